"""Stable Diffusion UNets loaded from diffusers folders compute what diffusers computes.

Random-weight ``UNet2DConditionModel`` s of three tiny configurations, one per family (SD 1.x:
1x1-convolution projections, one head count; SD 2.x: linear projections, heads per level; SDXL:
no attention at the first level, transformer depth per level, "text_time" added conditioning),
are written by diffusers' ``save_pretrained`` and loaded with
:func:`diffusion_jax.pretrained.sd_unet.load_unet`. Every parameter is perturbed away from
diffusers' initialisation first, so that zero-initialised output layers hide nothing. Both run
the same float32 inputs; diffusers' integer timestep k is our time t = (k + 1) / 1000.
Worst absolute errors seen: 2.9e-6 (SD 1.x), 2.7e-6 (SD 2.x), 3.6e-6 (SDXL) on outputs of
magnitude ~2-3, i.e. float32 round-off through ~20 layers; the tolerance is 2e-5.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from diffusion_jax.pretrained import sd_unet  # noqa: E402

TOLERANCE = 2e-5
FAMILIES = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                attention_head_dim=4, norm_num_groups=8),
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=40, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=48, attention_head_dim=(2, 4, 4),
                 transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8),
}


def random_unet(config, seed=0):
    """A diffusers UNet2DConditionModel with every parameter perturbed from its initialisation."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(sample_size=16, **config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("unets")
    models = {}
    for name, config in FAMILIES.items():
        models[name] = random_unet(config)
        models[name].save_pretrained(root / name)
    return root, models


def _inputs(name, config, batch=2):
    rng = np.random.default_rng(1)
    inputs = dict(x=rng.standard_normal((batch, 16, 16, 4)).astype(np.float32),
                  k=np.array([10.0, 981.0], np.float32)[:batch],
                  context=rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(
                      np.float32))
    if name == "sdxl":
        inputs["pooled"] = rng.standard_normal((batch, 16)).astype(np.float32)
        inputs["time_ids"] = np.array([[512, 512, 0, 0, 512, 512],
                                       [1024, 768, 16, 8, 1024, 1024]], np.float32)[:batch]
    return inputs


def _diffusers_output(model, inputs):
    extra = {}
    if "pooled" in inputs:
        extra["added_cond_kwargs"] = dict(text_embeds=torch.from_numpy(inputs["pooled"]),
                                          time_ids=torch.from_numpy(inputs["time_ids"]))
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2),
                    torch.from_numpy(inputs["k"]), torch.from_numpy(inputs["context"]), **extra)
    return out.sample.permute(0, 2, 3, 1).numpy()


def _our_output(model, params, inputs):
    extra = {k: inputs[k] for k in ("pooled", "time_ids") if k in inputs}
    t = (inputs["k"] + 1.0) / 1000.0
    return np.asarray(model.apply({"params": params}, inputs["x"], t,
                                  context=inputs["context"], **extra))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_unet_matches_diffusers(saved, name):
    root, models = saved
    model, params, config = sd_unet.load_unet(root / name)
    inputs = _inputs(name, FAMILIES[name])
    theirs = _diffusers_output(models[name], inputs)
    ours = _our_output(model, params, inputs)
    error = float(np.abs(ours - theirs).max())
    print(f"{name}: max abs error {error:.2e} (outputs up to {np.abs(theirs).max():.2f})")
    assert error < TOLERANCE
    # The comparison can fail: a timestep off by one changes the output far beyond it.
    shifted = _our_output(model, params, {**inputs, "k": inputs["k"] + 1.0})
    assert np.abs(shifted - theirs).max() > 100 * TOLERANCE


def test_configuration_maps_onto_the_unet(saved):
    root, _ = saved
    sdxl = sd_unet.unet_from_config(sd_unet.read_config(root / "sdxl"))
    assert sdxl.attention_levels == (1, 2) and sdxl.transformer_depth == (1, 2, 3)
    assert sdxl.num_heads == (2, 4, 4) and sdxl.time_ids_dim == 8 and sdxl.pooled_dim == 16
    sd1 = sd_unet.unet_from_config(sd_unet.read_config(root / "sd1"))
    assert sd1.num_heads == (4, 4) and sd1.attention_levels == (0,) and sd1.norm_eps == 1e-5


