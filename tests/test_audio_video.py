"""Audio and video through the image machinery: networks, configs, the loop, samplers and files."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import audio_eval, configuration, generate, modalities, run, samplers
from diffusion_jax import schedules, train
from diffusion_jax.data import DataError, Tones, check_source
from diffusion_jax.models.dit import DiT, sincos_position_embedding, unpatchify
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.layers import FrameConv
from diffusion_jax.models.video_unet import VideoUNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def audio_config(**data):
    """A seconds-long class-conditional run on 512-sample tones at 4 kHz."""
    config = tiny.get_config()
    config.data.name = "tones"
    config.data.size = 64
    config.data.sample_rate = 4000
    config.data.clip_length = 512
    config.model.unet.attention_resolutions = (256,)
    for key, value in data.items():
        config.data[key] = value
    return config


def video_config(**data):
    """A seconds-long text-to-video run on 4-frame 16x16 clips of moving shapes."""
    config = tiny.get_config()
    config.data.name = "moving_shapes"
    config.data.captions = "auto"
    config.data.size = 32
    config.data.frames = 4
    config.data.resolution = 16
    config.text.width = 32
    config.text.depth = 1
    config.text.num_heads = 2
    config.text.max_length = 80
    config.training.num_steps = 4
    config.training.checkpoint_every = 2
    for key, value in data.items():
        config.data[key] = value
    return config


def _quiet(*args, **kwargs):
    pass


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# ---------------------------------------------------------------------------------- networks


def test_the_unet_on_signals_uses_one_dimensional_kernels():
    unet = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(32,),
                num_groups=8, dropout=0.0, num_classes=4)
    x = jax.random.normal(jax.random.key(0), (2, 64, 1))
    params = unet.init(jax.random.key(1), x, jnp.array([0.2, 0.7]), jnp.array([0, 3]))["params"]
    assert params["conv_in"]["kernel"].shape == (3, 1, 16)
    assert params["down_0_downsample"]["kernel"].shape == (3, 16, 16)
    assert "up_1_attn_0" in params  # attention at length 32, the second level
    out = unet.apply({"params": params}, x, jnp.array([0.2, 0.7]), jnp.array([0, 3]))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="signal length \\(63,\\) must be divisible by 2"):
        unet.apply({"params": params}, x[:, :63], jnp.array([0.2, 0.7]))


def test_patches_of_any_rank_come_back_in_place():
    for shape, patch in (((2, 12, 3), (4,)), ((2, 4, 6, 3), (2, 3)), ((2, 4, 6, 8, 3), (2, 3, 4))):
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        grid = [n // p for n, p in zip(shape[1:-1], patch)]
        # Cut into patches by hand: [batch, g1, p1, .., c] -> [batch, g1, .., p1, .., c]
        split = x.reshape(shape[0], *[v for g, p in zip(grid, patch) for v in (g, p)], shape[-1])
        axes = len(patch)
        order = [0] + [1 + 2 * a for a in range(axes)] + [2 + 2 * a for a in range(axes)] + \
            [1 + 2 * axes]
        tokens = split.transpose(order).reshape(shape[0], int(np.prod(grid)), -1)
        np.testing.assert_array_equal(unpatchify(jnp.asarray(tokens), shape, patch), x)


def test_position_embeddings_split_the_channels_between_the_axes():
    one = sincos_position_embedding(8, 5)
    np.testing.assert_allclose(one[3, :4], np.sin(3 / 10_000 ** (np.arange(4) / 4)), rtol=1e-6)
    three = sincos_position_embedding(14, 2, 3, 4)  # 4 channels per axis, 2 left over
    assert three.shape == (24, 14)
    np.testing.assert_array_equal(three[:, 12:], 0)
    # Token (1, 2, 3) in row-major order; the frame axis comes first.
    index = 1 * 12 + 2 * 4 + 3
    np.testing.assert_allclose(three[index, [0, 4, 8]], np.sin([1.0, 2.0, 3.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="needs at least 6 channels"):
        sincos_position_embedding(4, 2, 3, 4)


def test_the_dit_takes_signals_and_spatio_temporal_patches():
    dit = DiT(patch_size=4, temporal_patch=2, hidden=24, depth=2, num_heads=2, num_classes=3)
    for shape in ((2, 32, 1), (2, 4, 8, 8, 3)):
        x = jax.random.normal(jax.random.key(0), shape)
        params = dit.init(jax.random.key(1), x, jnp.array([0.3, 0.8]))["params"]
        patch_inputs = int(np.prod(params["patch_embedding"]["kernel"].shape[:-2]))
        assert patch_inputs == (4 if len(shape) == 3 else 2 * 4 * 4)
        # The last layer starts at zero (adaLN-Zero): perturb it to see the output's layout.
        params = jax.tree_util.tree_map(lambda a: a + 0.01, params)
        out = dit.apply({"params": params}, x, jnp.array([0.3, 0.8]), jnp.array([0, 2]))
        assert out.shape == shape and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        dit.init(jax.random.key(1), jnp.zeros((1, 30, 1)), jnp.array([0.3]))


def _strip_time(params):
    """A VideoUNet's parameters as the image UNet's: no temporal layers, 1x3x3 -> 3x3."""
    if isinstance(params, dict):
        out = {}
        for key, value in params.items():
            if key == "time":
                continue
            out.update(_strip_time(value)) if key == "space" else out.update(
                {key: _strip_time(value)})
        return out
    return params[0] if params.ndim == 5 else params


def test_a_new_video_unet_is_the_image_unet_on_each_frame_and_then_mixes_frames():
    kw = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
              num_heads=2, num_groups=8, dropout=0.0, num_classes=3)
    video, image = VideoUNet(**kw), UNet(**kw)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16, 16, 3))
    t, y = jnp.array([0.3, 0.6]), jnp.array([0, 2])
    params = video.init(jax.random.key(1), x, t, y)["params"]
    assert params["conv_in"]["kernel"].shape == (1, 3, 3, 3, 16)
    assert params["down_0_res_0"]["space"]["conv_0"]["kernel"].shape == (1, 3, 3, 16, 16)
    assert params["down_0_res_0"]["time"]["conv"]["kernel"].shape == (3, 1, 1, 16, 16)
    key = iter(jax.random.split(jax.random.key(2), 1000))

    def perturbed(params, where):
        return jax.tree_util.tree_map_with_path(
            lambda path, a: a + 0.05 * jax.random.normal(next(key), a.shape)
            if where(jax.tree_util.keystr(path)) else a, params)

    # Every spatial layer trained (here: perturbed, the zero-initialised output convolutions
    # too), the temporal layers new: each frame's output is the image UNet's.
    params = perturbed(params, lambda keys: "time" not in keys)
    out = video.apply({"params": params}, x, t, y)
    assert np.abs(out).max() > 0.1
    per_frame = jnp.stack([image.apply({"params": _strip_time(params)}, x[:, i], t, y)
                           for i in range(5)], axis=1)
    np.testing.assert_allclose(out, per_frame, atol=2e-5)

    # With the temporal layers trained too, a frame's output depends on the others, and on their
    # order (the temporal attention knows the frame index).
    moved = perturbed(params, lambda keys: "time" in keys)
    out = video.apply({"params": moved}, x, t, y)
    changed = video.apply({"params": moved}, x.at[:, 4].set(0.0), t, y)
    assert np.abs(changed[:, 0] - out[:, 0]).max() > 1e-3
    reversed_out = video.apply({"params": moved}, x[:, ::-1], t, y)[:, ::-1]
    assert np.abs(reversed_out - out).max() > 1e-3


def test_frame_convolutions_are_flax_convolutions_over_each_frame():
    """FrameConv makes nn.Conv's parameters for a [1, kh, kw] kernel and gives its output, with
    strides and padding within frames; a kernel spanning frames is refused."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
    for kw in (dict(kernel_size=(1, 3, 3)), dict(kernel_size=(1, 1, 1)),
               dict(kernel_size=(1, 3, 3), strides=(1, 2, 2), padding=((0, 0), (1, 1), (1, 1)))):
        ours, flax_conv = FrameConv(5, **kw), nn.Conv(5, **kw)
        params = ours.init(jax.random.key(1), x)
        reference = flax_conv.init(jax.random.key(1), x)
        assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
            jnp.shape, reference)
        np.testing.assert_array_equal(params["params"]["kernel"], reference["params"]["kernel"])
        params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # a bias that is not zero
        np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), atol=1e-5)
    with pytest.raises(ValueError, match="convolves each frame of"):
        FrameConv(5, (3, 3, 3)).init(jax.random.key(1), x)
    # In bfloat16 the kernel and bias are cast as their first use, so the samplers cast them
    # once before their loop, as they do nn.Conv's.
    bf16 = FrameConv(5, (1, 3, 3), dtype=jnp.bfloat16)
    params = bf16.init(jax.random.key(1), x)["params"]
    network = lambda p, x, t, c: bf16.apply({"params": p}, x)  # noqa: E731
    cast = generate.cast_params_once(network, params, x.shape)
    assert {k: a.dtype for k, a in cast.items()} == {"kernel": jnp.bfloat16, "bias": jnp.bfloat16}


