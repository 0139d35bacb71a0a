"""The comparison table of a GPU session: diffusion_jax's throughput beside PyTorch's.

diffusion_jax's throughput results beside the PyTorch baseline's (diffusers' UNets,
``torch_baseline.json``) measured on the same card, as ratios and MFU. It only reads result files,
so it runs anywhere after the benchmarks have run::

    python benchmarks/train_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --plain
    python benchmarks/sample_throughput.py --models ddpm_cifar10 --dtypes bfloat16 --batch 1024
    python path/to/torch_baseline.py --no-sd          # writes $OUT/torch_baseline.json
    python benchmarks/compare_torch.py --torch $OUT/torch_baseline.json

MFU is stated against each system's own measured bf16 matmul peak, and diffusion_jax's also
against PyTorch's (one denominator for both). FLOPs per training image are 3x the forward pass
(diffusion_jax counts them from the jaxpr, PyTorch with its flop counter; for the DDPM UNet both
give 12.44 GFLOP forward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# diffusion_jax benchmark model -> the PyTorch baseline's entry for the same architecture
TORCH_NAMES = {"ddpm_cifar10": "ddpm_cifar10_unet", "sd15": "sd15_unet"}


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        sys.exit(f"{path} is not a complete JSON file ({err}); rerun the benchmark that writes it")


def _number(value, digits=0):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(ours, theirs):
    return "n/a" if not ours or not theirs else f"{ours / theirs:.2f}x"


def _percent(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def comparison(train, sample, torch):
    """Markdown lines comparing the result files' contents.

    The contents are dicts as the benchmarks write them; any may be None."""
    lines = []
    device = (train or sample or {}).get("device", "?")
    torch_device = (torch or {}).get("device", "?")
    lines.append(f"diffusion_jax: {device}, jax {(train or sample or {}).get('jax', '?')}; "
                 f"PyTorch baseline: {torch_device}, torch {(torch or {}).get('torch', '?')}")
    if torch and torch_device not in device:
        lines.append(f"WARNING: the two ran on different cards ({device} vs {torch_device}); "
                     "ratios between cards say little")
    jax_peak = (train or {}).get("matmul_peak_tflops")
    torch_peak = (torch or {}).get("bf16_matmul_tflops")
    lines.append(f"measured bf16 matmul peak: diffusion_jax {_number(jax_peak, 1)} TFLOP/s, "
                 f"PyTorch {_number(torch_peak, 1)} TFLOP/s")
    lines.append("")
    lines.append("| model | training, bf16, images/s | diffusion_jax | PyTorch | ratio | MFU "
                 "(own peak) | MFU (PyTorch's peak) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [r for r in (train or {}).get("rows", []) if r.get("dtype") == "bfloat16"]
    goals = []
    for name in dict.fromkeys(r["model"] for r in rows):
        reference = (torch or {}).get(TORCH_NAMES.get(name, ""), {})
        compiled = reference.get("train_bf16_compiled_img_s")
        eager = reference.get("train_bf16_autocast_img_s")
        torch_mfu = None
        if compiled and reference.get("fwd_gflops_per_sample") and torch_peak:
            torch_mfu = compiled * 3 * reference["fwd_gflops_per_sample"] / (torch_peak * 1e3)
        for row in (r for r in rows if r["model"] == name):
            kind = ("plain jit step (no EMA, clipping, metrics, data feed)"
                    if row.get("train_step") == "plain" else
                    f"full step ({row.get('train_step', 'jit')}, batch {row.get('batch')})")
            cross = (row["achieved_tflops"] / torch_peak
                     if torch_peak and row.get("achieved_tflops") else None)
            lines.append(f"| {name} | {kind} | {_number(row.get('images_per_s'))} | "
                         f"{_number(compiled)} (compiled) | {_ratio(row.get('images_per_s'), compiled)} | "
                         f"{_percent(row.get('mfu'))} | {_percent(cross)} |")
        full = next((r for r in rows if r["model"] == name and r.get("train_step") != "plain"),
                    None)
        plain = next((r for r in rows if r["model"] == name and r.get("train_step") == "plain"),
                     None)
        if eager:
            lines.append(f"| {name} | against PyTorch eager (bf16 autocast) | "
                         f"{_number(full and full.get('images_per_s'))} | {_number(eager)} | "
                         f"{_ratio(full and full.get('images_per_s'), eager)} | | |")
        if torch_mfu is not None:
            lines.append(f"| {name} | PyTorch's own MFU (bf16 + compile) | | | | "
                         f"{_percent(torch_mfu)} | |")
        if full and plain:
            goals.append(f"{name}: the full step runs at "
                         f"{_ratio(full.get('images_per_s'), plain.get('images_per_s'))} the "
                         "plain jit step's rate on this card (floor: 1.00x)")
        if full and compiled:
            goals.append(f"{name}: training goal, 3x PyTorch compiled = "
                         f"{_number(3 * compiled)} images/s; the full step is at "
                         f"{_ratio(full.get('images_per_s'), 3 * compiled)} of that")
    lines.append("")
    lines.append("| model | sampling, bf16, denoiser evaluations/s | diffusion_jax | PyTorch | "
                 "ratio | MFU (own peak) |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for row in (r for r in (sample or {}).get("rows", []) if r.get("dtype") == "bfloat16"):
        reference = (torch or {}).get(TORCH_NAMES.get(row["model"], ""), {})
        compiled = reference.get("sample_bf16_compiled_evals_per_s")
        eager = reference.get("sample_bf16_evals_per_s")
        lines.append(f"| {row['model']} | {row.get('method')} in a lax.scan, {row.get('steps')} "
                     f"steps, batch {row.get('batch')} | {_number(row.get('evaluations_per_s'))} | "
                     f"{_number(compiled)} (compiled), {_number(eager)} (eager) | "
                     f"{_ratio(row.get('evaluations_per_s'), compiled)} | "
                     f"{_percent(row.get('mfu'))} |")
        if compiled:
            goals.append(f"{row['model']}: sampling goal, 2x PyTorch compiled = "
                         f"{_number(2 * compiled)} evaluations/s; the sampler is at "
                         f"{_ratio(row.get('evaluations_per_s'), 2 * compiled)} of that")
    if goals:
        lines += [""] + goals
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="the PyTorch baseline's JSON file")
    parser.add_argument("--train", default=os.path.join(RESULTS, "train_throughput.json"))
    parser.add_argument("--sample", default=os.path.join(RESULTS, "sample_throughput.json"))
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args(argv)
    train, sample, torch = _load(args.train), _load(args.sample), _load(args.torch)
    missing = [path for path, value in ((args.train, train), (args.sample, sample),
                                        (args.torch, torch)) if value is None]
    if len(missing) == 3:
        sys.exit(f"none of the result files exist: {', '.join(missing)}; run the benchmarks "
                 "first (see this script's docstring)")
    for path in missing:
        print(f"(no {path}: its part of the table is empty)")
    table = "\n".join(comparison(train, sample, torch))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
