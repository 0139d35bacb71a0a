"""What one training step (and one sampler call) compiles to, for this machine or a target GPU.

Device kernels, their kinds, copies, loops and bytes, on this machine's backend or, without a GPU,
as XLA compiles them for an H100 or H200. Timings need the card; this shows the structure that costs
time on it (every kernel is a launch of a few microseconds, every copy is memory traffic), so a
change can be judged between the sessions that have one.

    python benchmarks/compiled_kernels.py                           # this machine's backend
    python benchmarks/compiled_kernels.py --target h100 --plain      # an H100, without a GPU
    python benchmarks/compiled_kernels.py --target h200 --models dit_b2 --state-layouts default

``--target`` needs JAX's CUDA plugin of the installed jax version, with its CUDA libraries
(several GB; no GPU or driver is needed)::

    pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"

The compiler cannot autotune without the card, so convolution algorithms and matmul tilings
may differ from a real compile; kernel counts, layouts, copies and fusion are the same passes.
If it fails choosing Triton tile sizes ("Couldn't find output tile sizes", seen for SD 1.5),
run it with ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` (cuBLAS matmuls instead).
``--plain`` adds the plain step of ``train_throughput.py --plain`` (AdamW on a fixed batch) and
``--sample`` one guided DDIM call of 50 steps, with parameters in default layouts (as restored
from a checkpoint); ``--attention auto`` compiles cuDNN's fused attention where it applies on
the target (JAX is told the target's compute capability, which sets the head sizes cuDNN takes:
up to 256 on Hopper, so the DDPM UNet's 256-wide head qualifies). Counted are the entry
computation and loop bodies, and the bytes their kernels read and write (``gb_moved``;
``gb_moved_by_memory_kernels`` leaves out matmuls, convolutions and fused attention: what the
card's bandwidth bounds).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

# The GPU targets' descriptions (XLA's GpuTargetConfig) for compiling without the device.
_TARGET = """gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _TARGET.format(bandwidth=3_352_320_000_000, memory=84_929_347_584,
                           name="NVIDIA H100 80GB HBM3"),
    "h200": _TARGET.format(bandwidth=4_800_000_000_000, memory=150_121_545_728,
                           name="NVIDIA H200"),
}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<type>.+?) "
                          r"(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
# An operand: an optional inline type, then its name.
_OPERAND = re.compile(r"(?:((?:pred|[suf]\d+|bf16)\[[\d,]*\](?:\{[^}]*\})?)\s+)?%([\w.\-]+)")
# Kernels that do the model's arithmetic (matmuls, convolutions, fused attention); the others
# move memory (elementwise, reductions, copies) and are bounded by the card's bandwidth.
_ARITHMETIC = ("gemm", "cublas", "cudnn$conv", "fmha", "convolution", "dot")
# Instructions that launch nothing: views, tuples, parameters and constants.
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
         "opt-barrier", "partition-id", "replica-id"}


def _bytes(type_text):
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES.get(dtype, 4)
    return total