def test_temporal_layers_start_at_zero_or_at_random_as_asked():
    """temporal_init="zeros" (the default, for inflation) makes every temporal output projection
    zero, so a clip's frames do not see each other; "default" starts them at random, and the
    spatial layers are initialised alike either way."""
    kw = dict(channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(4,),
              num_heads=1, num_groups=4, dropout=0.0)
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 3))
    t = jnp.array([0.5])
    inits = {name: VideoUNet(temporal_init=name, **kw).init(jax.random.key(1), x, t)["params"]
             for name in ("zeros", "default")}
    for name, params in inits.items():
        paths = [(jax.tree_util.keystr(p), a)
                 for p, a in jax.tree_util.tree_flatten_with_path(params)[0]]
        out_kernels = [a for p, a in paths if "['time']" in p and (
            p.endswith("['conv']['kernel']") or p.endswith("['out']['kernel']"))]
        assert len(out_kernels) == 9, name  # five res blocks' convs, four attentions' outs
        assert all(bool(jnp.all(a == 0)) == (name == "zeros") for a in out_kernels), name
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), _strip_time(inits["zeros"]),
                                  _strip_time(inits["default"]))
    assert all(jax.tree_util.tree_leaves(same))
    with pytest.raises(ValueError, match="temporal_init='ones' is not one of"):
        VideoUNet(temporal_init="ones", **kw).init(jax.random.key(1), x, t)