def test_bfloat16_parameters_and_computation(saved):
    root, models = saved
    model, params, _ = sd_unet.load_unet(root / "sd1", dtype=jnp.bfloat16,
                                         param_dtype=jnp.bfloat16)
    kernel = params["conv_in"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    inputs = _inputs("sd1", FAMILIES["sd1"])
    theirs = _diffusers_output(models["sd1"], inputs)
    ours = _our_output(model, params, inputs)
    assert ours.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: close, not equal.
    assert 1e-4 < np.abs(ours - theirs).max() < 0.2 * np.abs(theirs).max()


def test_fp16_variant_and_sharded_weights_load(saved, tmp_path):
    root, _ = saved
    state = load_file(str(root / "sd1" / "diffusion_pytorch_model.safetensors"))
    _, reference, _ = sd_unet.load_unet(root / "sd1")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(root / "sd1" / "config.json", half / "config.json")
    save_file({k: v.astype(np.float16) for k, v in state.items()},
              str(half / "diffusion_pytorch_model.fp16.safetensors"))
    _, params, _ = sd_unet.load_unet(half)
    np.testing.assert_allclose(params["conv_in"]["kernel"], reference["conv_in"]["kernel"],
                               rtol=1e-3, atol=1e-4)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(root / "sd1" / "config.json", sharded / "config.json")
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / file))
        weight_map.update({k: file for k in part})
    (sharded / sd_unet.SHARDED_INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    _, params, _ = sd_unet.load_unet(sharded)
    np.testing.assert_array_equal(params["conv_out"]["kernel"], reference["conv_out"]["kernel"])


def test_bfloat16_weight_files_load(saved, tmp_path):
    """safetensors' numpy API has no bfloat16; such tensors are read from the file's bytes."""
    from safetensors.torch import save_file as save_torch_file

    root, models = saved
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    shutil.copy(root / "sd1" / "config.json", bf16 / "config.json")
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in models["sd1"].state_dict().items()}
    save_torch_file(state, str(bf16 / "diffusion_pytorch_model.safetensors"))
    _, params, _ = sd_unet.load_unet(bf16)
    expected = state["conv_in.weight"].float().permute(2, 3, 1, 0).numpy()
    np.testing.assert_array_equal(params["conv_in"]["kernel"], expected)
    assert params["conv_in"]["kernel"].dtype == np.float32


def test_bad_weights_are_named(saved, tmp_path):
    root, _ = saved
    state = load_file(str(root / "sd1" / "diffusion_pytorch_model.safetensors"))
    model = sd_unet.unet_from_config(sd_unet.read_config(root / "sd1"))
    with pytest.raises(ValueError, match=r"does not use \(1\): extra\.weight"):
        sd_unet.convert_state_dict({**state, "extra.weight": np.zeros(3, np.float32)}, model)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    with pytest.raises(ValueError, match=r"missing from the weights \(1\): " + name):
        sd_unet.convert_state_dict({k: v for k, v in state.items() if k != name}, model)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): conv_in\.bias \(5,\)"):
        sd_unet.convert_state_dict({**state, "conv_in.bias": np.zeros(5, np.float32)}, model)


def test_bad_folders_are_refused_with_the_reason(saved, tmp_path):
    root, _ = saved
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        sd_unet.load_unet(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        sd_unet.load_unet(tmp_path)
    shutil.copy(root / "sd1" / "config.json", tmp_path / "config.json")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never loads pickles.*save_pretrained"):
        sd_unet.load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match="describes a SD3Transformer2DModel"):
        sd_unet.load_unet(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sd_unet.load_unet(tmp_path)


@pytest.mark.parametrize("change, key", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "up_block_types"),
    (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"]), "down_block_types"),
    (dict(time_cond_proj_dim=256), "time_cond_proj_dim"),
    (dict(layers_per_block=[1, 2]), "layers_per_block"),
    (dict(something_new=1), "something_new"),
    (dict(addition_embed_type="text_time", addition_time_embed_dim=8,
          projection_class_embeddings_input_dim=40), "projection_class_embeddings_input_dim"),
])
def test_unsupported_configurations_name_the_key(saved, change, key):
    root, _ = saved
    config = {**sd_unet.read_config(root / "sd1"), **change}
    with pytest.raises(ValueError, match=key):
        sd_unet.unet_from_config(config)


@pytest.mark.slow
def test_stable_diffusion_1_5_unet_matches_diffusers(tmp_path):
    """SD 1.5's real UNet configuration (859,520,964 parameters), random weights, one forward.

    About 3.4 GB per copy: the torch model is saved, its output kept, then freed before our
    loader reads the folder, so that at most two copies are alive (24 GiB machines)."""
    import gc

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).eval()
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    with torch.no_grad():  # the zero-initialised output convolution would hide the decoder
        model.conv_out.weight.normal_(0.0, 0.02)
    model.save_pretrained(tmp_path / "unet")
    rng = np.random.default_rng(0)
    inputs = dict(x=rng.standard_normal((1, 32, 32, 4)).astype(np.float32),
                  k=np.array([500.0], np.float32),
                  context=rng.standard_normal((1, 77, 768)).astype(np.float32))
    theirs = _diffusers_output(model, inputs)
    del model
    gc.collect()
    unet, params, _ = sd_unet.load_unet(tmp_path / "unet")
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    assert count == 859_520_964
    ours = _our_output(unet, params, inputs)
    error = float(np.abs(ours - theirs).max())
    print(f"SD 1.5 UNet: max abs error {error:.2e} (outputs up to {np.abs(theirs).max():.2f})")
    assert error < 1e-4
