"""Stable Diffusion text-to-image throughput: images/s of diffusion_jax's whole pipeline.

Loads a diffusers Stable Diffusion folder with ``StableDiffusion.from_pretrained`` (timed), makes
a first call (compiling its one program, then running it), then times ``--repeats`` more calls of
``pipe(prompts, num_steps, guidance_scale)``: tokenizing, encoding the prompts and the empty
negative prompt, the sampler's loop with classifier-free guidance, decoding, and the images back
on the host as numpy, as diffusers' pipeline returns them with ``output_type="np"``. images/s is
the batch over the best call's seconds, the convention of the PyTorch side.

    python benchmarks/sd_pipeline.py --folder DIR           # batch 8, 30 steps, bf16
    python benchmarks/sd_pipeline.py --folder DIR --torch-json torch_sd_pipeline.json
    python benchmarks/sd_pipeline.py --tiny                 # a tiny random folder, on a CPU

The defaults are those of the PyTorch pipeline baseline (``torch_sd_pipeline.py``, which with
``--save DIR`` writes the random-weight SD 1.5 folder it times): 512x512 (the folder's default
size), 30 steps of the folder's scheduler (DPM-Solver++(2M) there, mapped onto ``dpmpp_2m`` with
diffusers' timesteps), guidance 7.5, batch 8, bfloat16 computation and parameters.
``--torch-json`` reads that script's result and prints our rate over diffusers' eager and
``torch.compile``d rates, warning where the settings or the card differ. ``--tiny`` (with no
``--folder``, or one that does not exist yet) writes a tiny random folder with diffusers and
transformers first, and defaults to batch 2, 3 steps, 64x64, 2 repeats. Writes
``benchmarks/results/NAME.json``. ``--summarize RESULT.json [--torch-json ...] [--train-json ...]``
runs nothing and prints the markdown summary that ``gpu_comparison.sh --sd-baseline`` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from common import accelerator, report
from diffusion_jax.pipelines import StableDiffusion

PROMPT = "a photograph of an astronaut riding a horse"  # the PyTorch side's prompt
TORCH_RATES = (("images_per_s_eager", "diffusers eager"),
               ("images_per_s_compiled_unet", "diffusers with torch.compile(UNet)"))


def write_tiny_folder(folder):
    """A tiny random-weight SD folder, as ``torch_sd_pipeline.py --tiny --save`` writes one."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    codes = printable + [256 + i for i in range(256 - len(printable))]
    chars = [chr(c) for c in codes]  # CLIP's byte alphabet, no merges: tokenizes any prompt
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    scratch = tempfile.mkdtemp(prefix="tiny_vocab_")
    with open(os.path.join(scratch, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(scratch, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(os.path.join(scratch, "vocab.json"),
                                           os.path.join(scratch, "merges.txt"),
                                           model_max_length=77)
    text = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        algorithm_type="dpmsolver++", solver_order=2)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=transformers.CLIPTextModel(text), tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(scratch, ignore_errors=True)


def parameter_counts(pipe) -> dict:
    """Parameters of each component of the loaded pipeline."""
    count = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))  # noqa: E731
    models = pipe.models
    return {"unet": count(models.unet_params), "vae": count(models.vae_params),
            "text_encoder": sum(count(p) for p in models.text_encoder_params)}


def measure(args, folder) -> dict:
    """Load, first call, timed calls: the row of the results table."""
    dtype = jnp.dtype(args.dtype)
    param_dtype = jnp.dtype(args.param_dtype or args.dtype)
    start = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(folder, dtype=dtype, param_dtype=param_dtype,
                                           attention=args.attention)
    jax.block_until_ready(pipe.params)
    load_s = time.perf_counter() - start
    size = args.size or pipe.models.default_size
    method = None if args.method in (None, "folder") else args.method
    prompts = [PROMPT] * args.batch

    def call():  # returns host numpy, so it has waited for the device
        return pipe(prompts, num_steps=args.steps, guidance_scale=args.guidance, method=method,
                    height=size, width=size, key=jax.random.key(args.seed))

    start = time.perf_counter()
    images = call()
    first_s = time.perf_counter() - start
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        images = call()
        seconds.append(time.perf_counter() - start)
    if images.shape != (args.batch, size, size, 3) or not np.isfinite(images).all():
        raise SystemExit(f"sd_pipeline.py: the pipeline returned {images.shape} images "
                         f"(finite: {bool(np.isfinite(images).all())}); expected "
                         f"{(args.batch, size, size, 3)}")
    best = min(seconds)
    guided = args.guidance > 1.0
    return {
        "folder": os.path.abspath(folder), "pipeline": pipe.models.index.get("_class_name"),
        "parameters": parameter_counts(pipe), "batch": args.batch, "steps": args.steps,
        "size": size, "guidance": args.guidance, "dtype": args.dtype,
        "param_dtype": param_dtype.name, "attention": args.attention,
        "scheduler": pipe.models.scheduler_config.get("_class_name"),
        "sampler": method or pipe.plan.method, "sampler_from": "method" if method else "folder",
        "load_s": load_s, "first_call_s": first_s, "compile_s": max(0.0, first_s - best),
        "best_s": best, "mean_s": float(np.mean(seconds)), "images_per_s": args.batch / best,
        "unet_evaluations_per_s": args.batch * args.steps * (2 if guided else 1) / best,
    }


