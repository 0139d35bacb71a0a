"""Metrics of generated point clouds and molecules, per guidance scale, against real data.

Point clouds (``data.name = "shape_points"``): generated shapes are compared with held-out ones
by Chamfer and earth mover's distances (MMD, COV and 1-NNA, :func:`~diffusion_jax.point_eval.
set_distances`), and a small PointNet (:class:`~diffusion_jax.models.point_classifier.
PointClassifier`, trained by ``--mode=train_classifier`` on the training shapes and tested on
fresh ones) reads each generated shape's class, scored against the class asked for.

Molecules (``molecules``, ``molecule_folder``): atom stability, molecule stability, validity,
uniqueness and novelty against the training molecules (:func:`~diffusion_jax.molecule_eval.
evaluate`), the metrics of Hoogeboom et al. 2022.

Every table also has a "real" row: the same metrics of held-out real data (for point clouds,
held-out shapes other than the reference ones, asked for the same classes), the level a perfect
model would reach.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import classifier_store, configuration, generate, modalities, molecule_eval
from diffusion_jax import parallel, point_eval, prompt_eval, set_files, writers
from diffusion_jax.models.point_classifier import PointClassifier

__all__ = ["TEST_SHAPES", "train_point_classifier", "load_point_classifier", "evaluate_sets",
           "format_table"]

TEST_SHAPES = 600  # fresh shapes the classifier is measured on
_READ_BATCH = 200


def _records(source, indices):
    """``(x [n, N, 3 + F], labels [n] or None)`` of ``source``'s records at ``indices``."""
    records = [source[int(i)] for i in indices]
    x = np.stack([np.asarray(r["x"], np.float32) for r in records])
    labels = np.array([r["label"] for r in records], np.int32) if "label" in records[0] else None
    return x, labels


def _classifier_step(model, optimizer):
    def loss_fn(params, points, labels):
        logits = model.apply({"params": params}, points)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, points, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, points, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _classify_fn(model, params) -> Callable:
    """``classify(points [n, N, 3]) -> int [n]``, in padded batches (one compilation)."""
    apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
    return lambda points: classifier_store.apply_in_batches(
        apply, params, np.asarray(points)[..., :3], _READ_BATCH, pad=True)


