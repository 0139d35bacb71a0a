"""Inpainting adherence of text-to-image runs on captioned shapes: repaint one object as asked.

Test records of one object each (CaptionedShapes of a seed neither the model nor the judge of
:mod:`diffusion_jax.prompt_eval` saw) have the region their object can occupy masked
(:func:`object_mask`: the box that holds any shape of the record's size in its 3x3 cell, from the
generator's geometry); the rest, the plain background, is kept. Each record gets a request
(:func:`requests`): another (shape, colour) pair than its object's, alternately one of the pairs
split "train" holds ("seen") and one of split "heldout"'s ("held-out": ``config.data.heldout``,
HELDOUT_PAIRS by default), in a colour other than the
background, at the same size and position. The run inpaints the masked region (RePaint,
:class:`diffusion_jax.samplers.KnownRegion`, strength 1) once with the request's caption at each
guidance scale ("with the prompt") and once with the empty caption ("without": unconditional,
the same at every scale), and the attribute judge reads the results. Reported per group: how
often the requested shape appears (over requests that change the shape), the requested colour
(over those that change the colour), both, the original object back, and the attributes kept
from the input (background, size, position); the unedited inputs scored the same way show what
doing nothing scores. As a check, the kept region of every output must equal the input exactly.

    from diffusion_jax import configuration, inpaint_eval
    config = configuration.load_config("configs/text_shapes.py")
    results = inpaint_eval.evaluate_inpainting(config, "runs/text", num=200,
                                               guidance_scales=(1.0, 3.0))
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import configuration, files, generate, parallel, prompt_eval, run
from diffusion_jax import train_state, writers
from diffusion_jax.data import captions

__all__ = ["object_box", "object_mask", "draw_records", "requests", "score_requests",
           "evaluate_inpainting", "format_table"]

GROUPS = ("seen", "heldout", "all")
KEPT = ("background", "size", "position")  # what a request keeps from the input
SEED_OFFSET = 40_000  # records: config.seed + this, a seed no training or judging uses


def _attributes(record_or_attributes) -> dict:
    """The attribute dict of a CaptionedShapes record, or the dict itself."""
    if "attributes" in record_or_attributes:
        return record_or_attributes["attributes"]
    return record_or_attributes


def object_box(attributes, resolution: int) -> tuple:
    """``(top, bottom, left, right)`` pixel bounds (bottom and right exclusive) of one object's box.

    The box holds every pixel any shape of the record's size can cover in its cell: a single
    object's centre lies within the generator's jitter of the cell's centre and no shape reaches
    further than ``_EXTENT`` times the size's largest radius from it (centres clipped to keep
    objects inside the image stay inside the box too). A pixel belongs to it when its centre does,
    as the renderer decides. ``attributes`` is a record or its attribute dict; it must describe
    one object with a position."""
    a = _attributes(attributes)
    count, position = int(a.get("count", 1)), int(a.get("position", -1))
    if count != 1 or not 0 <= position < len(captions.POSITIONS):
        raise ValueError(f"object_box needs one object with a position (count 1, position "
                         f"0..8), got count {count} and position {position}")
    reach = captions._EXTENT * captions._RADIUS[int(a["size"])][1] + captions._JITTER_SINGLE
    row, col = divmod(position, 3)
    bounds = []
    for cell in (row, col):
        centre = (cell + 0.5) / 3
        low, high = max(centre - reach, 0.0), min(centre + reach, 1.0)
        # pixel i is inside when low <= (i + 0.5) / resolution <= high
        bounds += [int(np.ceil(low * resolution - 0.5 - 1e-6)),
                   int(np.floor(high * resolution - 0.5 + 1e-6)) + 1]
    top, bottom, left, right = bounds
    return max(top, 0), min(bottom, resolution), max(left, 0), min(right, resolution)


def object_mask(attributes, resolution: int) -> np.ndarray:
    """The repaint mask (float32 [resolution, resolution, 1], 1 = repaint) of one object's box.

    See :func:`object_box`; the object's pixels, whatever its shape, all lie inside."""
    top, bottom, left, right = object_box(attributes, resolution)
    mask = np.zeros((resolution, resolution, 1), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask


def draw_records(num: int, resolution: int, seed: int, heldout_concept: str = "pairs") -> list:
    """``num`` CaptionedShapes records of one object each, of every (shape, colour) pair.

    When ``heldout_concept`` is a colour, records on a background of that colour are passed
    over: the held-out requests ask for objects of it, which must differ from the background."""
    concept = captions.concept_attribute(heldout_concept)
    hidden = concept[1] if concept and concept[0] == "colour" else -1
    source = captions.CaptionedShapes(4 * num, resolution, seed=seed, split="all", max_objects=1)
    records = (source[i] for i in range(len(source)))
    return list(itertools.islice(
        (r for r in records if int(r["attributes"]["background"]) != hidden), num))


def _pairs(heldout_concept: str):
    """``(seen pairs, held-out pairs)`` of (shape, colour) under ``config.data.heldout``."""
    source = captions.CaptionedShapes(1, heldout=heldout_concept)
    every = [(s, c) for s in range(len(captions.SHAPES)) for c in range(len(captions.COLOURS))]
    return [p for p in every if not source.is_heldout(*p)], list(source.heldout_pairs)


def requests(attributes: Sequence[dict], seed: int, heldout_concept: str = "pairs"):
    """``(requested attributes, heldout, prompts)``: another object for each record.

    Request i keeps record i's size, count, position and background and asks for a (shape,
    colour) pair other than its object's, in a colour other than the background: for even i one
    of the pairs split "train" holds, for odd i one of split "heldout"'s, both under
    ``heldout_concept`` (``config.data.heldout``; ``heldout[i]`` says which),
    drawn with ``seed``. ``prompts`` are their captions (:func:`~diffusion_jax.data.captions.\
caption_for`)."""
    rng = np.random.default_rng(seed)
    seen_pairs, heldout_pairs = _pairs(heldout_concept)
    heldout = np.arange(len(attributes)) % 2 == 1
    out, prompts = [], []
    for a, held in zip(attributes, heldout):
        a = {k: int(np.asarray(v)) for k, v in _attributes(a).items()}
        pairs = [p for p in (heldout_pairs if held else seen_pairs)
                 if p != (a["shape"], a["colour"]) and p[1] != a["background"]]
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        request = {k: np.int32(v) for k, v in {**a, "shape": shape, "colour": colour}.items()}
        out.append(request)
        prompts.append(captions.caption_for(request, rng))
    return out, heldout, prompts


def _rate(hits, chosen):
    return float(np.mean(hits[chosen])) if chosen.any() else None


def score_requests(predicted: dict, requested: Sequence[dict], original: Sequence[dict],
                   heldout) -> dict:
    """How often images classified as ``predicted`` show what was requested, per group.

    For "seen", "heldout" and "all" requests: ``shape`` (the requested shape, over requests that
    change the shape), ``colour`` (likewise), ``shape_and_colour`` (both as requested, over all),
    ``original_object`` (the input's shape and colour), each of KEPT as requested, and
    ``all_correct`` (every attribute the judge reads as requested). None where a group is
    empty."""
    want = prompt_eval.attribute_targets(requested)
    had = prompt_eval.attribute_targets(original)
    heldout = np.asarray(heldout, bool)
    got = {name: np.asarray(predicted[name]) for name in prompt_eval.ATTRIBUTES}
    right = {name: got[name] == want[name] for name in prompt_eval.ATTRIBUTES}
    old = (got["shape"] == had["shape"]) & (got["colour"] == had["colour"])
    out = {}
    for group, members in (("seen", ~heldout), ("heldout", heldout),
                           ("all", np.ones_like(heldout))):
        out[group] = {
            "num": int(members.sum()),
            "shape": _rate(right["shape"], members & (want["shape"] != had["shape"])),
            "colour": _rate(right["colour"], members & (want["colour"] != had["colour"])),
            "shape_and_colour": _rate(right["shape"] & right["colour"], members),
            "original_object": _rate(old, members),
            **{name: _rate(right[name], members) for name in KEPT},
            "all_correct": _rate(np.all([right[n] for n in prompt_eval.ATTRIBUTES], 0), members),
        }
    return out


def _checkpoint_inpainter(config, workdir, step):
    """The default inpainter: the run's checkpoint through ``generate.make_generate_fn``."""
    state, model, example_shape, num_classes = run.restore_run(config, workdir, step=step)
    params = train_state.model_params(state, config.sampling.use_ema)
    mesh = run.sampling_mesh(config)
    s = config.sampling

    def for_scale(scale):
        generate_fn = generate.make_generate_fn(config, model, example_shape, num_classes,
                                                mesh=mesh, guidance_scale=scale)

        def inpaint(key, x0, mask, prompts):
            edit = generate.EditInputs(jnp.asarray(x0), jnp.asarray(mask), 1.0, s.jump_length,
                                       s.jump_n_sample)
            return generate_fn(params, key, len(prompts), list(prompts), edit=edit)
        return inpaint

    return int(state.step), for_scale


def _inpaint_all(inpaint, key, images, masks, prompts, batch_size):
    """Every image inpainted in batches: ``(outputs, largest change in the kept region)``."""
    outputs, kept_change = [], 0.0
    for offset in range(0, len(images), batch_size):
        chunk = slice(offset, offset + batch_size)
        out = np.asarray(parallel.to_host(inpaint(jax.random.fold_in(key, offset), images[chunk],
                                                  masks[chunk], prompts[chunk])), np.float32)
        kept_change = max(kept_change, float(np.max(np.abs(out - images[chunk])
                                                    * (1.0 - masks[chunk]))))
        outputs.append(out)
    return np.concatenate(outputs), kept_change


def _check(config):
    """Refuse runs this evaluation cannot measure, naming the key."""
    configuration.validate(config)
    if config.data.name != "captions":
        raise configuration.ConfigError(
            f"inpainting adherence needs a text-to-image run on captioned shapes "
            f"(data.name='captions'); this config's data is {config.data.name!r}")
    if config.latent.autoencoder:
        raise configuration.ConfigError(
            "inpainting adherence measures pixel runs (the kept region must come back exactly); "
            f"config.latent.autoencoder={config.latent.autoencoder!r} is a latent run")


def evaluate_inpainting(config, workdir: str, *, num: int = 200,
                        guidance_scales: Optional[Sequence[float]] = None,
                        log: Callable[[str], None] = print, step: Optional[int] = None,
                        load_inpainter: Optional[Callable] = None) -> dict:
    """Inpainting adherence of the run in ``workdir`` on ``num`` one-object records.

    See the module docstring. ``guidance_scales`` default to :func:`prompt_eval.guidance_scales`;
    the judge is the run's attribute classifier (``--mode=train_classifier``, found as
    :func:`prompt_eval.load_attribute_classifier` finds it). Generation runs in batches of
    ``evaluation.batch_size`` with the config's sampler and RePaint settings; the same noise
    serves every scale. Writes ``workdir/eval/step<N>_<method>_<steps>steps_inpaint_*.json``
    and returns the results. ``load_inpainter(config, workdir, step) -> (step, for_scale)``,
    where ``for_scale(scale)`` returns ``inpaint(key, x0, mask, prompts) -> images in [-1, 1]``,
    replaces the run's checkpoint (for tests)."""
    log = log if parallel.is_writer() else writers.quiet
    _check(config)
    scales = tuple(float(g) for g in (guidance_scales or prompt_eval.guidance_scales(config)))
    classify, judge = prompt_eval.load_attribute_classifier(config, workdir)
    resolution, s = config.data.resolution, config.sampling
    records = draw_records(num, resolution, config.seed + SEED_OFFSET, config.data.heldout)
    original = [r["attributes"] for r in records]
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0
    masks = np.stack([object_mask(a, resolution) for a in original])
    requested, heldout, prompts = requests(original, s.seed + SEED_OFFSET, config.data.heldout)
    step, for_scale = (load_inpainter or _checkpoint_inpainter)(config, workdir, step)
    key = jax.random.key(s.seed)
    batch = config.evaluation.batch_size
    start = time.time()
    runs = [("without", 1.0, [""] * num)] + [("with", g, prompts) for g in scales]
    conditions, kept_change, exact = [], 0.0, True
    for prompt, scale, texts in runs:
        outputs, change = _inpaint_all(for_scale(scale), key, images, masks, texts, batch)
        kept_change = max(kept_change, change)
        keep = masks[..., 0] == 0
        exact &= bool(np.array_equal(files.to_uint8(outputs)[keep],
                                     np.stack([r["image"] for r in records])[keep]))
        scored = score_requests(classify(files.quantize(outputs)), requested, original, heldout)
        conditions.append({"prompt": prompt, "guidance_scale": None if prompt == "without"
                           else scale, **scored})
        log(f"inpainting {prompt} the prompt" + ("" if prompt == "without" else f", guidance "
            f"{scale:g}") + f": requested shape and colour {scored['all']['shape_and_colour']:.3f}")
    results = {
        "step": int(step),
        "metric": "inpainting adherence: the attribute classifier's reading of inpainted objects "
                  "against the (shape, colour) requested, the rest of the image kept",
        "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                    "strength": 1.0, "jump_length": s.jump_length,
                    "jump_n_sample": s.jump_n_sample, "use_ema": s.use_ema},
        "num": int(num), "num_seen": int((~heldout).sum()), "num_heldout": int(heldout.sum()),
        "guidance_scales": list(scales),
        "mask_fraction": float(masks.mean()),
        "unedited": score_requests(classify(images), requested, original, heldout),
        "without_prompt": conditions[0],
        "with_prompt": conditions[1:],
        "kept_region": {"max_abs_change": kept_change, "exact_uint8": exact},
        "classifier_test_accuracy": judge["test_accuracy_per_attribute"],
        "seconds": round(time.time() - start, 2),
    }
    settings = {"workdir": os.path.abspath(workdir), "sampling": s.to_dict(), "num": int(num),
                "guidance_scales": list(scales), "data": config.data.to_dict()}
    if parallel.is_writer():
        name = f"step{results['step']}_{s.method}_{s.num_steps}steps_inpaint"
        results["path"] = files.save_result(os.path.join(workdir, "eval"), name, results,
                                            settings)
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    """A markdown table of :func:`evaluate_inpainting`'s results, one row per condition and group.

    Rows: the unedited inputs, inpainting without the prompt, and with it at each guidance
    scale; columns: the rates of :func:`score_requests`."""
    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    columns = ("shape", "colour", "shape_and_colour", "original_object") + KEPT
    names = ("new shape", "new colour", "both", "old object") + KEPT
    lines = [f"inpainting adherence of step {results['step']} "
             f"({results['sampler']['method']}, {results['sampler']['num_steps']} steps): "
             f"{results['num']} one-object images, the object's box repainted "
             f"({results['mask_fraction']:.0%} of the pixels)", "",
             "| inpainting | requested pair | images | " + " | ".join(names) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    rows = [("input, unedited", results["unedited"]),
            ("without prompt", results["without_prompt"])]
    rows += [(f"prompt, guidance {c['guidance_scale']:g}", c) for c in results["with_prompt"]]
    for label, result in rows:
        for group, pair in (("seen", "seen"), ("heldout", "held-out")):
            r = result[group]
            lines.append(f"| {label} | {pair} | {r['num']} | "
                         + " | ".join(cell(r[c]) for c in columns) + " |")
    kept = results["kept_region"]
    judge = results["classifier_test_accuracy"]
    lines += ["", f"kept region: largest change {kept['max_abs_change']:.3g}, identical after "
              f"8-bit quantisation: {'yes' if kept['exact_uint8'] else 'NO'}; judge on real "
              f"images: shape {judge['shape']:.2f}, colour {judge['colour']:.2f}, all correct "
              f"{judge['all_correct']:.2f}",
              "(new shape / colour: over requests that change it; both: requested shape and "
              "colour; old object: the input's shape and colour; the rest: kept as in the input)"]
    return "\n".join(lines)
