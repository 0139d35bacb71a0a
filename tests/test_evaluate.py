"""--mode=eval end to end: the classifier's reported accuracy is what it scores, a generator that
returns real data scores like data, one that returns noise does not, and missing pieces give
clear errors."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpoints, configuration, data, evaluate, generate, train
from diffusion_jax import run as run_lib


def _config():
    config = tiny.get_config()
    config.training.num_steps = 1
    config.classifier.num_steps = 120
    config.classifier.batch_size = 32
    config.evaluation.num_samples = 96
    config.evaluation.batch_size = 48
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    config = _config()
    train.train_and_evaluate(config, workdir, log=lambda line: None)
    summary = evaluate.train_classifier(config, workdir, log=lambda line: None)
    return config, workdir, summary


def test_classifier_accuracy_is_what_it_scores(run):
    config, workdir, summary = run
    with open(os.path.join(workdir, "classifier", "classifier.json")) as f:
        assert json.load(f) == summary
    apply, params, _ = evaluate.load_classifier(config, workdir)
    held_out = configuration.build_source(config.data, split="test")
    to_inputs = data.ToModelInputs()
    records = [to_inputs.map(held_out[i]) for i in range(len(held_out))]
    logits, _ = apply(params, np.stack([r["x"] for r in records]))
    accuracy = np.mean(np.argmax(logits, -1) == np.array([r["label"] for r in records]))
    assert summary["test_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    # Trained for seconds only (the tests need a working feature extractor, not a good one):
    # clearly above chance for three classes. Longer training reaches 99% on this data.
    assert summary["test_accuracy"] > 0.4


def _fake_generator(monkeypatch, make_images):
    def make_generate_fn(config, model, example_shape, num_classes, **overrides):
        def generate_fn(params, key, num):
            labels = np.asarray(generate.sampling_labels(config, num_classes, num))
            return make_images(labels, key)
        return generate_fn

    monkeypatch.setattr(generate, "make_generate_fn", make_generate_fn)


def test_real_data_scores_like_data_and_noise_does_not(run, monkeypatch):
    config, workdir, summary = run
    # Held-out shapes (a seed neither the reference set nor the classifier has seen), picked to
    # have the requested labels: a perfect class-conditional generator.
    pool = data.Shapes(2_000, config.data.resolution, seed=7)
    by_label = {c: [i for i in range(len(pool)) if int(pool[i]["label"]) == c] for c in range(3)}
    to_inputs = data.ToModelInputs()
    used = {"n": 0}

    def real_images(labels, key):
        out = []
        for label in labels:
            index = by_label[int(label)][used["n"] % len(by_label[int(label)])]
            used["n"] += 1
            out.append(to_inputs.map(pool[index])["x"])
        return np.stack(out)

    _fake_generator(monkeypatch, real_images)
    real = evaluate.evaluate(config, workdir, log=lambda line: None)

    _fake_generator(monkeypatch, lambda labels, key: np.asarray(
        jax.random.uniform(key, (len(labels), 16, 16, 3), minval=-1, maxval=1)))
    noise = evaluate.evaluate(config, workdir, log=lambda line: None)

    assert real["num_samples"] == noise["num_samples"] == 96
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    assert noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert noise["frechet_distance"] > 10 * real["frechet_distance"]
    # Real shapes of the asked-for class are recognised about as often as on the test split.
    assert real["class_accuracy_chance"] == pytest.approx(1 / 3)
    assert real["class_accuracy"] > 0.4
    assert abs(real["class_accuracy"] - summary["test_accuracy"]) < 0.15
    assert "not FID" in real["feature_space"]
    # Every evaluation wrote its own file (same settings: a numbered suffix); the newest is noise's.
    written = max(glob.glob(os.path.join(workdir, "eval", "step1_dpmpp_2m_3steps_cfg1_*.json")),
                  key=os.path.getmtime)
    with open(written) as f:
        assert json.load(f)["frechet_distance"] == noise["frechet_distance"]


def test_missing_classifier_says_how_to_train_one(tmp_path):
    config = _config()
    with pytest.raises(evaluate.EvaluationError, match="--mode=train_classifier"):
        evaluate.evaluate(config, str(tmp_path))


def test_inception_features_need_a_weights_file(run, tmp_path):
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    config.evaluation.feature_extractor = "inception"
    with pytest.raises(configuration.ConfigError, match="inception_weights"):
        evaluate.evaluate(config, workdir)
    config.evaluation.inception_weights = str(tmp_path / "pt_inception.pth")
    with pytest.raises(evaluate.EvaluationError, match="not found.*pt_inception.pth"):
        evaluate.evaluate(config, workdir)


def test_eval_measures_the_checkpoint_that_sampling_checkpoint_step_names(run, monkeypatch):
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    config.sampling.checkpoint_step = 5  # the run has only step 1
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint for step 5"):
        evaluate.evaluate(config, workdir, log=lambda line: None)
    config.sampling.checkpoint_step = 1
    _fake_generator(monkeypatch, lambda labels, key: np.zeros((len(labels), 16, 16, 3)))
    assert evaluate.evaluate(config, workdir, log=lambda line: None)["step"] == 1


def test_bits_per_dim_differentiates_the_unet_in_forward_mode(run):
    """The likelihood's divergence is a jax.jvp through the network (here the tiny UNet, whose
    GroupNorm has a written reverse-mode gradient only in training)."""
    config, workdir, _ = run
    state, model, shape, num_classes = run_lib.restore_run(config, workdir)
    result = evaluate._bits_per_dim(config, model, state.ema_params, shape, num_classes, 4, 2)
    assert result["bits_per_dim_examples"] == 4 and np.isfinite(result["bits_per_dim"])
    assert result["bits_per_dim"] > 0
