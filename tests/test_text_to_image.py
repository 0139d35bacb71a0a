"""Text-to-image end to end: caption tokens through the pipeline, the text-conditioned network,
classifier-free guidance with prompts, training and prompt-based sampling from the CLI and the
Python API."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import (conditioning, configuration, data, generate, guidance,
                           parameterization, run, text)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny preset on captioned 16x16 shapes with a 1-block text encoder.
TEXT_FLAGS = {"data.name": "captions", "data.resolution": 16, "data.class_conditional": False,
              "text.width": 32, "text.depth": 1, "text.num_heads": 2, "text.max_length": 80}


def _config():
    config = tiny.get_config()
    for key, value in TEXT_FLAGS.items():
        group, name = key.split(".")
        setattr(getattr(config, group), name, value)
    return config


@pytest.fixture(scope="module")
def network():
    config = _config()
    _, model, shape, num_classes, _ = run.build(config)
    tokens, mask = text.encode(["a small red circle in the top left"] * 2, 80)
    x = jax.random.normal(jax.random.key(1), (2,) + shape)
    params = model.init(jax.random.key(0), x, jnp.ones(2), tokens=tokens,
                        token_mask=mask)["params"]
    # Make the zero-initialised output layers non-zero so that the text actually matters.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    return config, model, params, shape


def test_pipeline_turns_captions_into_tokens():
    source = data.CaptionedShapes(size=8, resolution=16)
    batch = next(data.make_iterator(source, batch_size=4, seed=0, max_length=80))
    assert batch["x"].shape == (4, 16, 16, 3)
    assert batch["tokens"].shape == batch["token_mask"].shape == (4, 80)
    assert batch["token_mask"].dtype == bool
    captions = text.decode(batch["tokens"])
    assert all(c in {source[i]["caption"] for i in range(8)} for c in captions)


def test_padding_does_not_change_the_prediction(network):
    config, model, params, shape = network
    x = jax.random.normal(jax.random.key(2), (2,) + shape)
    prompts = ["two blue squares on a yellow background", "a large green triangle"]
    outs = []
    for length in (48, 80):
        tokens, mask = text.encode(prompts, length)
        outs.append(model.apply({"params": params}, x, jnp.full(2, 0.3), tokens=tokens,
                                token_mask=mask))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)
    # ... while the prompt itself does change it.
    tokens, mask = text.encode(prompts[::-1], 80)
    other = model.apply({"params": params}, x, jnp.full(2, 0.3), tokens=tokens, token_mask=mask)
    assert np.abs(np.asarray(other) - np.asarray(outs[1])).max() > 1e-3


def _guided(network, prompts, scale):
    config, model, params, shape = network
    schedule = configuration.build_schedule(config)
    par = configuration.build_parameterization(config)
    denoise = parameterization.make_denoise_fn(
        jax.tree_util.Partial(conditioning.sampling_network(model), params), schedule, par)
    cond = generate.encode_prompts(config, prompts)
    null_tokens, null_mask = text.null_text(config.text.max_length)
    uncond = {"tokens": jnp.broadcast_to(null_tokens, cond["tokens"].shape),
              "token_mask": jnp.broadcast_to(null_mask, cond["tokens"].shape)}
    guided = guidance.classifier_free_guidance(denoise, cond=cond, uncond=uncond, scale=scale)
    x = jax.random.normal(jax.random.key(3), (len(prompts),) + shape)
    t = jnp.full((len(prompts),), 0.6)
    return guided(x, t), denoise(x, t, cond), denoise(x, t, None)


@pytest.mark.slow  # samples at three scales; guidance is checked in closed form in test_guidance
def test_guidance_scale_one_is_the_conditional_and_zero_ignores_the_prompt(network):
    prompts = ["a small red circle in the top left", "three white squares on a black background"]
    guided, conditional, unconditional = _guided(network, prompts, 1.0)
    np.testing.assert_allclose(guided, conditional, atol=1e-5)
    assert np.abs(np.asarray(conditional) - np.asarray(unconditional)).max() > 1e-3
    # Scale 0: the unconditional branch alone, whatever the prompt says.
    a, _, _ = _guided(network, prompts, 0.0)
    b, _, _ = _guided(network, ["a large blue triangle", "two green circles"], 0.0)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, unconditional, atol=1e-5)
    # Scale 4 extrapolates: x0_uncond + 4 (x0_cond - x0_uncond).
    g4, _, _ = _guided(network, prompts, 4.0)
    np.testing.assert_allclose(g4, unconditional + 4 * (conditional - unconditional), atol=1e-4)


def test_caption_dropout_replaces_whole_captions_by_the_empty_one():
    prepare = conditioning.drop_captions(0.5, 80)
    tokens, mask = text.encode([f"caption number {i}" for i in range(64)], 80)
    out = prepare({"x": jnp.zeros((64, 2)), "tokens": jnp.asarray(tokens),
                   "token_mask": jnp.asarray(mask)}, jax.random.key(0))
    decoded = text.decode(out["tokens"])
    dropped = [d == "" for d in decoded]
    assert 16 < sum(dropped) < 48
    for i, d in enumerate(decoded):
        assert d in ("", f"caption number {i}")
        if d == "":
            assert int(out["token_mask"][i].sum()) == 2  # bos and eos only


@pytest.mark.slow  # a text run trained and sampled: over a minute
def test_tiny_text_run_trains_and_samples_from_prompts(tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT}
    flags = [f"--config.{k}={v}" for k, v in TEXT_FLAGS.items()]
    run = subprocess.run([sys.executable, "main.py", "--config=configs/tiny.py",
                          f"--workdir={workdir}", "--config.training.num_steps=4",
                          "--config.training.checkpoint_every=4", *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 4/4" in run.stdout
    prompt = "two red squares on a blue background|a small white circle in the center"
    run = subprocess.run([sys.executable, "main.py", "--config=configs/tiny.py",
                          f"--workdir={workdir}", "--mode=sample", *flags,
                          f"--config.sampling.prompt={prompt}",
                          "--config.sampling.guidance_scale=4",
                          "--config.sampling.negative_prompt=black background"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    npz = [f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".npz")]
    assert len(npz) == 1 and "cfg4" in npz[0]
    saved = np.load(os.path.join(workdir, "samples", npz[0]))
    assert saved["samples"].shape == (4, 16, 16, 3)
    assert list(saved["prompts"]) == ["two red squares on a blue background",
                                      "a small white circle in the center"] * 2

    # The Python API: a list of prompts, a sampler and a step count.
    images, state = generate.generate_from_prompts(
        _config(), workdir, ["a large green triangle", "three black circles"],
        method="ddim", num_steps=3, guidance_scale=3.0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert int(state.step) == 4


def test_prompts_need_a_text_model():
    config = tiny.get_config()
    config.sampling.prompt = "a red circle"
    with pytest.raises(configuration.ConfigError, match="text-conditioned"):
        configuration.validate(config)