def kernel_summary(hlo_text):
    """Count what an optimised HLO module launches.

    The non-free instructions of its entry computation and of the bodies of its loops (fusion bodies
    are inside their kernel). Returns a dict of counts; ``kernels_in_loops`` are those that run once
    per iteration (a sampler's steps). ``gb_moved`` is what the kernels read and write (each operand
    once and the output, a loop body counted once), ``gb_moved_by_memory_kernels`` the part of it
    that kernels other than matmuls, convolutions and fused attention move: at the card's bandwidth,
    a lower bound on their time."""
    computations, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    executed, loops = [entry], 0
    for name in executed:  # grows as loop bodies are found
        for line in computations.get(name, []):
            if " while(" in line:
                loops += 1
                executed += re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)
    kinds = collections.Counter()
    small = copies = copy_bytes = in_loops = 0
    moved = moved_by_memory = 0
    for name in executed:
        types = {}
        for line in computations.get(name, []):
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            out_type, op, rest = match.group("type", "op", "rest")
            types[match.group("name")] = out_type
            if op in _FREE or op == "while":
                continue
            depth, end = 0, len(rest)
            for i, char in enumerate(rest):  # the operand list ends at its closing parenthesis
                depth += char == "("
                if char == ")":
                    if not depth:
                        end = i
                        break
                    depth -= 1
            operands = {}
            for inline, operand in _OPERAND.findall(rest[:end]):
                operands.setdefault(operand, inline or types.get(operand, ""))
            traffic = _bytes(out_type) + sum(_bytes(t) for t in operands.values())
            if op == "fusion":
                kind = re.search(r"kind=(\w+)", rest).group(1)
                custom = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', rest)
                label = f"fusion {kind}" + (f" {custom.group(1)}" if custom else "")
            elif op == "custom-call":
                label = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
            else:
                label = op
            kinds[label] += 1
            size = _bytes(out_type)
            small += size < 2 ** 20
            in_loops += name != entry
            if op == "copy":
                copies, copy_bytes = copies + 1, copy_bytes + size
            moved += traffic
            if not any(word in label for word in _ARITHMETIC):
                moved_by_memory += traffic
    return {"kernels": sum(kinds.values()), "small_kernels": small, "copies": copies,
            "copy_mb": copy_bytes / 2 ** 20, "loops": loops, "kernels_in_loops": in_loops,
            "gb_moved": moved / 1e9, "gb_moved_by_memory_kernels": moved_by_memory / 1e9,
            "kinds": dict(kinds.most_common())}


def _assume_compute_capability(target):
    """Make JAX choose cuDNN attention's head sizes for ``target`` instead of the local GPU.

    JAX decides which head sizes cuDNN attention takes from the local GPU's compute capability (up
    to 256 from Hopper on, 128 before) and, with no GPU here, takes the older limit. Give it the
    target's instead, so that ``--attention auto`` compiles what it would on the card. Private JAX
    API: if it has moved, the older limit stays and this says so."""
    match = re.search(r"cuda_compute_capability \{ major: (\d+)(?: minor: (\d+))? \}",
                      TARGETS[target])
    capability = (int(match.group(1)), int(match.group(2) or 0))
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    except ImportError:
        cudnn_attention = None
    if not hasattr(cudnn_attention, "check_compute_capability"):
        print("note: cuDNN attention is judged as for a GPU before Hopper (head size <= 128)")
        return
    cudnn_attention.check_compute_capability = lambda needed: capability >= tuple(
        int(x) for x in needed.split("."))


def _devices(target):
    import jax

    if not target:
        return jax.devices()[:1]
    from jax.experimental import topologies

    _assume_compute_capability(target)

    topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                            topology="1x1x1")
    return topology.devices


def _abstract(tree, sharding):
    import jax

    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding(a)), tree)


def compile_programs(name, dtype, batch, *, devices, state_layouts="auto", plain=False,
                     sample_steps=0, attention="xla"):
    """Compile benchmark model ``name``'s train step (and other programs) for ``devices``.

    The full train step, and optionally the plain step and a sampler call, compiled without
    arrays; returns {program: compiled}.
    ``attention`` is model.attention, with kernels chosen for the devices' platform."""
    from diffusion_jax.models import layers

    with layers.compiling_for(devices[0].platform):
        return _compile_programs(name, dtype, batch, devices=devices,
                                 state_layouts=state_layouts, plain=plain,
                                 sample_steps=sample_steps, attention=attention)


