"""Video adherence on moving shapes: motion_of recovers every motion from the exact ground truth,
score is perfect on it and drops by exactly what is wrong, the frame judge reads real frames,
and evaluate_video scores real clips like the real row and noise far below it."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import classifier_store, configuration, files, video_eval
from diffusion_jax.data.video import MOTIONS, MovingShapes


def _config(frames=4, captions="auto"):
    config = tiny.get_config()
    config.data.name = "moving_shapes"
    config.data.captions = captions
    config.data.frames = frames
    config.data.resolution = 16
    config.data.size = 1_000
    config.classifier.num_steps = 250  # the slow test trains longer, on longer clips
    config.classifier.batch_size = 32
    config.classifier.width = 24
    config.classifier.learning_rate = 3e-3
    config.evaluation.num_samples = 60
    config.evaluation.batch_size = 25
    return config


def _truth(source, count):
    """``(read, wanted)`` of the first clips: the ground truth as the judge's readings."""
    geometry = [source.geometry(i) for i in range(count)]
    frames = source.frames
    read = {"shape": np.stack([np.full(frames, g["shape"]) for g in geometry]),
            "colour": np.stack([g["colour"] for g in geometry]),
            "background": np.stack([np.full(frames, g["background"]) for g in geometry]),
            "centre": np.stack([g["centre"] for g in geometry])}
    return read, [video_eval.wanted_of(g) for g in geometry]


# ------------------------------------------------------------------------------ motion_of


@pytest.mark.parametrize("frames,resolution", [(3, 16), (4, 16), (8, 16), (16, 32), (32, 32)])
def test_motion_of_recovers_every_motion_of_the_ground_truth(frames, resolution):
    """On 120 clips of each size every motion is read right (1.0 here; 0.98 is the bar)."""
    source = MovingShapes(120, frames, resolution, seed=1)
    read, wanted = _truth(source, len(source))
    read_motions = [video_eval.motion_of(c, k) for c, k in zip(read["centre"], read["colour"])]
    right = np.array([m == w["motion"] for m, w in zip(read_motions, wanted)])
    assert right.mean() >= 0.98, right.mean()
    for motion in MOTIONS:  # every motion is there, and read right
        chosen = [r for r, w in zip(right, wanted) if w["motion"] == motion]
        assert len(chosen) >= 8 and np.mean(chosen) >= 0.9, motion


@pytest.mark.parametrize("frames,resolution", [(3, 16), (8, 16), (16, 32), (32, 32)])
def test_motion_thresholds_leave_a_margin_on_the_ground_truth(frames, resolution):
    """What video_eval's comment promises: straight motions travel over twice MIN_TRAVEL and
    bounces turn back over MIN_TURN."""
    source = MovingShapes(300, frames, resolution, seed=0)
    travel, turns = [], []
    for i in range(len(source)):
        g = source.geometry(i)
        if g["motion"] in ("right", "left", "up", "down"):
            travel.append(np.abs(g["centre"][-1] - g["centre"][0]).max())
        elif g["motion"] == "bounce":
            turns.append(video_eval._turn(g["centre"][:, 1]))
    assert min(travel) > 2 * video_eval.MIN_TRAVEL
    assert min(turns) > video_eval.MIN_TURN


