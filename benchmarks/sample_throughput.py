"""Sampling throughput: denoiser evaluations per second (images through the network) inside
diffusion_jax's compiled samplers, for the DDPM CIFAR-10 UNet and DiT-B/2 (class-conditional,
with classifier-free guidance, so each step evaluates both branches in one batched call).

    python benchmarks/sample_throughput.py
    python benchmarks/sample_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --batch 512

Parameters are random (speed does not depend on them). On a CPU the default batch is 4; on a
GPU or TPU, 256.
"""

from __future__ import annotations

import argparse

import jax

from common import MODELS, accelerator, build, on_accelerator, report, time_calls
from diffusion_jax import sample


def measure(name, dtype, batch, num_steps, method, attention="xla"):
    config, shape, num_classes, model, _, mesh, _, state = build(name, dtype, batch,
                                                                 model__attention=attention)
    config.sampling.method, config.sampling.num_steps = method, num_steps
    config.sampling.grid = "trailing"
    config.sampling.guidance_scale = 2.0
    generate = jax.jit(sample.make_generate_fn(config, model, shape, num_classes, mesh=mesh),
                       static_argnums=2)
    key = jax.random.key(0)
    seconds = time_calls(lambda: generate(state.ema_params, key, batch), iterations=3, warmup=1)
    branches = 2 if num_classes else 1
    return {"model": name, "dtype": dtype, "batch": batch, "method": method,
            "attention": attention,
            "steps": num_steps, "guided": bool(num_classes),
            "evaluations_per_s": batch * branches * num_steps / seconds,
            "samples_per_s": batch / seconds}


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
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            rows.append(measure(name, dtype, batch, steps, args.method, args.attention))
            print(rows[-1], flush=True)
    report(rows, ["model", "dtype", "batch", "method", "steps", "guided", "attention", "evaluations_per_s",
                  "samples_per_s"], args.name)


if __name__ == "__main__":
    main()
