"""Prompt adherence of text-to-image models on captioned shapes (``data.name = "captions"``).

A judge, the multi-head :class:`~diffusion_jax.models.classifier.AttributeClassifier`, is trained on
CaptionedShapes images of every (shape, colour) pair, held-out ones included (it is a judge, not
the generator), to read off each attribute a caption names: shape, colour, size, count, position
(the 3x3 cell of a single object, or "none" for several) and background. Evaluation draws
attributes with a fixed seed, half from (shape, colour) pairs the generator saw in training and
half from the held-out ones (``config.data.heldout``: HELDOUT_PAIRS, or every pair of a held-out
colour or shape), turns them into prompts with ``caption_for``, generates one image per
prompt at each guidance scale, classifies the images, and reports how often each attribute the
prompt asks for is there: per attribute, the mean over the attributes the prompt names (position
only for one object), and the rate of images with every attribute right, for seen and held-out
pairs separately.

    python main.py --config=configs/text_shapes.py --workdir=DIR --mode=train_classifier
    python main.py --config=configs/text_shapes.py --workdir=DIR --mode=eval \\
        --config.evaluation.guidance_scales="(0.0, 1.0, 3.0, 5.0)"

``evaluate.train_classifier`` and ``evaluate.evaluate`` come here for captioned data.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import classifier_store, configuration, files, generate, parallel, writers
from diffusion_jax.data import captions
from diffusion_jax.models.classifier import AttributeClassifier

__all__ = ["ATTRIBUTES", "NO_POSITION", "heads", "attribute_targets", "validate",
           "guidance_scales", "train_attribute_classifier", "load_attribute_classifier",
           "draw_prompts", "score", "concept_rates", "evaluate_prompts", "format_table"]

ATTRIBUTES = ("shape", "colour", "size", "count", "position", "background")
NO_POSITION = len(captions.POSITIONS)  # the position class of several objects ("none")
GROUPS = ("seen", "heldout", "all")
# The data whose --mode=eval measures every one of config.evaluation.guidance_scales.
GUIDANCE_SWEEPS = ("captions", "tones", "moving_shapes", "shape_points", "molecules",
                   "molecule_folder")
TEST_EXAMPLES = 2_000  # fresh images the judge's accuracy is measured on
_CLASSIFY_BATCH = 250  # images per call of the jitted classifier (padded: one compilation)


def _seeds(config):
    """CaptionedShapes seeds of the judge's training images, test images and evaluation prompts.

    None of them is a seed the diffusion model's data uses (0 and 1)."""
    return config.seed + 10_000, config.seed + 20_000, config.sampling.seed + 30_000


def heads(max_objects: int = 3):
    """``((attribute, number of classes), ...)`` of the judge's softmax heads."""
    sizes = {"shape": len(captions.SHAPES), "colour": len(captions.COLOURS),
             "size": len(captions.SIZES), "count": max_objects,
             "position": len(captions.POSITIONS) + 1, "background": len(captions.COLOURS)}
    return tuple((name, sizes[name]) for name in ATTRIBUTES)


def attribute_targets(attributes: Sequence[dict]) -> dict:
    """Class indices (int32 [n] per attribute) of a list of CaptionedShapes attribute dicts.

    Count 1..k becomes class 0..k-1, and position -1 (several objects) the class NO_POSITION."""
    out = {name: np.array([int(a[name]) for a in attributes], np.int32) for name in ATTRIBUTES}
    out["count"] = out["count"] - 1
    out["position"] = np.where(out["position"] < 0, NO_POSITION, out["position"]).astype(np.int32)
    return out


def _images_and_attributes(source, indices):
    records = [source[int(i)] for i in indices]
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0
    return images, [r["attributes"] for r in records]


# ----------------------------------------------------------------------------------- config