@pytest.mark.slow  # a minute or more on two cores
def test_every_sampler_runs_audio_and_video_networks_unchanged():
    schedule = schedules.get("cosine")
    for model, shape in ((UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(), num_groups=8, dropout=0.0), (2, 32, 1)),
                         (VideoUNet(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(4,), num_groups=8, dropout=0.0),
                          (2, 3, 8, 8, 3))):
        noise = jax.random.normal(jax.random.key(0), shape)
        params = model.init(jax.random.key(1), noise, jnp.ones(2))["params"]
        params = jax.tree_util.tree_map(lambda a: a + 0.01, params)  # a non-trivial network
        denoise = lambda x, t: -x * 0.1 + 0.1 * model.apply({"params": params}, x, t)  # noqa
        for method in samplers.METHODS:
            out = samplers.sample(denoise, noise, schedule=schedule, method=method, num_steps=3,
                                  grid="trailing", key=jax.random.key(2)).samples
            assert out.shape == shape and np.all(np.isfinite(out)), method


# ------------------------------------------------------------------------ configs and inputs


@pytest.mark.parametrize("config, overrides, message", [
    ("audio", {"model.name": "mlp"}, "config.model.name='mlp' takes vectors, not data of "
     "shape \\(512, 1\\); use model.name in \\('unet', 'dit'\\)"),
    ("audio", {"model.dit.patch_size": 3, "model.name": "dit"},
     "patch_size=3 does not divide the signal length 512"),
    ("audio", {"model.unet.channel_mult": (1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)},
     "11 levels; the signal length 512 must be divisible by 1024"),
    ("video", {"model.name": "dit", "model.dit.temporal_patch": 3},
     "temporal_patch=3 does not divide the 4 frames"),
    ("video", {"model.unet.channel_mult": (1, 2, 2, 2, 2, 2)},
     "the frame size 16 must be divisible by 32"),
    ("audio", {"data.name": "audio_folder"}, "config.data.path must name the audio folder"),
    ("video", {"data.name": "video_folder", "data.path": "/x"},
     "a video_folder has no captions"),
    ("audio", {"data.audio_channels": 3}, "config.data.audio_channels must be in \\[1, 2\\], got 3"),
    ("video", {"model.unet.temporal_init": "ones"},
     "temporal_init='ones' is not one of \\('zeros', 'default'\\)"),
    ("audio", {"model.unet.temporal_init": "default"}, "this data has no frames"),
])
def test_bad_audio_and_video_settings_name_the_key(config, overrides, message):
    config = audio_config() if config == "audio" else video_config()
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        target = config
        for part in group.split("."):
            target = target[part]
        target[name] = value
    with pytest.raises(configuration.ConfigError, match=message):
        run.build(config)


