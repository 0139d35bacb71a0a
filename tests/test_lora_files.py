"""LoRA files: ours and diffusers' read and write the same adapters, to the same outputs.

Tiny random SD 1.x (1x1-convolution projections) and SDXL (two text encoders) folders from
``sd_folders.build``. A LoRA is made with PEFT on copies of diffusers' UNet and text encoders
(random nonzero factors; rank 4 with alpha 8, to_k at rank 2 and proj_out at alpha 2 through
PEFT's rank / alpha patterns; attention, projections, resnet convolutions and time projections,
down / upsamplers and the time embedding; the second encoder rank 2, alpha 3) and written by
``save_lora_weights`` with its adapter metadata. Our UNet and encoders with it merged at
strengths 0.5 and 1 must match diffusers' with the file loaded (``load_lora_weights`` +
``set_adapters``) on the same float32 inputs to 2e-3; the other way, an adapter made here and
written by :func:`save_lora` must match in diffusers; a kohya-named copy (SDXL's UNet in the
original SGM names) must load to the same factors, here and in diffusers; two LoRAs at their own
strengths must match. Worst errors seen: 2.1e-6 (SD 1.x) and 2.6e-6 (SDXL), on outputs of
magnitude ~2 that the LoRAs change by 1 to 4.

transformers 5.25 refuses PEFT 0.21 in ``PreTrainedModel.load_adapter`` (it wants 0.22), which
diffusers calls to put a LoRA on a text encoder; the tests give each diffusers text encoder a
``load_adapter`` doing what that method does with PEFT's own ``inject_adapter_in_model`` and
``set_peft_model_state_dict``, so that everything else (the file's parsing, key conversion, rank
and alpha, ``set_adapters``) is diffusers' own.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import sd_folders  # noqa: E402
from diffusion_jax import lora  # noqa: E402
from diffusion_jax.pretrained import lora_files, stable_diffusion  # noqa: E402

# diffusers keeps several adapters on one network, which PEFT warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
TOLERANCE = 2e-3
UNET_LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                     "proj_in", "proj_out", "conv1", "conv",
                                                     "time_emb_proj", "linear_1",
                                                     "conv_shortcut"],
                 rank_pattern={"to_k": 2}, alpha_pattern={"proj_out": 2})
TEXT_LORA = {"text_encoder": dict(r=4, lora_alpha=8, target_modules=[
                 "q_proj", "k_proj", "v_proj", "out_proj", "fc1"]),
             "text_encoder_2": dict(r=2, lora_alpha=3, target_modules=[
                 "q_proj", "v_proj", "out_proj", "fc2"])}
WORST = {}  # family -> worst error seen, printed at the end of each test


@dataclasses.dataclass
class Setup:
    family: str
    root: object
    pipe: object
    models: object
    forward: object
    theirs: object
    base: list
    peft_file: str
    loaded: set


def _peft_load_adapter(model):
    """What transformers' ``load_adapter`` does with a state dict and config (see the doc)."""
    def load_adapter(adapter_name=None, adapter_state_dict=None, peft_config=None, **kwargs):
        peft.inject_adapter_in_model(peft_config, model, adapter_name)
        result = peft.set_peft_model_state_dict(model, adapter_state_dict, adapter_name)
        assert not [k for k in result.unexpected_keys if "lora" in k], result.unexpected_keys
    return load_adapter


def _encoders(pipe):
    return [name for name in lora_files.TEXT_ENCODERS if getattr(pipe, name, None) is not None]


def _inputs(family):
    rng = np.random.default_rng(1)
    context = 80 if family == "sdxl" else 32
    inputs = dict(x=rng.standard_normal((2, 16, 16, 4)).astype(np.float32),
                  k=np.array([10.0, 981.0], np.float32),
                  context=rng.standard_normal((2, 7, context)).astype(np.float32),
                  ids=np.array([[512, 40, 71, 9, 513, 513], [512, 300, 513, 513, 513, 513]],
                               np.int32))
    if family == "sdxl":
        inputs["pooled"] = rng.standard_normal((2, 24)).astype(np.float32)
        inputs["time_ids"] = np.array([[32, 32, 0, 0, 32, 32], [48, 32, 4, 0, 48, 32]],
                                      np.float32)
    return inputs


