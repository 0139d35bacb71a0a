"""Device memory of the full training step, by mesh and option, from XLA's memory analysis.

What each device holds and allocates for one step, as the compiled step states it. Nothing is run,
so a CPU answers for 8 or 64 devices it does not have (fake CPU devices) and for models that would
not fit it, and the options that trade speed for memory (``--remat``, ``--grad-accumulation``,
``mesh.fsdp``, ``--attention auto``) can be weighed before a run.

    python benchmarks/train_memory.py                                # DDPM UNet, bf16, batch 128
    python benchmarks/train_memory.py --meshes 1x1 8x1 1x8 2x4 --remat both --grad-accumulation 1 4
    python benchmarks/train_memory.py --target h100 --models sd15 --batch 32 --remat both
    python benchmarks/train_memory.py --models sd15 --batch 2 --lora-rank 0 8  # full vs LoRA
    python benchmarks/train_memory.py --models sd15 --batch 2 --controlnet    # full vs ControlNet
    python benchmarks/train_memory.py --models moving_shapes --batch 64 --frames 8 16 32 64 \
        --remat both --meshes 1x1 1x8                                   # frames that fit

Per device, in GB: ``inputs_gb`` is what the step is given (its share of parameters, EMA, Adam
moments, batch and metrics), ``temp_gb`` what it allocates while it runs (activations kept for the
backward pass, gradients, parameters gathered over fsdp), and ``peak_gb`` both, plus outputs that
do not reuse a donated input. A mesh is ``DATAxFSDP`` (``config.mesh.data`` x ``config.mesh.fsdp``).
On a CPU, meshes of more devices than it has are simulated (XLA's fake host devices); on a GPU or
TPU they must exist. ``--target h100|h200`` compiles for that GPU without one (one device; needs
JAX's CUDA plugin, see ``compiled_kernels.py``). The numbers are the given compiler's, and another
backend fuses, schedules and pads differently: XLA's CPU compiler keeps more float32 temporaries
in a bfloat16 step than a GPU's and realises little of what remat saves (docs/benchmarks.md has
figures). Read a CPU's numbers for meshes and trends, and the target's for a card.

``--lora-rank 0 8`` compiles, for the same model, batch and options, the full fine-tuning step
(rank 0) and the step of an adapter run (``config.lora.rank`` 8 on ``--lora-targets``, a preset
of ``diffusion_jax.lora.PRESETS`` or regular expressions, comma-separated): its state is the
adapters, their EMA and Adam moments, and the frozen base held once (``run.abstract_state``; the
base needs no weights here, only its shapes). ``state_gb`` and ``frozen_gb`` are the state's and
the base's bytes per device (part of ``inputs_gb``), ``params`` counts what is trained (the
adapters' factors) and ``frozen_params`` the base. Each LoRA row carries ``inputs_ratio``,
``temp_ratio`` and ``peak_ratio``: its numbers over the full step's with the same settings.

``--frames 8 16 32`` compiles a video model (``moving_shapes``: the text-to-video preset's
space-time UNet and text encoder, 32x32 frames; ``moving_shapes_cpu``) for each clip length, so
the frame count that fits a device, with or without remat and fsdp, can be read before a run;
the batch carries random caption tokens.

``--controlnet`` adds, for the same settings, the step of a ControlNet run (``config.controlnet``:
a copy of the UNet's encoder trained on the frozen base, each example with a control image, 8x
the latents' size for ``sd15``); its row (``trains`` "controlnet") gets the same columns and
ratios as a LoRA row.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re


# XLA's CPU compiler orders a program for concurrency by default, at the cost of memory (the DDPM
# UNet's bf16 step at batch 128: 9.2 GB of temporaries, 7.1 ordered for memory); accelerator
# compilers order for memory, and so does this script's CPU compiler. Read when the CPU backend
# starts, so main() sets it before JAX does (compile options do not reach it).
CPU_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def parse_mesh(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"a mesh is DATAxFSDP, e.g. 8x1 or 2x4, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def step_memory(name, dtype, batch, *, devices, data=1, fsdp=1, remat=False,
                grad_accumulation=1, train_step="jit", attention="xla", lora_rank=0,
                lora_targets="attention", controlnet=False, frames=None):
    """Per-device memory in GB of benchmark model ``name``'s full training step on a mesh.

    The step is compiled for a ``data`` x ``fsdp`` mesh of ``devices`` (abstract arrays only).
    ``lora_rank`` > 0 compiles an adapter run's step instead: adapters of that rank on the
    kernels ``lora_targets`` selects, the base frozen (``config.lora``); ``controlnet`` that of
    a ControlNet run on the frozen base. ``frames`` sets a video model's clip length."""
    import jax
    import numpy as np

    from common import abstract_step_arguments, build_abstract, compiled_memory, text_tokens
    from diffusion_jax import controlnet_runs, parallel, run, train
    from diffusion_jax.models import layers

    frozen = dict(lora__rank=lora_rank, lora__targets=lora_targets) if lora_rank else {}
    if controlnet:
        frozen = dict(controlnet__control="canny")
    config, shape, num_classes, model, optimizer, abstract = build_abstract(
        name, dtype, batch, frames, model__remat=remat, model__attention=attention,
        training__grad_accumulation=grad_accumulation, mesh__train_step=train_step,
        mesh__data=data, mesh__fsdp=fsdp, **frozen)
    control_shape = None
    if controlnet:  # the base's UNet guided by a fresh ControlNet
        model = controlnet_runs.wrap_model(config, model, 8 if name == "sd15" else 1)
        control_shape = controlnet_runs.control_shape(model, shape)
    if frozen:  # what is trained, its EMA and moments, and the base once (shapes only)
        abstract = run.abstract_state(config, model, optimizer, shape, num_classes)
    mesh = parallel.make_mesh(data, fsdp, devices[:data * fsdp])
    arguments = abstract_step_arguments(name, abstract, mesh, batch, shape, num_classes,
                                        control_shape=control_shape,
                                        tokens=text_tokens(config))
    with layers.compiling_for(devices[0].platform):
        step = train.compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
        compiled = step.lower(*arguments).compile()

    def count(tree):
        return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))

    def device_gb(tree):  # bytes of one device's shards
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(tree)) / 1e9

    state = arguments[0]
    return {"model": name, "dtype": dtype, "batch": batch,
            "frames": shape[0] if len(shape) == 4 else None, "mesh": f"{data}x{fsdp}",
            "train_step": train_step, "remat": remat, "grad_accumulation": grad_accumulation,
            "trains": ("controlnet" if controlnet else f"lora {lora_rank}" if lora_rank
                       else "full"),
            "lora_rank": lora_rank, "lora_targets": lora_targets if lora_rank else None,
            "params": count(abstract.params), "frozen_params": count(abstract.frozen),
            "state_gb": device_gb(state), "frozen_gb": device_gb(state.frozen),
            **compiled_memory(compiled)}