@pytest.mark.parametrize("record, message", [
    ({"audio": np.zeros((64, 1), np.int16)}, "audio is int16 .*float samples in \\[-1, 1\\]"),
    ({"audio": np.full((64, 1), 2.0, np.float32)}, "in \\[2.0, 2.0\\].*in \\[-1, 1\\]"),
    ({"audio": np.zeros(64, np.float32)}, "of shape \\(64,\\).*wave\\[:, None\\]"),
    ({"video": np.zeros((4, 8, 8, 3), np.float32)}, "video is float32 .*uint8 0..255"),
    ({"video": np.zeros((8, 8, 3), np.uint8)}, "shape \\(8, 8, 3\\).*\\[frames, height"),
])
def test_bad_audio_and_video_records_are_refused_with_the_fix(record, message):
    with pytest.raises(DataError, match=message):
        check_source([record], dataset="mine")


# ---------------------------------------------------------------------- the loop and outputs


@pytest.mark.slow  # a minute or more on two cores
def test_an_audio_run_resumes_bit_for_bit_and_samples_wav_files(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    straight = train.train_and_evaluate(audio_config(), str(tmp_path / "a"), log=_quiet)
    config = audio_config()
    config.training.num_steps = 3
    train.train_and_evaluate(config, str(tmp_path / "b"), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(audio_config(), str(tmp_path / "b"), log=lines.append)
    assert any("resumed from step 3" in line for line in lines)
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)

    config = audio_config()
    config.sampling.num_samples = 3
    written = generate.generate_to_files(config, str(tmp_path / "a"))
    wavs = sorted(p for p in written if p.endswith(".wav"))
    assert len(wavs) == 3 and len([p for p in written if p.endswith(".png")]) == 4
    samples = np.load([p for p in written if p.endswith(".npz")][0])["samples"]
    assert samples.shape == (3, 512, 1)
    wave, rate = soundfile.read(wavs[1], dtype="float32")
    assert rate == 4000 and wave.shape == (512,)
    np.testing.assert_allclose(wave, np.clip(samples[1, :, 0], -1, 1), atol=1 / 32768 + 1e-7)


@pytest.mark.slow  # a minute or more on two cores
def test_a_video_run_resumes_bit_for_bit_and_samples_gif_and_mp4(tmp_path):
    imageio = pytest.importorskip("imageio.v3")
    straight = train.train_and_evaluate(video_config(), str(tmp_path / "a"), log=_quiet)
    config = video_config()
    config.training.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path / "b"), log=_quiet)
    resumed = train.train_and_evaluate(video_config(), str(tmp_path / "b"), log=_quiet)
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)

    config = video_config()
    config.sampling.num_samples = 2
    config.sampling.prompt = "a red circle moving to the right on a blue background"
    written = generate.generate_to_files(config, str(tmp_path / "a"))
    assert len([p for p in written if p.endswith(".gif")]) == 2
    mp4 = [p for p in written if p.endswith(".mp4")][0]
    frames = imageio.imread(mp4, plugin="FFMPEG", index=None)
    assert frames.shape == (4, 64, 64, 3)  # frames below 64 px are enlarged for players
    gif = imageio.imread([p for p in written if p.endswith(".gif")][0], index=None)
    assert gif.shape[:3] == (4, 16, 16)
    grid = imageio.imread([p for p in written if p.endswith(".png")][0])
    assert grid.shape[:2] == (2 * 16 + 2, 4 * 16 + 3 * 2)  # a row of 4 frames per clip

    # Image-to-video: config.sampling.init_image is every clip's first frame, kept exactly.
    first = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    imageio.imwrite(str(tmp_path / "first.png"), first)
    config.sampling.init_image = str(tmp_path / "first.png")
    written = generate.generate_to_files(config, str(tmp_path / "a"))
    npz = [p for p in written if p.endswith(".npz")][0]
    assert os.path.basename(npz).startswith("step4_i2v_")
    clips = np.load(npz)["samples"]
    assert clips.shape == (2, 4, 16, 16, 3)
    np.testing.assert_allclose(clips[:, 0], np.broadcast_to(first / 127.5 - 1.0, (2, 16, 16, 3)),
                               atol=1e-6)


# ------------------------------------------------------------------------------- metrics