def _our_forward(models, inputs):
    extra = {k: inputs[k] for k in ("pooled", "time_ids") if k in inputs}
    t = (inputs["k"] + 1.0) / 1000.0

    @jax.jit
    def forward(unet_params, encoder_params):
        outputs = [models.unet.apply({"params": unet_params}, inputs["x"], t,
                                     context=inputs["context"], **extra)]
        for module, params in zip(models.text_encoders, encoder_params):
            out = module.apply({"params": params}, inputs["ids"])
            outputs += [out.last_hidden_state] + (
                [out.text_embeds] if out.text_embeds is not None else [])
        return outputs

    return lambda m: [np.asarray(o) for o in forward(m.unet_params, m.text_encoder_params)]


def _their_forward(pipe, inputs):
    def forward():
        extra = {}
        if "pooled" in inputs:
            extra["added_cond_kwargs"] = dict(text_embeds=torch.from_numpy(inputs["pooled"]),
                                              time_ids=torch.from_numpy(inputs["time_ids"]))
        ids = torch.from_numpy(inputs["ids"]).long()
        with torch.no_grad():
            outputs = [pipe.unet(torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2),
                                 torch.from_numpy(inputs["k"]),
                                 torch.from_numpy(inputs["context"]), **extra)
                       .sample.permute(0, 2, 3, 1).numpy()]
            for name in _encoders(pipe):
                out = getattr(pipe, name)(ids)
                outputs.append(out.last_hidden_state.numpy())
                if getattr(out, "text_embeds", None) is not None:
                    outputs.append(out.text_embeds.numpy())
        return outputs
    return forward


def _write_peft_lora(pipe, folder):
    """A LoRA made by PEFT on copies of the pipeline's networks, saved by diffusers."""
    torch.manual_seed(1)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(peft.LoraConfig(**UNET_LORA, init_lora_weights=False))
    layers = dict(unet_lora_layers=get_peft_model_state_dict(unet),
                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    for name in _encoders(pipe):
        encoder = copy.deepcopy(getattr(pipe, name))
        config = peft.LoraConfig(**TEXT_LORA[name], init_lora_weights=False)
        peft.inject_adapter_in_model(config, encoder)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
        layers[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(str(folder), **layers)
    return str(folder / lora_files.WEIGHT_NAME)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's threads contend with XLA's for the two cores: one is many times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_SETUPS = {}


def _setup(family, tmp_path_factory) -> Setup:
    if family not in _SETUPS:
        root = tmp_path_factory.mktemp(f"lora_{family}")
        pipe = sd_folders.build(root / "model", family, "ddim")
        for name in _encoders(pipe):
            getattr(pipe, name).load_adapter = _peft_load_adapter(getattr(pipe, name))
        models = stable_diffusion.load_stable_diffusion(
            root / "model", components=("unet", "text_encoder", "text_encoder_2"))
        inputs = _inputs(family)
        theirs = _their_forward(pipe, inputs)
        _SETUPS[family] = Setup(family, root, pipe, models, _our_forward(models, inputs), theirs,
                                theirs(), _write_peft_lora(pipe, root / "peft"), set())
    return _SETUPS[family]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory)


def _activate(setup, names, weights):
    for name, file in names.items():
        if name not in setup.loaded:
            setup.pipe.load_lora_weights(file, adapter_name=name)
            setup.loaded.add(name)
    setup.pipe.set_adapters(list(names), adapter_weights=list(weights))


def _compare(setup, names, loras, scales):
    """Max abs error of ours against diffusers', and how much the LoRAs changed diffusers'."""
    _activate(setup, names, scales)
    theirs = setup.theirs()
    ours = setup.forward(lora_files.merge_into(setup.models, loras, list(scales)))
    error = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    effect = max(float(np.abs(a - b).max()) for a, b in zip(theirs, setup.base))
    WORST[setup.family] = max(WORST.get(setup.family, 0.0), error)
    print(f"{setup.family} {list(names)} at {list(scales)}: max abs error {error:.1e}, "
          f"LoRA effect {effect:.2f} (worst so far {WORST[setup.family]:.1e})")
    return error, effect


def test_peft_file_matches_diffusers(setup):
    loaded = lora_files.load_lora(setup.peft_file, setup.models)
    assert loaded.unet is not None and len(loaded.text_encoders) == len(_encoders(setup.pipe))
    # to_q, to_k (rank 2 by the pattern), to_v stacked on our fused kernel: rank 4 + 2 + 4.
    qkv = [p for p in loaded.unet.paths if p.endswith("self_attention/qkv/kernel")]
    assert qkv and {loaded.unet.ranks[p] for p in qkv} == {10}
    assert {loaded.unet.scales[p] for p in qkv} == {2.0}
    for scale in (0.5, 1.0):
        error, effect = _compare(setup, {"peft": setup.peft_file}, loaded, [scale])
        assert error <= TOLERANCE and effect > 100 * TOLERANCE


def _random_lora(models, seed=0) -> lora_files.StableDiffusionLora:
    """Adapters made here on the UNet (transformers, every convolution, the time projections)
    and the text encoders (attention, MLPs, SDXL's text projection), with random ``up``."""
    key, rng = jax.random.key(seed), np.random.default_rng(seed)

    def randomized(adapter):
        return lora.Adapter({path: dict(factors, up=0.2 * rng.standard_normal(
            factors["up"].shape, np.float32)) for path, factors in adapter.weights.items()},
            adapter.alphas)

    unet = lora.init(models.unet_params, ["unet_transformer", "all_conv", r"_res_\d+/emb/kernel$"],
                     rank=3, alpha=5, key=key)
    encoders = [randomized(lora.init(params, ["clip_transformer", r"^text_projection/kernel$"],
                                     rank=2, alpha=None, key=jax.random.fold_in(key, i + 1)))
                for i, params in enumerate(models.text_encoder_params)]
    return lora_files.StableDiffusionLora(randomized(unet), encoders)


def test_saved_adapter_loads_in_diffusers(setup, tmp_path):
    ours = _random_lora(setup.models)
    file = lora_files.save_lora(tmp_path, ours, setup.models)
    assert file == str(tmp_path / lora_files.WEIGHT_NAME)
    assert [p.name for p in tmp_path.iterdir()] == [lora_files.WEIGHT_NAME]  # no temporary left
    with safe_open(file, framework="numpy") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 3 and metadata["unet.lora_alpha"] == 5
    for scale in (0.5, 1.0):
        error, effect = _compare(setup, {"ours": file}, ours, [scale])
        assert error <= TOLERANCE and effect > 100 * TOLERANCE
    # Read back here: the same merged weights (fused kernels were split per module, then stacked).
    again = lora_files.load_lora(file, setup.models)
    for name in ("unet_params", "text_encoder_params"):
        merged = [getattr(lora_files.merge_into(setup.models, x), name) for x in (ours, again)]
        worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(*map(jax.tree_util.tree_leaves, merged)))
        assert worst < 1e-6, (name, worst)


