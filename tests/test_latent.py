"""Latent diffusion end to end on tiny settings: an autoencoder run, a latent run on its latents.

The autoencoder's objective (adaptive GAN weight, hinge loss, which network each term trains),
resuming both kinds of run bit for bit, the latent scale kept with the run, precomputed latents
equal to those encoded on the fly, sampling and decoding, a diffusers vae/ folder as the
autoencoder, and the errors of configs that point at the wrong thing.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import kill_at_step_and_rerun

from configs import tiny
from diffusion_jax import autoencoder_training, configuration, files, generate, latent, run, train
from diffusion_jax import train_state
from diffusion_jax.models.autoencoder import AutoencoderKL, SpatialSelfAttention
from diffusion_jax.models.patchgan import PatchDiscriminator


def _quiet(*args, **kwargs):
    pass


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def autoencoder_config(**overrides):
    """A tiny autoencoder run: 16x16 shapes, f=2, 2 latent channels, discriminator from step 2."""
    config = tiny.get_config()
    config.task = "autoencoder"
    a = config.autoencoder
    a.block_out_channels = (8, 16)
    a.norm_num_groups = 4
    a.latent_channels = 2
    a.disc_weight = 0.5
    a.disc_start = 2
    a.disc_layers = 1
    a.disc_channels = 8
    config.training.num_steps = 4
    config.training.checkpoint_every = 2
    for key, value in overrides.items():
        group, name = key.split("__")
        config[group][name] = value
    return config


def latent_config(autoencoder_dir, **overrides):
    """A tiny denoiser on the 8x8x2 latents of the autoencoder run in ``autoencoder_dir``."""
    config = tiny.get_config()
    config.latent.autoencoder = str(autoencoder_dir)
    config.model.unet.attention_resolutions = (4,)
    for key, value in overrides.items():
        group, name = key.split("__")
        config[group][name] = value
    return config


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("autoencoder")
    state = train.train_and_evaluate(autoencoder_config(), str(workdir), log=_quiet)
    return workdir, state


@pytest.mark.slow  # two more runs; the default suite resumes pixel runs, and these are also
# covered by the kill -9 test below
def test_autoencoder_run_resumes_bit_for_bit(autoencoder_run, tmp_path):
    """Steps 3 and 4 (discriminator on) after a restart equal those of the straight run."""
    _, straight = autoencoder_run
    train.train_and_evaluate(autoencoder_config(training__num_steps=2), str(tmp_path), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(autoencoder_config(), str(tmp_path), log=lines.append)
    assert any("resumed from step 2" in line for line in lines)
    assert any("with a discriminator" in line and "perceptual loss off" in line
               for line in lines)
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert sorted(straight.params) == ["autoencoder", "discriminator"]


def _loss_setup():
    ae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       latent_channels=2, norm_num_groups=4)
    disc = PatchDiscriminator(layers=1, channels=8)
    task = autoencoder_training.AutoencoderTask(ae, disc)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    params = task.init(jax.random.key(0), x)["params"]
    loss = autoencoder_training.AutoencoderLoss(ae, disc, kl_weight=1e-3, disc_weight=0.5,
                                                disc_start=0)
    return ae, disc, loss, params, x


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    """The vjp through the last convolution gives the gradients jax.grad takes of the whole net."""
    ae, disc, loss, params, x = _loss_setup()
    batch, draws = loss.draw({"x": x}, jax.random.key(3), 5)
    _, aux = loss.compute(params, batch, draws)

    def terms(kernel):
        p = jax.tree_util.tree_map(lambda a: a, params)
        p["autoencoder"]["decoder"]["conv_out"]["kernel"] = kernel
        mean, logvar = ae.apply({"params": p["autoencoder"]}, x, method=AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(draws["key"], mean.shape)
        recon = ae.apply({"params": p["autoencoder"]}, z, method=AutoencoderKL.decode)
        nll = jnp.mean(jnp.sum(jnp.abs(x - recon), axis=(1, 2, 3)))
        gan = -jnp.mean(disc.apply({"params": params["discriminator"]}, recon))
        return nll, gan

    kernel = params["autoencoder"]["decoder"]["conv_out"]["kernel"]
    nll_grad = jax.grad(lambda k: terms(k)[0])(kernel)
    gan_grad = jax.grad(lambda k: terms(k)[1])(kernel)
    expected = 0.5 * jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    np.testing.assert_allclose(aux["gan_weight"], expected, rtol=1e-5)
    np.testing.assert_allclose(aux["reconstruction"], terms(kernel)[0], rtol=1e-6)


@pytest.mark.slow  # gradients of the autoencoder and discriminator losses
def test_each_network_is_trained_by_its_own_terms():
    """Before disc_start the discriminator gets no gradient; after, only the hinge loss moves it."""
    ae, disc, loss, params, x = _loss_setup()
    grad = lambda step: jax.grad(lambda p: loss.compute(  # noqa: E731
        p, *loss.draw({"x": x}, jax.random.key(3), step))[0])(params)
    late = autoencoder_training.AutoencoderLoss(ae, disc, kl_weight=1e-3, disc_weight=0.5,
                                                disc_start=10)
    before = jax.grad(lambda p: late.compute(p, *late.draw({"x": x}, jax.random.key(3), 9))[0])(
        params)
    assert all(np.all(g == 0) for g in _leaves(before["discriminator"]))
    after = grad(0)["discriminator"]
    recon = _reconstruction(loss, params, x)
    hinge = jax.grad(lambda d: autoencoder_training.hinge_discriminator_loss(
        disc.apply({"params": d}, x), disc.apply({"params": d}, recon)))(params["discriminator"])
    for a, b in zip(_leaves(after), _leaves(hinge)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _reconstruction(loss, params, x):
    """The posterior-sample reconstruction the loss computes for draw key 3."""
    ae = loss.autoencoder
    key = loss.draw({"x": x}, jax.random.key(3), 0)[1]["key"]
    mean, logvar = ae.apply({"params": params["autoencoder"]}, x, method=AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return ae.apply({"params": params["autoencoder"]}, z, method=AutoencoderKL.decode)


def test_hinge_loss_values():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-3.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> mean 0.25; fake: relu(1-3)=0, relu(1+0)=1 -> mean 0.5
    assert float(autoencoder_training.hinge_discriminator_loss(real, fake)) == pytest.approx(0.375)


@pytest.fixture(scope="module")
def latent_run(autoencoder_run, tmp_path_factory):
    autoencoder_dir, _ = autoencoder_run
    workdir = tmp_path_factory.mktemp("latent")
    lines = []
    state = train.train_and_evaluate(latent_config(autoencoder_dir), str(workdir),
                                     log=lines.append)
    return workdir, state, lines


def test_latent_run_keeps_its_scale(autoencoder_run, latent_run):
    """The scale measured at the start is logged, kept in latent.json and read back."""
    autoencoder_dir, _ = autoencoder_run
    workdir, _, lines = latent_run
    with open(workdir / "latent.json") as f:
        kept = json.load(f)
    assert any(f"latent scale {kept['scale']:.6g} (1 / std of" in line for line in lines)
    assert any("on latents of shape (8, 8, 2)" in line for line in lines)
    space = latent.load_space(latent_config(autoencoder_dir), str(workdir), log=_quiet)
    assert space.scale == kept["scale"] and kept["autoencoder_step"] == 4
    assert space.autoencoder_step == 4 and 0.1 < kept["scale"] < 10


@pytest.mark.slow  # two more runs; see test_autoencoder_run_resumes_bit_for_bit
def test_latent_run_resumes_bit_for_bit(autoencoder_run, latent_run, tmp_path):
    """Steps 4 to 6 after a restart (the scale read back from latent.json) equal the straight run's."""
    autoencoder_dir, _ = autoencoder_run
    _, straight, _ = latent_run
    config = latent_config(autoencoder_dir)
    train.train_and_evaluate(latent_config(autoencoder_dir, training__num_steps=3),
                             str(tmp_path), log=_quiet)
    resumed = train.train_and_evaluate(config, str(tmp_path), log=_quiet)
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_scale_estimate_is_one_over_the_std_of_the_latents():
    ae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=2,
                       norm_num_groups=4)
    images = jax.random.uniform(jax.random.key(0), (3, 4, 8, 8, 3), minval=-1, maxval=1)
    params = ae.init(jax.random.key(1), images[0])["params"]
    space = latent.LatentSpace(ae, params, scale=7.0)  # the estimate ignores the current scale
    batches = iter([{"x": b} for b in images])
    scale, count = latent.estimate_scale(space, batches, 3, jax.random.key(5))
    samples = [latent.LatentSpace(ae, params).encode_batch({"x": b}, jax.random.fold_in(
        jax.random.key(5), i))["x"] for i, b in enumerate(images)]
    assert count == 3 * 4 * 8 * 8 * 2
    np.testing.assert_allclose(scale, 1 / np.std(np.concatenate(samples)), rtol=1e-5)