def validate(config) -> None:
    """Check the keys of config.evaluation that only prompt adherence uses.

    It runs before anything compiles, and raises
    :class:`~diffusion_jax.configuration.ConfigError` naming the key."""
    scales = config.evaluation.guidance_scales
    if not isinstance(scales, (tuple, list)):
        raise configuration.ConfigError(
            f"config.evaluation.guidance_scales must be a tuple of numbers, e.g. (0.0, 1.0, 3.0), "
            f"got {scales!r}")
    for scale in scales:
        if (isinstance(scale, bool) or not isinstance(scale, (int, float))
                or not math.isfinite(scale) or scale < 0):
            raise configuration.ConfigError(
                f"config.evaluation.guidance_scales must hold finite numbers >= 0 (0 = "
                f"unconditional), got {tuple(scales)!r}")
    if scales and config.data.name not in GUIDANCE_SWEEPS:
        raise configuration.ConfigError(
            "config.evaluation.guidance_scales is for the evaluations that sweep guidance "
            f"(data.name in {GUIDANCE_SWEEPS}: prompt adherence, audio, video and 3-D metrics); "
            "this config's "
            f"data is {config.data.name!r}: leave it empty and set "
            "config.sampling.guidance_scale")


def guidance_scales(config):
    """The guidance scales to evaluate.

    They are config.evaluation.guidance_scales, or config.sampling.guidance_scale alone when that
    is empty."""
    scales = config.evaluation.guidance_scales or (config.sampling.guidance_scale,)
    return tuple(float(s) for s in scales)


# ------------------------------------------------------------------------------------ judge


def _make_classify(model, params):
    """``classify(images [-1, 1]) -> {attribute: predicted class int32 [n]}`` in padded batches."""
    apply = jax.jit(lambda p, x: {k: jnp.argmax(v, -1) for k, v in model.apply(
        {"params": p}, x)[0].items()})

    return lambda images: classifier_store.apply_in_batches(apply, params, images,
                                                            _CLASSIFY_BATCH, pad=True)


def _judge_accuracy(predicted, targets):
    """Per-attribute accuracy of the judge on images with known attributes, and all-correct rate.

    Position is scored over all images, "none" included, and over single objects."""
    correct = {name: predicted[name] == targets[name] for name in ATTRIBUTES}
    single = targets["count"] == 0
    out = {name: float(np.mean(correct[name])) for name in ATTRIBUTES}
    out["position_single_object"] = float(np.mean(correct["position"][single]))
    out["all_correct"] = float(np.mean(np.all([correct[n] for n in ATTRIBUTES], axis=0)))
    return out


