"""Training runs that start from a pretrained Stable Diffusion folder (config.pretrained.path).

A tiny SD 1.x-like folder (``sd_folders.build``) is fine-tuned on captioned shapes through the
ordinary loop: the first parameters must be the folder's weights exactly (so the run's network
computes what the loaded pipeline computes, bit for bit), the run trains, checkpoints, resumes
and samples like any other, and configs that do not fit the folder are refused by key.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flax.traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sd_folders  # noqa: E402
from diffusion_jax import configuration, generate, parallel, pretrained_runs  # noqa: E402
from diffusion_jax import run, train, train_state  # noqa: E402
from diffusion_jax.pipelines import StableDiffusion  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd_finetune") / "model"
    sd_folders.build(path, "sd1", "ddim")
    return str(path)


def _config(folder, **training):
    config = sd_folders.finetune_config(folder)
    config.training.update({**dict(num_steps=2, checkpoint_every=2, log_every=2), **training})
    config.sampling.update(num_steps=3, num_samples=2, prompt="a red circle")
    return config


@pytest.mark.slow  # builds a run on the folder: about a minute
def test_first_parameters_are_the_folders_weights(folder):
    config = _config(folder)
    _, model, example_shape, num_classes, optimizer = run.build(config)
    assert num_classes is None and example_shape == (16, 16, 4)
    mesh = parallel.make_mesh(-1, 1)
    abstract = train_state.abstract_train_state(model, optimizer, example_shape, num_classes,
                                                config.seed)
    params = pretrained_runs.initial_params(config, model,
                                            parallel.state_shardings(mesh, abstract).params)
    pipe = StableDiffusion.from_pretrained(folder)
    for ours, theirs in ((params["denoiser"], pipe.models.unet_params),
                         (params["encoder"], pipe.models.text_encoder_params[0])):
        jax.tree_util.tree_map(np.testing.assert_array_equal, ours, theirs)
    state = train_state.state_from_params(config, optimizer, params, abstract, mesh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.ema_params, params)
    # The run's network is the pipeline's: same output for the same latents, time and prompt.
    x = jax.random.normal(jax.random.key(1), (2,) + example_shape)
    t = jnp.array([0.3, 0.9])
    ids, mask = configuration.encode_captions(config, ["a red circle", ""])
    run_out = model.apply({"params": params}, x, t, tokens=ids, token_mask=mask)
    context = pipe.models.text_encoders[0].apply({"params": params["encoder"]}, ids)
    pipe_out = pipe.models.unet.apply({"params": pipe.models.unet_params}, x, t,
                                      context=context.last_hidden_state)
    np.testing.assert_array_equal(run_out, pipe_out)
    # The empty caption of caption dropout is the tokenizer's "" (what the pipeline's
    # unconditional branch reads).
    null_tokens, _ = configuration.null_caption(config)
    np.testing.assert_array_equal(null_tokens[0], pipe.tokenize([""])[0][0])


@pytest.mark.slow  # two short training runs and sampling: about a minute
def test_fine_tune_trains_resumes_and_samples(folder, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(folder), workdir, log=lambda line: None)
    assert run.has_checkpoints(workdir)
    train.train_and_evaluate(_config(folder, num_steps=4), workdir, log=lambda line: None)
    config = _config(folder, num_steps=4)
    state, *_ = run.restore_run(config, workdir)
    assert int(state.step) == 4
    pipe = StableDiffusion.from_pretrained(folder)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                   state.params["denoiser"], pipe.models.unet_params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # it trained
    # --mode=sample on a workdir with checkpoints samples the run, not the folder.
    written = generate.generate_to_files(config, workdir)
    assert os.path.basename(written[0]).startswith("step4_")
    samples = np.load(written[0])["samples"]
    assert samples.shape == (2, 32, 32, 3) and np.isfinite(samples).all()


@pytest.mark.parametrize("change, match", [
    (dict(diffusion=dict(target="v")), "diffusion.target='v', but the folder's model predicts"),
    (dict(diffusion=dict(schedule="ddpm_linear")), "is not the forward process"),
    (dict(latent=dict(autoencoder="a copy of its vae/")), "set it to .*vae"),
    (dict(data=dict(class_conditional=True, name="shapes")), "captioned data"),
])
def test_configs_that_do_not_fit_the_folder_are_refused(folder, change, match, tmp_path):
    config = _config(folder)
    for group, values in change.items():
        config[group].update(values)
    if config.latent.autoencoder == "a copy of its vae/":  # the same weights, another folder
        shutil.copytree(os.path.join(folder, "vae"), tmp_path / "vae")
        config.latent.autoencoder = str(tmp_path / "vae")
    with pytest.raises(configuration.ConfigError, match=match):
        run.build(config)


@pytest.mark.slow  # a short ControlNet run and sampling: about a minute
def test_a_controlnet_of_a_folder_trains_on_its_frozen_unet(folder, tmp_path):
    """config.controlnet with config.pretrained.path: the ControlNet copies the folder's UNet
    encoder, reads control images 2x the latents' size (the tiny VAE's factor), trains alone
    while the folder's weights stay as they were, and samples with its controls."""
    from diffusion_jax import controlnet_runs

    config = _config(folder)
    config.controlnet.control = "mask"
    _, model, example_shape, num_classes, optimizer = run.build(config)
    assert controlnet_runs.control_shape(model, example_shape) == (32, 32, 3)
    workdir = str(tmp_path / "control")
    lines = []
    state = train.train_and_evaluate(config, workdir, log=lines.append)
    assert any("a ControlNet (mask control" in line for line in lines), lines[:3]
    pipe = StableDiffusion.from_pretrained(folder)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.frozen["denoiser"],
                           pipe.models.unet_params)  # the base did not move
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(state.params).items()}
    assert float(jnp.abs(flat["control_mid/kernel"]).max()) > 0  # the zero convolution trained
    assert not any(path.startswith("up_") for path in flat)  # an encoder copy, no decoder
    written = generate.generate_to_files(config, workdir)
    arrays = np.load(written[0])
    assert arrays["samples"].shape == (2, 32, 32, 3) and np.isfinite(arrays["samples"]).all()
    assert arrays["controls"].shape == (2, 32, 32, 3)
