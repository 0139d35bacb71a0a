"""Image-to-video: the first frame given, the others painted by any video model (edit_runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import configuration, edit_runs, run, schedules
from diffusion_jax.models.video_unet import VideoUNet
from tests.test_audio_video import audio_config, video_config


def _denoiser(frames=4):
    """A fresh VideoUNet with its temporal layers perturbed, so frames see each other."""
    model = VideoUNet(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), num_groups=8, dropout=0.0)
    x = jnp.zeros((2, frames, 8, 8, 3))
    params = model.init(jax.random.key(1), x, jnp.ones(2))["params"]
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape),
                                    params)
    return lambda x, t: 0.9 * x + 0.3 * model.apply({"params": params}, x, t)


def _sample(denoise, noise, edit):
    return edit_runs.sample_edited(denoise, noise, edit, dict(
        schedule=schedules.get("cosine"), method="ddim", num_steps=6, grid="trailing",
        key=jax.random.key(3)))


def test_the_first_frame_is_kept_exactly_and_the_others_follow_it():
    denoise = _denoiser()
    noise = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 3))
    first = jax.random.uniform(jax.random.key(4), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    edit = edit_runs.first_frame_inputs(first, 4)
    assert edit.mask.shape == (1, 4, 1, 1, 1) and edit.strength == 1.0
    np.testing.assert_array_equal(edit.mask[0, :, 0, 0, 0], [0.0, 1.0, 1.0, 1.0])
    out = _sample(denoise, noise, edit)
    np.testing.assert_array_equal(out[:, 0], first)  # exact: the known region is put back
    plain = _sample(denoise, noise, None)
    other = _sample(denoise, noise, edit_runs.first_frame_inputs(-first, 4))
    # The painted frames depend on the given frame (through the temporal layers).
    assert float(jnp.abs(out[:, 1:] - plain[:, 1:]).max()) > 1e-2
    assert float(jnp.abs(out[:, 1:] - other[:, 1:]).max()) > 1e-2
    # One first frame for every clip, and RePaint's resampling, keep it too.
    resampled = _sample(denoise, noise, edit_runs.first_frame_inputs(first[:1], 4,
                                                                     jump_length=2,
                                                                     jump_n_sample=2))
    np.testing.assert_array_equal(resampled[:, 0], jnp.broadcast_to(first[:1], (2, 8, 8, 3)))
    assert np.all(np.isfinite(resampled))


def test_first_frame_inputs_refuse_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 frames"):
        edit_runs.first_frame_mask(1)
    with pytest.raises(ValueError, match=r"give \[1 or batch, height, width, channels\]"):
        edit_runs.first_frame_inputs(np.zeros((8, 8, 3)), 4)


def test_a_video_runs_init_image_is_its_first_frame(tmp_path):
    path = str(tmp_path / "frame.png")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    config = video_config()
    config.sampling.init_image = path
    config.sampling.jump_n_sample = 3  # RePaint's resampling applies: this is inpainting in time
    configuration.validate(config)
    assert configuration.editing_strength(config) == 1.0
    assert edit_runs.mode_name(config) == "i2v_"
    edit = edit_runs.edit_inputs(config, (4, 16, 16, 3))
    assert edit.x0.shape == (1, 4, 16, 16, 3) and edit.jump_n_sample == 3
    np.testing.assert_allclose(edit.x0[0, 0], pixels / 127.5 - 1.0, atol=1e-6)
    config.sampling.strength = 0.5
    assert edit_runs.mode_name(config) == "i2v0.5_"


@pytest.mark.parametrize("kind, key, message", [
    ("video", "mask_image", "a video run's init_image is its clips' first frame"),
    ("audio", "init_image", "data.name='tones' is audio: leave it empty"),
    ("image", "evaluation", "first_frame=True measures image-to-video on moving shapes"),
])
def test_editing_keys_that_do_not_fit_the_data_are_refused(tmp_path, kind, key, message):
    path = str(tmp_path / "frame.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    config = {"video": video_config, "audio": audio_config}.get(kind, video_config)()
    if kind == "image":
        config.data.name = "shapes"
        config.evaluation.first_frame = True
    else:
        config.sampling.init_image = path
    if key == "mask_image":
        config.sampling.mask_image = path
    with pytest.raises(configuration.ConfigError, match=message):
        run.build(config)


@pytest.mark.slow  # compiles generation for three edits
def test_one_generate_function_takes_each_calls_first_frames():
    """``edit`` given per call (per-batch first frames) is the same as a generate function made
    for it: the evaluations reuse one compiled sampler for every batch."""
    from diffusion_jax import generate, train_state
    config = video_config()
    config.sampling.num_steps = 3
    _, model, shape, num_classes, optimizer = run.build(config)
    state = train_state.init_train_state(config, model, optimizer, shape, num_classes,
                                           run.build_mesh(config))
    keys = jax.random.split(jax.random.key(5), 2)
    firsts = [jax.random.uniform(k, (2,) + shape[1:], minval=-1.0, maxval=1.0) for k in keys]
    edits = [edit_runs.first_frame_inputs(f, shape[0]) for f in firsts]
    prompts = ["a red circle moving up on a blue background"] * 2
    shared = generate.make_generate_fn(config, model, shape, num_classes)
    per_call = [shared(state.params, jax.random.key(0), 2, prompts, edit=e) for e in edits]
    made_for = generate.make_generate_fn(config, model, shape, num_classes, edit=edits[0])(
        state.params, jax.random.key(0), 2, prompts)
    np.testing.assert_array_equal(per_call[0], made_for)
    for clips, first in zip(per_call, firsts):
        np.testing.assert_array_equal(clips[:, 0], first)
    plain = shared(state.params, jax.random.key(0), 2, prompts)  # no edit: from noise
    assert float(jnp.abs(plain[:, 0] - firsts[1]).max()) > 0.1