def test_two_adapters_with_their_own_scales(setup):
    ours_file = lora_files.save_lora(setup.root / "two" / "ours.safetensors",
                                     _random_lora(setup.models, seed=1), setup.models)
    loras = [lora_files.load_lora(f, setup.models) for f in (setup.peft_file, ours_file)]
    error, effect = _compare(setup, {"peft": setup.peft_file, "ours_two": ours_file}, loras,
                             [0.7, -0.4])
    assert error <= TOLERANCE and effect > 100 * TOLERANCE


def _kohya_copy(setup, folder):
    """The PEFT file with kohya's names and per-module alpha tensors (SDXL's UNet in SGM names)."""
    tensors, _ = lora_files.read_lora(setup.peft_file)
    prefixes = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_",
                "text_encoder": "lora_te1_" if setup.family == "sdxl" else "lora_te_"}
    kohya = {}
    for key, value in tensors.items():
        component, rest = key.split(".", 1)
        module, factor = rest.rsplit(".lora_", 1)
        config = UNET_LORA if component == "unet" else TEXT_LORA[component]
        alpha = config["lora_alpha"]
        if component == "unet":
            alpha = 2 if module.endswith("proj_out") else alpha
            if setup.family == "sdxl":
                module = lora_files._sgm_name(module, setup.models.unet)
        elif not module.startswith("text_model."):
            module = "text_model." + module
        name = prefixes[component] + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = np.array(alpha, np.float32)
    path = folder / "kohya.safetensors"
    save_file(kohya, str(path))
    return str(path), kohya


def test_kohya_file_loads_to_the_same_adapters(setup, tmp_path):
    path, tensors = _kohya_copy(setup, tmp_path)
    if setup.family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    kohya = lora_files.load_lora(path, setup.models)
    peft_lora = lora_files.load_lora(setup.peft_file, setup.models)
    for a, b in zip(kohya.components().values(), peft_lora.components().values()):
        assert a.alphas == b.alphas
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    # diffusers reads the kohya names (SDXL's through its SGM block mapping) the same way.
    error, _ = _compare(setup, {"kohya": path}, kohya, [1.0])
    assert error <= TOLERANCE