def compare_with_torch(row, path) -> tuple[dict, list]:
    """Our images/s over each of diffusers' rates in ``path``; and warnings where they differ."""
    with open(path) as f:
        theirs = json.load(f)
    warnings = []
    for key in ("batch", "steps", "size"):
        if key in theirs and theirs[key] != row[key]:
            warnings.append(f"{key}: ours {row[key]}, diffusers {theirs[key]}")
    their_dtype = str(theirs.get("dtype", "")).replace("torch.", "")
    if their_dtype and their_dtype != row["dtype"]:
        warnings.append(f"dtype: ours {row['dtype']}, diffusers {their_dtype}")
    if row["sampler"] != "dpmpp_2m" or row["guidance"] != 7.5:
        their_sampler = theirs.get("sampler", "DPMSolverMultistep(2M), guidance 7.5")
        warnings.append(f"sampler: ours {row['sampler']} with guidance {row['guidance']}, "
                        f"diffusers {their_sampler}")
    ours_device = jax.devices()[0].device_kind
    if theirs.get("device") and theirs["device"] != ours_device:
        warnings.append(f"device: ours {ours_device}, diffusers {theirs['device']}")
    ratios = {"torch_device": theirs.get("device"), "torch": theirs.get("torch")}
    for key, label in TORCH_RATES:
        if theirs.get(key):
            ratios[f"ratio_to_{key}"] = row["images_per_s"] / theirs[key]
            ratios[key] = theirs[key]
    if theirs.get("compile_error"):
        ratios["torch_compile_error"] = theirs["compile_error"]
    return ratios, warnings


def ratio_lines(row, ratios, warnings) -> list:
    """The lines that state the comparison (gpu_comparison.sh collects them into its log)."""
    lines = [f"SD pipeline ratio: diffusion_jax {row['images_per_s']:.3f} images/s / {label} "
             f"{ratios[key]:.3f} images/s = {ratios[f'ratio_to_{key}']:.2f}x"
             for key, label in TORCH_RATES if f"ratio_to_{key}" in ratios]
    if not lines:
        lines.append("SD pipeline ratio: the PyTorch result has no images/s to compare with")
    if "torch_compile_error" in ratios:
        lines.append(f"SD pipeline ratio: diffusers' torch.compile failed: "
                     f"{ratios['torch_compile_error'][:200]}")
    lines += [f"SD pipeline ratio: WARNING: the two ran with different {w}" for w in warnings]
    return lines