def test_motion_of_follows_its_rules():
    still = np.full((6, 2), 0.5)
    same = np.zeros(6, int)
    assert video_eval.motion_of(still, same) == "still"
    assert video_eval.motion_of(still, [0, 0, 0, 3, 3, 3]) == "colour"
    # One misread colour in the last third (two frames) makes no colour change.
    assert video_eval.motion_of(still, [0, 0, 0, 0, 0, 3]) == "still"
    ramp = np.linspace(0.3, 0.7, 6)
    for axis, forwards, backwards in ((1, "right", "left"), (0, "down", "up")):
        moving = still.copy()
        moving[:, axis] = ramp
        assert video_eval.motion_of(moving, same) == forwards
        moving[:, axis] = ramp[::-1]
        assert video_eval.motion_of(moving, same) == backwards
    # Below MIN_TRAVEL it is no motion; the larger axis wins.
    short = still.copy()
    short[:, 1] = np.linspace(0.5, 0.5 + 0.9 * video_eval.MIN_TRAVEL, 6)
    assert video_eval.motion_of(short, same) == "still"
    diagonal = still.copy()
    diagonal[:, 0], diagonal[:, 1] = np.linspace(0.3, 0.7, 6), np.linspace(0.5, 0.3, 6)
    assert video_eval.motion_of(diagonal, same) == "down"
    # There and back is a bounce; a wobble smaller than MIN_TURN is not.
    bounce = still.copy()
    bounce[:, 1] = [0.3, 0.5, 0.7, 0.6, 0.5, 0.4]
    assert video_eval.motion_of(bounce, same) == "bounce"
    wobble = still.copy()
    wobble[:, 1] = [0.3, 0.4, 0.5, 0.5 - 0.9 * video_eval.MIN_TURN, 0.6, 0.7]
    assert video_eval.motion_of(wobble, same) == "right"
    # A turn within a span under MIN_TRAVEL is still no bounce.
    small = still.copy()
    small[:, 1] = [0.5, 0.54, 0.58, 0.54, 0.5, 0.5]
    assert video_eval.motion_of(small, [0, 0, 0, 3, 3, 3]) == "colour"
    with pytest.raises(ValueError, match=r"centres \[T, 2\]"):
        video_eval.motion_of(np.zeros((6, 3)), same)


# ---------------------------------------------------------------------------------- score


def test_score_of_the_ground_truth_is_perfect():
    read, wanted = _truth(MovingShapes(60, 6, 16, seed=1), 60)
    result = video_eval.score(read, wanted)
    assert result["num_clips"] == 60
    assert result["motion_accuracy"] == 1.0
    assert result["attribute_accuracy"] == {"shape": 1.0, "colour": 1.0, "background": 1.0}
    assert result["temporal_consistency"] == 1.0
    assert set(result["motion_accuracy_per_motion"].values()) == {1.0}
    assert sum(result["read_motions"].values()) == 60 and result["read_motions"]["still"] == 0


def test_score_drops_by_exactly_what_is_wrong():
    frames, count = 6, 60
    read, wanted = _truth(MovingShapes(count, frames, 16, seed=1), count)
    colour_clip = next(i for i, w in enumerate(wanted) if w["motion"] == "colour")
    plain = [i for i, w in enumerate(wanted) if w["motion"] != "colour"]
    wrong = [dict(w) for w in wanted]
    for i in plain[:6]:  # six clips asked for another motion
        wrong[i]["motion"] = "up" if wanted[i]["motion"] != "up" else "down"
    wrong[plain[0]]["colour"] = (wanted[plain[0]]["colour"] + 1) % 6  # every frame wrong
    switch = int(np.argmax(read["colour"][colour_clip] != read["colour"][colour_clip][0]))
    wrong[colour_clip]["to_colour"] = wanted[colour_clip]["colour"]  # frames after the switch
    wrong[plain[1]]["shape"] = None  # not asked: left out of the shape score
    result = video_eval.score(read, wrong)
    assert result["motion_accuracy"] == pytest.approx(1 - 6 / count)
    wrong_frames = frames + (frames - switch)
    assert result["attribute_accuracy"]["colour"] == pytest.approx(
        1 - wrong_frames / (count * frames))
    assert result["attribute_accuracy"]["shape"] == 1.0
    assert result["attribute_accuracy"]["background"] == 1.0
    assert result["temporal_consistency"] == 1.0

    # A shape misread in one middle frame breaks two frame pairs; a colour flicker in the
    # colour change breaks one (its first switch is allowed), in another clip two.
    flicker = {name: np.array(value) for name, value in read.items()}
    flicker["shape"][plain[2], 2] = (flicker["shape"][plain[2], 2] + 1) % 3
    flicker["colour"][colour_clip, -1] = flicker["colour"][colour_clip, 0]
    flicker["colour"][plain[3], 3] = (flicker["colour"][plain[3], 3] + 1) % 6
    result = video_eval.score(flicker, wanted)
    assert result["temporal_consistency"] == pytest.approx(1 - 5 / (count * (frames - 1)))
    assert result["attribute_accuracy"]["shape"] == pytest.approx(1 - 1 / (count * frames))

    # Clips asked only for their motion (a class-conditional run) score no attribute.
    motions_only = [{"motion": w["motion"]} for w in wanted]
    result = video_eval.score(read, motions_only)
    assert result["motion_accuracy"] == 1.0
    assert result["attribute_accuracy"] == {"shape": None, "colour": None, "background": None}
    chance = video_eval.chance(wanted)
    share = np.mean([w["motion"] == "colour" for w in wanted])
    assert chance["attribute_accuracy"]["colour"] == pytest.approx((1 + share) / 6)
    assert chance["motion_accuracy"] == pytest.approx(1 / 6)
    assert video_eval.chance(motions_only)["attribute_accuracy"]["shape"] is None
    with pytest.raises(ValueError, match="readings of 60 clips but 59 wanted"):
        video_eval.score(read, wanted[:-1])


