"""Sampling throughput: denoiser evaluations per second inside diffusion_jax's compiled samplers.

Evaluations are images through the network; measured for the DDPM CIFAR-10 UNet and DiT-B/2
(class-conditional, with classifier-free guidance, so each step evaluates both branches in one
batched call).

    python benchmarks/sample_throughput.py
    python benchmarks/sample_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --batch 512

Parameters are random (speed does not depend on them). On a CPU the default batch is 4; on a
GPU or TPU, 256. Each evaluation is counted at the FLOPs of one image's forward pass (matmuls and
convolutions, from the jaxpr; ``gflop_per_evaluation_xla`` is XLA's cost analysis of the same
pass, which misses cuDNN convolutions on a GPU), and MFU is against a measured matmul peak.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from common import (CONTEXT, MODELS, accelerator, build, compiled_flops, forward_flops,
                    matmul_peak_tflops, on_accelerator, report, time_calls)
from diffusion_jax import configuration, generate, samplers


def _xla_forward_flops(model, params, shape, num_classes, batch):
    """XLA's cost analysis of one forward pass of ``batch`` images, per image."""
    args = [jnp.zeros((batch,) + tuple(shape)), jnp.ones((batch,))]
    if num_classes:
        args.append(jnp.zeros((batch,), jnp.int32))
    forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return compiled_flops(forward.lower(params, *args).compile()) / batch


def measure(name, dtype, batch, num_steps, method, attention="xla"):
    config, shape, num_classes, model, _, mesh, _, state = build(name, dtype, batch,
                                                                 model__attention=attention)
    config.sampling.method, config.sampling.num_steps = method, num_steps
    config.sampling.grid = "trailing"
    config.sampling.guidance_scale = 2.0
    generate_fn = jax.jit(generate.make_generate_fn(config, model, shape, num_classes,
                                                    mesh=mesh), static_argnums=2)
    key = jax.random.key(0)
    seconds = time_calls(lambda: generate_fn(state.ema_params, key, batch), iterations=3, warmup=1)
    branches = 2 if num_classes else 1
    schedule = configuration.build_schedule(config)
    times = samplers.time_grid(schedule, num_steps, config.sampling.grid)
    per_sample = samplers.number_of_evaluations(method, times, schedule)  # Heun: about 2x steps
    evaluations_per_s = batch * branches * per_sample / seconds
    flops = forward_flops(model, shape, num_classes, CONTEXT.get(name))  # per evaluation
    xla = (None if name in CONTEXT else
           _xla_forward_flops(model, state.ema_params, shape, num_classes, batch))
    return {"model": name, "dtype": dtype, "batch": batch, "method": method,
            "attention": attention,
            "steps": num_steps, "evaluations_per_sample": branches * per_sample,
            "guided": bool(num_classes),
            "evaluations_per_s": evaluations_per_s,
            "samples_per_s": batch / seconds,
            "gflop_per_evaluation": flops / 1e9,
            "achieved_tflops": flops * evaluations_per_s / 1e12,
            "gflop_per_evaluation_xla": xla / 1e9 if xla else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ddpm_cifar10", "dit_b2"],
                        choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--method", default="ddim")
    parser.add_argument("--attention", choices=["xla", "cudnn", "auto"], default="xla",
                        help="attention kernel (model.attention)")
    parser.add_argument("--name", default="sample_throughput", help="results file stem")
    args = parser.parse_args(argv)
    batch = args.batch or (256 if on_accelerator() else 4)
    steps = args.steps or (50 if on_accelerator() else 4)
    print(f"device: {accelerator()}, jax {jax.__version__}")
    peak = matmul_peak_tflops()
    print(f"measured matmul peak: {peak:.2f} TFLOP/s")
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            row = measure(name, dtype, batch, steps, args.method, args.attention)
            row["mfu"] = row["achieved_tflops"] / peak
            rows.append(row)
            print(row, flush=True)
    report(rows, ["model", "dtype", "batch", "method", "steps", "guided", "attention",
                  "evaluations_per_s", "samples_per_s", "gflop_per_evaluation",
                  "achieved_tflops", "mfu", "gflop_per_evaluation_xla"], args.name,
           {"matmul_peak_tflops": peak,
            "matmul_peak_dtype": "bfloat16" if on_accelerator() else "float32",
            "flops_note": "gflop_per_evaluation = forward matmul/conv FLOPs of one image "
                          "counted from the jaxpr; XLA's cost analysis misses cuDNN "
                          "convolutions on GPU"})


if __name__ == "__main__":
    main()
