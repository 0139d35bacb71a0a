"""Motion and attribute adherence of video runs on procedural moving shapes.

For a run on MovingShapes (``data.name = "moving_shapes"``), a judge, the
:class:`~diffusion_jax.models.frame_judge.FrameJudge`, is trained on single frames of the
training clips to read a frame's shape, object colour, background colour and object centre.
Evaluation asks the run for the clips of held-out records (their captions for a captioned run;
for a class-conditional one the motions ``config.sampling.label`` names, every class in turn
when it is -1), reads every frame of every clip with the judge, and scores:

- motion accuracy: the share of clips whose motion, read off the judge's centres and colours by
  :func:`motion_of`, is the one asked for;
- attribute accuracy: per attribute (shape, colour, background), the share of frames whose
  reading is the one asked for (a colour change may show either of its two colours);
- temporal consistency: the share of consecutive frame pairs whose read shape and colour are
  unchanged (a colour-change clip may switch colour once).

With ``evaluation.first_frame`` each scale runs twice: from noise, and from each record's own
first frame (image-to-video), whose attributes are then scored on the frames after the first.

The same scores of the real held-out clips against their own ground truth, and chance, give
the scale:

    python main.py --config=configs/moving_shapes_cpu.py --workdir=DIR --mode=train_classifier
    python main.py --config=configs/moving_shapes_cpu.py --workdir=DIR --mode=eval \\
        --config.evaluation.guidance_scales="(1.0, 3.0)"
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import classifier_store, configuration, edit_runs, files, generate, parallel
from diffusion_jax import prompt_eval
from diffusion_jax import writers
from diffusion_jax.data.captions import COLOURS, SHAPES
from diffusion_jax.data.video import MOTIONS
from diffusion_jax.models.frame_judge import FrameJudge

__all__ = ["ATTRIBUTES", "TEST_CLIPS", "MIN_TRAVEL", "MIN_TURN", "train_judge", "load_judge",
           "read_clips", "motion_of", "wanted_of", "score", "chance", "evaluate_video",
           "format_table"]

ATTRIBUTES = ("shape", "colour", "background")
TEST_CLIPS = 500  # fresh clips (all their frames) the judge is measured on
FRAMES_PER_CLIP = 2  # training frames taken from each rendered clip
CENTRE_WEIGHT = 1.0  # weight of the squared centre error, in pixels, beside the cross-entropies
# motion_of's thresholds, in frame sides. Every straight motion of MovingShapes moves its centre
# by more than twice MIN_TRAVEL, and every bounce (of 3 to 32 frames) turns back by more than
# MIN_TURN past where it started or where it ends: tests/test_video_eval.py checks both.
MIN_TRAVEL = 0.1
MIN_TURN = 0.03
_READ_BATCH = 256  # frames per call of the jitted judge (padded: one compilation)


def _check_data(config) -> None:
    if config.data.name != "moving_shapes":
        raise configuration.ConfigError(
            "video adherence is measured on procedural moving shapes; this config's data is "
            f"{config.data.name!r}: set config.data.name='moving_shapes'")


# ------------------------------------------------------------------------------- scoring


def _turn(x) -> float:
    """How far ``x`` turns back: an interior value's largest lead over an earlier and a later one.

    0 for a monotone sequence; for one that rises to a peak and falls, the peak's lead over the
    higher of its two sides' lowest values (and the same for a trough)."""
    x = np.asarray(x, np.float64)
    if len(x) < 3:
        return 0.0
    before_min, before_max = np.minimum.accumulate(x)[:-2], np.maximum.accumulate(x)[:-2]
    after_min = np.minimum.accumulate(x[::-1])[::-1][2:]
    after_max = np.maximum.accumulate(x[::-1])[::-1][2:]
    middle = x[1:-1]
    peak = np.minimum(middle - before_min, middle - after_min)
    trough = np.minimum(before_max - middle, after_max - middle)
    return float(max(peak.max(), trough.max(), 0.0))


def _majority(values) -> Optional[int]:
    """The value held by more than half of ``values``, or None."""
    values, counts = np.unique(np.asarray(values), return_counts=True)
    best = int(np.argmax(counts))
    return int(values[best]) if 2 * counts[best] > counts.sum() else None