def test_read_clips_reads_every_frame_in_order():
    clips = np.zeros((3, 5, 16, 16, 3), np.float32)
    clips[..., 0] = np.arange(15).reshape(3, 5, 1, 1) / 100

    def judge_fn(frames):
        value = np.round(frames[:, 0, 0, 0] * 100).astype(int)
        return {"shape": value, "colour": value + 1, "background": value + 2,
                "centre": np.stack([value, -value], -1) / 100}

    read = video_eval.read_clips(judge_fn, clips)
    assert read["shape"].tolist() == np.arange(15).reshape(3, 5).tolist()
    assert read["background"][2, 4] == 16
    assert read["centre"].shape == (3, 5, 2)
    assert read["centre"][1, 2].tolist() == pytest.approx([0.07, -0.07])
    with pytest.raises(ValueError, match=r"\[n, frames, height, width, 3\]"):
        video_eval.read_clips(judge_fn, clips[0])


# ------------------------------------------------------------------------ judge and eval


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("video_eval"))
    config = _config()
    lines = []
    summary = video_eval.train_judge(config, workdir, log=lines.append)
    return config, workdir, summary, lines


def test_the_judge_is_saved_and_reads_real_frames(judge):
    config, workdir, summary, lines = judge
    with open(os.path.join(workdir, "classifier", "classifier.json")) as f:
        assert json.load(f) == summary
    assert summary["kind"] == "frame_judge"
    assert (summary["resolution"], summary["frames"], summary["width"]) == (16, 4, 24)
    test = summary["test"]
    assert test["num_clips"] == video_eval.TEST_CLIPS and test["num_frames"] == 4 * 500
    # 250 steps of 32 frames: shape 0.94, colour and background 1.0, centre 0.21 px and motion
    # 1.0 here (shape is the slowest to learn: 0.64 after 150 steps).
    assert test["shape"] > 0.85 and test["colour"] > 0.98 and test["background"] > 0.98
    assert test["centre_error_pixels"] < 0.3
    assert test["motion_accuracy"] > 0.98
    assert "held-out accuracy shape" in lines[-1]
    # The saved judge reads the test clips exactly as the summary says.
    judge_fn, loaded = video_eval.load_judge(config, workdir)
    assert loaded == summary
    source = configuration.build_source(config.data, split="test")
    clips = np.stack([source[i]["video"] for i in range(500)]) / 127.5 - 1.0
    read = video_eval.read_clips(judge_fn, clips)
    truth = [source.geometry(i) for i in range(500)]
    assert np.mean(read["shape"] == np.array([[g["shape"]] for g in truth])) == test["shape"]
    assert np.mean(read["colour"] == np.stack([g["colour"] for g in truth])) == test["colour"]
    error = np.linalg.norm(read["centre"] - np.stack([g["centre"] for g in truth]), axis=-1)
    assert error.mean() * 16 == pytest.approx(test["centre_error_pixels"], rel=1e-5)


