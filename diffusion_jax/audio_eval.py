"""Metrics of generated audio: pitch accuracy, label accuracy and a Fréchet distance per guidance.

For a class-conditional run on procedural tones (``data.name = "tones"``), evaluation asks for
every class in turn (``sampling.label = -1``) at each of ``evaluation.guidance_scales`` and
measures the clips, quantised to 16 bits as their WAV files store them:

- pitch accuracy: of the clips whose class is one note, the share whose fundamental estimated
  from the spectrum (:func:`diffusion_jax.audio.estimate_pitch`) rounds to the requested note;
- label accuracy: the share the audio classifier (trained with ``--mode=train_classifier``, on
  the clips' spectrograms) assigns to the requested class;
- the Fréchet distance between the classifier's features of the clips and of the training clips.

The same metrics of real held-out clips (their own labels) and chance give the scale:

    python main.py --config=configs/tones_cpu.py --workdir=DIR --mode=train_classifier
    python main.py --config=configs/tones_cpu.py --workdir=DIR --mode=eval \\
        --config.evaluation.guidance_scales="(0.0, 1.0, 2.0, 4.0)"

``evaluate.evaluate`` comes here for audio runs.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import numpy as np

from diffusion_jax import audio, classifier_store, configuration, generate, metrics, parallel
from diffusion_jax import prompt_eval, writers

__all__ = ["pitch_targets", "pitch_accuracy", "quantize_16bit", "evaluate_audio",
           "format_table"]


def quantize_16bit(waves) -> np.ndarray:
    """Clips in [-1, 1] as :func:`~diffusion_jax.audio.write_wav` stores them (n / 32768)."""
    steps = np.round(np.asarray(waves, np.float64) * 32768)
    return (np.clip(steps, -32768, 32767) / 32768).astype(np.float32)


def pitch_targets(source, labels) -> np.ndarray:
    """The MIDI note each label asks for, or -1 where its class is not one note (chords, hits).

    ``source`` has ``CLASSES`` whose entries have ``kind`` and ``midi`` (:class:`~diffusion_jax.\
data.audio.Tones`); any other source has no pitches (all -1)."""
    classes = getattr(source, "CLASSES", None)
    if classes is None:
        return np.full(len(labels), -1, np.int64)
    midi = np.array([c.midi if c.kind == "note" else -1 for c in classes], np.int64)
    return midi[np.asarray(labels, np.int64)]


def pitch_accuracy(waves, targets, sample_rate: int) -> tuple:
    """``(accuracy, count)``: the share of clips with a target note whose pitch rounds to it.

    ``targets`` are MIDI notes, -1 where a clip has none (left out); accuracy is None if no clip
    has one."""
    targets = np.asarray(targets)
    chosen = np.flatnonzero(targets >= 0)
    if not len(chosen):
        return None, 0
    hz = audio.estimate_pitches(np.asarray(waves)[chosen], sample_rate)
    with np.errstate(divide="ignore"):
        midi = np.where(hz > 0, np.round(audio.hz_to_midi(np.maximum(hz, 1e-9))), -1)
    return float(np.mean(midi == targets[chosen])), int(len(chosen))


def _score(waves, labels, classifier, sample_rate, source, reference_stats):
    """Pitch and label accuracy of clips asked to be ``labels``, and their Fréchet distance."""
    apply, params, _ = classifier
    logits, features = classifier_store.apply_in_batches(apply, params, waves, 250)
    pitch, count = pitch_accuracy(waves, pitch_targets(source, labels), sample_rate)
    stats = metrics.FeatureStatistics(features.shape[1]).update(features)
    return {"pitch_accuracy": pitch, "pitch_clips": count,
            "label_accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
            "frechet_distance": metrics.frechet_distance(stats, reference_stats)}


def _checkpoint_generator(config, workdir, step):
    """``(step, num_classes, for_scale)`` of the run's checkpoint; a class-conditional one."""
    step, num_classes, for_scale = generate.checkpoint_generators(config, workdir, step)
    if num_classes is None:
        raise configuration.ConfigError(
            "--mode=eval of audio measures a class-conditional run (label and pitch accuracy "
            "of the classes it is asked for); this run has no classes: set "
            "config.data.class_conditional=True on labelled data (data.name='tones')")
    return step, num_classes, lambda scale: (lambda key, num, g=for_scale(scale): g(key, num))


