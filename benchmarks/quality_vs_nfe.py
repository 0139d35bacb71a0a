"""Sample quality of one trained run against sampler, number of steps and guidance scale.

For every combination it runs what ``--mode=eval`` runs (see diffusion_jax/evaluate.py): generates
``evaluation.num_samples`` samples from the run's checkpoint and measures, in the features of the
classifier trained with ``--mode=train_classifier``, the Fréchet distance and precision/recall
against the data, and the class accuracy of class-conditional samples. Prints a table and writes
JSON (by default to WORKDIR/eval/quality_vs_nfe.json).

    python benchmarks/quality_vs_nfe.py --config=configs/fashion_mnist_cpu.py --workdir=runs/fm \\
        --methods ddim heun dpmpp_2m --steps 5 10 20 50 --guidance 1 2 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusion_jax import configuration, evaluate, samplers  # noqa: E402


def _load_config(path):
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config file")
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--methods", nargs="+", default=["ddim", "heun", "dpmpp_2m"],
                        choices=samplers.METHODS)
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--guidance", nargs="+", type=float, default=None,
                        help="guidance scales (default: the config's)")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    config = _load_config(args.config)
    if args.num_samples:
        config.evaluation.num_samples = args.num_samples
    scales = args.guidance or [config.sampling.guidance_scale]
    rows = []
    for method in args.methods:
        for steps in args.steps:
            for scale in scales:
                config.sampling.method, config.sampling.num_steps = method, steps
                config.sampling.guidance_scale = scale
                start = time.time()
                result = evaluate.evaluate(config, args.workdir, log=lambda line: None)
                schedule = configuration.build_schedule(config)
                times = samplers.time_grid(schedule, steps, config.sampling.grid)
                row = {"method": method, "steps": steps, "guidance_scale": scale,
                       "nfe": samplers.number_of_evaluations(method, times, schedule),
                       **{k: result.get(k) for k in ("frechet_distance", "precision", "recall",
                                                     "class_accuracy")},
                       "seconds": round(time.time() - start, 1)}
                rows.append(row)
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)

    header = ("method", "steps", "nfe", "guidance_scale", "frechet_distance", "precision",
              "recall", "class_accuracy")
    print()
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k])
                         for k in header))
    print(f"\n({evaluate.FEATURE_SPACE_NOTE})")
    output = args.output or os.path.join(args.workdir, "eval", "quality_vs_nfe.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"config": args.config, "workdir": args.workdir, "rows": rows,
                   "feature_space": evaluate.FEATURE_SPACE_NOTE}, f, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
