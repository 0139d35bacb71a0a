"""Shared pieces of the throughput benchmarks.

The models benchmarked, timing, FLOP counts from XLA's cost analysis, a measured matmul peak for
MFU, and the output table/JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from configs import cifar10_ddpm, default, moving_shapes, moving_shapes_cpu, tiny  # noqa: E402

# name -> (config builder, data shape, number of classes or None)
MODELS = {}


def _ddpm_cifar10():
    return cifar10_ddpm.get_config(), (32, 32, 3), None


def _dit_b2():
    config = default.get_config()
    config.model.name = "dit"
    config.model.dit.size = "B"
    config.model.dit.patch_size = 2
    config.model.dropout = 0.0
    config.diffusion.schedule = "ddpm_linear"
    config.diffusion.target = "eps"
    config.diffusion.label_dropout = 0.1
    return config, (32, 32, 4), 1000


def _sd15():
    config = default.get_config()
    config.model.name = "sd15"  # built by build() below: models.sd15_unet
    config.model.dropout = 0.0
    config.diffusion.schedule = "scaled_linear"
    config.diffusion.target = "eps"
    return config, (64, 64, 4), None


def _moving_shapes():
    config = moving_shapes.get_config()
    d = config.data
    return config, (d.frames, d.resolution, d.resolution, 3), None


def _moving_shapes_cpu():
    config = moving_shapes_cpu.get_config()
    d = config.data
    return config, (d.frames, d.resolution, d.resolution, 3), None


def _tiny():  # a seconds-long smoke test of the benchmarks themselves (tests/test_benchmarks.py)
    config = tiny.get_config()
    config.model.dropout = 0.1
    return config, (16, 16, 3), 3


MODELS["ddpm_cifar10"] = _ddpm_cifar10
MODELS["dit_b2"] = _dit_b2
MODELS["sd15"] = _sd15
MODELS["tiny"] = _tiny


def _tiny_video():  # the tiny model on 4-frame 16x16 clips with captions (the benchmarks' tests)
    config = tiny.get_config()
    config.data.name = "moving_shapes"
    config.data.captions = "auto"
    config.data.frames = 4
    config.data.resolution = 16
    config.text.width = 32
    config.text.depth = 1
    config.text.num_heads = 2
    config.text.max_length = 80
    return config, (4, 16, 16, 3), None


MODELS["tiny_video"] = _tiny_video
# The text-to-video presets: a factorised space-time UNet on [frames, R, R, 3] clips with its
# byte-level text encoder; their batches carry random caption tokens (see text_tokens).
MODELS["moving_shapes"] = _moving_shapes
MODELS["moving_shapes_cpu"] = _moving_shapes_cpu
# Models that cross-attend to text: the batch carries a random [77, 768] context (the output of
# SD's frozen CLIP text encoder, which is not part of what is timed, as in the PyTorch baseline).
CONTEXT = {"sd15": (77, 768)}


def build(name, dtype, batch, frames=None, **overrides):
    """The benchmark model ``name`` as a run would build it, its state initialised on the mesh.

    Returns ``(config, shape, num_classes, model, optimizer, mesh, abstract_state, state)``.
    ``overrides`` set config keys, e.g. ``training__steps_per_call=4``; ``frames`` a video
    model's clip length."""
    from diffusion_jax import run, train_state

    config, shape, num_classes, model, optimizer, abstract = build_abstract(
        name, dtype, batch, frames, **overrides)
    mesh = run.build_mesh(config)
    state = train_state.init_train_state(config, model, optimizer, shape, num_classes, mesh)
    return config, shape, num_classes, model, optimizer, mesh, abstract, state