def motion_of(centres, colours, *, min_travel: float = MIN_TRAVEL,
              min_turn: float = MIN_TURN) -> str:
    """The motion a clip shows, from its object's centre [T, 2] and colour [T] in each frame.

    Centres are ``(y, x)`` in frame sides (y downwards). In order: "bounce" when x turns back by
    at least ``min_turn`` (see :func:`_turn`) and spans at least ``min_travel``; else "right",
    "left", "up" or "down" when the centre's net displacement from the first frame to the last
    is at least ``min_travel`` along its larger axis; else "colour" when one colour holds most
    of the first third of the frames and another most of the last third; else "still" (not one
    of MOTIONS: no motion at all)."""
    centres = np.asarray(centres, np.float64)
    colours = np.asarray(colours)
    if centres.ndim != 2 or centres.shape[1] != 2 or len(colours) != len(centres):
        raise ValueError(f"motion_of takes centres [T, 2] and colours [T]; got shapes "
                         f"{centres.shape} and {colours.shape}")
    y, x = centres[:, 0], centres[:, 1]
    if _turn(x) >= min_turn and np.ptp(x) >= min_travel:
        return "bounce"
    dy, dx = y[-1] - y[0], x[-1] - x[0]
    if max(abs(dy), abs(dx)) >= min_travel:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    third = max(1, len(colours) // 3)
    first, last = _majority(colours[:third]), _majority(colours[-third:])
    if first is not None and last is not None and first != last:
        return "colour"
    return "still"


def wanted_of(geometry: dict) -> dict:
    """What a clip with MovingShapes ground truth ``geometry`` shows, as :func:`score` takes it.

    ``{"motion", "shape", "colour" (the first frame's), "to_colour" (the last frame's for the
    colour change, else None), "background"}``."""
    colours = np.asarray(geometry["colour"])
    return {"motion": geometry["motion"], "shape": int(geometry["shape"]),
            "colour": int(colours[0]),
            "to_colour": int(colours[-1]) if geometry["motion"] == "colour" else None,
            "background": int(geometry["background"])}


def _jumps(read_shape, read_colour, allow_switch: bool) -> np.ndarray:
    """Which consecutive frame pairs change the read shape or colour; one colour switch may pass."""
    shape_changes = read_shape[1:] != read_shape[:-1]
    colour_changes = read_colour[1:] != read_colour[:-1]
    jumps = shape_changes | colour_changes
    switches = np.flatnonzero(colour_changes & ~shape_changes)
    if allow_switch and len(switches):
        jumps[switches[0]] = False
    return jumps


def score(read: dict, wanted: Sequence[dict], *, given_frames: int = 0) -> dict:
    """Motion accuracy, attribute accuracy and temporal consistency of clips read by the judge.

    ``read`` is :func:`read_clips`' dict (shape, colour, background [n, T], centre [n, T, 2]);
    ``wanted[i]`` is clip i's :func:`wanted_of` dict, any of whose entries may be None (not
    asked for: left out of its score, which is None when no clip asks). A frame's colour is
    right when it is ``colour`` or ``to_colour``. Temporal consistency is one minus the share of
    consecutive frame pairs whose shape or colour reading changes, where a clip that asks for
    the colour change (or whose motion is not given) may switch colour once. The first
    ``given_frames`` frames of each clip (image-to-video's given first frame) are left out of
    attribute accuracy; motion and consistency read every frame, the given ones included."""
    shapes, colours = np.asarray(read["shape"]), np.asarray(read["colour"])
    backgrounds, centres = np.asarray(read["background"]), np.asarray(read["centre"])
    if len(wanted) != len(shapes):
        raise ValueError(f"score got readings of {len(shapes)} clips but {len(wanted)} wanted")
    motions = [motion_of(c, k) for c, k in zip(centres, colours)]
    asked = [i for i, w in enumerate(wanted) if w.get("motion") is not None]
    correct = np.array([motions[i] == wanted[i]["motion"] for i in asked], bool)
    per_motion = {}
    for name in MOTIONS:
        chosen = [j for j, i in enumerate(asked) if wanted[i]["motion"] == name]
        per_motion[name] = float(correct[chosen].mean()) if chosen else None
    readings = {"shape": shapes, "colour": colours, "background": backgrounds}
    attribute = {}
    for name in ATTRIBUTES:
        right = []
        for i, w in enumerate(wanted):
            if w.get(name) is None:
                continue
            accepted = [w[name]] + ([w["to_colour"]] if name == "colour"
                                    and w.get("to_colour") is not None else [])
            right.append(np.isin(readings[name][i][given_frames:], accepted))
        attribute[name] = float(np.mean(right)) if right else None
    jumps = [_jumps(shapes[i], colours[i], w.get("motion") in ("colour", None))
             for i, w in enumerate(wanted)]
    return {"num_clips": len(wanted),
            "motion_accuracy": float(correct.mean()) if len(correct) else None,
            "motion_accuracy_per_motion": per_motion,
            "read_motions": {name: motions.count(name) for name in MOTIONS + ("still",)},
            "attribute_accuracy": attribute,
            "temporal_consistency": 1.0 - float(np.mean(np.concatenate(jumps)))}


def chance(wanted: Sequence[dict]) -> dict:
    """The scores of guessing each motion and each frame's attributes uniformly at random.

    Shape, colour and background are guessed among SHAPES, COLOURS and COLOURS; a frame of a
    colour change has two right colours, so colour's chance depends on the clips asked for.
    Temporal consistency has no chance level (None)."""
    def mean_or_none(values):
        return float(np.mean(values)) if values else None

    colours = [(1 + (w.get("to_colour") is not None)) / len(COLOURS) for w in wanted
               if w.get("colour") is not None]
    return {"motion_accuracy": (1.0 / len(MOTIONS)
                                if any(w.get("motion") is not None for w in wanted) else None),
            "attribute_accuracy": {
                "shape": mean_or_none([1.0 / len(SHAPES) for w in wanted
                                       if w.get("shape") is not None]),
                "colour": mean_or_none(colours),
                "background": mean_or_none([1.0 / len(COLOURS) for w in wanted
                                            if w.get("background") is not None])},
            "temporal_consistency": None}


# --------------------------------------------------------------------------------- judge


def _as_frames(videos) -> np.ndarray:
    """uint8 clips (or frames) as float32 in [-1, 1]."""
    return np.asarray(videos, np.float32) / 127.5 - 1.0


def _training_batch(source, rng, num: int):
    """``(frames [num, R, R, 3] in [-1, 1], targets)``: a few random frames of many random clips."""
    per_clip = min(FRAMES_PER_CLIP, source.frames)
    frames, targets = [], {"shape": [], "colour": [], "background": [], "centre": []}
    for index in rng.integers(len(source), size=-(-num // per_clip)):
        chosen = rng.choice(source.frames, size=per_clip, replace=False)
        geometry = source.geometry(int(index))
        frames.append(source[int(index)]["video"][chosen])
        targets["colour"].append(geometry["colour"][chosen])
        targets["centre"].append(geometry["centre"][chosen])
        targets["shape"].append(np.full(per_clip, geometry["shape"]))
        targets["background"].append(np.full(per_clip, geometry["background"]))
    targets = {name: np.concatenate(value)[:num] for name, value in targets.items()}
    targets["centre"] = targets["centre"].astype(np.float32)
    return _as_frames(np.concatenate(frames)[:num]), targets


def _make_judge_fn(model, params) -> Callable:
    """``judge_fn(frames [n, R, R, 3] in [-1, 1]) -> predictions`` in padded batches."""
    def predict(p, x):
        out = model.apply({"params": p}, x)
        return {**{name: jnp.argmax(out[name], -1) for name in ATTRIBUTES},
                "centre": out["centre"]}

    apply = jax.jit(predict)

    return lambda frames: classifier_store.apply_in_batches(apply, params, frames, _READ_BATCH,
                                                            pad=True)


def read_clips(judge_fn: Callable, clips) -> dict:
    """What the judge reads in every frame of ``clips`` [n, T, R, R, 3] in [-1, 1].

    ``judge_fn`` is :func:`load_judge`'s. Returns ``{"shape", "colour", "background": class
    indices int [n, T], "centre": [n, T, 2]}`` (y, x in frame sides)."""
    clips = np.asarray(clips, np.float32)
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"read_clips takes RGB clips [n, frames, height, width, 3], got an "
                         f"array of shape {clips.shape}")
    n, frames = clips.shape[:2]
    predicted = judge_fn(clips.reshape((n * frames,) + clips.shape[2:]))
    out = {name: np.asarray(predicted[name]).reshape(n, frames) for name in ATTRIBUTES}
    out["centre"] = np.asarray(predicted["centre"], np.float32).reshape(n, frames, 2)
    return out


def _real_clips(source, count: int):
    """``(clips [count, T, R, R, 3] in [-1, 1], geometries, records)`` of the first records."""
    records = [source[i] for i in range(count)]
    geometries = [source.geometry(i) for i in range(count)]
    return _as_frames(np.stack([r["video"] for r in records])), geometries, records


def _judge_test(judge_fn, source, resolution: int) -> dict:
    """The judge's accuracy on every frame of TEST_CLIPS clips, and motion_of's on its readings."""
    count = min(TEST_CLIPS, len(source))
    clips, truth, _ = _real_clips(source, count)
    read = read_clips(judge_fn, clips)
    frames = clips.shape[1]
    error = np.linalg.norm(read["centre"] - np.stack([g["centre"] for g in truth]), axis=-1)
    out = {name: float(np.mean(read[name] == np.stack(
        [np.broadcast_to(g[name], (frames,)) for g in truth]))) for name in ATTRIBUTES}
    return {**out, "centre_error_pixels": float(error.mean() * resolution),
            "centre_error_pixels_p99": float(np.quantile(error, 0.99) * resolution),
            "motion_accuracy": score(read, [wanted_of(g) for g in truth])["motion_accuracy"],
            "num_clips": count, "num_frames": int(error.size)}


def _initial_params(model, seed: int, resolution: int):
    """LeCun-normal kernels (variance 1 / fan-in) and zero biases, drawn by numpy.

    Flax's own initialisers give the same statistics (truncated at two deviations) but take
    XLA seconds to compile on a CPU; these take none."""
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, resolution, resolution, 3)))["params"]
    rng = np.random.default_rng([seed, 40_001])

    def draw(leaf):
        if len(leaf.shape) < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)

    return jax.tree_util.tree_map(draw, abstract)