def test_loading_then_saving_gives_the_peft_factors_back(setup, tmp_path):
    """Fused kernels are split back into their modules at the file's own ranks."""
    loaded = lora_files.load_lora(setup.peft_file, setup.models)
    saved = lora_files.save_lora(tmp_path / "again.safetensors", loaded, setup.models)
    original, _ = lora_files.read_lora(setup.peft_file)
    again, _ = lora_files.read_lora(saved)
    strip = lambda key: key.replace(".text_model.", ".")  # noqa: E731
    assert sorted(map(strip, again)) == sorted(map(strip, original))
    by_name = {strip(k): v for k, v in original.items()}
    for key, value in again.items():
        if ".lora_A." in key:
            np.testing.assert_array_equal(value, by_name[strip(key)], err_msg=key)
        else:  # to_k's scale (alpha 8 / rank 2) was folded into its up factor at to_q's (8 / 4)
            ratio = value / by_name[strip(key)]
            np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6, err_msg=key)
    merged = [jax.tree_util.tree_leaves(lora_files.merge_into(
        setup.models, lora_files.load_lora(f, setup.models)).unet_params)
        for f in (setup.peft_file, saved)]
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(*merged)) < 1e-6


def _module_alpha(key):
    component, rest = key.split(".", 1)
    if component == "unet":
        return 2 if rest.split(".lora_")[0].endswith("proj_out") else UNET_LORA["lora_alpha"]
    return TEXT_LORA[component]["lora_alpha"]


def test_alpha_tensors_older_spellings_and_no_metadata(setup):
    tensors, metadata = lora_files.read_lora(setup.peft_file)
    table = lora_files.layout(setup.models)
    reference = lora_files.convert_lora(tensors, table, metadata)

    def same(loaded, expected=reference):
        for a, b in zip(loaded.components().values(), expected.components().values()):
            assert a.alphas == b.alphas
            jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)

    # Per-module alpha tensors instead of the metadata (older diffusers-named files).
    alphas = {k.split(".lora_")[0] + ".alpha": np.array(_module_alpha(k), np.float32)
              for k in tensors if ".lora_A." in k}
    same(lora_files.convert_lora({**tensors, **alphas}, table))

    # diffusers' older spellings of the factors, and its attention-processor names.
    def old(key):
        if key.startswith("unet.") and ".attn1.to_" in key and ".to_out" not in key:
            head, _, tail = key.partition(".attn1.to_")
            name, factor = tail.split(".lora_")
            return f"{head}.attn1.processor.to_{name}_lora.{'down' if factor[0] == 'A' else 'up'}" \
                ".weight"
        if key.startswith("unet."):
            return key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        return key.replace(".lora_A.", ".lora_linear_layer.down.").replace(
            ".lora_B.", ".lora_linear_layer.up.")
    renamed = {old(k): v for k, v in tensors.items()}
    assert any(".processor.to_q_lora.down." in k for k in renamed)
    same(lora_files.convert_lora({**renamed, **alphas}, table))

    # A UNet-only file without the "unet." prefix (UNet2DConditionModel.save_lora_adapter).
    bare = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    bare_meta = {k[len("unet."):]: v for k, v in metadata.items() if k.startswith("unet.")}
    loaded = lora_files.convert_lora(bare, table, bare_meta)
    assert loaded.text_encoders == [None] * len(reference.text_encoders)
    same(lora_files.StableDiffusionLora(loaded.unet, []),
         lora_files.StableDiffusionLora(reference.unet, []))

    # Without metadata or alpha tensors, alpha is the rank (scale 1), as diffusers reads it;
    # with use_rslora the scale is alpha / sqrt(rank).
    plain = lora_files.convert_lora(tensors, table)
    assert {s for a in plain.components().values() for s in a.scales.values()} == {1.0}
    rslora = lora_files.convert_lora(tensors, table, {**metadata, "unet.use_rslora": True})
    proj_in = next(p for p in rslora.unet.paths if p.endswith("proj_in/kernel"))
    assert rslora.unet.scales[proj_in] == 8 / math.sqrt(4) and \
        reference.unet.scales[proj_in] == 8 / 4
    with pytest.raises(ValueError, match="the metadata gives rank 5, the tensors rank 4"):
        lora_files.convert_lora(tensors, table, {**metadata, "unet.r": 5})
    with pytest.raises(ValueError, match="DoRA / LoRA biases are not supported"):
        lora_files.convert_lora(tensors, table, {**metadata, "unet.use_dora": True})