def train_point_classifier(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Train the shape classifier on the run's training shapes, test it on fresh ones, save it.

    ``config.classifier``'s steps, batch size and learning rate; returns the summary saved in
    ``classifier.json`` (its test accuracy included)."""
    source = configuration.build_source(config.data, "train")
    test_source = configuration.build_source(config.data, "test")
    c = config.classifier
    model = PointClassifier(source.num_classes)
    key = jax.random.key(config.seed)
    params = model.init(key, jnp.zeros((1,) + source[0]["x"].shape, jnp.float32))["params"]
    optimizer = classifier_store.classifier_optimizer(config)
    opt_state, step = optimizer.init(params), _classifier_step(model, optimizer)
    rng = np.random.default_rng(config.seed)
    start = time.time()
    for i in range(c.num_steps):
        points, labels = _records(source, rng.integers(0, len(source), c.batch_size))
        params, opt_state, loss = step(params, opt_state, points, labels)
        if (i + 1) % max(c.num_steps // 10, 1) == 0:
            log(f"point classifier step {i + 1}/{c.num_steps}  loss {float(loss):.4f}")
    points, labels = _records(test_source, range(min(TEST_SHAPES, len(test_source))))
    accuracy = float(np.mean(_classify_fn(model, params)(points) == labels))
    summary = {"kind": "point_classifier", "num_classes": int(source.num_classes),
               "num_points": int(points.shape[1]), "steps": int(c.num_steps),
               "test": {"accuracy": accuracy, "num_shapes": len(labels)},
               "training_seconds": round(time.time() - start, 1)}
    directory = classifier_store.save_classifier(config, workdir, params, summary)
    log(f"point classifier: held-out accuracy {accuracy:.3f} on {len(labels)} shapes; "
        f"saved to {directory}")
    return summary


def load_point_classifier(config, workdir: str):
    """``(classify, summary)`` of the classifier :func:`train_point_classifier` saved."""
    directory, summary = classifier_store.read_classifier_summary(config, workdir,
                                                                  "point classifier")
    if summary.get("kind") != "point_classifier":
        raise classifier_store.EvaluationError(
            f"{directory} holds a {summary.get('kind', 'image')} classifier, not the point "
            "classifier: train it with --mode=train_classifier for this config")
    model = PointClassifier(summary["num_classes"])
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, summary["num_points"], 3)))["params"])
    params = classifier_store.restore_classifier_params(directory, abstract)
    return _classify_fn(model, params), summary


def _score_points(points, asked, reference, classify) -> dict:
    """Distances of ``points`` to the ``reference`` shapes, and the classifier's accuracy."""
    result = point_eval.set_distances(points[..., :3], reference[..., :3])
    if asked is not None and classify is not None:
        result["class_accuracy"] = float(np.mean(classify(points) == asked))
    return result


def _reference_smiles(source) -> Optional[list]:
    """The training molecules' canonical SMILES (for novelty), where the source names them.

    Example i is molecule ``i mod n``, so the first ``min(len, n)`` examples are all the
    molecules a run trains on (fewer than the list when ``data.size`` is smaller)."""
    if not hasattr(source, "smiles"):
        return None
    return sorted({source.smiles(i) for i in range(min(len(source), source.num_molecules))})


def _generate_all(config, g, num_classes, num, key) -> tuple:
    """``num`` samples of ``g`` in batches of ``evaluation.batch_size``, and the labels asked."""
    e, samples, asked = config.evaluation, [], []
    for offset in range(0, num, e.batch_size):
        n = min(e.batch_size, num - offset)
        samples.append(np.asarray(parallel.to_host(g(jax.random.fold_in(key, offset), n))))
        labels = generate.sampling_labels(config, num_classes, n)
        asked.append(None if labels is None else np.asarray(labels))
    return np.concatenate(samples), None if asked[0] is None else np.concatenate(asked)


def _real_row(config, kind, test, num, reference, classify) -> dict:
    """The metrics of held-out real data: the level a perfect model reaches."""
    if kind == "molecules":
        x, _ = _records(test, range(min(num, len(test))))
        return molecule_eval.evaluate(set_files.molecules_of(x, config))
    x, labels = _records(test, range(num, 2 * num))
    return _score_points(x, labels if classify is not None else None, reference, classify)


def _sizes(config, kind, test) -> int:
    """Samples per row: ``evaluation.num_samples`` (point clouds: half the held-out at most).

    The other half of the held-out shapes is the point clouds' real row."""
    num = config.evaluation.num_samples
    if kind == "points":
        num = min(num, len(test) // 2)
    if num < 1:
        raise configuration.ConfigError(
            f"{test!r} has {len(test)} records, too few to evaluate against: raise "
            "config.data.size (point clouds need two held-out shapes per sample)")
    return num


def evaluate_sets(config, workdir: str, *, log: Callable[[str], None] = print,
                  step: Optional[int] = None, load_generator: Optional[Callable] = None) -> dict:
    """The point-cloud or molecule metrics of a run's samples per guidance scale, and of real data.

    ``evaluation.num_samples`` samples per scale of :func:`~diffusion_jax.prompt_eval.
    guidance_scales`, generated in batches of ``evaluation.batch_size`` with the same noise at
    every scale. Point clouds are compared with the first ``num_samples`` held-out shapes (split
    "test"); the "real" row scores the next ``num_samples``. Writes
    ``workdir/eval/step<N>_<method>_<steps>steps_sets.json`` and TensorBoard scalars under
    ``eval/sets/``; returns the results. ``load_generator(config, workdir, step) -> (step,
    num_classes, for_scale)`` replaces the run's checkpoint (as
    :func:`~diffusion_jax.generate.checkpoint_generators`)."""
    log = log if parallel.is_writer() else writers.quiet
    configuration.validate(config)
    s = config.sampling
    kind = modalities.KINDS.get(config.data.name)
    if kind not in modalities.SET_KINDS:
        raise configuration.ConfigError(f"evaluate_sets measures point clouds and molecules; "
                                        f"data.name={config.data.name!r} is {kind or 'image'}")
    test = configuration.build_source(config.data, split="test")
    num = _sizes(config, kind, test)
    step, num_classes, for_scale = (load_generator or generate.checkpoint_generators)(
        config, workdir, step)
    # The shape judge reads the classes asked for: a class-conditional point-cloud run only.
    classify, summary = (load_point_classifier(config, workdir)
                         if kind == "points" and num_classes is not None else (None, None))
    reference = _records(test, range(num))[0] if kind == "points" else None
    start = time.time()
    real = _real_row(config, kind, test, num, reference, classify)
    novelty_reference = (_reference_smiles(configuration.build_source(config.data, "train"))
                         if kind == "molecules" else None)
    per_scale = []
    for scale in prompt_eval.guidance_scales(config):
        samples, asked = _generate_all(config, for_scale(scale), num_classes, num,
                                       jax.random.key(s.seed))
        row = (_score_points(samples, asked, reference, classify) if kind == "points" else
               molecule_eval.evaluate(set_files.molecules_of(samples, config),
                                      novelty_reference))
        per_scale.append({"guidance_scale": scale, **row})
        log(f"guidance {scale:g}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                  if isinstance(v, float)))
    results = {"step": int(step), "kind": kind, "num_samples": num,
               "conditional": num_classes is not None,
               "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                           "use_ema": s.use_ema},
               "scales": per_scale, "real": real,
               "classifier_test": None if summary is None else summary["test"],
               "generation_and_scoring_seconds": round(time.time() - start, 2)}
    scalars = {f"eval/sets/cfg{r['guidance_scale']:g}/{k}": v for r in per_scale
               for k, v in r.items() if k != "guidance_scale" and isinstance(v, float)}
    out_path = classifier_store.write_results(
        config, workdir, f"step{results['step']}_{s.method}_{s.num_steps}steps_sets", results,
        scalars, log)
    log(format_table(results))
    log(f"wrote {out_path}")
    return results


def format_table(results: dict) -> str:
    """One row per guidance scale (one "-" row for an unconditional run), then the real row."""
    rows = results["scales"] + [{"guidance_scale": "real", **results["real"]}]
    names = list(dict.fromkeys(k for row in rows for k, v in row.items()
                               if isinstance(v, float) and k != "guidance_scale"))
    sampler = results["sampler"]
    lines = [f"{results['kind']} of step {results['step']}: {sampler['method']}, "
             f"{sampler['num_steps']} steps, {results['num_samples']} samples per row",
             f"{'guidance':>9} " + " ".join(f"{n:>18}" for n in names)]
    for row in rows:
        scale = row["guidance_scale"]
        label = (scale if isinstance(scale, str) else
                 f"{scale:g}" if results["conditional"] else "-")
        lines.append(f"{label:>9} " + " ".join(
            f"{row[n]:>18.4f}" if isinstance(row.get(n), float) else f"{'-':>18}"
            for n in names))
    return "\n".join(lines)