def train_attribute_classifier(config, workdir: str, *, log: Callable[[str], None] = print
                               ) -> dict:
    """Train the judge (the attribute classifier), test it and save it.

    It trains on fresh CaptionedShapes images of split "all" (``config.classifier``'s num_steps,
    batch_size, learning_rate, width and feature_dim), measures its per-attribute accuracy on
    TEST_EXAMPLES images of another seed, and saves it where ``evaluate.train_classifier`` saves
    classifiers (``evaluation.classifier_dir`` or ``workdir/classifier``). Returns the summary
    written to ``classifier.json`` there."""
    configuration.validate(config)
    c, d = config.classifier, config.data
    train_seed, test_seed, _ = _seeds(config)
    source = captions.CaptionedShapes(c.num_steps * c.batch_size, d.resolution, seed=train_seed,
                                      split="all", max_objects=d.max_objects)
    example_shape = (d.resolution, d.resolution, 3)
    model = AttributeClassifier(heads=heads(source.max_objects), width=c.width,
                                feature_dim=c.feature_dim)
    params = model.init(jax.random.key(config.seed), jnp.zeros((1,) + example_shape))["params"]
    optimizer = classifier_store.classifier_optimizer(config)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, targets):
        def loss_fn(params):
            logits, _ = model.apply({"params": params}, images)
            losses = {name: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                logits[name], targets[name])) for name in ATTRIBUTES}
            accuracy = {name: jnp.mean(jnp.argmax(logits[name], -1) == targets[name])
                        for name in ATTRIBUTES}
            return sum(losses.values()), accuracy

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    start = time.time()
    for i in range(c.num_steps):
        # Rendering the next batch overlaps the (asynchronously dispatched) previous step.
        images, attributes = _images_and_attributes(
            source, range(i * c.batch_size, (i + 1) * c.batch_size))
        params, opt_state, loss, accuracy = step(params, opt_state, images,
                                                 attribute_targets(attributes))
        if (i + 1) % max(c.num_steps // 10, 1) == 0 or i + 1 == c.num_steps:
            worst = min(ATTRIBUTES, key=lambda n: float(accuracy[n]))
            log(f"attribute classifier step {i + 1}/{c.num_steps} "
                f"{writers.progress_bar(i + 1, c.num_steps)}  loss {float(loss):.4f}  "
                f"batch accuracy {np.mean([float(v) for v in accuracy.values()]):.3f} "
                f"(lowest: {worst} {float(accuracy[worst]):.3f})")
    seconds = time.time() - start

    test = captions.CaptionedShapes(TEST_EXAMPLES, d.resolution, seed=test_seed, split="all",
                                    max_objects=d.max_objects)
    images, attributes = _images_and_attributes(test, range(len(test)))
    per_attribute = _judge_accuracy(_make_classify(model, params)(images),
                                    attribute_targets(attributes))
    summary = {
        "kind": "attributes",
        "test_accuracy": float(np.mean([per_attribute[n] for n in ATTRIBUTES])),
        "test_accuracy_per_attribute": per_attribute,
        "test_examples": int(len(test)),
        "test_images": f"CaptionedShapes(split='all', seed={test_seed}): a seed the judge "
                       "did not train on",
        "heads": [list(h) for h in model.heads],
        "train_steps": int(c.num_steps), "train_seconds": round(seconds, 1),
        "example_shape": list(example_shape),
        "data": config.data.to_dict(), "classifier": config.classifier.to_dict(),
        "device": jax.devices()[0].device_kind,
    }
    directory = classifier_store.save_classifier(config, workdir, params, summary)
    accuracies = "  ".join(f"{n} {per_attribute[n]:.3f}" for n in ATTRIBUTES)
    log(f"attribute classifier: held-out accuracy {accuracies}  (all correct "
        f"{per_attribute['all_correct']:.3f}) on {len(test)} fresh images after "
        f"{c.num_steps} steps ({seconds:.0f} s); saved to {directory}")
    return summary


def attribute_features(config, workdir: str) -> Callable:
    """``extract(images) -> features [n, feature_dim]`` of the run's attribute classifier."""
    model, params = _attribute_classifier(config, workdir)[:2]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])
    return lambda images: np.concatenate([np.asarray(apply(params, images[i:i + 250]))
                                          for i in range(0, len(images), 250)])


def load_attribute_classifier(config, workdir: str):
    """Load the judge trained with ``--mode=train_classifier`` for this run's data.

    Returns ``(classify(images) -> {attribute: predicted class [n]}, summary)``."""
    model, params, summary = _attribute_classifier(config, workdir)
    return _make_classify(model, params), summary


