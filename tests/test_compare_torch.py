"""benchmarks/compare_torch.py turns result files into the GPU comparison table."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from compare_torch import comparison  # noqa: E402

TRAIN = {"device": "1 x NVIDIA H200 (gpu)", "jax": "0.11.2", "matmul_peak_tflops": 800.0,
         "rows": [
             {"model": "ddpm_cifar10", "dtype": "bfloat16", "batch": 128, "train_step": "jit",
              "images_per_s": 6000.0, "achieved_tflops": 224.0, "mfu": 0.28},
             {"model": "ddpm_cifar10", "dtype": "bfloat16", "batch": 128, "train_step": "plain",
              "images_per_s": 6600.0, "achieved_tflops": 246.4, "mfu": 0.308},
             {"model": "ddpm_cifar10", "dtype": "float32", "batch": 128, "train_step": "jit",
              "images_per_s": 3000.0, "achieved_tflops": 112.0, "mfu": 0.14}]}
SAMPLE = {"device": "1 x NVIDIA H200 (gpu)", "jax": "0.11.2", "rows": [
    {"model": "ddpm_cifar10", "dtype": "bfloat16", "batch": 1024, "method": "ddim", "steps": 50,
     "evaluations_per_s": 29100.0, "mfu": 0.452}]}
TORCH = {"device": "NVIDIA H200", "torch": "2.11.0", "bf16_matmul_tflops": 700.0,
         "ddpm_cifar10_unet": {"fwd_gflops_per_sample": 12.44, "train_bf16_autocast_img_s": 2000.0,
                               "train_bf16_compiled_img_s": 3000.0,
                               "sample_bf16_evals_per_s": 8000.0,
                               "sample_bf16_compiled_evals_per_s": 19400.0}}


def _row(lines, *words):
    matches = [line for line in lines if line.startswith("|") and all(w in line for w in words)]
    assert len(matches) == 1, (words, lines)
    return [cell.strip() for cell in matches[0].strip("|").split("|")]


def test_ratios_and_mfu_come_from_the_files():
    lines = comparison(TRAIN, SAMPLE, TORCH)
    assert not any("WARNING" in line for line in lines)  # "NVIDIA H200" is the same card
    full = _row(lines, "full step")
    assert full[2:] == ["6,000", "3,000 (compiled)", "2.00x", "28.0%", "32.0%"]  # 224 / 700
    plain = _row(lines, "plain jit step")
    assert plain[2:5] == ["6,600", "3,000 (compiled)", "2.20x"]
    assert _row(lines, "against PyTorch eager")[2:5] == ["6,000", "2,000", "3.00x"]
    # 3000 images/s x 3 x 12.44 GFLOP / 700 TFLOP/s
    assert _row(lines, "PyTorch's own MFU")[5] == "16.0%"
    sampling = _row(lines, "ddim in a lax.scan")
    assert sampling[2:] == ["29,100", "19,400 (compiled), 8,000 (eager)", "1.50x", "45.2%"]
    assert not any("float32" in line for line in lines)  # the table is about bf16
    # the bars: the plain step's rate on the same card, 3x and 2x PyTorch compiled
    assert "ddpm_cifar10: the full step runs at 0.91x the plain jit step's rate" in lines[-3]
    assert lines[-2] == ("ddpm_cifar10: training goal, 3x PyTorch compiled = 9,000 images/s; "
                         "the full step is at 0.67x of that")
    assert lines[-1] == ("ddpm_cifar10: sampling goal, 2x PyTorch compiled = 38,800 "
                         "evaluations/s; the sampler is at 0.75x of that")


def test_different_cards_are_flagged_and_missing_parts_are_empty():
    lines = comparison(TRAIN, None, {**TORCH, "device": "NVIDIA H100 80GB HBM3"})
    assert any(line.startswith("WARNING: the two ran on different cards") for line in lines)
    assert comparison(None, None, TORCH)[-2:] == [
        "| model | sampling, bf16, denoiser evaluations/s | diffusion_jax | PyTorch | ratio | "
        "MFU (own peak) |",
        "| --- | --- | --- | --- | --- | --- |"]
    lines = comparison(TRAIN, SAMPLE, None)
    assert _row(lines, "full step")[3:5] == ["n/a (compiled)", "n/a"]


def test_command_line_reads_the_files(tmp_path):
    paths = {}
    for name, content in (("train", TRAIN), ("sample", SAMPLE), ("torch", TORCH)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_torch.py"),
                          "--torch", str(paths["torch"]), "--train", str(paths["train"]),
                          "--sample", str(paths["sample"]), "--out", str(tmp_path / "table.md")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "2.00x" in run.stdout and "1.50x" in run.stdout
    assert (tmp_path / "table.md").read_text() == run.stdout
    (tmp_path / "broken.json").write_text('{"rows": [')
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_torch.py"),
                          "--torch", str(tmp_path / "broken.json"), "--train",
                          str(tmp_path / "none.json"), "--sample", str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "is not a complete JSON file" in run.stderr
