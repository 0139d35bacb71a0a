"""Training throughput: images/s of diffusion_jax's full training step, with FLOPs and MFU.

The step is the one ``train_and_evaluate`` runs (loss, gradients, clipping, AdamW, EMA and metric
accumulation, on the device mesh, donating the old state), fed from host numpy batches through the
same device prefetcher as training, with model FLOPs counted from the network's jaxpr and MFU
against a measured matmul peak (bf16 on GPU/TPU, float32 on a CPU).

    python benchmarks/train_throughput.py                           # both models, f32 and bf16
    python benchmarks/train_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --batch 256
    python benchmarks/train_throughput.py --steps-per-call 4 --remat --train-step shard_map
    python benchmarks/train_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --plain --profile
    python benchmarks/train_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --checkpoint
    python benchmarks/train_throughput.py --models ddpm_cifar10 --lora-rank 0 8  # full vs LoRA
    python benchmarks/train_throughput.py --models moving_shapes --dtypes bfloat16 --batch 64 \
        --frames 8 16 --remat                                    # text-to-video, clips/s

Models: the DDPM CIFAR-10 UNet (35.7M parameters, 32x32x3) and DiT-B/2 on 32x32x4 latents by
default; ``--models sd15`` adds Stable Diffusion 1.5's UNet (859.5M parameters, 64x64x4 latents,
cross-attention to a 77x768 context; use ``--batch 32`` to match the PyTorch baseline, with
``--attention auto`` or ``--remat``: with XLA's attention its bf16 step needs more memory per
device at that batch than an H100 has and than JAX takes of an H200 by default; see
``train_memory.py``).
Batches are random (the input pipeline's decoding is not what is measured). On a CPU the default
batch is 8 and few steps are timed; on a GPU or TPU, 128.

``--models moving_shapes`` (and ``moving_shapes_cpu``) time the text-to-video presets' step:
the space-time UNet with its text encoder on random clips and caption tokens (``images_per_s``
counts clips); ``--frames`` sets their length.

``--lora-rank 0 8`` times, for the same model and batch, full fine-tuning (rank 0) and the step of
an adapter run (``config.lora.rank`` 8 on ``--lora-targets``): the train state's parameters, EMA
and Adam moments are the adapters, the base (freshly initialised parameters, no trained run
needed) is held once, frozen, and the network runs on base + adapters. Each LoRA row carries
``speed_ratio`` (its steps/s over the full step's) and ``memory_ratio`` (its compiled
``peak_gb`` over the full step's). ``gflop_per_image`` (and so MFU) is the full step's count
on every row, a full-step-equivalent rate: the LoRA step computes no weight gradients of the
frozen kernels, and ``gflop_per_image_xla`` is what it compiles to.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax

from common import (CONTEXT, MODELS, accelerator, build, compiled_flops, compiled_memory,
                    forward_flops, matmul_peak_tflops, on_accelerator, profile_summary,
                    random_batch, report, text_tokens)
from diffusion_jax import parallel, train


def lora_state(config, model, optimizer, shape, num_classes, mesh):
    """``(abstract, state)`` of an adapter run (``config.lora``) on freshly initialised weights.

    The base is the model's initial parameters (as :func:`train_state.init_train_state` draws
    them, created in their shardings), then the adapter state is made around it as a run makes
    it (``lora_runs.make_state``, jitted into the state's shardings, the base donated)."""
    import functools

    import jax.numpy as jnp

    from diffusion_jax import lora_runs, run, train_state

    abstract = run.abstract_state(config, model, optimizer, shape, num_classes)
    shardings = parallel.state_shardings(mesh, abstract)
    base = jax.jit(lambda: train_state.create_train_state(
        model, optimizer, jnp.zeros((1,) + tuple(shape), jnp.float32), jax.random.key(config.seed),
        with_labels=num_classes is not None).params, out_shardings=shardings.frozen)()
    paths = lora_runs.adapter_paths(config, base)
    make = jax.jit(functools.partial(lora_runs.make_state, config, optimizer, paths),
                   out_shardings=shardings, donate_argnums=0)
    return abstract, make(base)


def measure(name, dtype, batch, iterations, *, steps_per_call=1, remat=False,
            train_step="jit", grad_accumulation=1, dropout_rng="threefry", attention="xla",
            state_layouts="auto", profile=False, profile_dir="", checkpoint=False, lora_rank=0,
            lora_targets="attention", frames=None):
    overrides = dict(training__steps_per_call=steps_per_call, mesh__train_step=train_step,
                     mesh__state_layouts=state_layouts,
                     training__grad_accumulation=grad_accumulation,
                     model__dropout_rng=dropout_rng, model__attention=attention)
    if remat:
        overrides["model__remat"] = True
    if lora_rank:
        from common import build_abstract
        from diffusion_jax import run

        overrides.update(lora__rank=lora_rank, lora__targets=lora_targets)
        config, shape, num_classes, model, optimizer, _ = build_abstract(
            name, dtype, batch, frames, **overrides)
        mesh = run.build_mesh(config)
        abstract, state = lora_state(config, model, optimizer, shape, num_classes, mesh)
    else:
        config, shape, num_classes, model, optimizer, mesh, abstract, state = build(
            name, dtype, batch, frames, **overrides)
    step = train.compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
    context = CONTEXT.get(name)
    host_batches = itertools.cycle([random_batch(shape, batch, num_classes, seed=i,
                                                 context=context, tokens=text_tokens(config))
                                    for i in range(4)])
    batches = parallel.DevicePrefetcher(host_batches, mesh, size=config.training.prefetch,
                                        stack=steps_per_call)
    running = train.empty_running_metrics(mesh)
    step, state = train.compile_train_step(step, state, next(batches), running)  # then timed
    xla_flops, memory = compiled_flops(step), compiled_memory(step)
    for _ in range(2):  # compile and warm up
        state, running = step(state, next(batches), running)
    jax.block_until_ready(running)
    calls = max(1, iterations // steps_per_call)
    start = time.perf_counter()
    for _ in range(calls):
        state, running = step(state, next(batches), running)
    jax.block_until_ready(running)
    seconds = (time.perf_counter() - start) / (calls * steps_per_call)  # per train step
    ops = None
    if profile:
        def run():
            nonlocal state, running
            for _ in range(max(1, 5 // steps_per_call)):
                state, running = step(state, next(batches), running)
            jax.block_until_ready(running)

        ops = profile_summary(run, max(1, 5 // steps_per_call) * steps_per_call,
                              directory=profile_dir)
    stall = None
    if checkpoint:
        def run_calls():
            nonlocal state, running
            for _ in range(calls):
                state, running = step(state, next(batches), running)

        stall = checkpoint_stall(lambda: state, run_calls, calls * steps_per_call * seconds,
                                 lambda: jax.block_until_ready(running))
    params = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
    frozen = sum(x.size for x in jax.tree_util.tree_leaves(abstract.frozen))
    train_flops = 3 * forward_flops(model, shape, num_classes, context)  # per image
    return {"model": name, "dtype": dtype, "batch": batch,
            "frames": shape[0] if len(shape) == 4 else None, "params": int(params),
            "frozen_params": int(frozen), "lora_rank": lora_rank,
            "lora_targets": lora_targets if lora_rank else None,
            "steps_per_call": steps_per_call, "remat": remat, "train_step": train_step,
            "dropout_rng": dropout_rng, "attention": attention, "state_layouts": state_layouts,
            "images_per_s": batch / seconds, "steps_per_s": 1 / seconds,
            "step_ms": 1e3 * seconds,
            "gflop_per_image": train_flops / 1e9,
            "achieved_tflops": train_flops * batch / seconds / 1e12,
            "gflop_per_image_xla": xla_flops / steps_per_call / batch / 1e9 if xla_flops else None,
            "profile": ops, **memory, **(stall or {})}


def checkpoint_stall(current_state, run_calls, steady_seconds, sync, saves=3):
    """What an asynchronous checkpoint costs the training loop, as a run saves.

    The seconds the save call blocks (waiting for the step, copying the state to host memory) and
    the seconds the same number of steps takes longer than ``steady_seconds`` when a save starts
    before them (blocking plus whatever the background write takes from the loop), averaged over
    ``saves`` saves to a temporary folder. The write is awaited before the next save, outside the
    timing. ``current_state()`` returns the state to save; ``run_calls()`` runs the timed steps."""
    import shutil
    import tempfile

    from diffusion_jax import checkpoints

    directory = tempfile.mkdtemp(prefix="checkpoint_stall_")
    manager = checkpoints.Checkpoints(directory, fingerprint={"benchmark": True}, max_to_keep=1)
    blocking, extra, writes = [], [], []
    try:
        for i in range(saves):
            sync()
            start = time.perf_counter()
            manager.save(i + 1, current_state())  # the steps donate the state they take
            blocking.append(time.perf_counter() - start)
            run_calls()
            sync()
            extra.append(time.perf_counter() - start - steady_seconds)
            manager.wait()
            writes.append(time.perf_counter() - start)
    finally:
        manager.close()
        shutil.rmtree(directory, ignore_errors=True)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"save_blocking_s": mean(blocking), "save_stall_s": mean(extra),
            "save_until_written_s": mean(writes)}


def measure_plain(name, dtype, batch, iterations):
    """Throughput of a plain, untuned jit train step of the same network.

    A same-card reference for what the full step adds: the fixed batch is its own target at fixed
    noise levels (as the PyTorch baseline times it), AdamW, dropout on, and no EMA, clipping,
    metrics, noise drawing or data feed."""
    import jax.numpy as jnp
    import optax

    config, shape, num_classes, model, _, mesh, abstract, state = build(name, dtype, batch)
    optimizer = optax.adamw(1e-4)
    params = state.params
    opt_state = optimizer.init(params)
    host = random_batch(shape, batch, num_classes, context=CONTEXT.get(name))
    x = jnp.asarray(host["x"])
    noise_level = jnp.linspace(0.0, 1.0, batch)
    extra = {}
    if num_classes:
        extra["labels"] = jnp.asarray(host["label"])
    if "context" in host:
        extra["context"] = jnp.asarray(host["context"])

    def loss_fn(p, key):
        out = model.apply({"params": p}, x, noise_level, train=True, rngs={"dropout": key},
                          **extra)
        return jnp.mean((out.astype(jnp.float32) - x) ** 2)

    def step(p, o, i):
        grads = jax.grad(loss_fn)(p, jax.random.fold_in(jax.random.key(0), i))
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    step = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, 0).compile()
    for i in range(2):
        params, opt_state = step(params, opt_state, i)
    jax.block_until_ready(params)
    start = time.perf_counter()
    for i in range(iterations):
        params, opt_state = step(params, opt_state, i)
    jax.block_until_ready(params)
    seconds = (time.perf_counter() - start) / iterations
    train_flops = 3 * forward_flops(model, shape, num_classes, CONTEXT.get(name))
    return {"model": name, "dtype": dtype, "batch": batch, "train_step": "plain",
            "params": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
            "images_per_s": batch / seconds, "step_ms": 1e3 * seconds,
            "gflop_per_image": train_flops / 1e9,
            "achieved_tflops": train_flops * batch / seconds / 1e12}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ddpm_cifar10", "dit_b2"],
                        choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--steps-per-call", type=int, default=1)
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--train-step", choices=["jit", "shard_map"], default="jit")
    parser.add_argument("--dropout-rng", choices=["threefry", "rbg"], default="threefry",
                        help="generator of the dropout masks (model.dropout_rng)")
    parser.add_argument("--attention", choices=["xla", "cudnn", "auto"], default="xla",
                        help="attention kernel (model.attention)")
    parser.add_argument("--state-layouts", nargs="+", choices=["auto", "default"],
                        default=["auto"],
                        help="device layouts of the train state (mesh.state_layouts); give both "
                             "to compare them")
    parser.add_argument("--plain", action="store_true",
                        help="also time a plain jit train step of the same network (no EMA, "
                             "clipping, metrics or data feed), as a same-card reference")
    parser.add_argument("--profile", action="store_true",
                        help="trace 5 more steps and print the device ops that take the time")
    parser.add_argument("--profile-dir", default="", help="keep the trace here (for XProf)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="also measure what an asynchronous checkpoint save costs the loop: "
                             "seconds blocked in the save call and seconds lost over the timed "
                             "steps that follow it (save_blocking_s, save_stall_s)")
    parser.add_argument("--lora-rank", nargs="+", type=int, default=[0],
                        help="0: full training; r > 0: LoRA adapters of rank r on a frozen base "
                             "(config.lora.rank); e.g. 0 8 times both and their ratio")
    parser.add_argument("--lora-targets", default="attention",
                        help="the kernels LoRA adapts (config.lora.targets)")
    parser.add_argument("--frames", nargs="+", type=int, default=[None],
                        help="a video model's clip lengths (moving_shapes, moving_shapes_cpu)")
    parser.add_argument("--name", default="train_throughput", help="results file stem")
    args = parser.parse_args(argv)
    if any(rank < 0 for rank in args.lora_rank):
        parser.error(f"--lora-rank takes 0 (full) or a positive rank, got {args.lora_rank}")
    if any(args.lora_rank) and args.train_step == "shard_map":
        parser.error("LoRA steps compute their gradients with --train-step jit")
    batch = args.batch or (128 if on_accelerator() else 8)
    iterations = args.iterations or (60 if on_accelerator() else 3)
    print(f"device: {accelerator()}, jax {jax.__version__}")
    peak = matmul_peak_tflops()
    print(f"measured matmul peak: {peak:.2f} TFLOP/s")
    rows = []
    for name in args.models:
        if args.frames != [None] and len(MODELS[name]()[1]) != 4:
            parser.error(f"--frames sets a video model's clip length; {name!r} is not one "
                         "(video models: moving_shapes, moving_shapes_cpu, tiny_video)")
    for name, dtype in itertools.product(args.models, args.dtypes):
        for layouts, rank, frames in itertools.product(args.state_layouts, args.lora_rank,
                                                       args.frames):
            row = measure(name, dtype, batch, iterations, frames=frames,
                          steps_per_call=args.steps_per_call,
                          remat=args.remat, train_step=args.train_step,
                          grad_accumulation=args.grad_accumulation,
                          dropout_rng=args.dropout_rng, attention=args.attention,
                          state_layouts=layouts, profile=args.profile,
                          profile_dir=args.profile_dir, checkpoint=args.checkpoint,
                          lora_rank=rank, lora_targets=args.lora_targets)
            ops = row.pop("profile")
            row["mfu"] = row["achieved_tflops"] / peak
            full = [r for r in rows if r["model"] == name and r["dtype"] == dtype
                    and r.get("state_layouts") == layouts and r.get("lora_rank") == 0
                    and r.get("frames") == row["frames"]]
            if rank and full:  # LoRA over full fine-tuning, same model, batch and options
                row["speed_ratio"] = row["steps_per_s"] / full[0]["steps_per_s"]
                if row.get("peak_gb") and full[0].get("peak_gb"):
                    row["memory_ratio"] = row["peak_gb"] / full[0]["peak_gb"]
            rows.append(row)
            print(row, flush=True)
            if "speed_ratio" in row:
                print(f"{name} {dtype} batch {batch}: LoRA rank {rank} ({args.lora_targets}) / "
                      f"full: {row['speed_ratio']:.3f}x steps/s ({row['steps_per_s']:.3g} vs "
                      f"{full[0]['steps_per_s']:.3g}), "
                      f"{row.get('memory_ratio', float('nan')):.3f}x peak memory", flush=True)
            if ops:
                row["profile"] = ops
                what = f" LoRA rank {rank}" if rank else ""
                print(f"where the time of one {name} {dtype}{what} step goes (top {len(ops)} "
                      "ops):")
                for op in ops:
                    print(f"  {op['ms_per_step']:8.3f} ms  {100 * op['share']:5.1f}%  "
                          f"x{op['calls']:<5g} {op['op'][:90]}")
        if args.plain:
            plain = measure_plain(name, dtype, batch, iterations)
            plain["mfu"] = plain["achieved_tflops"] / peak
            rows.append(plain)
            print(plain, flush=True)
    columns = ["model", "dtype", "batch", "steps_per_call", "train_step", "remat",
               "dropout_rng", "attention", "state_layouts", "params",
               "images_per_s", "step_ms", "gflop_per_image", "achieved_tflops", "mfu",
               "gflop_per_image_xla", "peak_gb", "save_blocking_s", "save_stall_s"]
    if any(row.get("frames") for row in rows):
        columns[3:3] = ["frames"]
    flops_note = ("gflop_per_image = 3 x forward matmul/conv FLOPs counted from the jaxpr; XLA's "
                  "cost analysis misses cuDNN convolutions on GPU")
    if args.lora_rank != [0]:
        columns[9:9] = ["lora_rank"]
        columns[columns.index("peak_gb") + 1:columns.index("peak_gb") + 1] = [
            "inputs_gb", "temp_gb", "speed_ratio", "memory_ratio"]
        flops_note += ("; on LoRA rows too (a full-step-equivalent rate: the LoRA step computes "
                       "no weight gradients of frozen kernels, gflop_per_image_xla counts what "
                       "it runs)")
    report(rows, columns, args.name,
           {"matmul_peak_tflops": peak,
            "matmul_peak_dtype": "bfloat16" if on_accelerator() else "float32",
            "flops_note": flops_note})


if __name__ == "__main__":
    main()