def _attribute_classifier(config, workdir: str):
    """``(model, params, summary)`` of the attribute classifier in the run's classifier folder."""
    directory, summary = classifier_store.read_classifier_summary(config, workdir,
                                                                  "attribute classifier")
    if summary.get("kind") != "attributes":
        raise classifier_store.EvaluationError(
            f"the classifier in {directory} is not an attribute classifier for captioned data "
            f"(it was trained on {summary['data'].get('name')!r}); retrain it with "
            "--mode=train_classifier and this config")
    wanted = [config.data.resolution, config.data.resolution, 3]
    if summary["example_shape"] != wanted:
        raise classifier_store.EvaluationError(
            f"the attribute classifier in {directory} was trained on images of shape "
            f"{summary['example_shape']}, this config makes {wanted}; retrain it with "
            "--mode=train_classifier")
    counts = dict(tuple(h) for h in summary["heads"])["count"]
    if counts < config.data.max_objects:
        raise classifier_store.EvaluationError(
            f"the attribute classifier in {directory} counts up to {counts} objects, but "
            f"config.data.max_objects={config.data.max_objects}; retrain it with "
            "--mode=train_classifier")
    model = AttributeClassifier(heads=tuple(tuple(h) for h in summary["heads"]),
                                width=summary["classifier"]["width"],
                                feature_dim=summary["classifier"]["feature_dim"])
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1,) + tuple(wanted)))["params"])
    params = classifier_store.restore_classifier_params(directory, abstract)
    return model, params, summary


# ------------------------------------------------------------------------------- evaluation


def draw_prompts(num: int, resolution: int, seed: int, max_objects: int = 3,
                 heldout_concept: str = "pairs"):
    """``(attributes, prompts, heldout)`` of ``num`` prompts.

    The attribute dicts are drawn with ``seed``, alternately from split "train" and split
    "heldout" of CaptionedShapes with ``heldout=heldout_concept`` (``heldout[i]`` says which),
    and a caption of each from ``caption_for``."""
    rng = np.random.default_rng(seed)
    sources = [captions.CaptionedShapes(1, resolution, split=split, max_objects=max_objects,
                                        heldout=heldout_concept)
               for split in ("train", "heldout")]
    heldout = np.arange(num) % 2 == 1
    attributes = [sources[int(h)].sample_attributes(rng) for h in heldout]
    prompts = [captions.caption_for(a, rng) for a in attributes]
    return attributes, prompts, heldout


def concept_rates(predicted: dict, heldout, concept: str) -> dict:
    """``{"concept_rate": {group: rate}}``: how often images show a held-out colour or shape.

    For ``config.data.heldout`` naming a colour or shape, the fraction of images of each group
    whose object the judge reads as that colour or shape; on seen prompts, which never ask for
    it, this is the concept leaking where it was not asked for. Empty for "pairs"."""
    attribute = captions.concept_attribute(concept)
    if attribute is None:
        return {}
    shows = np.asarray(predicted[attribute[0]]) == attribute[1]
    heldout = np.asarray(heldout, bool)
    return {"concept_rate": {group: float(shows[members].mean()) if members.any() else None
                             for group, members in (("seen", ~heldout), ("heldout", heldout))}}


def score(predicted: dict, attributes: Sequence[dict], heldout) -> dict:
    """Prompt adherence of images generated for ``attributes`` and classified as ``predicted``.

    ``predicted`` is {attribute: class [n]}. Reports, for "seen", "heldout" and "all" prompts,
    the accuracy of each attribute (position over single-object prompts only), ``mean_accuracy``
    (per image, the fraction of the attributes its prompt names that are right; averaged) and
    ``all_correct`` (the rate of images with every named attribute right)."""
    targets = attribute_targets(attributes)
    heldout = np.asarray(heldout, bool)
    single = targets["count"] == 0
    correct = {name: np.asarray(predicted[name]) == targets[name] for name in ATTRIBUTES}
    named = {name: single if name == "position" else np.ones_like(single) for name in ATTRIBUTES}
    right = sum((correct[n] & named[n]).astype(np.float64) for n in ATTRIBUTES)
    asked = sum(named[n].astype(np.float64) for n in ATTRIBUTES)
    out = {}
    for group, members in (("seen", ~heldout), ("heldout", heldout),
                           ("all", np.ones_like(heldout))):
        accuracy = {}
        for name in ATTRIBUTES:
            chosen = members & named[name]
            accuracy[name] = float(np.mean(correct[name][chosen])) if chosen.any() else None
        out[group] = {
            "num_prompts": int(members.sum()),
            "accuracy": accuracy,
            "mean_accuracy": float(np.mean((right / asked)[members])) if members.any() else None,
            "all_correct": float(np.mean((right == asked)[members])) if members.any() else None,
        }
    return out