def _read(path):
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def summary_lines(pipeline_json=None, torch_json=None, train_json=None) -> list:
    """Markdown lines for the SD part of gpu_comparison.sh's summary, from the result files.

    Any of the three may be missing (a step that failed): its line says so."""
    ours, theirs, train = _read(pipeline_json), _read(torch_json), _read(train_json)
    lines = ["## Stable Diffusion: the whole pipeline, and the UNet's training step", ""]
    if theirs:
        rates = ", ".join(f"{label} {theirs[key]:.3f} images/s" for key, label in TORCH_RATES
                          if theirs.get(key))
        lines.append(f"- PyTorch ({theirs.get('device')}, torch {theirs.get('torch')}): "
                     f"{rates or 'no rate'}; batch {theirs.get('batch')}, {theirs.get('steps')} "
                     f"steps, {theirs.get('size')}px, {theirs.get('dtype')}"
                     + (f"; torch.compile failed: {theirs['compile_error'][:120]}"
                        if theirs.get("compile_error") else ""))
    else:
        lines.append("- PyTorch pipeline: no result")
    if ours:
        (row,) = ours["rows"]
        lines.append(f"- diffusion_jax ({ours['device']}, jax {ours['jax']}): "
                     f"{row['images_per_s']:.3f} images/s; batch {row['batch']}, {row['steps']} "
                     f"steps of {row['sampler']}, {row['size']}px, {row['dtype']}, attention "
                     f"{row['attention']}; load {row['load_s']:.1f} s, first call (compiling) "
                     f"{row['first_call_s']:.1f} s")
        lines += [f"- {line}" for line in ratio_lines(row, row, ours.get("torch_warnings", []))
                  if theirs or "WARNING" in line]
    else:
        lines.append("- diffusion_jax pipeline: no result")
    if train:
        row = train["rows"][0]
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        lines.append(f"- diffusion_jax training step, {row.get('model')} UNet ({train['device']}): "
                     f"{row['images_per_s']:.2f} images/s{mfu}; batch {row.get('batch')}, "
                     f"{row.get('dtype')}, attention {row.get('attention', '?')}")
    else:
        lines.append("- diffusion_jax SD 1.5 training step: no result")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="a diffusers Stable Diffusion folder (model_index.json)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random folder (written unless --folder exists) and small "
                             "settings, to check the script on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="prompts per call (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default 30)")
    parser.add_argument("--size", type=int, default=None,
                        help="image height and width (default: the folder's, 512 for SD 1.5)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="the parameters' dtype (default: --dtype)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls after the first (default 3)")
    parser.add_argument("--method", default=None,
                        help="a diffusion_jax sampler (e.g. dpmpp_2m) instead of the folder's "
                             "scheduler mapped onto one (the default, 'folder')")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--attention", default="xla", choices=["xla", "cudnn", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-json", help="torch_sd_pipeline.py's result, to compare with")
    parser.add_argument("--name", default="sd_pipeline", help="results file stem")
    parser.add_argument("--summarize", metavar="PIPELINE_JSON",
                        help="run nothing: print the markdown summary of this script's result "
                             "(missing: a failed step), --torch-json's and --train-json's")
    parser.add_argument("--train-json", help="with --summarize: train_throughput.py's result")
    args = parser.parse_args(argv)
    if args.summarize:
        return args
    small = (dict(batch=2, steps=3, repeats=2, size=64) if args.tiny
             else dict(batch=8, steps=30, repeats=3))
    for key, value in small.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.folder and not args.tiny:
        parser.error("give --folder DIR (a diffusers Stable Diffusion folder), or --tiny")
    if args.folder and not args.tiny and not os.path.isdir(args.folder):
        parser.error(f"--folder {args.folder} is not a directory")
    if args.torch_json and not os.path.isfile(args.torch_json):
        parser.error(f"--torch-json {args.torch_json}: no such file")
    if min(args.batch, args.steps, args.repeats) < 1:
        parser.error("--batch, --steps and --repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:
        print("\n".join(summary_lines(args.summarize, args.torch_json, args.train_json)))
        return
    folder, scratch = args.folder, None
    if args.tiny and (folder is None or not os.path.exists(folder)):
        if folder is None:
            scratch = folder = tempfile.mkdtemp(prefix="tiny_sd_")
        start = time.perf_counter()
        write_tiny_folder(folder)
        print(f"wrote a tiny random Stable Diffusion folder to {folder} in "
              f"{time.perf_counter() - start:.1f} s")
    try:
        row = measure(args, folder)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    extra = {"flax": flax.__version__, "numpy": np.__version__, "prompt": PROMPT}
    lines = []
    if args.torch_json:
        ratios, warnings = compare_with_torch(row, args.torch_json)
        row.update(ratios)
        extra["torch_warnings"] = warnings
        lines = ratio_lines(row, ratios, warnings)
    print(f"{accelerator()}: {row['pipeline']} from {row['folder']}, "
          f"{row['parameters']['unet']:,} UNet parameters; {row['sampler']} "
          f"({row['sampler_from']}), guidance {row['guidance']}")
    report([row], ["batch", "steps", "size", "dtype", "attention", "load_s", "first_call_s",
                   "best_s", "mean_s", "images_per_s", "unet_evaluations_per_s"],
           args.name, extra=extra)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
