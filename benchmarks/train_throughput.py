"""Training throughput: images/s of diffusion_jax's full training step (the one
``train_and_evaluate`` runs: loss, gradients, clipping, AdamW, EMA and metric accumulation, on the
device mesh, donating the old state), with FLOPs per image from XLA's cost analysis and MFU
against a measured matmul peak (bf16 on GPU/TPU, float32 on a CPU).

    python benchmarks/train_throughput.py                           # both models, f32 and bf16
    python benchmarks/train_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --batch 256

Models: the DDPM CIFAR-10 UNet (35.7M parameters, 32x32x3) and DiT-B/2 on 32x32x4 latents.
Batches are random (the input pipeline is not what is measured). On a CPU the default batch is
8 and few steps are timed; on a GPU or TPU, 128.
"""

from __future__ import annotations

import argparse

import jax

from common import (MODELS, accelerator, build, compiled_flops, matmul_peak_tflops,
                    on_accelerator, random_batch, report, time_calls)
from diffusion_jax import parallel, train


def measure(name, dtype, batch, iterations):
    config, shape, num_classes, model, optimizer, mesh, abstract, state = build(name, dtype, batch)
    step = train.compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
    global_batch = parallel.global_batch(random_batch(shape, batch, num_classes), mesh)
    running = train.empty_running_metrics(mesh)
    flops = compiled_flops(step.lower(state, global_batch, running).compile())
    holder = {"state": state, "running": running}

    def call():
        holder["state"], holder["running"] = step(holder["state"], global_batch,
                                                  holder["running"])
        return holder["state"].step

    seconds = time_calls(call, iterations=iterations)
    params = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
    return {"model": name, "dtype": dtype, "batch": batch, "params": int(params),
            "images_per_s": batch / seconds, "step_ms": 1e3 * seconds,
            "gflop_per_image_xla": flops / batch / 1e9 if flops else None,
            "achieved_tflops_xla": flops / seconds / 1e12 if flops else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args(argv)
    batch = args.batch or (128 if on_accelerator() else 8)
    iterations = args.iterations or (50 if on_accelerator() else 3)
    print(f"device: {accelerator()}, jax {jax.__version__}")
    peak = matmul_peak_tflops()
    print(f"measured matmul peak: {peak:.2f} TFLOP/s")
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            row = measure(name, dtype, batch, iterations)
            if row["achieved_tflops_xla"]:
                row["mfu_xla"] = row["achieved_tflops_xla"] / peak
            rows.append(row)
            print(row, flush=True)
    report(rows, ["model", "dtype", "batch", "params", "images_per_s", "step_ms",
                  "gflop_per_image_xla", "mfu_xla"], "train_throughput",
           {"matmul_peak_tflops": peak,
            "matmul_peak_dtype": "bfloat16" if on_accelerator() else "float32"})


if __name__ == "__main__":
    main()