def _chance(attributes, num_heads):
    """Per-attribute accuracy of guessing uniformly among a head's classes, and its mean.

    Position is guessed among its nine cells; the mean is over the attributes each prompt
    names."""
    classes = dict(num_heads)
    chance = {name: 1.0 / classes[name] for name in ATTRIBUTES}
    chance["position"] = 1.0 / len(captions.POSITIONS)
    single = attribute_targets(attributes)["count"] == 0
    base = sum(chance[n] for n in ATTRIBUTES if n != "position")
    per_image = np.where(single, (base + chance["position"]) / len(ATTRIBUTES),
                         base / (len(ATTRIBUTES) - 1))
    return {**chance, "mean_accuracy": float(np.mean(per_image))}


def _checkpoint_generator(config, workdir, step):
    """The default generator source: the run's checkpoint (:func:`generate.checkpoint_generators`)."""
    step, _, for_scale = generate.checkpoint_generators(config, workdir, step)
    return step, lambda scale: (lambda key, prompts, attributes, g=for_scale(scale):
                                g(key, len(prompts), prompts))


def evaluate_prompts(config, workdir: str, *, log: Callable[[str], None] = print,
                     step: Optional[int] = None, load_generator: Optional[Callable] = None
                     ) -> dict:
    """Prompt adherence at each of :func:`guidance_scales`.

    ``evaluation.num_samples`` prompts (see :func:`draw_prompts`; the same at every scale, and
    the same noise) are generated in batches of ``evaluation.batch_size``, quantised to 8 bits
    like saved images and scored by the judge (see :func:`score`). Writes
    ``workdir/eval/step<N>_<method>_<steps>steps_prompts.json`` and TensorBoard scalars under
    ``eval/prompts/``, and returns the results.

    ``load_generator(config, workdir, step) -> (step, for_scale)``, where ``for_scale(scale)``
    returns ``generate(key, prompts, attributes) -> images [n, H, W, 3] in [-1, 1]``, replaces
    the run's checkpoint (tests use a renderer of the prompts' attributes, or noise)."""
    log = log if parallel.is_writer() else writers.quiet  # process 0 reports
    configuration.validate(config)
    validate(config)
    e, s = config.evaluation, config.sampling
    scales = guidance_scales(config)
    classify, judge = load_attribute_classifier(config, workdir)
    num_heads = [tuple(h) for h in judge["heads"]]
    max_objects = config.data.max_objects
    _, _, prompt_seed = _seeds(config)
    attributes, prompts, heldout = draw_prompts(e.num_samples, config.data.resolution,
                                                prompt_seed, max_objects, config.data.heldout)
    step, for_scale = (load_generator or _checkpoint_generator)(config, workdir, step)
    key = jax.random.key(s.seed)
    per_scale = []
    start = time.time()
    for scale in scales:
        generate_scale = for_scale(scale)
        scale_start = time.time()
        predicted = {name: [] for name in ATTRIBUTES}
        for offset in range(0, e.num_samples, e.batch_size):
            chunk = slice(offset, min(offset + e.batch_size, e.num_samples))
            images = generate_scale(jax.random.fold_in(key, offset), prompts[chunk],
                                    attributes[chunk])
            images = files.quantize(parallel.to_host(images))
            for name, value in classify(images).items():
                predicted[name].append(value)
        predicted = {name: np.concatenate(v) for name, v in predicted.items()}
        result = {"guidance_scale": scale, **score(predicted, attributes, heldout),
                  **concept_rates(predicted, heldout, config.data.heldout),
                  "seconds": round(time.time() - scale_start, 2)}
        per_scale.append(result)
        log(f"guidance {scale:g}: mean attribute accuracy seen "
            f"{result['seen']['mean_accuracy']:.3f}, held-out "
            f"{result['heldout']['mean_accuracy']:.3f}")
    results = {
        "step": int(step),
        "metric": "prompt adherence: the attribute classifier's reading of generated images "
                  "against the attributes their prompts name",
        "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                    "guidance_rescale": s.guidance_rescale,
                    "negative_prompt": s.negative_prompt, "use_ema": s.use_ema},
        "num_samples": int(e.num_samples),
        "num_seen": int((~heldout).sum()), "num_heldout": int(heldout.sum()),
        "heldout": config.data.heldout,
        "heldout_pairs": [[captions.COLOURS[c], captions.SHAPES[sh]] for sh, c in
                          captions.CaptionedShapes(heldout=config.data.heldout).heldout_pairs],
        "guidance_scales": list(scales),
        "scales": per_scale,
        "chance": _chance(attributes, num_heads),
        "classifier_test_accuracy": judge["test_accuracy_per_attribute"],
        "generation_and_scoring_seconds": round(time.time() - start, 2),
    }
    scalars = {}
    for result in per_scale:
        prefix = f"eval/prompts/cfg{result['guidance_scale']:g}"
        for group in GROUPS:
            scalars[f"{prefix}/{group}/mean_accuracy"] = result[group]["mean_accuracy"]
            scalars[f"{prefix}/{group}/all_correct"] = result[group]["all_correct"]
            for attribute, value in result[group]["accuracy"].items():
                scalars[f"{prefix}/{group}/{attribute}"] = value
    out_path = classifier_store.write_results(
        config, workdir, f"step{results['step']}_{s.method}_{s.num_steps}steps_prompts",
        results, {k: v for k, v in scalars.items() if v is not None}, log)
    log(format_table(results))
    log(f"wrote {out_path}")
    return results