def _compile_programs(name, dtype, batch, *, devices, state_layouts, plain, sample_steps,
                      attention):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from common import abstract_step_arguments, build_abstract
    from diffusion_jax import generate, parallel, train

    config, shape, num_classes, model, optimizer, abstract = build_abstract(
        name, dtype, batch, mesh__state_layouts=state_layouts, model__attention=attention)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 1), parallel.AXES)
    replicated = parallel.replicated(mesh)
    state, batch_struct, running = abstract_step_arguments(name, abstract, mesh, batch, shape,
                                                           num_classes)
    step = train.compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
    programs = {"train": step.lower(state, batch_struct, running).compile()}
    if plain:
        adamw = optax.adamw(1e-4)
        params = _abstract(abstract.params, lambda a: replicated)
        opt_state = _abstract(jax.eval_shape(adamw.init, abstract.params), lambda a: replicated)

        def plain_step(p, o, key, x, t):
            def loss(p):
                out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
                return jnp.mean((out.astype(jnp.float32) - x) ** 2)

            updates, o = adamw.update(jax.grad(loss)(p), o, p)
            return optax.apply_updates(p, updates), o

        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
        t = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=replicated)
        programs["plain"] = jax.jit(plain_step, donate_argnums=(0, 1)).lower(
            params, opt_state, key, batch_struct["x"], t).compile()
    if sample_steps:
        config.sampling.method, config.sampling.num_steps = "ddim", sample_steps
        config.sampling.guidance_scale = 2.0
        generate_fn = jax.jit(generate.make_generate_fn(config, model, shape, num_classes,
                                                        mesh=mesh), static_argnums=2)
        params = _abstract(abstract.ema_params, lambda a: replicated)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
        programs["sample"] = generate_fn.lower(params, key, batch).compile()
    return programs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default=None,
                        help="compile for this GPU without one (needs the CUDA plugin)")
    parser.add_argument("--models", nargs="+", default=["ddpm_cifar10"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--state-layouts", nargs="+", choices=["auto", "default"],
                        default=["auto"], help="mesh.state_layouts; give both to compare")
    parser.add_argument("--plain", action="store_true", help="also the plain train step")
    parser.add_argument("--sample", action="store_true",
                        help="also one guided DDIM call of 50 steps at the same batch")
    parser.add_argument("--attention", choices=["xla", "cudnn", "auto"], default="xla",
                        help="model.attention, chosen for the target's platform")
    parser.add_argument("--dump", default="", help="write each optimised HLO module here")
    parser.add_argument("--name", default="compiled_kernels", help="results file stem")
    args = parser.parse_args(argv)
    if args.target:
        # The plugin's version check asks the CUDA driver, which a machine without a GPU lacks.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax

    from common import MODELS, report

    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    try:
        devices = _devices(args.target)
    except Exception as err:  # noqa: BLE001 - any failure here means the plugin is unusable
        sys.exit(f"cannot compile for {args.target} here ({type(err).__name__}: {err}); "
                 "install JAX's CUDA plugin of this jax version (see this script's docstring)")
    where = "without the device" if args.target else jax.devices()[0].platform
    print(f"compiling for {devices[0].device_kind} ({where}), jax {jax.__version__}")
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            for i, layouts in enumerate(args.state_layouts):
                programs = compile_programs(
                    name, dtype, args.batch, devices=devices, state_layouts=layouts,
                    plain=args.plain and i == 0, sample_steps=50 if args.sample and i == 0 else 0,
                    attention=args.attention)
                for program, compiled in programs.items():
                    text = compiled.as_text()
                    if args.dump:
                        os.makedirs(args.dump, exist_ok=True)
                        with open(os.path.join(args.dump, f"{name}_{dtype}_{program}_{layouts}"
                                               ".hlo.txt"), "w") as f:
                            f.write(text)
                    summary = kernel_summary(text)
                    rows.append({"model": name, "dtype": dtype, "batch": args.batch,
                                 "program": program, "attention": args.attention,
                                 "state_layouts": layouts if program == "train" else "",
                                 **summary})
                    top = ", ".join(f"{k} {v}" for k, v in list(summary["kinds"].items())[:6])
                    print(f"{name} {dtype} {program} {rows[-1]['state_layouts']}: "
                          f"{summary['kernels']} kernels ({top}), "
                          f"{summary['gb_moved']:.1f} GB moved", flush=True)
    report(rows, ["model", "dtype", "batch", "program", "attention", "state_layouts", "kernels",
                  "small_kernels", "copies", "copy_mb", "loops", "kernels_in_loops", "gb_moved",
                  "gb_moved_by_memory_kernels"], args.name,
           {"target": args.target or jax.devices()[0].platform})


if __name__ == "__main__":
    main()