def build_abstract(name, dtype, batch, frames=None, **overrides):
    """:func:`build` without a mesh or arrays.

    ``frames`` sets a video model's clip length (``config.data.frames``). Returns ``(config,
    shape, num_classes, model, optimizer, abstract_state)``."""
    from diffusion_jax import configuration, train_state
    from diffusion_jax import optimizer as optimizer_lib

    config, shape, num_classes = MODELS[name]()
    if frames is not None:
        if len(shape) != 4:
            raise ValueError(f"--frames sets a video model's clip length; {name!r} takes data of "
                             f"shape {shape}")
        shape = (int(frames),) + tuple(shape[1:])
        config.data.frames = int(frames)
    config.model.dtype = dtype
    config.data.batch_size = batch
    config.data.class_conditional = num_classes is not None
    for key, value in overrides.items():
        group, field = key.split("__")
        setattr(getattr(config, group), field, value)
    if name == "sd15":
        from diffusion_jax import models

        model = models.sd15_unet(dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                                 remat=bool(config.model.remat),
                                 attention=config.model.attention)
    else:  # with its text encoder for captioned data, as a run builds it
        model = configuration.build_denoiser(config, shape, num_classes)
    optimizer = optimizer_lib.optimizer_from_config(config)
    abstract = train_state.abstract_train_state(model, optimizer, shape, num_classes, config.seed)
    return config, shape, num_classes, model, optimizer, abstract


def text_tokens(config):
    """The caption length of a model with its own text encoder (a captioned run), else None."""
    from diffusion_jax import configuration

    return config.text.max_length if configuration.is_text_model(config) else None


def abstract_step_arguments(name, abstract, mesh, batch, shape, num_classes, control_shape=None,
                            tokens=None):
    """Abstract arguments of benchmark model ``name``'s train step on ``mesh``, for compiling.

    ``(state, batch, running metrics)`` as abstract arrays in their shardings, for compiling
    without data; with ``control_shape`` the batch holds control images (a ControlNet run's),
    with ``tokens`` (a length) caption tokens and their mask."""
    from diffusion_jax import parallel, train

    def placed(tree, sharding):  # every leaf in ``sharding`` (one, or a tree like ``tree``)
        shardings = (jax.tree_util.tree_map(lambda _: sharding, tree)
                     if isinstance(sharding, jax.sharding.Sharding) else sharding)
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    batch_struct = {"x": jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)}
    if num_classes:
        batch_struct["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if name in CONTEXT:
        batch_struct["context"] = jax.ShapeDtypeStruct((batch,) + CONTEXT[name], jnp.float32)
    if tokens:
        batch_struct["tokens"] = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
        batch_struct["token_mask"] = jax.ShapeDtypeStruct((batch, tokens), jnp.bool_)
    if control_shape is not None:
        batch_struct["control"] = jax.ShapeDtypeStruct((batch,) + tuple(control_shape),
                                                       jnp.float32)
    running = jax.eval_shape(lambda: {"metrics": train.TrainMetrics.empty(),
                                      "finite": jnp.asarray(True)})
    return (placed(abstract, parallel.state_shardings(mesh, abstract)),
            placed(batch_struct, parallel.batch_sharding(mesh)),
            placed(running, parallel.replicated(mesh)))


def accelerator() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()} x {device.device_kind} ({device.platform})"


def on_accelerator() -> bool:
    return jax.devices()[0].platform in ("gpu", "tpu")