def format_table(results: dict) -> str:
    """One row per guidance scale and prompt group.

    Each row has the mean accuracy over the named attributes, the all-correct rate, and each
    attribute's accuracy."""
    def cell(value, width=6):
        return f"{'-':>{width}}" if value is None else f"{value:{width}.3f}"

    sampler = results["sampler"]
    lines = [(f"prompt adherence of step {results['step']}: {sampler['method']}, "
              f"{sampler['num_steps']} steps; {results['num_seen']} prompts of seen and "
              f"{results['num_heldout']} of held-out (shape, colour) pairs per scale"),
             (f"{'guidance':>8}  {'prompts':<8} {'mean':>6} {'all':>6}  "
              + " ".join(f"{name:>10}" for name in ATTRIBUTES))]
    for result in results["scales"]:
        for i, (group, label) in enumerate((("seen", "seen"), ("heldout", "held-out"))):
            r = result[group]
            scale = f"{result['guidance_scale']:g}" if i == 0 else ""
            lines.append(f"{scale:>8}  {label:<8} {cell(r['mean_accuracy'])} "
                         f"{cell(r['all_correct'])}  "
                         + " ".join(cell(r["accuracy"][n], 10) for n in ATTRIBUTES))
    chance = results["chance"]
    lines.append(f"{'chance':>8}  {'':<8} {cell(chance['mean_accuracy'])} {'':>6}  "
                 + " ".join(cell(chance[n], 10) for n in ATTRIBUTES))
    judge = results["classifier_test_accuracy"]
    lines.append(f"{'judge':>8}  {'real':<8} {'':>6} {cell(judge['all_correct'])}  "
                 + " ".join(cell(judge[n if n != "position" else "position_single_object"], 10)
                            for n in ATTRIBUTES))
    lines.append("(mean: fraction of the attributes a prompt names that the attribute classifier "
                 "sees, position only for one object; all: every named attribute right; judge: "
                 "the classifier's accuracy on real images of a fresh seed)")
    return "\n".join(lines)