def test_latent_samples_decode_to_images(autoencoder_run, latent_run):
    autoencoder_dir, _ = autoencoder_run
    workdir, _, _ = latent_run
    written = generate.generate_to_files(latent_config(autoencoder_dir), str(workdir))
    arrays = np.load([p for p in written if p.endswith(".npz")][0])
    assert arrays["samples"].shape == (4, 16, 16, 3)
    assert np.all(np.abs(arrays["samples"]) <= 1)


def test_precomputed_latents_equal_those_encoded_on_the_fly(autoencoder_run, tmp_path):
    autoencoder_dir, _ = autoencoder_run
    config = latent_config(autoencoder_dir, latent__precomputed=str(tmp_path / "latents"))
    out = latent.encode_dataset(config, str(tmp_path), log=_quiet)
    source = latent.precomputed_source(config)
    assert len(source) == config.data.size and source.num_classes == 3
    pixels = configuration.build_source(config.data)
    space = latent.load_space(config, str(tmp_path), estimate=lambda s: (1.0, 0), resumed=False,
                              log=_quiet)
    latent.check_precomputed(source, space, config)
    images = np.stack([np.asarray(pixels[i]["image"], np.float32) / 127.5 - 1 for i in (0, 9)])
    mean, logvar = space.moments(images)
    stored = np.stack([source[i]["moments"] for i in (0, 9)])
    np.testing.assert_allclose(stored, np.concatenate([mean, logvar], -1), atol=1e-5)
    key = jax.random.key(4)
    np.testing.assert_allclose(space.encode_batch({"moments": stored}, key)["x"],
                               space.encode_batch({"x": images}, key)["x"], atol=1e-5)
    with pytest.raises(configuration.ConfigError, match="exists already"):
        latent.encode_dataset(config, str(tmp_path), log=_quiet)
    assert os.path.isdir(out) and not os.path.exists(out + ".partial")
    other = latent_config(autoencoder_dir, latent__precomputed=out, data__resolution=32)
    with pytest.raises(configuration.ConfigError, match="other data"):
        latent.precomputed_source(other)