def time_calls(fn, *, iterations: int, warmup: int = 2) -> float:
    """Seconds per call of ``fn()`` (which returns arrays), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    out = None
    for _ in range(iterations):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iterations


def forward_flops(model, shape, num_classes, context=None) -> float:
    """Matmul/convolution FLOPs of one image through the network's forward pass.

    Counted from the jaxpr (:mod:`diffusion_jax.flops`); a training step is counted as 3x this
    (forward, and backward with respect to activations and weights), the usual MFU convention."""
    from diffusion_jax import flops

    args = [jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32)]
    if num_classes:
        args.append(jax.ShapeDtypeStruct((1,), jnp.int32))
    variables = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)
    if not context:
        return flops.count_flops(lambda v, *a: model.apply(v, *a), variables, *args)
    text = jax.ShapeDtypeStruct((1,) + tuple(context), jnp.float32)
    return flops.count_flops(lambda v, c, *a: model.apply(v, *a, context=c), variables, text,
                             *args)


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled function by XLA's cost analysis (0 when unavailable).

    It misses cuDNN convolutions on GPU, so treat it as a lower bound there."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compiled_memory(compiled) -> dict:
    """Per-device memory of one call of a compiled function by XLA's memory analysis, in GB.

    ``inputs_gb`` (its arguments), ``temp_gb`` (what it allocates while running) and
    ``peak_gb`` (both, plus outputs that do not reuse a donated argument); {} when unavailable."""
    try:
        memory = compiled.memory_analysis()
        inputs, temp = memory.argument_size_in_bytes, memory.temp_size_in_bytes
        outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
    except Exception:  # some backends do not implement it
        return {}
    return {"inputs_gb": inputs / 1e9, "temp_gb": temp / 1e9,
            "peak_gb": (inputs + temp + outputs) / 1e9}


def matmul_peak_tflops(dtype=None) -> float:
    """Measured throughput of a large square matmul in TFLOP/s, the denominator of MFU.

    bf16 on GPU/TPU, float32 on a CPU (whose bf16 matmuls are emulated and slower)."""
    if dtype is None:
        dtype = jnp.bfloat16 if on_accelerator() else jnp.float32
    n = 8192 if on_accelerator() else 1024
    # Random operands, as the PyTorch baseline uses (constant ones draw less power and read
    # ~10% faster on an H100).
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    seconds = time_calls(lambda: matmul(a, b), iterations=20 if on_accelerator() else 3)
    return 2 * n ** 3 / seconds / 1e12


def profile_summary(run, steps: int, top: int = 20, directory: str = "") -> list:
    """Profile ``run()`` and return the ``top`` device operations by time.

    ``run()`` runs ``steps`` train steps and blocks; it is traced with the JAX profiler. Returns
    ``[{"op", "ms_per_step", "share", "calls"}]``. On a GPU these are the XLA ops of the device
    planes (fusions, convolutions, cuBLAS/cuDNN calls); on a CPU, the ops XLA's CPU client ran. The
    trace stays in ``directory`` (a temporary folder when empty) for TensorBoard/XProf."""
    import glob
    import tempfile

    directory = directory or tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(directory):
        run()
    paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        return []
    data = jax.profiler.ProfileData.from_file(paths[-1])
    totals, calls = {}, {}

    def add(events):
        for event in events:
            totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
            calls[event.name] = calls.get(event.name, 0) + 1

    devices = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in devices:  # one line of HLO ops per device, else its streams' kernels
        lines = list(plane.lines)
        chosen = ([line for line in lines if line.name == "XLA Ops"]
                  or [line for line in lines if line.name.startswith("Stream")]
                  or [line for line in lines if "Module" not in line.name])
        for line in chosen:
            add(line.events)
    if not devices:
        for plane in data.planes:
            if plane.name == "/host:CPU":
                for line in plane.lines:
                    if "XLA" in line.name and "Eigen" not in line.name:
                        add(event for event in line.events if event.duration_ns > 0
                            and not event.name.startswith("ThunkExecutor"))
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals, key=totals.get, reverse=True)[:top]
    return [{"op": name, "ms_per_step": totals[name] / 1e6 / steps,
             "share": totals[name] / whole, "calls": round(calls[name] / steps, 2)}
            for name in ranked]


def report(rows, columns, name, extra=None):
    """Print ``rows`` as a table and write them to benchmarks/results/<name>.json."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"device": accelerator(), "jax": jax.__version__,
                   "python": platform.python_version(), **(extra or {}), "rows": rows}, f,
                  indent=1)
    print(f"wrote {path}")


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def random_batch(shape, batch, num_classes, seed=0, context=None, tokens=None):
    """A batch of random data (and labels, a text context, or ``tokens`` caption tokens)."""
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)}
    if num_classes:
        out["label"] = rng.integers(0, num_classes, batch).astype(np.int32)
    if context:
        out["context"] = rng.standard_normal((batch,) + tuple(context)).astype(np.float32)
    if tokens:  # byte tokens of captions of random lengths, the rest padding
        lengths = rng.integers(tokens // 4, tokens + 1, batch)
        out["token_mask"] = np.arange(tokens)[None] < lengths[:, None]
        out["tokens"] = np.where(out["token_mask"], rng.integers(32, 127, (batch, tokens)),
                                 0).astype(np.int32)
    return out