def evaluate_audio(config, workdir: str, classifier, reference, test_source, *,
                   log: Callable[[str], None] = print, step: Optional[int] = None,
                   load_generator: Optional[Callable] = None) -> dict:
    """Pitch accuracy, label accuracy and Fréchet distance at each guidance scale (see above).

    ``classifier`` is ``evaluate.load_classifier``'s ``(apply, params, summary)``,
    ``reference`` the classifier's features of training clips and ``test_source`` the held-out
    clips.
    ``load_generator(config, workdir, step) -> (step, num_classes, for_scale)``, where
    ``for_scale(scale)`` returns ``generate(key, num) -> clips``, replaces the run's checkpoint
    (tests give it real clips or noise). Writes ``workdir/eval/step<N>_<method>_<steps>steps_
    audio.json`` and TensorBoard scalars under ``eval/audio/``, and returns the results."""
    log = log if parallel.is_writer() else writers.quiet
    e, s = config.evaluation, config.sampling
    if configuration.is_text_model(config):
        raise configuration.ConfigError(
            "--mode=eval of audio measures class-conditional runs; a captioned tones run is "
            "sampled from prompts (--mode=sample with config.sampling.prompt): set "
            "config.data.captions='none' to train and measure the class-conditional model")
    rate, source = config.data.sample_rate, test_source
    reference_stats = metrics.FeatureStatistics(reference.shape[1]).update(reference)
    start = time.time()
    records = [source[i] for i in range(min(e.num_samples, len(source)))]
    real = _score(quantize_16bit(np.stack([r["audio"] for r in records])),
                  np.array([r["label"] for r in records]), classifier, rate, source,
                  reference_stats)
    step, num_classes, for_scale = (load_generator or _checkpoint_generator)(config, workdir,
                                                                             step)
    key = jax.random.key(s.seed)
    per_scale = []
    for scale in prompt_eval.guidance_scales(config):
        generate_scale = for_scale(scale)
        scale_start = time.time()
        clips, labels = [], []
        for offset in range(0, e.num_samples, e.batch_size):
            num = min(e.batch_size, e.num_samples - offset)
            clips.append(quantize_16bit(parallel.to_host(
                generate_scale(jax.random.fold_in(key, offset), num))))
            labels.append(np.asarray(generate.sampling_labels(config, num_classes, num)))
        result = _score(np.concatenate(clips), np.concatenate(labels), classifier, rate,
                        source, reference_stats)
        per_scale.append({"guidance_scale": scale, **result,
                          "seconds": round(time.time() - scale_start, 2)})
        log(f"guidance {scale:g}: pitch accuracy {_cell(result['pitch_accuracy'])}, label "
            f"accuracy {result['label_accuracy']:.3f}, FD {result['frechet_distance']:.2f}")
    results = {
        "step": step,
        "metric": "audio: pitch accuracy (notes; the estimated fundamental rounds to the "
                  "requested note), label accuracy (the spectrogram classifier reads the "
                  "requested class) and Fréchet distance in that classifier's features to the "
                  "training clips",
        "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                    "use_ema": s.use_ema},
        "num_samples": int(e.num_samples),
        "scales": per_scale,
        "real": real,
        "chance": {"label_accuracy": 1.0 / num_classes,
                   "pitch_accuracy": _pitch_chance(source)},
        "classifier_test_accuracy": classifier[2]["test_accuracy"],
        "generation_and_scoring_seconds": round(time.time() - start, 2),
    }
    scalars = {f"eval/audio/cfg{r['guidance_scale']:g}/{k}": r[k] for r in per_scale
               for k in ("pitch_accuracy", "label_accuracy", "frechet_distance")
               if r[k] is not None}
    out_path = classifier_store.write_results(
        config, workdir, f"step{step}_{s.method}_{s.num_steps}steps_audio", results, scalars, log)
    log(format_table(results))
    log(f"wrote {out_path}")
    return results


def _pitch_chance(source):
    """Chance pitch accuracy: one over the number of distinct notes the note classes ask for."""
    notes = {c.midi for c in getattr(source, "CLASSES", ()) if c.kind == "note"}
    return 1.0 / len(notes) if notes else None


def _cell(value, width=6):
    return f"{'-':>{width}}" if value is None else f"{value:{width}.3f}"


def format_table(results: dict) -> str:
    """One row per guidance scale, then real clips and chance."""
    sampler = results["sampler"]
    lines = [f"audio metrics of step {results['step']}: {sampler['method']}, "
             f"{sampler['num_steps']} steps, {results['num_samples']} clips per scale",
             f"{'':>10} {'pitch':>7} {'label':>7} {'FD':>8}"]
    rows = [(f"cfg {r['guidance_scale']:g}", r) for r in results["scales"]]
    rows += [("real", results["real"]), ("chance", {**results["chance"],
                                                    "frechet_distance": None})]
    for name, r in rows:
        fd = r["frechet_distance"]
        lines.append(f"{name:>10} {_cell(r['pitch_accuracy'], 7)} "
                     f"{_cell(r['label_accuracy'], 7)} "
                     f"{'-' if fd is None else f'{fd:.2f}':>8}")
    lines.append("(pitch: notes whose estimated fundamental rounds to the requested note; label: "
                 "the classifier reads the requested class; FD: Fréchet distance in the "
                 "classifier's features to training clips; real: held-out clips with their own "
                 f"labels; classifier test accuracy {results['classifier_test_accuracy']:.3f})")
    return "\n".join(lines)