def test_a_diffusers_vae_folder_is_an_autoencoder_with_its_scaling_factor(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=2, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    config = latent_config(tmp_path / "vae")
    _, _, shape, _, _ = run.build(config)
    assert shape == (8, 8, 2)
    space = latent.load_space(config, str(tmp_path / "run"), log=_quiet)
    assert space.scale == 0.5


def test_configs_pointing_at_the_wrong_thing_say_so(autoencoder_run, latent_run, tmp_path):
    autoencoder_dir, _ = autoencoder_run
    latent_dir, _, _ = latent_run
    cases = [
        (latent_config(tmp_path / "nowhere"), "is not a folder"),
        (latent_config(latent_dir), "is the workdir of a latent-diffusion run"),
        (latent_config(autoencoder_dir, data__resolution=17), "not a multiple of 2"),
        (latent_config(autoencoder_dir, data__name="toy2d"), "encodes images"),
        (latent_config(autoencoder_dir, model__name="dit"), "the denoiser works on the latents"),
        (autoencoder_config(latent__autoencoder=str(autoencoder_dir)), "for diffusion runs"),
        (autoencoder_config(autoencoder__norm_num_groups=3), "not divisible by"),
    ]
    cases[4][0].model.dit.patch_size = 3
    for config, message in cases:
        with pytest.raises(configuration.ConfigError, match=message):
            run.build(config)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(configuration.ConfigError, match="has no config.json"):
        run.build(latent_config(tmp_path / "empty"))


def test_a_run_keeps_the_autoencoder_and_scale_it_started_with(autoencoder_run, latent_run,
                                                                tmp_path):
    """latent.json decides: another autoencoder of the same shape (a copy), another checkpoint
    step or scale is refused; a fresh start replaces what a failed start left behind."""
    autoencoder_dir, _ = autoencoder_run
    latent_dir, _, _ = latent_run
    shutil.copytree(autoencoder_dir, tmp_path / "copy")
    for config, message in [
            (latent_config(tmp_path / "copy"), "a run keeps the autoencoder it started with"),
            (latent_config(autoencoder_dir, latent__checkpoint_step=2), "leave it -1"),
            (latent_config(autoencoder_dir, latent__scale=123.0), "leave it 0")]:
        with pytest.raises(configuration.ConfigError, match=message):
            latent.load_space(config, str(latent_dir), log=_quiet)
    shutil.copy(latent_dir / "latent.json", tmp_path / "latent.json")
    fresh = latent.load_space(latent_config(tmp_path / "copy"), str(tmp_path), resumed=False,
                              estimate=lambda space: (2.5, 1), log=_quiet)
    assert fresh.scale == 2.5
    with pytest.raises(configuration.ConfigError, match="has checkpoints but no latent.json"):
        latent.load_space(latent_config(autoencoder_dir), str(tmp_path / "copy"), resumed=True,
                          estimate=lambda space: (2.5, 1), log=_quiet)


def test_pixel_run_workdir_is_not_an_autoencoder(tmp_path):
    """A pixel run's workdir (config.json as training writes it, checkpoints/) is refused."""
    os.makedirs(tmp_path / "pixels" / "checkpoints")
    files.save_json(str(tmp_path / "pixels" / "config.json"),
                    json.loads(tiny.get_config().to_json_best_effort()))
    with pytest.raises(configuration.ConfigError, match="pixel-space diffusion run"):
        run.build(latent_config(tmp_path / "pixels"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTOENCODER_FLAGS = ["--config.task=autoencoder", "--config.autoencoder.block_out_channels=(8,16)",
                     "--config.autoencoder.norm_num_groups=4",
                     "--config.autoencoder.latent_channels=2",
                     "--config.autoencoder.disc_weight=0.5", "--config.autoencoder.disc_start=6",
                     "--config.autoencoder.disc_layers=1", "--config.autoencoder.disc_channels=8"]


@pytest.mark.slow  # runs in subprocesses, killed and rerun
@pytest.mark.parametrize("kind", ["autoencoder", "latent"])
def test_a_run_killed_with_sigkill_resumes_bit_for_bit(kind, autoencoder_run, tmp_path):
    """kill -9 mid-run, then the same command: the end state equals an uninterrupted run's."""
    autoencoder_dir, _ = autoencoder_run
    steps = ["--config.training.num_steps=24", "--config.training.log_every=1",
             "--config.training.checkpoint_every=4"]
    if kind == "autoencoder":
        extra = AUTOENCODER_FLAGS
        config = autoencoder_config(autoencoder__disc_start=6)
    else:
        extra = [f"--config.latent.autoencoder={autoencoder_dir}",
                 "--config.model.unet.attention_resolutions=(4,)"]
        config = latent_config(autoencoder_dir)
    for flag in steps:
        key, value = flag[len("--config."):].split("=")
        group, name = key.split(".")
        config[group][name] = int(value)
    command = [sys.executable, "main.py", "--config=configs/tiny.py",
               f"--workdir={tmp_path / 'killed'}", *extra, *steps]
    kill_at_step_and_rerun(command, 9, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), log=_quiet)
    _, model, shape, num_classes, optimizer = run.build(config)
    manager = run.open_checkpoints(config, str(tmp_path / "killed"), shape, num_classes)
    assert manager.latest_step() == 24
    killed = manager.restore(train_state.abstract_train_state(model, optimizer, shape,
                                                              num_classes, 0))
    manager.close()
    for a, b in zip(_leaves(straight), _leaves(killed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # trains a classifier for the Fréchet distance
def test_autoencoder_cli_sample_and_eval(autoencoder_run, tmp_path):
    """--mode=sample writes originals beside reconstructions; --mode=eval reports PSNR and FD."""
    autoencoder_dir, _ = autoencoder_run
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={autoencoder_dir}",
            *AUTOENCODER_FLAGS, "--config.autoencoder.disc_start=2",
            "--config.training.num_steps=4"]
    for mode in ("sample", "train_classifier", "eval"):
        done = subprocess.run(base + [f"--mode={mode}", "--config.classifier.num_steps=20",
                                      "--config.evaluation.num_samples=64"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (mode, done.stderr[-3000:])
    assert "PSNR" in done.stdout and "Fréchet distance" in done.stdout
    (result,) = [f for f in os.listdir(autoencoder_dir / "eval") if f.endswith(".json")]
    with open(autoencoder_dir / "eval" / result) as f:
        values = json.load(f)
    assert values["num_images"] == 64 and 0 < values["psnr_db"] < 100
    assert values["frechet_distance"] >= 0


_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")  # (test_latent imports the conftest helpers by name)
    import jax, numpy as np
    from tests.test_latent import autoencoder_config, latent_config
    from diffusion_jax import train
    assert jax.device_count() == 8
    mesh = dict(mesh__data=4, mesh__fsdp=2)
    runs = {"autoencoder": autoencoder_config(**mesh),
            "latent": latent_config(sys.argv[2], training__steps_per_call=2,
                                    training__log_every=2, training__checkpoint_every=2,
                                    data__batch_size=16, **mesh)}
    out = {}
    for name, config in runs.items():
        state = train.train_and_evaluate(config, sys.argv[1] + "/" + name, log=print)
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state.params)):
            out[f"{name}/{i}"] = np.asarray(leaf)
    np.savez(sys.argv[1] + "/states.npz", **out)
""")


def test_an_attention_key_bias_has_no_gradient():
    """The key bias adds the same q.b to every score of a query, which the softmax ignores: its
    gradient is 0 up to round-off, while the query bias's is not."""
    attention = SpatialSelfAttention(num_groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    params = attention.init(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # biases that are not zero
    target = jax.random.normal(jax.random.key(2), x.shape)
    grads = jax.grad(lambda p: ((attention.apply({"params": p}, x) - target) ** 2).mean())(params)
    assert np.abs(grads["to_k"]["bias"]).max() < 1e-5 * np.abs(grads["to_q"]["bias"]).max()
    assert np.abs(grads["to_q"]["bias"]).max() > 1e-4


@pytest.mark.slow  # a subprocess with 8 simulated devices
def test_eight_devices_train_as_one(autoencoder_run, tmp_path):
    """An autoencoder run (with its discriminator) and a latent run (encoding each stack of two
    steps' batches laid out for the scanned step) on a 4x2 data x fsdp mesh of 8 simulated
    devices end where one device ends."""
    autoencoder_dir, one_device = autoencoder_run
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=8").strip()}
    done = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path),
                           str(autoencoder_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    eight = np.load(tmp_path / "states.npz")
    latent_one = train.train_and_evaluate(
        latent_config(autoencoder_dir, training__steps_per_call=2, training__log_every=2,
                      training__checkpoint_every=2, data__batch_size=16),
        str(tmp_path / "latent_one"), log=_quiet)
    # Same math, batch reductions in another order: float32 round-off. Biases whose true
    # gradient is 0 or nearly (a convolution's right before a GroupNorm) get a looser bound,
    # since Adam scales their round-off gradients up. An attention's key bias has a gradient of
    # exactly 0 (test_an_attention_key_bias_has_no_gradient): in either run its value is
    # round-off amplified by Adam, different run to run, so it is not compared.
    for name, state in (("autoencoder", one_device), ("latent", latent_one)):
        for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(state.params)[0]):
            where = jax.tree_util.keystr(path)
            if where.endswith("['to_k']['bias']"):
                continue
            tolerance = 1e-4 if where.endswith("['bias']") else 2e-5
            np.testing.assert_allclose(eight[f"{name}/{i}"], np.asarray(leaf), rtol=2e-4,
                                       atol=tolerance, err_msg=f"{name} {where}")


@pytest.mark.slow  # compiling the bfloat16 gradient takes a while on a CPU
def test_the_autoencoder_loss_trains_in_bfloat16_with_a_discriminator():
    """The GPU presets' setting: the GAN terms' pullbacks take float32 cotangents."""
    ae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=2, norm_num_groups=4,
                       dtype=jnp.bfloat16)
    disc = PatchDiscriminator(layers=1, channels=8, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    params = autoencoder_training.AutoencoderTask(ae, disc).init(jax.random.key(0), x)["params"]
    loss = autoencoder_training.AutoencoderLoss(ae, disc, disc_weight=0.5, disc_start=0)
    grads = jax.grad(lambda p: loss.compute(p, *loss.draw({"x": x}, jax.random.key(2), 1))[0])(
        params)
    assert all(np.all(np.isfinite(g)) for g in _leaves(grads))
    assert any(np.any(g != 0) for g in _leaves(grads["discriminator"]))