def _judge_step(model, optimizer, resolution: int) -> Callable:
    """The jitted training step of the judge: cross-entropies plus the squared centre error."""
    def loss_fn(params, frames, targets):
        out = model.apply({"params": params}, frames)
        losses = {name: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            out[name], targets[name])) for name in ATTRIBUTES}
        pixels = jnp.mean(jnp.sum(jnp.square((out["centre"] - targets["centre"]) * resolution),
                                  axis=-1))
        accuracy = {name: jnp.mean(jnp.argmax(out[name], -1) == targets[name])
                    for name in ATTRIBUTES}
        return sum(losses.values()) + CENTRE_WEIGHT * pixels, (accuracy, jnp.sqrt(pixels))

    @jax.jit
    def step(params, opt_state, frames, targets):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frames, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return step


def train_judge(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Train the frame judge on the run's training clips, test it on fresh clips and save it.

    It trains ``config.classifier.num_steps`` steps of ``batch_size`` frames (a few frames of
    each of many clips of the training split, ground truth from ``geometry``) with
    :func:`~diffusion_jax.classifier_store.classifier_optimizer`, measures it on every frame of
    TEST_CLIPS clips of split "test" (another seed), and saves it where
    ``evaluate.train_classifier`` saves classifiers. Returns the summary saved beside it."""
    configuration.validate(config)
    _check_data(config)
    c, d = config.classifier, config.data
    source = configuration.build_source(d)
    model = FrameJudge(len(SHAPES), len(COLOURS), width=c.width)
    params = _initial_params(model, config.seed, d.resolution)
    optimizer = classifier_store.classifier_optimizer(config)
    opt_state = optimizer.init(params)
    step = _judge_step(model, optimizer, d.resolution)
    rng = np.random.default_rng([config.seed, 40_000])
    start = time.time()
    for i in range(c.num_steps):
        frames, targets = _training_batch(source, rng, c.batch_size)
        params, opt_state, loss, (accuracy, rms) = step(params, opt_state, frames, targets)
        if (i + 1) % max(c.num_steps // 10, 1) == 0 or i + 1 == c.num_steps:
            log(f"frame judge step {i + 1}/{c.num_steps} "
                f"{writers.progress_bar(i + 1, c.num_steps)}  loss {float(loss):.4f}  batch "
                + "  ".join(f"{n} {float(accuracy[n]):.3f}" for n in ATTRIBUTES)
                + f"  centre rms {float(rms):.2f} px")
    seconds = time.time() - start
    test_source = configuration.build_source(d, split="test")
    test = _judge_test(_make_judge_fn(model, params), test_source, d.resolution)
    summary = {
        "kind": "frame_judge", "resolution": int(d.resolution), "frames": int(d.frames),
        "width": int(c.width), "test": test,
        "test_data": f"every frame of {test['num_clips']} clips of {test_source!r}",
        "train_steps": int(c.num_steps), "train_seconds": round(seconds, 1),
        "data": d.to_dict(), "classifier": c.to_dict(),
        "device": jax.devices()[0].device_kind,
    }
    directory = classifier_store.save_classifier(config, workdir, params, summary)
    log("frame judge: held-out accuracy " + "  ".join(f"{n} {test[n]:.3f}" for n in ATTRIBUTES)
        + f", centre error {test['centre_error_pixels']:.2f} px, motion read right "
        f"{test['motion_accuracy']:.3f} on {test['num_frames']} frames of {test['num_clips']} "
        f"fresh clips after {c.num_steps} steps ({seconds:.0f} s); saved to {directory}")
    return summary


def load_judge(config, workdir: str):
    """Load the frame judge that ``train_judge`` saved for this run's data.

    Returns ``(judge_fn, summary)``: ``judge_fn(frames [n, R, R, 3] in [-1, 1]) -> {"shape",
    "colour", "background": class indices [n], "centre": [n, 2]}``."""
    directory, summary = classifier_store.read_classifier_summary(config, workdir, "frame judge")
    if summary.get("kind") != "frame_judge":
        raise classifier_store.EvaluationError(
            f"the classifier in {directory} is not a frame judge of moving shapes (it was "
            f"trained on {summary.get('data', {}).get('name')!r}); train one with "
            "--mode=train_classifier and this config, or point config.evaluation.classifier_dir "
            "at one")
    resolution = config.data.resolution
    if summary["resolution"] != resolution:
        raise classifier_store.EvaluationError(
            f"the frame judge in {directory} was trained on {summary['resolution']}x"
            f"{summary['resolution']} frames, this config makes {resolution}x{resolution}; "
            "retrain it with --mode=train_classifier and this config")
    model = FrameJudge(len(SHAPES), len(COLOURS), width=summary["width"])
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))["params"])
    params = classifier_store.restore_classifier_params(directory, abstract)
    return _make_judge_fn(model, params), summary


# ---------------------------------------------------------------------------- evaluation


def _checkpoint_generator(config, workdir, step):
    """The default generator source: the run's checkpoint (:func:`generate.checkpoint_generators`)."""
    step, _, for_scale = generate.checkpoint_generators(config, workdir, step)
    s, frames = config.sampling, config.data.frames

    def for_scale_video(scale):
        g = for_scale(scale)

        def generate_clips(key, prompts, num, first_frames=None):
            edit = None if first_frames is None else edit_runs.first_frame_inputs(
                first_frames, frames, jump_length=s.jump_length, jump_n_sample=s.jump_n_sample)
            return g(key, num, prompts, edit=edit)

        return generate_clips

    return step, for_scale_video


def _conditioning(config):
    """``"captions"``, ``"labels"`` or ``"none"``: what the run's clips are generated from."""
    if configuration.is_text_model(config):
        return "captions"
    return "labels" if config.data.class_conditional else "none"


def _generated_wanted(config, conditioning, num, wanted):
    """What a batch of ``num`` generated clips asks for: the records' own, or the labels' motion."""
    if conditioning == "captions":
        return wanted
    labels = generate.sampling_labels(config, len(MOTIONS) if conditioning == "labels" else None,
                                      num)
    motions = [None] * num if labels is None else [MOTIONS[int(k)] for k in np.asarray(labels)]
    return [{"motion": m, "shape": None, "colour": None, "to_colour": None, "background": None}
            for m in motions]


def _generate_and_read(config, generate_scale, judge_fn, records, wanted, conditioning,
                       first_frames=None):
    """``(read, wanted)`` of clips made in batches for ``records``, quantised like saved ones.

    ``first_frames`` [n, R, R, 3] in [-1, 1], if given, are the clips' given first frames."""
    e, d = config.evaluation, config.data
    key = jax.random.key(config.sampling.seed)
    expected = (d.frames, d.resolution, d.resolution, 3)
    reads, asked = [], []
    for offset in range(0, len(records), e.batch_size):
        chunk = slice(offset, min(offset + e.batch_size, len(records)))
        num = chunk.stop - chunk.start
        prompts = ([r["caption"] for r in records[chunk]] if conditioning == "captions"
                   else None)
        extra = {} if first_frames is None else {"first_frames": first_frames[chunk]}
        clips = files.quantize(parallel.to_host(
            generate_scale(jax.random.fold_in(key, offset), prompts, num, **extra)))
        if clips.shape[1:] != expected:
            raise classifier_store.EvaluationError(
                f"the generator made clips of shape {clips.shape[1:]}, the judge reads "
                f"{expected} (config.data.frames and resolution): evaluate with the config "
                "the run was trained with")
        reads.append(read_clips(judge_fn, clips))
        asked += _generated_wanted(config, conditioning, num, wanted[chunk])
    read = {name: np.concatenate([r[name] for r in reads]) for name in reads[0]}
    return read, asked


def _sweep(config, for_scale, judge_fn, records, wanted, conditioning, first_frames, log):
    """One result per guidance scale (and per first-frame setting): scores and seconds."""
    per_scale, asked = [], wanted
    settings = [None] + ([first_frames] if config.evaluation.first_frame else [])
    for scale in prompt_eval.guidance_scales(config):
        for given in settings:
            scale_start = time.time()
            read, asked = _generate_and_read(config, for_scale(scale), judge_fn, records,
                                             wanted, conditioning, given)
            result = {"guidance_scale": scale, "first_frame": given is not None,
                      **score(read, asked, given_frames=int(given is not None)),
                      "seconds": round(time.time() - scale_start, 2)}
            per_scale.append(result)
            log(f"guidance {scale:g}{', first frame given' if given is not None else ''}: "
                f"motion accuracy {_cell(result['motion_accuracy'])}, "
                f"temporal consistency {result['temporal_consistency']:.3f}")
    return per_scale, asked


def evaluate_video(config, workdir: str, judge, *, log: Callable[[str], None] = print,
                   step: Optional[int] = None, load_generator: Optional[Callable] = None
                   ) -> dict:
    """Motion accuracy, attribute accuracy and temporal consistency per guidance scale.

    ``judge`` is :func:`load_judge`'s ``(judge_fn, summary)``. The first
    ``evaluation.num_samples`` records of split "test" are what is asked for: a captioned run
    is prompted with their captions and scored against their ground truth; a class-conditional
    one makes the motions of :func:`~diffusion_jax.generate.sampling_labels` and is scored on
    motion and consistency only (an unconditional one on consistency alone). Clips are
    generated in batches of ``evaluation.batch_size`` with the same noise at every scale of
    :func:`~diffusion_jax.prompt_eval.guidance_scales`, quantised to 8 bits like saved clips
    and read by the judge (see :func:`score`). With ``evaluation.first_frame`` every scale is
    also run from each record's own first frame (image-to-video,
    :func:`~diffusion_jax.edit_runs.first_frame_inputs`), scored on the frames after it. The
    records' own clips give the "real" row. Writes ``workdir/eval/step<N>_<method>_<steps>steps_video.json`` and TensorBoard scalars
    under ``eval/video/``, and returns the results.

    ``load_generator(config, workdir, step) -> (step, for_scale)``, where ``for_scale(scale)``
    returns ``generate(key, prompts or None, num, first_frames=None) -> clips [num, T, R, R, 3]
    in [-1, 1]`` (``first_frames`` [num, R, R, 3]: the given first frames), replaces the run's checkpoint (tests give it real clips or noise)."""
    log = log if parallel.is_writer() else writers.quiet  # process 0 reports
    configuration.validate(config)
    _check_data(config)
    e, s = config.evaluation, config.sampling
    judge_fn, summary = judge
    conditioning = _conditioning(config)
    source = configuration.build_source(config.data, split="test")
    start = time.time()
    clips, geometries, records = _real_clips(source, min(e.num_samples, len(source)))
    wanted = [wanted_of(g) for g in geometries]
    real = score(read_clips(judge_fn, clips), wanted)
    step, for_scale = (load_generator or _checkpoint_generator)(config, workdir, step)
    per_scale, asked = _sweep(config, for_scale, judge_fn, records, wanted, conditioning,
                              clips[:, 0], log)
    results = {
        "step": int(step),
        "metric": "video adherence: the frame judge's reading of generated clips (motion from "
                  "its centres and colours, shape, colour, background per frame, and the "
                  "consistency of shape and colour between frames) against what was asked for",
        "conditioning": conditioning,
        "sampler": {"method": s.method, "num_steps": s.num_steps, "grid": s.grid,
                    "guidance_rescale": s.guidance_rescale, "use_ema": s.use_ema,
                    "jump_length": s.jump_length, "jump_n_sample": s.jump_n_sample},
        "num_samples": len(records),
        "guidance_scales": list(dict.fromkeys(r["guidance_scale"] for r in per_scale)),
        "scales": per_scale, "real": real, "chance": chance(asked),
        "judge_test": summary["test"],
        "generation_and_scoring_seconds": round(time.time() - start, 2),
    }
    scalars = {}
    for result in per_scale:
        prefix = (f"eval/video/cfg{result['guidance_scale']:g}"
                  f"{'_first_frame' if result['first_frame'] else ''}")
        scalars[f"{prefix}/motion_accuracy"] = result["motion_accuracy"]
        scalars[f"{prefix}/temporal_consistency"] = result["temporal_consistency"]
        for name, value in result["attribute_accuracy"].items():
            scalars[f"{prefix}/{name}"] = value
    out_path = classifier_store.write_results(
        config, workdir, f"step{results['step']}_{s.method}_{s.num_steps}steps_video",
        results, {k: v for k, v in scalars.items() if v is not None}, log)
    log(format_table(results))
    log(f"wrote {out_path}")
    return results


def _cell(value, width=6):
    return f"{'-':>{width}}" if value is None else f"{value:{width}.3f}"


def format_table(results: dict) -> str:
    """One row per guidance scale, then the real held-out clips and chance."""
    sampler = results["sampler"]
    lines = [f"video adherence of step {results['step']}: {sampler['method']}, "
             f"{sampler['num_steps']} steps, {results['num_samples']} clips per scale "
             f"(conditioned on {results['conditioning']})",
             f"{'':>10} {'motion':>7} " + " ".join(f"{n:>10}" for n in ATTRIBUTES)
             + f" {'consistency':>11}"]
    rows = [(f"cfg {r['guidance_scale']:g}{' i2v' if r.get('first_frame') else ''}", r)
            for r in results["scales"]]
    for name, r in rows + [("real", results["real"]), ("chance", results["chance"])]:
        lines.append(f"{name:>10} {_cell(r['motion_accuracy'], 7)} "
                     + " ".join(_cell(r["attribute_accuracy"][n], 10) for n in ATTRIBUTES)
                     + f" {_cell(r['temporal_consistency'], 11)}")
    judge = results["judge_test"]
    lines.append("(motion: clips whose motion, read from the judge's centres and colours, is the "
                 "one asked for; shape, colour, background: frames read as asked; consistency: "
                 "frame pairs with shape and colour unchanged, one colour switch allowed in a "
                 "colour change; i2v: the record's first frame given, attributes read on the "
                 "frames after it; real: held-out clips against their own ground truth; the "
                 "judge on fresh frames: " + ", ".join(f"{n} {judge[n]:.3f}" for n in ATTRIBUTES)
                 + f", centre error {judge['centre_error_pixels']:.2f} px)")
    return "\n".join(lines)
