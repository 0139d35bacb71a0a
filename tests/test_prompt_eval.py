"""Prompt adherence of text-to-image runs: the attribute classifier learns every attribute, a
generator that draws exactly what the prompt says scores what the classifier can see, one that
returns noise scores like guessing, and the guidance scales to evaluate are checked."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import configuration, evaluate, prompt_eval
from diffusion_jax.data import captions

# The tiny preset on captioned 16x16 shapes with a 1-block text encoder (as test_text_to_image).
TEXT_FLAGS = {"data.name": "captions", "data.resolution": 16, "data.class_conditional": False,
              "text.width": 32, "text.depth": 1, "text.num_heads": 2, "text.max_length": 80}
CHANCE = {"shape": 1 / 3, "colour": 1 / 6, "size": 1 / 2, "count": 1 / 3, "position": 1 / 10,
          "background": 1 / 6}


def _config():
    config = tiny.get_config()
    for key, value in TEXT_FLAGS.items():
        group, name = key.split(".")
        setattr(getattr(config, group), name, value)
    # About 10 s of CPU training: enough to beat chance on every attribute, far from the 97-100%
    # that 500 steps of batch 128 reach at 32x32.
    config.classifier.num_steps = 200
    config.classifier.batch_size = 64
    config.classifier.learning_rate = 2e-3
    config.evaluation.num_samples = 200
    config.evaluation.batch_size = 100
    return config


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("prompt_eval"))
    config = _config()
    lines = []
    summary = evaluate.train_classifier(config, workdir, log=lines.append)
    return config, workdir, summary, lines


def test_classifier_beats_chance_on_every_attribute(judge):
    config, workdir, summary, lines = judge
    with open(os.path.join(workdir, "classifier", "classifier.json")) as f:
        assert json.load(f) == summary
    accuracy = summary["test_accuracy_per_attribute"]
    for name, chance in CHANCE.items():
        assert accuracy[name] > chance + 0.15, (name, accuracy)
    assert accuracy["position_single_object"] > CHANCE["position"] + 0.15
    assert "held-out accuracy shape" in lines[-1]
    # The saved classifier reads the test images as the summary says.
    classify, loaded = prompt_eval.load_attribute_classifier(config, workdir)
    assert loaded == summary
    test = captions.CaptionedShapes(200, 16, seed=config.seed + 20_000, split="all")
    records = [test[i] for i in range(len(test))]
    predicted = classify(np.stack([r["image"] for r in records]) / 127.5 - 1.0)
    targets = prompt_eval.attribute_targets([r["attributes"] for r in records])
    for name in prompt_eval.ATTRIBUTES:
        assert abs(np.mean(predicted[name] == targets[name]) - accuracy[name]) < 0.1


def _renderer(resolution):
    """A "perfect generator": renders the attributes the prompt was written from."""
    source = captions.CaptionedShapes(1, resolution)

    def load_generator(config, workdir, step):
        def for_scale(scale):
            def generate(key, prompts, attributes):
                assert len(prompts) == len(attributes)
                for prompt, a in zip(prompts, attributes):
                    assert captions.COLOURS[int(a["colour"])] in prompt
                rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
                return np.stack([source.render(a, rng) for a in attributes]) / 127.5 - 1.0
            return generate
        return 7, for_scale

    return load_generator


def _noise(config, workdir, step):
    def for_scale(scale):
        return lambda key, prompts, attributes: np.asarray(jax.random.uniform(
            key, (len(prompts), 16, 16, 3), minval=-1.0, maxval=1.0))
    return 0, for_scale


def test_perfect_generator_scores_like_the_classifier_and_noise_like_chance(judge):
    config, workdir, summary, _ = judge
    config = config.copy_and_resolve_references()
    config.evaluation.guidance_scales = (0.0, 3.0)
    lines = []
    perfect = prompt_eval.evaluate_prompts(config, workdir, log=lines.append,
                                           load_generator=_renderer(16))
    noise = prompt_eval.evaluate_prompts(config, workdir, log=lambda line: None,
                                         load_generator=_noise)
    assert perfect["guidance_scales"] == [0.0, 3.0]
    assert perfect["num_seen"] == perfect["num_heldout"] == 100
    first, second = perfect["scales"]
    # The same prompts and keys at every scale: a generator that ignores the scale scores alike.
    assert first["all"] == second["all"]
    judge_accuracy = summary["test_accuracy_per_attribute"]
    for name in prompt_eval.ATTRIBUTES:
        expected = judge_accuracy["position_single_object" if name == "position" else name]
        assert abs(first["all"]["accuracy"][name] - expected) < 0.12, name
    mean_judge = np.mean([judge_accuracy[n] for n in prompt_eval.ATTRIBUTES])
    for group in ("seen", "heldout"):
        assert first[group]["mean_accuracy"] > 0.7
        assert abs(first[group]["mean_accuracy"] - mean_judge) < 0.12
        assert first[group]["all_correct"] > 0.2
        assert noise["scales"][0][group]["mean_accuracy"] < noise["chance"]["mean_accuracy"] + 0.15
        assert noise["scales"][0][group]["all_correct"] < 0.05
    assert noise["chance"]["mean_accuracy"] == pytest.approx(0.29, abs=0.02)
    written = max(glob.glob(os.path.join(workdir, "eval", "step7_dpmpp_2m_3steps_prompts_*.json")),
                  key=os.path.getmtime)
    with open(written) as f:
        assert json.load(f)["scales"][1] == second
    table = "\n".join(lines)
    assert "held-out" in table and "chance" in table and written in table


def test_score_counts_position_only_for_one_object():
    attributes = [{"shape": 0, "colour": 1, "size": 0, "count": 1, "position": 4, "background": 2},
                  {"shape": 2, "colour": 3, "size": 1, "count": 3, "position": -1, "background": 0}]
    targets = prompt_eval.attribute_targets(attributes)
    assert targets["count"].tolist() == [0, 2]
    assert targets["position"].tolist() == [4, prompt_eval.NO_POSITION]
    # Everything right, except the second image's position, which its prompt does not name.
    predicted = {k: v.copy() for k, v in targets.items()}
    predicted["position"][1] = 0
    result = prompt_eval.score(predicted, attributes, heldout=[False, True])
    assert result["all"]["mean_accuracy"] == result["all"]["all_correct"] == 1.0
    assert result["heldout"]["accuracy"]["position"] is None
    # A wrong colour costs one of the six named attributes of a single object.
    predicted["colour"][0] = 5
    result = prompt_eval.score(predicted, attributes, heldout=[False, True])
    assert result["seen"]["mean_accuracy"] == pytest.approx(5 / 6)
    assert result["seen"]["all_correct"] == 0.0 and result["heldout"]["all_correct"] == 1.0
    assert result["all"]["accuracy"]["colour"] == 0.5


def test_prompts_alternate_seen_and_heldout_pairs():
    attributes, prompts, heldout = prompt_eval.draw_prompts(40, 16, seed=3)
    again = prompt_eval.draw_prompts(40, 16, seed=3)
    assert prompts == again[1]
    assert heldout.tolist() == [i % 2 == 1 for i in range(40)]
    for a, prompt, h in zip(attributes, prompts, heldout):
        pair = (int(a["shape"]), int(a["colour"]))
        assert (pair in captions.HELDOUT_PAIRS) == h
        assert captions.COLOURS[pair[1]] in prompt and captions.SIZES[int(a["size"])] in prompt


def test_prompts_of_a_heldout_colour_name_it_only_when_heldout():
    attributes, prompts, heldout = prompt_eval.draw_prompts(60, 16, seed=4, max_objects=1,
                                                            heldout_concept="yellow")
    yellow = captions.COLOURS.index("yellow")
    for a, prompt, h in zip(attributes, prompts, heldout):
        assert int(a["count"]) == 1
        assert (int(a["colour"]) == yellow) == h
        assert ("yellow" in prompt) == h  # nor as the background of a seen prompt


def test_concept_rates_count_images_showing_the_heldout_colour_or_shape():
    yellow, triangle = captions.COLOURS.index("yellow"), captions.SHAPES.index("triangle")
    predicted = {"colour": np.array([yellow, 0, yellow, yellow]),
                 "shape": np.array([triangle, triangle, 0, 1])}
    heldout = [False, False, True, True]
    assert prompt_eval.concept_rates(predicted, heldout, "yellow") == {
        "concept_rate": {"seen": 0.5, "heldout": 1.0}}
    assert prompt_eval.concept_rates(predicted, heldout, "triangle") == {
        "concept_rate": {"seen": 1.0, "heldout": 0.0}}
    assert prompt_eval.concept_rates(predicted, heldout, "pairs") == {}


def test_guidance_scales_are_checked_before_anything_loads(tmp_path):
    config = _config()
    assert prompt_eval.guidance_scales(config) == (config.sampling.guidance_scale,)
    config.evaluation.guidance_scales = (0.0, -1.0)
    with pytest.raises(configuration.ConfigError, match="evaluation.guidance_scales"):
        evaluate.evaluate(config, str(tmp_path))
    config.evaluation.guidance_scales = (0, 2.5)
    assert prompt_eval.guidance_scales(config) == (0.0, 2.5)
    with pytest.raises(evaluate.EvaluationError, match="--mode=train_classifier"):
        evaluate.evaluate(config, str(tmp_path))
    # Other data is measured at config.sampling.guidance_scale.
    other = tiny.get_config()
    other.evaluation.guidance_scales = (1.0, 2.0)
    with pytest.raises(configuration.ConfigError,
                       match=r"data.name in \('captions', 'tones', 'moving_shapes', "
                             r"'shape_points', 'molecules', 'molecule_folder'\)"):
        evaluate.evaluate(other, str(tmp_path))


def test_a_judge_trained_on_another_machine_loads_here(judge, tmp_path):
    """Orbax records the devices that saved the parameters (here cpu:0); a judge trained on a
    CPU must still load on a GPU machine, and the other way round."""
    import shutil

    config, workdir, summary, _ = judge
    moved = str(tmp_path / "judge")
    shutil.copytree(os.path.join(workdir, "classifier"), moved)
    sharding = os.path.join(moved, "params", "_sharding")
    with open(sharding) as f:
        text = f.read()
    assert "cpu:0" in text
    with open(sharding, "w") as f:
        f.write(text.replace("cpu:0", "gpu:0"))  # as written on a GPU machine
    other = _config()
    other.evaluation.classifier_dir = moved
    classify, loaded = prompt_eval.load_attribute_classifier(other, str(tmp_path))
    assert loaded == summary
    images = captions.CaptionedShapes(size=8, resolution=16, seed=3)
    batch = np.stack([images[i]["image"] for i in range(8)]).astype(np.float32) / 127.5 - 1
    local, _ = prompt_eval.load_attribute_classifier(config, workdir)
    for name, value in classify(batch).items():
        np.testing.assert_array_equal(value, local(batch)[name])


def test_a_judge_counting_fewer_objects_than_the_data_holds_is_refused(judge):
    config, workdir, summary, _ = judge
    assert dict(map(tuple, summary["heads"]))["count"] == config.data.max_objects == 3
    config = config.copy_and_resolve_references()
    config.data.max_objects = 4
    with pytest.raises(evaluate.EvaluationError, match="counts up to 3 objects.*max_objects=4"):
        prompt_eval.load_attribute_classifier(config, workdir)


def test_a_classifier_of_other_data_is_refused(tmp_path):
    config = _config()
    directory = tmp_path / "classifier"
    directory.mkdir()
    (directory / "classifier.json").write_text(json.dumps({"data": {"name": "captions"}}))
    with pytest.raises(evaluate.EvaluationError, match="not an attribute classifier"):
        prompt_eval.load_attribute_classifier(config, str(tmp_path))


@pytest.mark.slow
def test_prompt_adherence_of_a_trained_run(judge):
    """The default generator: a (2-step) diffusion checkpoint through generate.make_generate_fn."""
    from diffusion_jax import train

    config, workdir, _, _ = judge
    config = config.copy_and_resolve_references()
    config.training.num_steps = 2
    config.training.checkpoint_every = 2
    config.evaluation.num_samples = 8
    config.evaluation.batch_size = 4
    config.evaluation.guidance_scales = (0.0, 2.0)
    train.train_and_evaluate(config, workdir, log=lambda line: None)
    results = evaluate.evaluate(config, workdir, log=lambda line: None)
    assert results["step"] == 2 and [r["guidance_scale"] for r in results["scales"]] == [0, 2]
    assert glob.glob(os.path.join(workdir, "eval", "step2_dpmpp_2m_3steps_prompts_*.json"))