@pytest.mark.slow
def test_a_judge_trained_longer_reads_every_attribute(tmp_path):
    """The CPU preset's frames (8 of 16x16) and 600 steps of 32 frames.

    Shape 0.99, colour and background 1.0, centre 0.2 px and motion 1.0 here."""
    config = _config(frames=8)
    config.classifier.num_steps = 600
    test = video_eval.train_judge(config, str(tmp_path), log=lambda line: None)["test"]
    assert test["shape"] > 0.97 and test["colour"] > 0.99 and test["background"] > 0.99
    assert test["centre_error_pixels"] < 0.25 and test["centre_error_pixels_p99"] < 0.7
    assert test["motion_accuracy"] > 0.99


def _real_clips(config, order=None):
    """A generator that returns the test split's clips (by ``order`` if given) batch by batch."""
    source = configuration.build_source(config.data, split="test")
    order = list(range(len(source))) if order is None else order

    def load_generator(config, workdir, step):
        def for_scale(scale):
            done = []

            def generate(key, prompts, num):
                start = sum(done)
                done.append(num)
                chosen = order[start:start + num]
                if prompts is not None:
                    assert prompts == [source[i]["caption"] for i in chosen]
                return np.stack([source[i]["video"] for i in chosen]) / 127.5 - 1.0
            return generate
        return 7, for_scale
    return load_generator


def _noise(config, workdir, step):
    d = config.data

    def for_scale(scale):
        return lambda key, prompts, num: np.asarray(jax.random.uniform(
            key, (num, d.frames, d.resolution, d.resolution, 3), minval=-1.0, maxval=1.0))
    return 0, for_scale


def _shuffled_frames(config, workdir, step):
    """Real frames, each of another clip: every frame pair changes shape or colour."""
    source = configuration.build_source(config.data, split="test")

    def for_scale(scale):
        def generate(key, prompts, num):
            frames = config.data.frames
            clips = np.stack([source[i]["video"] for i in range(num * frames)])
            picked = clips[np.arange(num * frames), np.arange(num * frames) % frames]
            return picked.reshape((num, frames) + picked.shape[1:]) / 127.5 - 1.0
        return generate
    return 0, for_scale


def test_real_clips_score_like_the_real_row_and_noise_far_below(judge):
    config, workdir, _, _ = judge
    config = config.copy_and_resolve_references()
    config.evaluation.guidance_scales = (1.0, 3.0)
    lines = []
    judge_pair = video_eval.load_judge(config, workdir)
    real = video_eval.evaluate_video(config, workdir, judge_pair, log=lines.append,
                                     load_generator=_real_clips(config))
    noise = video_eval.evaluate_video(config, workdir, judge_pair, log=lambda line: None,
                                      load_generator=_noise)
    config.evaluation.guidance_scales = ()
    shuffled = video_eval.evaluate_video(config, workdir, judge_pair, log=lambda line: None,
                                         load_generator=_shuffled_frames)["scales"][0]
    assert real["guidance_scales"] == [1.0, 3.0] and real["conditioning"] == "captions"
    assert real["num_samples"] == 60
    for result in real["scales"]:
        assert result["first_frame"] is False
        scored = {k: v for k, v in result.items()
                  if k not in ("guidance_scale", "first_frame", "seconds")}
        assert scored == real["real"]
    assert real["real"]["motion_accuracy"] > 0.95
    assert real["real"]["attribute_accuracy"]["colour"] > 0.98
    assert shuffled["temporal_consistency"] < 0.4
    assert real["real"]["temporal_consistency"] > shuffled["temporal_consistency"] + 0.4
    assert shuffled["motion_accuracy"] < 0.5
    assert noise["real"] == real["real"]
    assert real["real"]["attribute_accuracy"]["background"] > 0.98
    noisy = noise["scales"][0]
    assert noisy["motion_accuracy"] < 0.35
    for name in video_eval.ATTRIBUTES:
        assert (noisy["attribute_accuracy"][name]
                < noise["chance"]["attribute_accuracy"][name] + 0.25), name
    written = glob.glob(os.path.join(workdir, "eval", "step7_dpmpp_2m_3steps_video_*.json"))
    assert len(written) == 1
    with open(written[0]) as f:
        assert json.load(f)["scales"][1] == real["scales"][1]
    table = "\n".join(lines)
    assert "cfg 3" in table and "chance" in table and "real" in table and written[0] in table