def test_pitch_accuracy_of_real_tones_is_perfect_and_of_noise_is_not():
    source = Tones(200, sample_rate=8000, length=2048, seed=3)
    records = [source[i] for i in range(200)]
    waves = audio_eval.quantize_16bit(np.stack([r["audio"] for r in records]))
    labels = np.array([r["label"] for r in records])
    targets = audio_eval.pitch_targets(source, labels)
    notes = targets >= 0
    assert 30 < notes.sum() < 200  # chords and hits have no single pitch
    accuracy, count = audio_eval.pitch_accuracy(waves, targets, 8000)
    assert count == notes.sum() and accuracy == 1.0
    # The same clips asked to be another note (a tone up the scale) are all wrong.
    wrong, _ = audio_eval.pitch_accuracy(waves, np.where(notes, targets + 2, -1), 8000)
    assert wrong < 0.05
    noise = 0.3 * np.random.default_rng(0).standard_normal(waves.shape).astype(np.float32)
    noisy, _ = audio_eval.pitch_accuracy(noise, targets, 8000)
    assert noisy < 0.3


def test_previews_of_each_modality():
    config = audio_config()
    assert modalities.modality((512, 1)) == "audio" and modalities.modality((4, 8, 8, 3)) == \
        "video"
    assert modalities.preview(np.zeros((3, 2)), config) is None
    spectrograms = modalities.preview(np.zeros((4, 512, 1)), config)
    assert spectrograms.dtype == np.uint8 and spectrograms.ndim == 3
    frames = modalities.preview(np.zeros((2, 3, 8, 8, 3)), config)
    assert frames.shape[:2] == (2 * 8 + 2, 3 * 8 + 2 * 2)


# ------------------------------------------------------------------------------ the mesh

_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tests.test_audio_video import audio_config, video_config
    from diffusion_jax import generate, train
    from diffusion_jax import run as run_lib
    assert jax.device_count() == 8
    out = {}
    for name, make, data, fsdp in (("audio", audio_config, 4, 2), ("video", video_config, 2, 4)):
        config = make()
        config.data.batch_size, config.mesh.data, config.mesh.fsdp = 16, data, fsdp
        config.model.unet.channels = 32  # (its embedding layers are large enough to split)
        config.training.num_steps = config.training.checkpoint_every = 4
        state = train.train_and_evaluate(config, sys.argv[1] + "/" + name, log=lambda line: None)
        print(name, "specs", sorted({str(leaf.sharding.spec)
                                     for leaf in jax.tree_util.tree_leaves(state.params)}))
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
            out[f"{name}/{i}"] = np.asarray(leaf)
        restored, model, shape, num_classes = run_lib.restore_run(config, sys.argv[1] + "/" + name)
        samples = generate.make_generate_fn(config, model, shape, num_classes, mesh=
                                            run_lib.sampling_mesh(config))(
            restored.ema_params, jax.random.key(0), 8)
        print(name, "sample devices", len(samples.sharding.device_set))
        out[f"{name}/samples"] = np.asarray(samples)
    np.savez(sys.argv[1] + "/states.npz", **out)
""")


@pytest.mark.slow  # two tiny runs on 8 simulated devices in a subprocess, and two on one
def test_audio_and_video_on_eight_devices_match_one_device(tmp_path):
    """Data parallelism and fsdp over 8 devices train the same audio and video models as one
    device (float32 round-off), and sampling spread over them gives the same clips."""
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                  "--xla_force_host_platform_device_count=8"]).strip()}
    result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    states = np.load(tmp_path / "states.npz")
    for name, make in (("audio", audio_config), ("video", video_config)):
        assert "'fsdp'" in result.stdout.split(f"{name} specs")[1].split("\n")[0]
        assert f"{name} sample devices 8" in result.stdout
        config = make()
        config.data.batch_size, config.model.unet.channels = 16, 32
        config.training.num_steps = config.training.checkpoint_every = 4
        single = train.train_and_evaluate(config, str(tmp_path / f"one_{name}"), log=_quiet)
        leaves = jax.tree_util.tree_flatten_with_path(single)[0]
        for i, (path, expected) in enumerate(leaves):
            where = jax.tree_util.keystr(path)
            if where.startswith((".params", ".ema_params")):
                # Same math, batch reductions in another order: float32 round-off (biases whose
                # true gradient is 0, before a GroupNorm, move by Adam's steps of round-off).
                np.testing.assert_allclose(states[f"{name}/{i}"], np.asarray(expected),
                                           rtol=1e-4, atol=1e-5, err_msg=f"{name} {where}")
            elif where.startswith((".step", ".rng")):
                np.testing.assert_array_equal(states[f"{name}/{i}"], np.asarray(expected),
                                              err_msg=f"{name} {where}")
        restored, model, shape, num_classes = run.restore_run(config, str(tmp_path / name))
        samples = generate.make_generate_fn(config, model, shape, num_classes)(
            restored.ema_params, jax.random.key(0), 8)
        np.testing.assert_allclose(states[f"{name}/samples"], samples, atol=1e-5)
