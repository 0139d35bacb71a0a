"""Sampler error against the number of denoiser evaluations, on a problem with a closed form.

Data: x0 ~ N(mu, diag(lambda)) in 64 dimensions, whose exact denoiser is
E[x0 | x_t] = mu + alpha lambda / (alpha^2 lambda + sigma^2) (x_t - alpha mu). With it a sampler's
only error is its discretisation error:

* deterministic methods (euler, ddim, heun, dpmpp_2m, dpmpp_3m, unipc): RMS distance between the sampler's output and
  the exact probability-flow ODE solution from the same noise (solved analytically to the last
  network time, then denoised exactly as every method's final step does);
* stochastic methods (ddpm, euler_ancestral): 2-Wasserstein distance between the data distribution
  and a Gaussian fitted to the samples; the floor that finite sampling alone gives is printed too.

For every schedule, time grid, method and NFE budget the largest number of steps whose NFE fits the
budget is used (Heun spends two evaluations on most steps). Prints tables and writes JSON.

    python benchmarks/sampler_error.py                      # all schedules, grids and methods
    python benchmarks/sampler_error.py --schedules edm --nfe 10 20 --output /tmp/edm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusion_jax import analytic, samplers, schedules  # noqa: E402

DETERMINISTIC = ("euler", "ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")
STOCHASTIC = ("ddpm", "euler_ancestral")


def _steps_for_budget(method, budget, schedule, grid):
    best = None
    for steps in range(1, budget + 1):
        try:
            times = samplers.time_grid(schedule, steps, grid)
        except ValueError:
            break
        nfe = samplers.number_of_evaluations(method, times, schedule)
        if nfe <= budget:
            best = (steps, nfe)
        else:
            break
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+",
                        default=["ddpm_linear", "cosine", "edm", "rectified_flow"])
    parser.add_argument("--grids", nargs="+", default=list(samplers.GRIDS))
    parser.add_argument("--methods", nargs="+", default=list(DETERMINISTIC + STOCHASTIC))
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50, 100])
    parser.add_argument("--batch", type=int, default=256, help="samples for the ODE error")
    parser.add_argument("--w2-samples", type=int, default=4096, help="samples for the W2 distance")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join("benchmarks", "results",
                                                          "sampler_error.json"))
    args = parser.parse_args(argv)

    jax.config.update("jax_enable_x64", True)  # measure discretisation error, not round-off
    rng = np.random.default_rng(args.seed)
    gaussian = analytic.DiagonalGaussian(rng.normal(size=args.dim) * 0.5,
                                         rng.uniform(0.05, 1.0, args.dim))
    key = jax.random.key(args.seed)
    noise = jax.random.normal(key, (args.batch, args.dim), jnp.float64)
    noise_w2 = jax.random.normal(jax.random.fold_in(key, 1), (args.w2_samples, args.dim),
                                 jnp.float64)
    w2_floor = float(np.mean([
        analytic.gaussian_w2(gaussian.sample(jax.random.fold_in(key, 100 + i), args.w2_samples),
                             gaussian.mean, gaussian.var) for i in range(4)]))

    rows = []
    started = time.perf_counter()
    for schedule_name in args.schedules:
        schedule = schedules.get(schedule_name)
        denoise = gaussian.denoiser(schedule)
        for grid in args.grids:
            for method in args.methods:
                stochastic = method in STOCHASTIC
                row = {"schedule": schedule_name, "grid": grid, "method": method,
                       "metric": "w2" if stochastic else "ode_rms", "results": []}
                for budget in args.nfe:
                    fit = _steps_for_budget(method, budget, schedule, grid)
                    if fit is None:
                        row["results"].append({"budget": budget, "steps": None, "nfe": None,
                                               "error": None})
                        continue
                    steps, nfe = fit
                    if stochastic:
                        out = samplers.sample(denoise, noise_w2, schedule=schedule, method=method,
                                              num_steps=steps, grid=grid,
                                              key=jax.random.fold_in(key, 2))
                        error = analytic.gaussian_w2(out.samples, gaussian.mean, gaussian.var)
                    else:
                        out = samplers.sample(denoise, noise, schedule=schedule, method=method,
                                              num_steps=steps, grid=grid)
                        t0, t_last = float(out.times[0]), float(out.times[-2])
                        scale = jnp.sqrt(schedule.alpha(t0) ** 2 + schedule.sigma(t0) ** 2)
                        x_last = gaussian.ode_solution(schedule, noise * scale, t0, t_last)
                        exact = denoise(x_last, jnp.full((args.batch,), t_last))
                        error = float(jnp.sqrt(jnp.mean((out.samples - exact) ** 2)))
                    row["results"].append({"budget": budget, "steps": steps, "nfe": nfe,
                                           "error": error})
                rows.append(row)
    elapsed = time.perf_counter() - started

    header = f"{'schedule':<15}{'grid':<10}{'method':<17}" + "".join(
        f"{'NFE<=' + str(b):>11}" for b in args.nfe)
    for metric, title in (("ode_rms", "RMS error against the exact probability-flow ODE solution"),
                          ("w2", f"W2 to the data distribution ({args.w2_samples} samples; "
                                 f"exact samples give {w2_floor:.3f})")):
        selected = [r for r in rows if r["metric"] == metric]
        if not selected:
            continue
        print(f"\n{title}\n{header}")
        for r in selected:
            cells = "".join(
                f"{'-':>11}" if c["error"] is None else f"{c['error']:>11.2e}" for c in r["results"])
            print(f"{r['schedule']:<15}{r['grid']:<10}{r['method']:<17}{cells}")
    print(f"\n{len(rows)} rows in {elapsed:.0f} s on {jax.devices()[0].platform}")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({
            "problem": {"data": "diagonal Gaussian", "dim": args.dim, "seed": args.seed,
                        "ode_batch": args.batch, "w2_samples": args.w2_samples,
                        "w2_floor": w2_floor},
            "environment": {"jax": jax.__version__, "device": str(jax.devices()[0]),
                            "python": platform.python_version()},
            "rows": rows,
        }, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