def add_ratios(rows):
    """Give each LoRA or ControlNet row its memory over the full step's of the same settings
    (if measured)."""
    keys = ("model", "dtype", "batch", "frames", "mesh", "train_step", "remat",
            "grad_accumulation")
    full = {tuple(r[k] for k in keys): r for r in rows if r["trains"] == "full"}
    for row in rows:
        reference = full.get(tuple(row[k] for k in keys))
        if row["trains"] != "full" and reference:
            for part in ("inputs", "temp", "peak"):
                if f"{part}_gb" in row and reference.get(f"{part}_gb"):
                    row[f"{part}_ratio"] = row[f"{part}_gb"] / reference[f"{part}_gb"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ddpm_cifar10"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--meshes", nargs="+", type=parse_mesh, default=[(1, 1)],
                        metavar="DATAxFSDP", help="e.g. 1x1 8x1 1x8 2x4")
    parser.add_argument("--remat", choices=["off", "on", "both"], default="off")
    parser.add_argument("--grad-accumulation", nargs="+", type=int, default=[1])
    parser.add_argument("--train-step", nargs="+", choices=["jit", "shard_map"], default=["jit"])
    parser.add_argument("--attention", choices=["xla", "cudnn", "auto"], default="xla")
    parser.add_argument("--target", choices=["h100", "h200"], default=None,
                        help="compile for this GPU without one (one device; needs the plugin)")
    parser.add_argument("--lora-rank", nargs="+", type=int, default=[0],
                        help="0: the full step; r > 0: LoRA adapters of rank r on a frozen "
                             "base (config.lora.rank); e.g. 0 8 compares them")
    parser.add_argument("--lora-targets", default="attention",
                        help="the kernels LoRA adapts (config.lora.targets)")
    parser.add_argument("--controlnet", action="store_true",
                        help="also compile a ControlNet run's step (config.controlnet) for each "
                             "setting")
    parser.add_argument("--frames", nargs="+", type=int, default=[None],
                        help="a video model's clip lengths, e.g. 8 16 32 (moving_shapes: the "
                             "frame count that fits a device)")
    parser.add_argument("--name", default="train_memory", help="results file stem")
    args = parser.parse_args(argv)
    if any(rank < 0 for rank in args.lora_rank):
        parser.error(f"--lora-rank takes 0 (full) or a positive rank, got {args.lora_rank}")
    if (any(args.lora_rank) or args.controlnet) and "shard_map" in args.train_step:
        parser.error("LoRA and ControlNet steps compute their gradients with --train-step jit")
    needed = max(data * fsdp for data, fsdp in args.meshes)
    if args.target and needed > 1:
        parser.error("--target compiles for one device: use --meshes 1x1")
    for steps in args.grad_accumulation:
        if steps < 1:
            parser.error(f"--grad-accumulation must be >= 1, got {steps}")
        for data, fsdp in args.meshes:  # as training checks it (run.build_mesh)
            if args.batch % (data * fsdp * steps):
                parser.error(f"--batch {args.batch} does not split into {steps} microbatch(es) "
                             f"on each device of the {data}x{fsdp} mesh; use a multiple of "
                             f"{data * fsdp * steps}")
    if args.target:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    else:  # in case this machine's backend is the CPU: set before JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
            flags += " " + CPU_FLAGS
        if needed > 1 and "xla_force_host_platform_device_count" not in flags:
            flags += f" --xla_force_host_platform_device_count={needed}"  # fake CPU devices
        os.environ["XLA_FLAGS"] = flags.strip()
    import jax

    from common import MODELS, report
    from compiled_kernels import _devices

    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        if args.frames != [None] and len(MODELS[model]()[1]) != 4:
            parser.error(f"--frames sets a video model's clip length; {model!r} is not one "
                         "(video models: moving_shapes, moving_shapes_cpu, tiny_video)")
    if any(frames is not None and frames < 1 for frames in args.frames):
        parser.error(f"--frames takes clip lengths >= 1, got {args.frames}")
    devices = _devices(args.target) if args.target else jax.devices()
    if needed > len(devices):
        how = ("XLA_FLAGS sets --xla_force_host_platform_device_count lower: raise it or leave it "
               "out" if devices[0].platform == "cpu" else "with JAX_PLATFORMS=cpu the CPU "
               "simulates them")
        parser.error(f"a {needed}-device mesh needs {needed} devices; this machine has "
                     f"{len(devices)} {devices[0].platform} devices ({how})")
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    where = f"{args.target}, without the device" if args.target else devices[0].platform
    print(f"compiling for {devices[0].device_kind} ({where}), jax {jax.__version__}")
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            for data, fsdp in args.meshes:
                for train_step in args.train_step:
                    for remat in remats:
                        kinds = [(rank, False) for rank in args.lora_rank]
                        if args.controlnet:
                            kinds.append((0, True))
                        for frames, steps, (rank, control) in itertools.product(
                                args.frames, args.grad_accumulation, kinds):
                            rows.append(step_memory(
                                name, dtype, args.batch, devices=devices, data=data, fsdp=fsdp,
                                remat=remat, grad_accumulation=steps, train_step=train_step,
                                attention=args.attention, lora_rank=rank,
                                lora_targets=args.lora_targets, controlnet=control,
                                frames=frames))
                            add_ratios(rows)
                            print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else
                                            f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    columns = ["model", "dtype", "batch", "mesh", "train_step", "remat", "grad_accumulation",
               "inputs_gb", "temp_gb", "peak_gb"]
    if args.lora_rank != [0] or args.controlnet:
        columns[7:7] = ["trains", "params", "frozen_params", "state_gb", "frozen_gb"]
    if any(row["frames"] for row in rows):
        columns[3:3] = ["frames"]
        columns += ["inputs_ratio", "temp_ratio", "peak_ratio"]
    report(rows, columns, args.name, {"target": args.target or devices[0].platform})
    for row in rows:
        if "peak_ratio" in row:
            what = ("ControlNet" if row["trains"] == "controlnet" else
                    f"LoRA rank {row['lora_rank']} ({row['lora_targets']})")
            print(f"{row['model']} {row['dtype']} batch {row['batch']} mesh {row['mesh']}: "
                  f"{what} / full: inputs "
                  f"{row['inputs_ratio']:.3f}x, temp {row['temp_ratio']:.3f}x, peak "
                  f"{row['peak_ratio']:.3f}x")


if __name__ == "__main__":
    main()
