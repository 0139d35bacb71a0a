"""The evaluation classifiers' store and the evaluations' result files, shared by the evaluators.

``--mode=train_classifier`` saves a classifier here (the feature extractor of
:mod:`diffusion_jax.evaluate` and :mod:`diffusion_jax.audio_eval`, or the attribute judge of
:mod:`diffusion_jax.prompt_eval`) and ``--mode=eval`` reads it back, then writes its results
with :func:`write_results`.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from diffusion_jax import files, parallel, writers

__all__ = ["EvaluationError", "classifier_dir", "save_classifier", "classifier_optimizer",
           "restore_classifier_params", "read_classifier_summary", "write_results",
           "apply_in_batches"]


class EvaluationError(RuntimeError):
    """Something evaluation needs is missing or does not fit; the message says what to do."""


def classifier_dir(config, workdir) -> str:
    """Where the run's classifier lives: ``evaluation.classifier_dir`` or ``workdir/classifier``."""
    return os.path.abspath(config.evaluation.classifier_dir or os.path.join(workdir, "classifier"))


def save_classifier(config, workdir: str, params, summary: dict) -> str:
    """Write a trained classifier (feature extractor or attribute judge) to its directory.

    ``params`` go through Orbax, ``summary`` to ``classifier.json``. Returns the directory.
    """
    directory = classifier_dir(config, workdir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "params"), params, force=True)
    checkpointer.wait_until_finished()
    files.save_json(os.path.join(directory, "classifier.json"), summary)
    return directory


def classifier_optimizer(config):
    """AdamW with a cosine decay over ``config.classifier``'s steps.

    The optimizer of every classifier --mode=train_classifier trains (feature extractor and
    attribute judge).
    """
    c = config.classifier
    return optax.adamw(optax.cosine_decay_schedule(c.learning_rate, c.num_steps),
                       weight_decay=1e-4)


def restore_classifier_params(directory: str, abstract):
    """A saved classifier's parameters, on this process's first device.

    Whatever machine trained it: the saved sharding names the devices of the machine that wrote
    it, which are not this one's.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    return ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)


def read_classifier_summary(config, workdir: str, kind: str = "classifier"):
    """``(directory, summary)`` of the classifier saved by :func:`save_classifier`.

    Raises an :class:`EvaluationError` that says how to train one when there is none (``kind``
    names it in the message).
    """
    directory = classifier_dir(config, workdir)
    summary_path = os.path.join(directory, "classifier.json")
    if not os.path.exists(summary_path):
        raise EvaluationError(
            f"no trained {kind} in {directory}; train one with `python main.py "
            f"--config=... --workdir={workdir} --mode=train_classifier` or set "
            "config.evaluation.classifier_dir")
    with open(summary_path) as f:
        return directory, json.load(f)


def write_results(config, workdir: str, name: str, results: dict, scalars: dict, log) -> str:
    """Write an evaluation's results: ``workdir/eval/<name>_<digest>.json`` and TensorBoard.

    The JSON holds ``results`` and the settings (sampling, evaluation and data groups);
    ``scalars`` (tag -> number) go to TensorBoard at ``results["step"]``. Process 0 writes;
    returns the JSON's path there (None elsewhere)."""
    settings = {"workdir": os.path.abspath(workdir), "sampling": config.sampling.to_dict(),
                "evaluation": config.evaluation.to_dict(), "data": config.data.to_dict()}
    out_path = (files.save_result(os.path.join(workdir, "eval"), name, results, settings)
                if parallel.is_writer() else None)
    writer = writers.MetricWriter(os.path.join(workdir, "tensorboard"), console=log,
                                  enabled=parallel.is_writer())
    writer.scalars(results["step"], scalars)
    writer.close()
    return out_path


def apply_in_batches(apply, params, inputs, batch_size: int, *, pad: bool = False):
    """``apply(params, batch)`` over ``inputs`` in batches; its output tree, concatenated (numpy).

    With ``pad`` every call gets ``batch_size`` rows (the last batch padded with zeros, whose rows
    are dropped), so one compiled program serves any count, none included."""
    inputs = np.asarray(inputs, np.float32)
    parts = []
    for start in range(0, max(len(inputs), 1) if pad else len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        if pad:
            padded = np.zeros((batch_size,) + inputs.shape[1:], np.float32)
            padded[:len(chunk)] = chunk
            parts.append(jax.tree_util.tree_map(lambda a, n=len(chunk): np.asarray(a)[:n],
                                                apply(params, padded)))
        else:
            parts.append(jax.tree_util.tree_map(np.asarray, apply(params, chunk)))
    return jax.tree_util.tree_map(lambda *arrays: np.concatenate(arrays), *parts)
