"""How well a ControlNet trained here makes a text-to-image base follow a control image.

The protocol, each step with the library's own entry points:

1. a text-to-image base on captioned shapes: ``--base DIR`` (a trained run), or trained into
   ``WORKDIR/base`` from ``--preset`` for ``--base-steps``;
2. a ControlNet of that base (``config.controlnet.control = --control``, ``controlnet.base``)
   trained into ``WORKDIR/controlnet_<control>`` for ``--steps`` on the same data;
3. ``--num`` test records (split "test": fresh images of the training distribution), each giving
   a prompt (its caption) and a control map (``diffusion_jax.data.controls``); one image per
   record is generated for every guidance scale and conditioning scale, from the same noise.
   Conditioning scale 0 is the base without the control, bit for bit;
4. adherence (``diffusion_jax.control_eval``): the IoU between the control's object mask and the
   generated object's mask (pixels classified to the renderer's palette), the F1 of the
   control's edges against the generated image's Canny edges (1-pixel tolerance), and how often
   the generated object has the caption's colour (does the control cost text adherence?); the
   same measures of the real test images against their own controls (the ceiling) and against
   another record's control (chance).

Also reported: the ControlNet's parameters against the base's, and training steps/s of both.

    python benchmarks/controlnet_adherence.py --base /path/to/text_shapes_run --control mask \\
        --steps 1000 --num 200                                   # docs/controlnet.md's numbers
    python benchmarks/controlnet_adherence.py --tiny --workdir /tmp/cn_smoke   # a smoke test

A run already complete in WORKDIR is reused. ``--set KEY=VALUE`` overrides config keys of the
ControlNet run (e.g. ``--set training.learning_rate=2e-4``). Results go to
``WORKDIR/controlnet_<control>.json`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import configuration, control_eval, controlnet_runs, files  # noqa: E402
from diffusion_jax import generate, run, train_state  # noqa: E402
from diffusion_jax.data import captions  # noqa: E402
from lora_concept import _override, _size, shrink, train_timed  # noqa: E402

DEFAULT_PRESET = os.path.join(ROOT, "configs", "text_shapes_cpu.py")


def make_configs(args):
    """``(base config, ControlNet config)`` from the base run or the preset, and the arguments."""
    workdir = os.path.abspath(args.workdir)
    if args.base:
        base = run.read_run_config(args.base, f"--base {args.base}")
        base_dir = os.path.abspath(args.base)
    else:
        base = configuration.load_config(args.preset)
        if args.tiny:
            base = shrink(base)
        base.training.update(num_steps=args.base_steps or base.training.num_steps,
                             checkpoint_every=args.base_steps or base.training.num_steps,
                             sample_every=0)
        base_dir = os.path.join(workdir, "base")
    if base.data.name != "captions":
        raise SystemExit(f"the base trains on {base.data.name!r}; the protocol needs captioned "
                         "shapes (data.name='captions')")
    control = base.copy_and_resolve_references()
    control.controlnet.update(control=args.control, base=base_dir)
    steps = args.steps
    control.training.update(num_steps=steps, checkpoint_every=steps, sample_every=0,
                            warmup_steps=min(control.training.warmup_steps, steps // 10),
                            log_every=min(control.training.log_every, max(steps // 5, 1)))
    if args.learning_rate:
        control.training.learning_rate = args.learning_rate
    for assignment in args.set:
        _override(control, assignment)
    return base, base_dir, control


def _colour_right(images, colours, backgrounds) -> np.ndarray:
    """Per image: whether the object pixels' most common palette colour is the caption's."""
    pixels = files.to_uint8(images).astype(np.int32)
    distance = ((pixels[..., None, :] - captions.PALETTE.astype(np.int32)) ** 2).sum(-1)
    nearest = distance.argmin(-1)  # [B, H, W] palette index
    right = []
    for image, colour, background in zip(nearest, colours, backgrounds):
        counts = np.bincount(image[image != background].ravel(), minlength=len(captions.PALETTE))
        right.append(counts.sum() > 0 and counts.argmax() == colour)
    return np.asarray(right)


def evaluate(config, workdir: str, args) -> dict:
    """Adherence of the ControlNet run in ``workdir`` per guidance and conditioning scale."""
    state, model, shape, num_classes = run.restore_run(config, workdir)
    params = train_state.model_params(state)
    source = controlnet_runs.with_control(config, configuration.build_source(config.data,
                                                                            split="test"))
    records = [source[i] for i in range(args.num)]
    prompts = [str(r["caption"]) for r in records]
    controls = np.stack([r["control"] for r in records]).astype(np.float32) / 255.0
    real = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0
    colours = np.array([int(r["attributes"]["colour"]) for r in records])
    backgrounds = np.array([int(r["attributes"]["background"]) for r in records])
    kind = config.controlnet.control

    def measure(images, maps):
        out = {k: float(v) for k, v in control_eval.adherence(images, maps, kind).items()}
        out["colour_right"] = float(np.mean(_colour_right(images, colours, backgrounds)))
        return out

    rows = [{"what": "real images, their own control", **measure(real, controls)},
            {"what": "real images, another record's control",
             **measure(real, np.roll(controls, 1, axis=0))}]
    batch = min(args.batch, args.num)
    for guidance in args.guidance_scales:
        for scale in args.scales:
            fn = generate.make_generate_fn(config, model, shape, num_classes,
                                           mesh=run.sampling_mesh(config),
                                           guidance_scale=guidance, control_scales=(scale,))
            images = []
            for start in range(0, args.num, batch):
                stop = min(start + batch, args.num)
                key = jax.random.fold_in(jax.random.key(args.seed), start)  # same noise per scale
                images.append(np.asarray(fn(params, key, stop - start, prompts[start:stop],
                                            controls[start:stop])))
            images = np.concatenate(images)
            rows.append({"what": f"generated, guidance {guidance:g}, control scale {scale:g}",
                         "guidance": guidance, "control_scale": scale,
                         **measure(images, controls)})
            print(f"  {rows[-1]}", flush=True)
            if args.grid_dir:
                files.save_grid(images[:32], os.path.join(
                    args.grid_dir, f"{kind}_g{guidance:g}_s{scale:g}.png"))
    if args.grid_dir:
        files.save_grid(controls[:32] * 2.0 - 1.0, os.path.join(args.grid_dir,
                                                                f"{kind}_controls.png"))
    return {"rows": rows, "controlnet": _size(state.params), "base": _size(state.frozen)}


def table(result: dict) -> str:
    rows = result["evaluation"]["rows"]
    keys = [k for k in rows[0] if k not in ("what",)]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['what']} | " + " | ".join(
            f"{row[k]:.3f}" if isinstance(row.get(k), float) else "" for k in keys) + " |")
    e = result["evaluation"]
    lines.append(f"ControlNet: {e['controlnet']['params']:,} parameters "
                 f"({e['controlnet']['params'] / e['base']['params']:.1%} of the base's "
                 f"{e['base']['params']:,}); training steps/s: base "
                 f"{result['base_train'].get('steps_per_s') or 'reused'}, ControlNet "
                 f"{result['controlnet_train'].get('steps_per_s') or 'reused'}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    base, base_dir, control = make_configs(args)
    os.makedirs(args.workdir, exist_ok=True)
    base_train = {}
    if not args.base:
        base_train = train_timed(base, base_dir)
    control_dir = os.path.join(os.path.abspath(args.workdir), f"controlnet_{args.control}")
    control_train = train_timed(control, control_dir)
    if args.grid_dir:
        os.makedirs(args.grid_dir, exist_ok=True)
    result = {"base": base_dir, "control": args.control, "num": args.num,
              "device": jax.devices()[0].platform, "base_train": base_train,
              "controlnet_train": control_train,
              "evaluation": evaluate(control, control_dir, args)}
    files.save_json(os.path.join(args.workdir, f"controlnet_{args.control}.json"), result)
    print(table(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "results",
                                                          "controlnet"))
    parser.add_argument("--base", default="", help="a trained captioned-shapes run to control")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="the base's preset (no --base)")
    parser.add_argument("--base-steps", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--control", default="mask", choices=("mask", "canny", "depth"))
    parser.add_argument("--steps", type=int, default=1000, help="ControlNet training steps")
    parser.add_argument("--learning-rate", type=float, default=0.0)
    parser.add_argument("--num", type=int, default=200, help="test records to generate")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-dir", default="", help="write sample grids here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


if __name__ == "__main__":
    main()
