"""Metrics of generated samples: Fréchet distance, precision/recall, class scores and bits/dim.

A classifier trained on the run's data gives the feature space for a Fréchet distance and
precision/recall, and scores class-conditional samples; the probability-flow ODE gives bits/dim
on held-out data.

By default the Fréchet distance is measured in that classifier's features, not Inception-v3's: it
ranks samplers, step counts and checkpoints of one dataset, but it is not FID and is not
comparable to published FID numbers. With ``evaluation.feature_extractor = "inception"`` and
pytorch-fid's weights file (which you provide; nothing is downloaded) it is FID.

    python main.py --config=configs/X.py --workdir=DIR --mode=train_classifier   # once per dataset
    python main.py --config=configs/X.py --workdir=DIR --mode=eval

Text-to-image runs (``data.name = "captions"``) are measured by prompt adherence instead: the
classifier is a multi-head attribute classifier and eval reports how often generated images show
what their prompts ask for, per guidance scale (see :mod:`diffusion_jax.prompt_eval`).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import audio_eval, classifier_store, configuration, controlnet_runs, data, files
from diffusion_jax import generate, likelihood
from diffusion_jax import latent, metrics, models, parallel, parameterization, prompt_eval, run
from diffusion_jax import modalities, set_eval, set_runs, train_state, video_eval, writers
from diffusion_jax.classifier_store import EvaluationError
from diffusion_jax.models import inception

__all__ = ["FEATURE_SPACE_NOTE", "INCEPTION_NOTE", "EvaluationError", "train_classifier",
           "load_classifier", "evaluate", "evaluate_pretrained", "reference_features",
           "split_source"]

FEATURE_SPACE_NOTE = ("Fréchet distance and precision/recall in the features of a classifier "
                      "trained on this dataset (not Inception-v3: not FID, not comparable to "
                      "published FID numbers)")


# The most held-out examples the classifier's test accuracy is measured on.
TEST_EXAMPLES = 10_000


def _classifier_model(classifier_config, num_classes, example_shape, sample_rate):
    """The classifier of images, or of audio clips (on their spectrograms)."""
    c = classifier_config
    if len(example_shape) == 2:
        return models.AudioClassifier(num_classes=num_classes, sample_rate=sample_rate,
                                      width=c["width"], feature_dim=c["feature_dim"])
    return models.Classifier(num_classes=num_classes, width=c["width"],
                             feature_dim=c["feature_dim"])


# Held-out data is config.data.test_split: Fashion-MNIST's and TFDS datasets' test split (or a
# slice of another split); for procedural data any split but the training one means fresh
# examples (another seed).


def split_source(config, key: str):
    """The source of the split that ``config.<key>`` names, with errors that name the key.

    ``key`` is "data.test_split" (held-out images) or "evaluation.reference_split" (the
    reference set; "" means ``data.split``)."""
    split = (config.data.test_split if key == "data.test_split"
             else config.evaluation.reference_split or config.data.split)
    try:
        return configuration.build_source(config.data, split=split)
    except data.DataError as err:
        raise data.DataError(f"config.{key}={split!r}: {err}") from err


def _batched_apply(apply_fn, params, images, batch_size=500):
    """``(logits, features)`` of the classifier over ``images``, 500 at a time."""
    return classifier_store.apply_in_batches(apply_fn, params, images, batch_size)


def _examples(source, indices=None):
    """(images in [-1, 1], labels or -1) of the records at ``indices`` (default: all), in order."""
    indices = range(len(source)) if indices is None else indices
    to_inputs = data.ToModelInputs()
    records = [to_inputs.map(source[int(i)]) for i in indices]
    images = np.stack([r["x"] for r in records])
    labels = np.array([r.get("label", -1) for r in records], np.int32)
    return images, labels


def train_classifier(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
    """Train the feature-extractor classifier on ``config.data`` and measure its accuracy.

    It trains on the training split and is measured on the held-out split; saves to
    ``evaluation.classifier_dir`` (default ``workdir/classifier``) and returns the summary
    written to ``classifier.json`` there. Captioned data trains the attribute classifier of
    :func:`diffusion_jax.prompt_eval.train_attribute_classifier` instead."""
    configuration.validate(config)
    if jax.process_count() > 1:
        raise EvaluationError(
            "--mode=train_classifier runs in a single process (the classifier is small), this "
            f"is one of {jax.process_count()}: run it as one task (e.g. `srun -n1`, or plain "
            "python on one host) without --config.distributed.initialize; --mode=eval then "
            "reads it on every host")
    if config.data.name == "captions":  # prompt adherence: captioned shapes
        return prompt_eval.train_attribute_classifier(config, workdir, log=log)
    if config.data.name == "moving_shapes":  # the frame judge of video_eval
        return video_eval.train_judge(config, workdir, log=log)
    if modalities.KINDS.get(config.data.name) == "points":  # the shape classifier of set_eval
        return set_eval.train_point_classifier(config, workdir, log=log)
    if modalities.KINDS.get(config.data.name) == "molecules":
        raise configuration.ConfigError(
            "molecules need no classifier: --mode=eval measures them with RDKit (stability, "
            "validity, uniqueness, novelty); run it directly")
    source = configuration.build_source(config.data)
    test_source = split_source(config, "data.test_split")  # before training: a typo fails now
    example_shape, num_classes = configuration.data_shape(source)
    if num_classes is None or len(example_shape) not in (2, 3):
        raise configuration.ConfigError(
            f"--mode=train_classifier needs labelled images or audio clips; {source!r} has "
            f"{'no labels' if num_classes is None else f'examples of shape {example_shape}'}")
    c = config.classifier
    model = _classifier_model(c, num_classes, example_shape, config.data.sample_rate)
    key_init, key_train = jax.random.split(jax.random.key(config.seed))
    params = model.init(key_init, jnp.zeros((1,) + tuple(example_shape)))["params"]
    optimizer = classifier_store.classifier_optimizer(config)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss_fn(params):
            logits, _ = model.apply({"params": params}, batch["x"], train=True,
                                    rngs={"dropout": key})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return jnp.mean(loss), jnp.mean(jnp.argmax(logits, -1) == batch["label"])

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    iterator = data.make_iterator(source, batch_size=c.batch_size, seed=config.seed)
    start = time.time()
    for i in range(c.num_steps):
        params, opt_state, loss, accuracy = step(params, opt_state, next(iterator),
                                                 jax.random.fold_in(key_train, i))
        if (i + 1) % max(c.num_steps // 10, 1) == 0 or i + 1 == c.num_steps:
            log(f"classifier step {i + 1}/{c.num_steps} "
                f"{writers.progress_bar(i + 1, c.num_steps)}  loss {float(loss):.4f}  "
                f"batch accuracy {float(accuracy):.3f}")
    seconds = time.time() - start

    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    # (all of Fashion-MNIST's test split; procedural data would otherwise be data.size records)
    images, labels = _examples(test_source, range(min(len(test_source), TEST_EXAMPLES)))
    logits, _ = _batched_apply(apply, params, images)
    test_accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    summary = {"test_accuracy": test_accuracy, "test_examples": int(len(labels)),
               "train_steps": int(c.num_steps), "train_seconds": round(seconds, 1),
               "num_classes": int(num_classes), "example_shape": list(example_shape),
               "data": config.data.to_dict(), "classifier": config.classifier.to_dict(),
               "device": jax.devices()[0].device_kind}
    directory = classifier_store.save_classifier(config, workdir, params, summary)
    log(f"classifier: test accuracy {test_accuracy:.4f} on {len(labels)} held-out examples "
        f"after {c.num_steps} steps ({seconds:.0f} s); saved to {directory}")
    return summary


def load_classifier(config, workdir: str):
    """Load the classifier trained for this run's data.

    Returns ``(apply(params, images) -> (logits, features), params, summary)``."""
    directory, summary = classifier_store.read_classifier_summary(config, workdir)
    if summary["data"].get("name") != config.data.name:
        raise EvaluationError(
            f"the classifier in {directory} was trained on data {summary['data'].get('name')!r}, "
            f"this config uses {config.data.name!r}")
    model = _classifier_model(summary["classifier"], summary["num_classes"],
                              summary["example_shape"], summary["data"].get("sample_rate"))
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1,) + tuple(summary["example_shape"])))["params"])
    params = classifier_store.restore_classifier_params(directory, abstract)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return apply, params, summary


def reference_features(config, workdir, extract, num):
    """Features of ``num`` examples of ``evaluation.reference_split`` (the reference set).

    That split is the training split (``data.split``) unless set. The features are cached in
    ``workdir/eval`` so later evaluations skip recomputing them."""
    name = config.evaluation.feature_extractor
    split = config.evaluation.reference_split or config.data.split
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)  # "train[:90%]"
    path = os.path.join(workdir, "eval", f"reference_{name}_{safe}_{num}.npz")
    # Processes may differ in finding this cache (process 0 writes it): harmless while feature
    # extraction runs on each process's own devices, as it does; a mesh-wide extractor would
    # have to agree on it first.
    if os.path.exists(path):
        return np.load(path)["features"]
    source = split_source(config, "evaluation.reference_split")
    # An evenly spread subset rather than the first ``num`` records, in case those are sorted.
    images, _ = _examples(source, np.linspace(0, len(source) - 1, min(num, len(source))))
    features = np.concatenate([extract(images[i:i + 250]) for i in range(0, len(images), 250)])
    if parallel.is_writer():
        files.save_arrays(path, features=features)
    return features


INCEPTION_NOTE = ("Fréchet distance (FID when the weights are pytorch-fid's standard ones) and "
                  "precision/recall in FID Inception-v3 pool features")


def feature_extractor(config, classifier):
    """``(extract(images) -> features [n, d] float64-ready numpy, description)``.

    ``classifier`` is :func:`load_classifier`'s result (unused for Inception features).
    """
    if config.evaluation.feature_extractor == "classifier":
        apply, params, _ = classifier
        return (lambda images: _batched_apply(apply, params, images)[1]), FEATURE_SPACE_NOTE
    try:
        variables = inception.load_weights(config.evaluation.inception_weights)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise EvaluationError(f"config.evaluation.inception_weights: {err}") from err
    feature_fn = inception.make_feature_fn(variables)

    def extract(images):
        images = np.asarray(images, np.float32)
        if images.shape[-1] == 1:  # grayscale: the same image in all three channels
            images = np.repeat(images, 3, axis=-1)
        return np.concatenate([np.asarray(feature_fn(images[i:i + 100]))
                               for i in range(0, len(images), 100)])

    return extract, INCEPTION_NOTE


def _no_controlnet(config):
    """``config``, unless it is a ControlNet run's (whose prompts need their controls)."""
    if controlnet_runs.enabled(config):
        raise configuration.ConfigError(
            "--mode=eval measures prompt adherence without control images; a ControlNet run's "
            "adherence to its controls is measured by benchmarks/controlnet_adherence.py")
    return config