def test_bfloat16_and_float16_files(setup, tmp_path):
    from safetensors.torch import save_file as save_torch

    tensors, metadata = lora_files.read_lora(setup.peft_file)
    reference = lora_files.load_lora(setup.peft_file, setup.models)
    header = {"lora_adapter_metadata": json.dumps(metadata)}
    for dtype in (torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.safetensors"
        save_torch({k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()}, str(path),
                   metadata=header)
        loaded = lora_files.load_lora(path, setup.models)
        for a, b in zip(jax.tree_util.tree_leaves(loaded.unet),
                        jax.tree_util.tree_leaves(reference.unet)):
            assert a.dtype == jnp.float32
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_keys_it_cannot_use_are_named(setup):
    tensors, metadata = lora_files.read_lora(setup.peft_file)
    table = lora_files.layout(setup.models)
    convert = lambda t: lora_files.convert_lora(t, table, metadata)  # noqa: E731
    a_key = next(k for k in tensors if k.startswith("unet.") and "attn2.to_k.lora_A" in k)
    cases = [
        ({"unet.down_blocks.0.foo.weight": np.zeros(3, np.float32)},
         r"unet\.down_blocks\.0\.foo\.weight \(not a LoRA factor"),
        ({"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": np.zeros((4, 8), np.float32)},
         r"no layer down_blocks\.7\.attentions\.0\.proj_in in this model's unet"),
        ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.zeros(3, np.float32)},
         r"lora_unet_down_blocks_0_resnets_0_conv1\.hada_w1_a \(unknown kind"),
        ({"lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
          np.zeros((4, 32), np.float32)}, r"lora_te3_text_model_encoder_layers_0_mlp_fc1"),
        ({a_key: np.zeros((2, 40), np.float32)},
         r"attn2\.to_k\.lora_A\.weight: lora_A \(2, 40\) and lora_B \(\d+, 2\) do not fit unet "
         r"layer .*attn2\.to_k \(our .*cross_attention/key_value/kernel, kernel \(\d+, \d+\)\); "
         r"expected lora_A \(2, \d+\)"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            convert({**tensors, **change})
    lone = {k: v for k, v in tensors.items() if k != a_key.replace("lora_A", "lora_B")}
    with pytest.raises(ValueError, match=r"needs both its down \(lora_A\) and up \(lora_B\)"):
        convert(lone)
    without_encoders = dataclasses.replace(setup.models, text_encoders=[],
                                           text_encoder_params=[])
    with pytest.raises(ValueError, match=r"this model has no text_encoder loaded"):
        lora_files.load_lora(setup.peft_file, without_encoders)
    with pytest.raises(FileNotFoundError, match="holds no pytorch_lora_weights"):
        lora_files.load_lora(setup.root, setup.models)


def test_lora_of_another_base_is_refused(tmp_path_factory):
    sd1, sdxl = (_setup(f, tmp_path_factory) for f in ("sd1", "sdxl"))
    with pytest.raises(ValueError) as info:
        lora_files.load_lora(sd1.peft_file, sdxl.models)
    message = str(info.value)
    print(message[:2000])
    assert "is it a LoRA of another base model?" in message
    assert re.search(r"layers whose tensors do not fit \(\d+\):", message)
    assert re.search(r"keys it cannot use \(\d+\):", message)
    # The middle block exists in both; its cross-attention reads 32-wide text there, 80 here.
    assert re.search(r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.lora_A"
                     r"\.weight: lora_A \(2, 32\) and lora_B \(64, 2\) do not fit unet layer "
                     r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k \(our "
                     r"mid_attn/block_0/cross_attention/key_value/kernel, kernel \(80, 128\)\)",
                     message)
    assert "no layer down_blocks.0.attentions.0.proj_in in this model's unet" in message
    # Our adapters refuse a model they were not made for too (shapes named).
    with pytest.raises(ValueError, match=r"does not fit these parameters"):
        lora_files.merge_into(sdxl.models, lora_files.StableDiffusionLora(
            lora_files.load_lora(sd1.peft_file, sd1.models).unet, []))

