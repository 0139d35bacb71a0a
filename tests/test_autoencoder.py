"""Parity of our Flax AutoencoderKL with diffusers', and the converter's checks and errors.

Random diffusers models (``torch.manual_seed``, GroupNorm scales and biases perturbed away from
1 and 0 so that a misplaced normalisation parameter shows) are written offline with
``save_pretrained``, loaded with ``load_vae`` and run on the same float32 batch by both. The
posterior mean, log-variance and the reconstruction of the mean must agree to float32 round-off:
``ATOL`` absolute, on outputs of magnitude about 1 to 10. The worst errors are printed (``-s``)
and named in the assertion message.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from diffusion_jax.models.autoencoder import AutoencoderKL, kl_divergence, sample_latent  # noqa: E402
from diffusion_jax.pretrained import autoencoder_from_config, convert_state_dict, load_vae  # noqa: E402

ATOL = 1e-4
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            sample_size=32)
IMAGE_SIZE, LATENT_SIZE = 32, 16  # of the tiny model (two levels)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              latent_channels=4, sample_size=512)
SD_VAE_PARAMETERS = 83_653_863


def _torch_vae(seed=0, **config):
    """A random diffusers AutoencoderKL with non-trivial GroupNorm parameters."""
    levels = len(config["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "norm" in name:  # norm1, norm2, conv_norm_out, the attention's group_norm
                param.add_(0.2 * torch.randn_like(param))
    return vae


def _saved(vae, folder):
    vae.save_pretrained(folder)
    return folder


def _state_dict(vae):
    return {name: tensor.detach().numpy().copy() for name, tensor in vae.state_dict().items()}


def _nhwc(tensor):
    return jnp.asarray(tensor.numpy().transpose(0, 2, 3, 1))


def _worst_errors(vae, apply, image_size, batch=2, seed=1):
    """Max abs differences {reconstruction, mean, logvar} between diffusers and ``apply(x)``."""
    torch.manual_seed(seed)
    x = torch.randn(batch, vae.config.in_channels, image_size, image_size)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
    ours = apply(_nhwc(x))
    theirs = (reconstruction, posterior.mean, posterior.logvar)
    assert ours[0].shape == (batch, image_size, image_size, vae.config.out_channels)
    return {name: float(np.max(np.abs(np.asarray(a) - _nhwc(b))))
            for name, a, b in zip(("reconstruction", "mean", "logvar"), ours, theirs)}


def _parameter_count(model):
    size = model.downsampling_factor
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def _check_parity(vae, folder, image_size, batch=2):
    model, params, info = load_vae(_saved(vae, folder))
    assert info["scaling_factor"] == vae.config.scaling_factor
    assert info["shift_factor"] == vae.config.shift_factor
    assert info["config"]["_class_name"] == "AutoencoderKL"
    torch_count = sum(p.numel() for p in vae.parameters())
    assert _parameter_count(model) == torch_count
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    errors = _worst_errors(vae, apply, image_size, batch)
    print(f"worst abs errors ({torch_count:,} parameters): {errors}")
    assert max(errors.values()) < ATOL, f"worst abs errors {errors} (tolerance {ATOL})"
    return model, params


class Tiny:
    """The tiny diffusers model, its folder, our model, params and jit-compiled methods."""

    def __init__(self, folder):
        self.vae = _torch_vae(**TINY)
        self.folder = _saved(self.vae, folder)
        self.model, self.params, _ = load_vae(folder)
        model = self.model
        for name in ("decode", "decode_hidden"):
            method = getattr(model, name)
            setattr(self, name, jax.jit(
                lambda params, x, method=method: model.apply({"params": params}, x, method=method)))
        self.call = jax.jit(lambda params, x, key=None: model.apply({"params": params}, x, key))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny_vae"))


def test_tiny_autoencoder_matches_diffusers(tiny):
    assert tiny.model.downsampling_factor == 2
    errors = _worst_errors(tiny.vae, lambda x: tiny.call(tiny.params, x), IMAGE_SIZE)
    print(f"tiny config, worst abs errors: {errors}")
    assert max(errors.values()) < ATOL, f"worst abs errors {errors} (tolerance {ATOL})"
    assert _parameter_count(tiny.model) == sum(p.numel() for p in tiny.vae.parameters())


@pytest.mark.parametrize("variant", [
    dict(mid_block_add_attention=False, block_out_channels=(32,)),
    dict(use_quant_conv=False, use_post_quant_conv=False, block_out_channels=(32,),
         latent_channels=3, in_channels=1, out_channels=2),
])
def test_variants_match_diffusers(tmp_path, variant):
    config = {**TINY, **variant}
    model, params = _check_parity(_torch_vae(**config), tmp_path, image_size=16)
    if not config.get("mid_block_add_attention", True):
        assert "attentions_0" not in params["encoder"]["mid_block"]
    if not config.get("use_quant_conv", True):
        assert "quant_conv" not in params and "post_quant_conv" not in params


def test_decoder_conv_out_is_a_plain_flax_conv(tiny):
    """decode(z) = nn.Conv(out_channels, (3, 3), padding=1) at params["decoder"]["conv_out"]."""
    model, params = tiny.model, tiny.params
    z = jax.random.normal(jax.random.PRNGKey(0), (2, LATENT_SIZE, LATENT_SIZE, 4))
    hidden = tiny.decode_hidden(params, z)
    assert hidden.shape == (2, IMAGE_SIZE, IMAGE_SIZE, model.block_out_channels[0])
    conv = nn.Conv(model.out_channels, (3, 3), padding=1)
    through_conv = conv.apply({"params": params["decoder"]["conv_out"]}, hidden)
    np.testing.assert_allclose(through_conv, tiny.decode(params, z), rtol=0, atol=1e-6)


def test_call_decodes_the_mean_or_a_posterior_draw(tiny):
    params = tiny.params
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, IMAGE_SIZE, IMAGE_SIZE, 3), minval=-1,
                           maxval=1)
    reconstruction, mean, logvar = tiny.call(params, x)
    assert mean.shape == logvar.shape == (2, LATENT_SIZE, LATENT_SIZE, 4)
    np.testing.assert_allclose(reconstruction, tiny.decode(params, mean), atol=1e-5)
    key = jax.random.PRNGKey(3)
    z = sample_latent(mean, logvar, key)
    np.testing.assert_allclose(
        z, mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape), atol=1e-6)
    sampled, _, _ = tiny.call(params, x, key)
    np.testing.assert_allclose(sampled, tiny.decode(params, z), atol=1e-5)
    assert float(jnp.max(jnp.abs(sampled - reconstruction))) > 1e-3


def test_kl_divergence_matches_diffusers():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 6) * 2
    theirs = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(moments)
    mean, logvar = _nhwc(moments[:, :4]), _nhwc(moments[:, 4:])
    ours = kl_divergence(mean, logvar)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, theirs.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(kl_divergence(jnp.zeros((2, 4, 4, 4)), jnp.zeros((2, 4, 4, 4))),
                               0.0)


def test_old_attention_names_and_conv_shaped_weights_convert_alike(tiny):
    vae, model, params = tiny.vae, tiny.model, tiny.params
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, tensor in _state_dict(vae).items():
        for new, old in old_names.items():
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
        legacy[name] = tensor
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    converted = convert_state_dict(legacy, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)


def test_fp16_weights_file_is_read_as_float32(tiny, tmp_path):
    vae, folder, params = tiny.vae, tiny.folder, tiny.params
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file({k: v.astype(np.float16) for k, v in _state_dict(vae).items()},
              str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    _, half, _ = load_vae(tmp_path)
    kernel = half["decoder"]["conv_out"]["kernel"]
    assert kernel.dtype == jnp.float32
    np.testing.assert_allclose(kernel, params["decoder"]["conv_out"]["kernel"], rtol=1e-3)


def test_unused_missing_and_misshapen_tensors_are_named(tiny):
    vae, model = tiny.vae, tiny.model
    state = _state_dict(vae)
    with pytest.raises(ValueError, match=r"does not use \(1\): encoder\.extra\.weight"):
        convert_state_dict({**state, "encoder.extra.weight": np.zeros(3, np.float32)}, model)
    incomplete = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match=r"missing from the weights \(1\): decoder\.conv_out\.bias"):
        convert_state_dict(incomplete, model)
    misshapen = {**state, "quant_conv.bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): quant_conv\.bias \(5,\)"):
        convert_state_dict(misshapen, model)
    with pytest.raises(ValueError, match="missing from the weights"):
        convert_state_dict(state, AutoencoderKL(block_out_channels=(32, 64, 64), norm_num_groups=8))


def test_folder_errors_say_what_is_wrong(tiny, tmp_path):
    folder = tiny.folder
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_vae(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_vae(tmp_path)
    (tmp_path / "vae").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "vae" / "config.json")
    with pytest.raises(FileNotFoundError, match="holds a vae/ folder"):
        load_vae(tmp_path)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="never loads pickles"):
        load_vae(tmp_path / "vae")
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL",')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DConditionModel, not an AutoencoderKL"):
        load_vae(tmp_path)


@pytest.mark.parametrize("change, key", [
    (dict(act_fn="gelu"), "act_fn"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
    (dict(norm_type="spatial"), "norm_type"),
    (dict(norm_num_groups=24), "norm_num_groups"),
    (dict(_class_name="VQModel"), "_class_name"),
])
def test_unsupported_config_values_name_the_key(tiny, change, key):
    config = {**dict(tiny.vae.config), **change}
    with pytest.raises(ValueError, match=key):
        autoencoder_from_config(config)


@pytest.mark.slow
def test_stable_diffusion_vae_matches_diffusers(tmp_path):
    vae = _torch_vae(**SD_VAE)
    assert sum(p.numel() for p in vae.parameters()) == SD_VAE_PARAMETERS
    model, _ = _check_parity(vae, tmp_path, image_size=64, batch=1)
    assert model.downsampling_factor == 8
    assert _parameter_count(model) == SD_VAE_PARAMETERS