def _controls(config, model, example_shape, num, offset) -> dict:
    """``generate``'s keyword arguments for test records ``offset``..: a ControlNet run's controls.

    ``{}`` for other runs."""
    if not controlnet_runs.enabled(config):
        return {}
    shape = controlnet_runs.control_shape(model, example_shape)
    return {"controls": generate.sampling_controls(config, num, shape, offset)}


def _data_specific_evaluation(config, workdir, log, step) -> Optional[dict]:
    """The results of the data's own evaluation, or None for images measured by features."""
    if config.data.name == "captions":  # prompt adherence: captioned shapes
        return prompt_eval.evaluate_prompts(_no_controlnet(config), workdir, log=log, step=step)
    if config.data.name in ("tones", "audio_folder"):  # pitch and label accuracy per guidance
        return _evaluate_audio(config, workdir, log, step)
    if config.data.name == "moving_shapes":  # motion and attributes per guidance scale
        return video_eval.evaluate_video(config, workdir, video_eval.load_judge(config, workdir),
                                         log=log, step=step)
    if set_runs.is_set_data(config):  # set distances and the shape judge, or RDKit
        return set_eval.evaluate_sets(config, workdir, log=log, step=step)
    return None


def evaluate(config, workdir: str, *, log: Callable[[str], None] = print,
             step: Optional[int] = None) -> dict:
    """Generate samples from a checkpoint of the run and measure them.

    Generates ``evaluation.num_samples`` samples from the run's checkpoint of ``step`` (default
    ``sampling.checkpoint_step``, -1 for the latest, as ``--mode=sample`` uses) with
    ``config.sampling``'s sampler, and measures them (see the module docstring). Writes
    ``workdir/eval/step<N>_<method>_<steps>steps_cfg<scale>.json`` and TensorBoard scalars
    under ``eval/``, and returns the results. Captioned data is measured by prompt adherence
    (:func:`diffusion_jax.prompt_eval.evaluate_prompts`) and audio by pitch and label accuracy
    (:func:`diffusion_jax.audio_eval.evaluate_audio`), video by the frame judge and point clouds
    and molecules by :func:`diffusion_jax.set_eval.evaluate_sets`, at each of
    ``evaluation.guidance_scales`` instead."""
    # Every process of a multi-process run generates its share and computes the same results;
    # process 0 alone writes and reports them.
    log = log if parallel.is_writer() else writers.quiet
    configuration.validate(config)
    prompt_eval.validate(config)
    if step is None and config.sampling.checkpoint_step != -1:
        step = config.sampling.checkpoint_step
    special = _data_specific_evaluation(config, workdir, log, step)
    if special is not None:
        return special
    e, s = config.evaluation, config.sampling
    classifier = load_classifier(config, workdir) if e.feature_extractor == "classifier" or \
        os.path.exists(os.path.join(classifier_store.classifier_dir(config, workdir),
                                    "classifier.json")) else None
    extract, feature_space = feature_extractor(config, classifier)
    later = ("evaluation.reference_split",) + ("data.test_split",) * bool(e.likelihood_examples)
    for key in later:  # the splits read after generating: a bad one fails before it
        split_source(config, key)
    state, model, example_shape, num_classes = run.restore_run(config, workdir, step=step)
    params = train_state.model_params(state, config.sampling.use_ema)
    generate_fn = generate.make_generate_fn(config, model, example_shape, num_classes,
                                            mesh=run.sampling_mesh(config),
                                            decode=latent.decoder_for(config, workdir))

    # Batches are generated over all devices, scored by the classifier, and folded into float64
    # running statistics as they come; only the feature vectors are kept (for precision/recall).
    start = time.time()
    generated_stats, features, logits, labels = None, [], [], []
    key = jax.random.key(s.seed)
    for offset in range(0, e.num_samples, e.batch_size):
        num = min(e.batch_size, e.num_samples - offset)
        # Quantised to 8 bits like saved images, so generated and real images are alike.
        controls = _controls(config, model, example_shape, num, offset)
        batch = files.quantize(parallel.to_host(
            generate_fn(params, jax.random.fold_in(key, offset), num, **controls)))
        batch_features = extract(batch)
        if generated_stats is None:
            generated_stats = metrics.FeatureStatistics(batch_features.shape[1])
        generated_stats.update(batch_features)
        features.append(batch_features)
        if classifier is not None:
            logits.append(_batched_apply(classifier[0], classifier[1], batch)[0])
        wanted = generate.sampling_labels(config, num_classes, num)  # what generate asked for
        if wanted is not None:
            labels.append(np.asarray(wanted))
    features = np.concatenate(features)
    generation_seconds = time.time() - start
    reference = reference_features(config, workdir, extract, e.num_samples)
    reference_stats = metrics.FeatureStatistics(reference.shape[1]).update(reference)
    results = {
        "step": int(state.step),
        "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                    "guidance_scale": s.guidance_scale, "use_ema": s.use_ema},
        "num_samples": int(len(features)),
        "feature_space": feature_space,
        "frechet_distance": metrics.frechet_distance(generated_stats, reference_stats),
        **metrics.precision_recall(reference, features, k=e.precision_recall_k),
        "generation_and_scoring_seconds": round(generation_seconds, 2),
    }
    if classifier is not None:
        results["classifier_test_accuracy"] = classifier[2]["test_accuracy"]
    if labels and classifier is not None:
        logits = np.concatenate(logits)
        wanted = np.concatenate(labels)
        results["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == wanted))
        results["class_accuracy_chance"] = 1.0 / num_classes
    if e.likelihood_examples:
        results.update(_bits_per_dim(config, model, params, example_shape, num_classes,
                                     e.likelihood_examples, e.likelihood_steps))

    name = f"step{results['step']}_{s.method}_{s.num_steps}steps_cfg{s.guidance_scale:g}"
    out_path = classifier_store.write_results(
        config, workdir, name, results,
        {f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}, log)
    log(format_table(results))
    log(f"wrote {out_path}")
    return results


def evaluation_prompts(config, num: int) -> list:
    """``num`` prompts for evaluating a pretrained folder, in turn.

    From ``evaluation.prompts_file`` (one per line; blank lines skipped), else the captions of
    ``num`` evenly spread records of ``config.data``."""
    path = config.evaluation.prompts_file
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise configuration.ConfigError(
                f"config.evaluation.prompts_file={path!r} cannot be read ({err}): give a UTF-8 "
                "text file with one prompt per line") from err
        if not prompts:
            raise configuration.ConfigError(f"config.evaluation.prompts_file={path!r} holds no "
                                            "prompt (one per line)")
        return [prompts[i % len(prompts)] for i in range(num)]
    source = configuration.build_source(config.data)
    indices = np.linspace(0, len(source) - 1, min(num, len(source))).astype(int)
    records = [source[int(i)] for i in indices]
    if "caption" not in records[0]:
        raise configuration.ConfigError(
            f"{source!r} has no captions to prompt the pretrained model with: set "
            "config.evaluation.prompts_file, or use captioned data (data.captions)")
    return [str(records[i % len(records)]["caption"]) for i in range(num)]


def _evaluate_audio(config, workdir, log, step):
    """:func:`diffusion_jax.audio_eval.evaluate_audio` with this run's classifier and data."""
    if config.evaluation.feature_extractor != "classifier":
        raise configuration.ConfigError(
            "config.evaluation.feature_extractor='inception' reads images; audio is measured in "
            "the features of its spectrogram classifier: leave it 'classifier'")
    classifier = load_classifier(config, workdir)
    extract = lambda clips: _batched_apply(classifier[0], classifier[1], clips)[1]  # noqa: E731
    test_source = split_source(config, "data.test_split")
    reference = reference_features(config, workdir, extract, config.evaluation.num_samples)
    return audio_eval.evaluate_audio(config, workdir, classifier, reference, test_source,
                                     log=log, step=step)


def evaluate_pretrained(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
    """``--mode=eval`` on the pretrained folder ``config.pretrained.path`` itself.

    Generates ``evaluation.num_samples`` images from :func:`evaluation_prompts` and measures the
    Fréchet distance and precision/recall of their Inception features against ``config.data``'s
    images (FID with pytorch-fid's weights; ``evaluation.feature_extractor`` must be
    "inception", as no classifier is trained for such data). Writes
    ``workdir/eval/pretrained_<method>_<steps>steps_cfg<scale>.json``."""
    log = log if parallel.is_writer() else writers.quiet
    configuration.validate(config)
    e, s = config.evaluation, config.sampling
    if e.feature_extractor != "inception":
        raise configuration.ConfigError(
            "--mode=eval of a pretrained folder measures Inception features: set "
            "config.evaluation.feature_extractor='inception' and config.evaluation."
            "inception_weights (pytorch-fid's FID weights file)")
    extract, feature_space = feature_extractor(config, None)
    prompts = evaluation_prompts(config, e.num_samples)
    pipeline = generate.load_pipeline(config)
    start, features = time.time(), []
    for offset in range(0, e.num_samples, e.batch_size):
        images = generate.generate_pretrained(config, pipeline,
                                              prompts[offset:offset + e.batch_size], offset)
        features.append(extract(files.quantize(images)))
        log(f"generated {offset + len(images)}/{e.num_samples}")
    features = np.concatenate(features)
    generated_stats = metrics.FeatureStatistics(features.shape[1]).update(features)
    reference = reference_features(config, workdir, extract, e.num_samples)
    reference_stats = metrics.FeatureStatistics(reference.shape[1]).update(reference)
    results = {
        "step": f"pretrained {config.pretrained.path}",
        "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                    "guidance_scale": s.guidance_scale, "use_ema": False},
        "num_samples": int(len(features)),
        "feature_space": feature_space,
        "frechet_distance": metrics.frechet_distance(generated_stats, reference_stats),
        **metrics.precision_recall(reference, features, k=e.precision_recall_k),
        "generation_and_scoring_seconds": round(time.time() - start, 2),
    }
    name = f"pretrained_{s.method}_{s.num_steps}steps_cfg{s.guidance_scale:g}"
    settings = {"pretrained": os.path.abspath(config.pretrained.path),
                "prompts": sorted(set(prompts)), "sampling": s.to_dict(),
                "evaluation": e.to_dict(), "data": config.data.to_dict()}
    out_path = (files.save_result(os.path.join(workdir, "eval"), name, results, settings)
                if parallel.is_writer() else None)
    log(format_table(results))
    log(f"wrote {out_path}")
    return results


def _bits_per_dim(config, model, params, example_shape, num_classes, num, num_steps):
    """Bits/dim of held-out examples under the model, with the Hutchinson estimator.

    A model with classes is evaluated unconditionally (with the null label)."""
    schedule = configuration.build_schedule(config)
    par = configuration.build_parameterization(config)

    def network(params, x, noise_level):
        labels = None if num_classes is None else jnp.full((x.shape[0],), num_classes, jnp.int32)
        return model.apply({"params": params}, x, noise_level, labels)

    denoise = parameterization.make_denoise_fn(jax.tree_util.Partial(network, params),
                                               schedule, par)
    held_out = split_source(config, "data.test_split")
    images, _ = _examples(held_out, range(min(num, len(held_out))))
    dim = int(np.prod(example_shape))
    values = []
    for offset in range(0, len(images), 100):
        result = likelihood.log_likelihood(denoise, images[offset:offset + 100],
                                           schedule=schedule, num_steps=num_steps,
                                           key=jax.random.key(offset))
        values.append(parallel.to_host(likelihood.bits_per_dim(result.log_likelihood, dim)))
    values = np.concatenate(values)
    return {"bits_per_dim": float(values.mean()),
            "bits_per_dim_stderr": float(values.std(ddof=1) / np.sqrt(len(values)))
            if len(values) > 1 else 0.0,
            "bits_per_dim_examples": int(len(values))}


def format_table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
             for k, v in rows]
    sampler = results["sampler"]
    header = (f"evaluation of step {results['step']}: {sampler['method']}, "
              f"{sampler['num_steps']} steps, guidance {sampler['guidance_scale']:g}")
    return "\n".join([header, *lines, f"({results['feature_space']})"])