def _frozen_first_frames(config, workdir, step):
    """Plain generation gives noise; given first frames, clips that hold them (no motion)."""
    source = configuration.build_source(config.data, split="test")
    d = config.data

    def for_scale(scale):
        given = []

        def generate(key, prompts, num, first_frames=None):
            if first_frames is None:
                return np.asarray(jax.random.uniform(
                    key, (num, d.frames, d.resolution, d.resolution, 3), minval=-1.0, maxval=1.0))
            start = sum(len(f) for f in given)
            given.append(first_frames)
            real = np.stack([source[i]["video"][0] for i in range(start, start + num)])
            np.testing.assert_allclose(first_frames, real / 127.5 - 1.0, atol=1e-6)
            return np.repeat(np.asarray(first_frames)[:, None], d.frames, axis=1)
        return generate
    return 0, for_scale


def test_first_frame_rows_are_scored_on_the_frames_after_it(judge):
    config, workdir, _, _ = judge
    config = config.copy_and_resolve_references()
    config.evaluation.first_frame = True
    config.evaluation.guidance_scales = (0.0, 2.0)
    lines = []
    result = video_eval.evaluate_video(config, workdir, video_eval.load_judge(config, workdir),
                                       log=lines.append, load_generator=_frozen_first_frames)
    rows = result["scales"]
    assert [(r["guidance_scale"], r["first_frame"]) for r in rows] == [
        (0.0, False), (0.0, True), (2.0, False), (2.0, True)]
    frozen = rows[1]
    # A held first frame keeps every attribute (a colour change's first colour counts) ...
    for name in video_eval.ATTRIBUTES:
        assert frozen["attribute_accuracy"][name] > 0.95, name
        assert rows[0]["attribute_accuracy"][name] < 0.6, name
    assert frozen["temporal_consistency"] > 0.99
    # ... and shows no motion at all.
    assert frozen["motion_accuracy"] == 0.0 and frozen["read_motions"]["still"] > 55
    assert rows[3] == {**frozen, "guidance_scale": 2.0, "seconds": rows[3]["seconds"]}
    assert "cfg 2 i2v" in "\n".join(lines)


def test_a_class_conditional_run_is_scored_on_its_labels_motions(judge):
    config, workdir, _, _ = judge
    config = config.copy_and_resolve_references()
    config.data.captions = "none"
    source = configuration.build_source(config.data, split="test")
    # Clip i of each batch shows motion i % 6, as sampling.label = -1 asks.
    by_motion = {m: [i for i in range(len(source)) if int(source[i]["label"]) == m]
                 for m in range(len(MOTIONS))}
    order = []
    for offset in range(0, 60, 25):
        order += [by_motion[i % 6].pop() for i in range(min(25, 60 - offset))]
    result = video_eval.evaluate_video(config, workdir, video_eval.load_judge(config, workdir),
                                       log=lambda line: None,
                                       load_generator=_real_clips(config, order))
    scored = result["scales"][0]
    assert result["conditioning"] == "labels"
    assert scored["motion_accuracy"] > 0.95
    assert scored["attribute_accuracy"] == {"shape": None, "colour": None, "background": None}
    assert sum(scored["motion_accuracy_per_motion"][m] is not None for m in MOTIONS) == 6
    assert result["chance"]["attribute_accuracy"]["shape"] is None
    # The real row is the test clips against their own ground truth.
    assert result["real"]["attribute_accuracy"]["background"] > 0.98


