"""Inpainting adherence on captioned shapes: the object mask holds the object and little else,
requests ask for another valid object, an oracle judge scores a perfect inpainter and a lazy one
as it should, and a tiny trained run keeps its known region exactly. The LoRA-concept benchmark
runs end to end at smoke-test size."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from diffusion_jax import files, inpaint_eval, prompt_eval, train
from diffusion_jax.data import captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_FLAGS = {"name": "captions", "resolution": 16, "class_conditional": False}


def _object_pixels(record):
    background = captions.PALETTE[int(record["attributes"]["background"])]
    return np.any(record["image"] != background, -1)


@pytest.mark.parametrize("resolution", [16, 32])
def test_object_mask_covers_the_object_and_little_else(resolution):
    records = inpaint_eval.draw_records(1500, resolution, seed=5)
    union = {}
    for record in records:
        a = record["attributes"]
        assert int(a["count"]) == 1 and int(a["position"]) >= 0
        mask = inpaint_eval.object_mask(record, resolution)
        assert mask.shape == (resolution, resolution, 1) and set(np.unique(mask)) == {0.0, 1.0}
        obj = _object_pixels(record)
        assert not (obj & (mask[..., 0] == 0)).any(), a  # every object pixel is repainted
        assert mask.mean() <= 0.25
        key = (int(a["size"]), int(a["position"]))
        union[key] = union.get(key, np.zeros_like(obj)) | obj
    # The box is the tightest one: objects of its size and cell reach within a pixel of each side.
    assert len(union) == 18
    for (size, position), pixels in union.items():
        top, bottom, left, right = inpaint_eval.object_box(
            {"size": size, "position": position, "count": 1}, resolution)
        ys, xs = np.nonzero(pixels)
        assert max(ys.min() - top, bottom - 1 - ys.max(), xs.min() - left,
                   right - 1 - xs.max()) <= 1, (size, position)
    with pytest.raises(ValueError, match="one object"):
        inpaint_eval.object_mask({"shape": 0, "colour": 0, "size": 0, "count": 2,
                                  "position": -1, "background": 1}, 16)


def test_requests_of_a_heldout_colour():
    records = inpaint_eval.draw_records(100, 16, seed=2, heldout_concept="green")
    assert len(records) == 100
    assert all(int(r["attributes"]["background"]) != 1 for r in records)
    requested, heldout, _ = inpaint_eval.requests([r["attributes"] for r in records], seed=7,
                                                  heldout_concept="green")
    green = captions.COLOURS.index("green")
    assert all((int(r["colour"]) == green) == h for r, h in zip(requested, heldout))
    assert {int(r["shape"]) for r, h in zip(requested, heldout) if h} == {0, 1, 2}


def test_requests_ask_for_another_valid_object():
    records = inpaint_eval.draw_records(300, 32, seed=2)
    original = [r["attributes"] for r in records]
    requested, heldout, prompts = inpaint_eval.requests(original, seed=7)
    again = inpaint_eval.requests(original, seed=7)
    assert prompts == again[2]
    assert heldout.tolist() == [i % 2 == 1 for i in range(300)]
    source = captions.CaptionedShapes(1, 32)
    changed = {"shape": 0, "colour": 0}
    for a, r, held, prompt in zip(original, requested, heldout, prompts):
        pair = (int(r["shape"]), int(r["colour"]))
        assert pair != (int(a["shape"]), int(a["colour"]))
        assert (pair in captions.HELDOUT_PAIRS) == held
        assert int(r["colour"]) != int(r["background"])
        for key in ("size", "count", "position", "background"):
            assert int(r[key]) == int(a[key])
        for key in ("shape", "colour"):
            changed[key] += int(r[key]) != int(a[key])
        for word in (captions.SHAPES[pair[0]], captions.COLOURS[pair[1]],
                     captions.SIZES[int(r["size"])], captions.COLOURS[int(r["background"])]):
            assert word in prompt
        source.render(r, 0)  # a combination the generator can draw
    assert min(changed.values()) > 150  # most requests change both


def _oracle(images):
    """A judge that reads the palette: colours exactly, shape from how full its box is."""
    out = {name: [] for name in prompt_eval.ATTRIBUTES}
    palette = captions.PALETTE.astype(np.int32)
    for image in files.to_uint8(images).astype(np.int32):
        ids = np.argmin(((image[:, :, None] - palette) ** 2).sum(-1), -1)
        background = int(np.argmax(np.bincount(ids.ravel(), minlength=6)))
        obj = ids != background
        ys, xs = np.nonzero(obj) if obj.any() else (np.array([0]), np.array([0]))
        fill = obj.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        res = image.shape[0]
        out["shape"].append(1 if fill > 0.95 else 2 if fill < 0.7 else 0)
        out["colour"].append(int(np.argmax(np.bincount(ids[obj], minlength=6)))
                             if obj.any() else background)
        out["background"].append(background)
        out["size"].append(int(max(np.ptp(ys), np.ptp(xs)) + 1 > 0.22 * res))
        out["count"].append(0)
        out["position"].append(int(ys.mean() * 3 // res) * 3 + int(xs.mean() * 3 // res))
    return {name: np.array(v, np.int32) for name, v in out.items()}


def _inpainter(kind):
    """Inpainters of a stand-in run: "perfect" draws the prompt's object, "lazy" returns the input,
    "sloppy" draws it but also changes one kept pixel."""
    source, config = captions.CaptionedShapes(1, 32), tiny.get_config()
    records = inpaint_eval.draw_records(40, 32, config.seed + inpaint_eval.SEED_OFFSET)
    requested = inpaint_eval.requests([r["attributes"] for r in records],
                                      config.sampling.seed + inpaint_eval.SEED_OFFSET)
    by_prompt = dict(zip(requested[2], requested[0]))

    def load(config, workdir, step):
        def for_scale(scale):
            def inpaint(key, x0, mask, prompts):
                if kind == "lazy" or not prompts[0]:
                    return x0
                drawn = np.stack([source.render(by_prompt[p], i) for i, p in enumerate(prompts)])
                out = mask * (drawn / 127.5 - 1.0) + (1 - mask) * x0
                if kind == "sloppy":
                    row, col = np.argwhere(mask[0, :, :, 0] == 0)[0]
                    out[0, row, col] = -out[0, row, col]
                return out
            return inpaint
        return 3, for_scale

    return load


def test_an_oracle_judge_scores_perfect_and_lazy_inpainters(tmp_path, monkeypatch):
    config = tiny.get_config()
    config.data.update(**{**TEXT_FLAGS, "resolution": 32})
    config.evaluation.batch_size = 16
    judge = {"test_accuracy_per_attribute": {"shape": 1.0, "colour": 1.0, "all_correct": 1.0}}
    monkeypatch.setattr(prompt_eval, "load_attribute_classifier", lambda c, w: (_oracle, judge))
    lines = []
    perfect = inpaint_eval.evaluate_inpainting(config, str(tmp_path), num=40,
                                               guidance_scales=(1, 3), log=lines.append,
                                               load_inpainter=_inpainter("perfect"))
    assert perfect["guidance_scales"] == [1.0, 3.0] and perfect["step"] == 3
    assert perfect["kept_region"] == {"max_abs_change": 0.0, "exact_uint8": True}
    for condition in perfect["with_prompt"]:
        for group in ("seen", "heldout"):
            r = condition[group]
            assert r["num"] == 20 and r["colour"] == 1.0 and r["original_object"] == 0.0
            assert r["shape"] >= 0.9 and r["shape_and_colour"] >= 0.9
            assert r["background"] == r["position"] == 1.0
    unedited = perfect["unedited"]["all"]
    assert unedited["colour"] == 0.0 and unedited["original_object"] >= 0.9
    # Without a prompt the stand-in leaves the input as it is: it scores like the input.
    assert perfect["without_prompt"]["all"] == unedited
    with open(perfect["path"]) as f:
        assert json.load(f)["with_prompt"] == perfect["with_prompt"]
    table = "\n".join(lines)
    assert "| prompt, guidance 3 | held-out | 20 | " in table and "| without prompt |" in table
    lazy = inpaint_eval.evaluate_inpainting(config, str(tmp_path), num=40, guidance_scales=(1,),
                                            log=lambda line: None,
                                            load_inpainter=_inpainter("lazy"))
    assert lazy["with_prompt"][0]["all"] == unedited
    sloppy = inpaint_eval.evaluate_inpainting(config, str(tmp_path), num=40,
                                              guidance_scales=(1,), log=lambda line: None,
                                              load_inpainter=_inpainter("sloppy"))
    assert not sloppy["kept_region"]["exact_uint8"]
    assert sloppy["kept_region"]["max_abs_change"] > 0.5


def test_score_requests_counts_shape_and_colour_over_the_requests_that_change_them():
    def attrs(shape, colour):
        return {"shape": shape, "colour": colour, "size": 0, "count": 1, "position": 4,
                "background": 5}

    original = [attrs(0, 0), attrs(0, 0), attrs(1, 2)]
    requested = [attrs(1, 0), attrs(2, 3), attrs(1, 3)]  # shape only, both, colour only
    predicted = prompt_eval.attribute_targets([attrs(1, 0), attrs(0, 3), attrs(1, 2)])
    result = inpaint_eval.score_requests(predicted, requested, original, [False, False, True])
    assert result["all"]["shape"] == 0.5  # requests 0 and 1 change the shape; 0 got it
    assert result["all"]["colour"] == 0.5  # requests 1 and 2 change the colour; 1 got it
    assert result["all"]["shape_and_colour"] == pytest.approx(1 / 3)
    assert result["all"]["original_object"] == pytest.approx(1 / 3)  # image 2 kept its object
    assert result["heldout"]["shape"] is None and result["heldout"]["num"] == 1
    assert result["seen"]["all_correct"] == 0.5 and result["all"]["background"] == 1.0


def _tiny_text_config():
    config = tiny.get_config()
    config.data.update(**TEXT_FLAGS)
    config.model.unet.channels = 8
    config.text.update(width=32, depth=1, num_heads=2, max_length=80)
    config.training.update(num_steps=4, checkpoint_every=4, warmup_steps=0)
    config.classifier.update(num_steps=4, batch_size=16)
    config.evaluation.batch_size = 8
    return config


@pytest.mark.slow
def test_a_tiny_run_inpaints_and_keeps_the_known_region_exactly(tmp_path):
    config, workdir = _tiny_text_config(), str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, log=lambda line: None)
    prompt_eval.train_attribute_classifier(config, workdir, log=lambda line: None)
    lines = []
    result = inpaint_eval.evaluate_inpainting(config, workdir, num=8, guidance_scales=(1, 3),
                                              log=lines.append)
    assert result["step"] == 4 and result["num"] == 8
    assert result["num_seen"] == result["num_heldout"] == 4
    assert [c["guidance_scale"] for c in result["with_prompt"]] == [1.0, 3.0]
    assert result["without_prompt"]["guidance_scale"] is None
    assert result["kept_region"] == {"max_abs_change": 0.0, "exact_uint8": True}
    for condition in [result["unedited"], result["without_prompt"], *result["with_prompt"]]:
        for group in inpaint_eval.GROUPS:
            for key, value in condition[group].items():
                assert value is None or 0 <= value <= (8 if key == "num" else 1), (key, value)
    assert 0.05 < result["mask_fraction"] <= 0.25
    written = glob.glob(os.path.join(workdir, "eval", "step4_dpmpp_2m_3steps_inpaint_*.json"))
    assert written == [result["path"]]
    assert "| prompt, guidance 1 | seen | 4 |" in lines[-1]


@pytest.mark.slow
def test_lora_concept_benchmark_runs_the_whole_protocol(tmp_path):
    workdir = str(tmp_path / "concept")
    done = subprocess.run([sys.executable, "lora_concept.py", "--tiny", "--workdir", workdir,
                           "--rank", "2", "--set", "sampling.num_steps=2", "--concept", "yellow",
                           "--set", "data.max_objects=1", "--inpaint", "4"],
                          cwd=os.path.join(ROOT, "benchmarks"), capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "lora_concept.json")) as f:
        result = json.load(f)
    assert result["table"] in done.stdout and "| train steps/s |" in result["table"]
    assert result["base"]["train"]["steps"] == 4 and result["lora"]["train"]["steps"] == 2
    assert result["concept"] == "yellow" and result["lora"]["split"] == "heldout"
    assert {tuple(p) for p in result["heldout_pairs"]} == {("yellow", s) for s in captions.SHAPES}
    assert "| held-out (yellow) colour, guidance 1 |" in result["table"]
    assert "| seen images showing yellow, guidance 3 |" in result["table"]
    for run in ("base", "lora"):
        inpainting = result[run]["inpainting"]
        assert inpainting["num"] == 4 and inpainting["kept_region"]["exact_uint8"]
        assert inpainting["table"] in done.stdout
    assert result["base"]["train"]["steps_per_s"] > 0 and result["lora"]["train"]["steps_per_s"] > 0
    size = result["lora"]["size"]
    assert 0 < size["adapter"]["params"] < size["base"]["params"]
    assert size["adapter"]["bytes"] == 4 * size["adapter"]["params"]  # float32
    for run in ("base", "lora"):
        rows = result[run]["adherence"]
        assert [r["guidance_scale"] for r in rows] == [1.0, 3.0]
        assert set(rows[0]["heldout"]) == {"mean_accuracy", "all_correct", "shape", "colour",
                                           "concept_rate"}
        assert all(0 <= row[group]["concept_rate"] <= 1 for row in rows
                   for group in ("seen", "heldout"))
    # Both evaluations read the one judge in WORKDIR/classifier.
    judges = set()
    for run in ("base", f"lora_rank{2}"):
        (path,) = glob.glob(os.path.join(workdir, run, "eval", "*_prompts_*.json"))
        with open(path) as f:
            judges.add(json.load(f)["settings"]["evaluation"]["classifier_dir"])
    assert judges == {os.path.join(workdir, "classifier")}
