"""Every preset validates and builds its model (shapes only, no data needed for TFDS presets)."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import autoencoders, configuration

PRESETS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob(
    "*.py") if p.stem != "__init__")
SHAPES = {"fashion_mnist": ((28, 28, 1), 10), "tfds": ((32, 32, 3), 10),
          "shapes": (None, 3), "captions": (None, None), "toy2d": ((2,), 8),
          "tones": (None, 36), "moving_shapes": (None, None), "shape_points": (None, 6),
          "molecules": (None, None)}


# Each latent-diffusion preset and the autoencoder preset whose run it names.
LATENT_PAIRS = {"fashion_mnist_latent": "fashion_mnist_autoencoder",
                "fashion_mnist_latent_cpu": "fashion_mnist_autoencoder_cpu",
                "shapes128_latent": "shapes128_autoencoder",
                "shapes128_latent_cpu": "shapes128_autoencoder_cpu"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_builds(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    if name.startswith("stable_diffusion"):  # presets for a pretrained folder, which they need
        with pytest.raises(configuration.ConfigError, match="pretrained.path|data.path"):
            configuration.validate(config)
        # Folders are loaded by tests/test_sd_pipeline.py and tests/test_sd_finetune.py.
        config.pretrained.path = "a diffusers folder"
        if config.data.name == "folder":
            config.data.path = "a folder of captioned images"
            config.latent.autoencoder = "a diffusers folder/vae"
        configuration.validate(config)
        return
    configuration.validate(config)
    shape, classes = SHAPES[config.data.name]
    if config.data.name == "tones":
        shape = (config.data.clip_length, config.data.audio_channels)
    elif config.data.name == "moving_shapes":
        shape = (config.data.frames, config.data.resolution, config.data.resolution, 3)
    elif config.data.name == "shape_points":
        shape = (config.data.num_points, 3)
    elif config.data.name == "molecules":  # positions and one channel per element
        shape = (config.data.max_atoms, 3 + len(config.data.elements.split(",")))
    elif shape is None:
        shape = (config.data.resolution, config.data.resolution, 3)
    classes = classes if config.data.class_conditional else None
    if config.task == "autoencoder":
        model = autoencoders.build_task(config, shape)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape)))
        assert sum(p.size for p in jax.tree_util.tree_leaves(params)) > 0
        return
    if config.latent.autoencoder:  # the denoiser works on the latents of the paired preset's run
        stage_one = importlib.import_module(f"configs.{LATENT_PAIRS[name]}").get_config()
        assert stage_one.data.to_dict() == {**config.data.to_dict(),
                                            "batch_size": stage_one.data.batch_size,
                                            "worker_count": stage_one.data.worker_count,
                                            "class_conditional": stage_one.data.class_conditional}
        autoencoder = autoencoders.build_autoencoder(stage_one.autoencoder, shape[-1])
        shape = autoencoders.latent_shape(autoencoder, shape, where=name)
    model = configuration.build_denoiser(config, shape, classes)
    args = [jnp.zeros((1,) + shape), jnp.zeros((1,))]
    if classes:
        args.append(jnp.zeros((1,), jnp.int32))
    kwargs = {}
    if configuration.is_text_model(config):  # a caption-conditioned network takes byte tokens
        kwargs = {"tokens": jnp.zeros((1, config.text.max_length), jnp.int32),
                  "token_mask": jnp.ones((1, config.text.max_length), bool)}
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    count = sum(p.size for p in jax.tree_util.tree_leaves(params))
    if name == "cifar10_ddpm":
        assert count == 35_746_307
    assert count > 0


def test_every_numeric_key_has_a_range():
    """A new numeric key must be given a type and range (configuration.NUMERIC, or its model
    family's ranges), or validation would let any value through."""
    from diffusion_jax import configuration, defaults
    from diffusion_jax.models import registry

    config = defaults.get_config()
    flat = configuration._flatten(config)
    families = {f"model.{name}." for name in registry.FAMILIES}
    numeric = {k for k, v in flat.items() if not isinstance(v, (bool, str)) and (
        isinstance(v, (int, float)) or (isinstance(v, tuple) and all(
            isinstance(x, (int, float)) for x in v)))}
    shared = {k for k in numeric if not any(k.startswith(f) for f in families)}
    assert shared == set(configuration.NUMERIC), shared ^ set(configuration.NUMERIC)
    for name, family in registry.FAMILIES.items():
        own = {k.split(".", 2)[2] for k in numeric if k.startswith(f"model.{name}.")}
        assert own == set(family.ranges), (name, own ^ set(family.ranges))
    for key, (kind, rule) in configuration.NUMERIC.items():
        configuration.check_number(key, flat[key], kind, rule)  # the defaults are in range