def test_quantised_real_clips_are_the_clips(judge):
    """Generated clips are quantised like saved ones; real clips survive that exactly."""
    config = judge[0]
    source = configuration.build_source(config.data, split="test")
    videos = np.stack([source[i]["video"] for i in range(4)])
    assert np.array_equal(files.quantize(videos / 127.5 - 1.0),
                          videos.astype(np.float32) / 127.5 - 1.0)


def test_a_judge_of_other_frames_or_data_is_refused(judge, tmp_path):
    config, workdir, _, _ = judge
    bigger = config.copy_and_resolve_references()
    bigger.data.resolution = 32
    with pytest.raises(classifier_store.EvaluationError, match="16x16 frames.*retrain"):
        video_eval.load_judge(bigger, workdir)
    other = tmp_path / "classifier"
    other.mkdir()
    (other / "classifier.json").write_text(json.dumps({"kind": "attributes",
                                                       "data": {"name": "captions"}}))
    with pytest.raises(classifier_store.EvaluationError, match="not a frame judge"):
        video_eval.load_judge(config, str(tmp_path))
    with pytest.raises(classifier_store.EvaluationError, match="no trained frame judge"):
        video_eval.load_judge(config, str(tmp_path / "nothing"))
    shapes = tiny.get_config()
    with pytest.raises(configuration.ConfigError, match="data.name='moving_shapes'"):
        video_eval.train_judge(shapes, str(tmp_path))


def test_an_unconditional_run_is_asked_for_nothing_but_consistency():
    config = _config(captions="none")
    config.data.class_conditional = False
    assert video_eval._conditioning(config) == "none"
    asked = video_eval._generated_wanted(config, "none", 3, [{"motion": "up"}] * 3)
    assert [w["motion"] for w in asked] == [None] * 3
    read, _ = _truth(MovingShapes(3, 6, 16, seed=1), 3)
    result = video_eval.score(read, asked)
    assert result["motion_accuracy"] is None and result["temporal_consistency"] == 1.0
    assert video_eval.chance(asked)["motion_accuracy"] is None
    config.data.class_conditional = True
    config.sampling.label = 4
    asked = video_eval._generated_wanted(config, "labels", 3, [{"motion": "up"}] * 3)
    assert [w["motion"] for w in asked] == ["bounce"] * 3


@pytest.mark.slow
def test_video_adherence_of_a_trained_run(judge):
    """The default generator: a (2-step) text-to-video checkpoint through make_generate_fn."""
    from diffusion_jax import train

    config, workdir, _, _ = judge
    config = config.copy_and_resolve_references()
    for key, value in {"width": 32, "depth": 1, "num_heads": 2, "max_length": 80}.items():
        config.text[key] = value
    config.training.num_steps = 2
    config.training.checkpoint_every = 2
    config.evaluation.num_samples = 6
    config.evaluation.batch_size = 3
    config.evaluation.guidance_scales = (0.0, 2.0)
    config.evaluation.first_frame = True  # image-to-video from the checkpoint too
    train.train_and_evaluate(config, workdir, log=lambda line: None)
    results = video_eval.evaluate_video(config, workdir, video_eval.load_judge(config, workdir),
                                        log=lambda line: None)
    assert results["step"] == 2 and results["guidance_scales"] == [0.0, 2.0]
    assert [r["first_frame"] for r in results["scales"]] == [False, True, False, True]
    assert results["scales"][0]["num_clips"] == 6
    assert glob.glob(os.path.join(workdir, "eval", "step2_dpmpp_2m_3steps_video_*.json"))
