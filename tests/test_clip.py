"""CLIP text encoders and the CLIP tokenizer against transformers, on folders it writes offline.

Encoders: tiny random CLIPTextModel / CLIPTextModelWithProjection models (hidden 32, 3 layers,
4 heads, vocabulary 1000) are written by transformers' ``save_pretrained`` (safetensors) and
loaded with :func:`diffusion_jax.pretrained.clip_text.load_text_encoder`; both compute in float32
on the same ids. Three configurations: SD 1.x-like (quick_gelu, an end token that is not the
largest id, so the pooling must look for it), SD 2.x-like (gelu, the legacy eos_token_id=2 whose
pooling takes the largest id) and SDXL's second encoder (gelu, with text_projection). The
outputs are O(1) (layer-normed); the worst absolute differences measured over the three were
1.9e-6 (last_hidden_state), 7.2e-7 (hidden_states[-2], the layer SDXL reads), 1.2e-6 (pooled)
and 9.2e-7 (text_embeds); the embeddings (hidden_states[0]) agree exactly. The tolerance is
1e-5: float32 round-off, far below any real difference (a missing transpose or a wrong
activation changes them by O(0.1)).

Tokenizer: there is no real CLIP vocabulary offline, so a small byte-level BPE is trained with
the ``tokenizers`` library on varied English text and written as CLIP's ``vocab.json`` (the 256
byte characters, the same with ``</w>``, the merges, ``<|startoftext|>``, ``<|endoftext|>``) and
``merges.txt``, with ``tokenizer_config.json`` / ``special_tokens_map.json`` as the SD 1.x
(AddedToken objects, pad ``<|endoftext|>``) and SD 2.x (pad ``!``) folders have them.
transformers' ``CLIPTokenizer`` (what diffusers' pipelines call; in transformers 5 it is the one
CLIP tokenizer, built on ``tokenizers``, with no ftfy step) loads each and re-saves it as
``tokenizer.json`` + ``tokenizer_config.json``; ours must give the ids it gives with
``padding="max_length", max_length=77, truncation=True`` on every prompt and folder, exactly.
Nothing remained to document as a difference.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from diffusion_jax.models.clip_text import CLIPTextTransformer  # noqa: E402
from diffusion_jax.pretrained.clip_text import (load_text_encoder,  # noqa: E402
                                                text_encoder_from_config)
from diffusion_jax.pretrained.clip_tokenizer import CLIPTokenizer  # noqa: E402

TOLERANCE = 1e-5
VOCAB, BOS, END = 1000, 998, 999
CONFIGS = {  # name -> (transformers class, CLIPTextConfig overrides)
    "sd1": ("CLIPTextModel", {"hidden_act": "quick_gelu", "eos_token_id": 500}),
    "sd2_legacy_eos": ("CLIPTextModel", {"hidden_act": "gelu", "eos_token_id": 2}),
    "sdxl_2": ("CLIPTextModelWithProjection", {"hidden_act": "gelu", "eos_token_id": END,
                                                "projection_dim": 24}),
}


def _save_encoder(folder, name):
    architecture, overrides = CONFIGS[name]
    torch.manual_seed(list(CONFIGS).index(name))
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=BOS, pad_token_id=1,
        **{"projection_dim": 16, **overrides})
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so their layout counts too
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """name -> (folder, transformers model), one per configuration."""
    made = {}
    for name in CONFIGS:
        folder = tmp_path_factory.mktemp(name)
        made[name] = (folder, _save_encoder(folder, name))
    return made


def _input_ids(end_token):
    """Three prompts of different lengths: start token, ids of both sides of the end token, end
    token, then padding with the end token (SD 1.x) or with another id (SD 2.x's "!")."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BOS, (3, 77))
    ids[ids == end_token] = 3
    ids[:, 0] = BOS
    for row, (length, pad) in enumerate([(5, end_token), (30, 0), (76, end_token)]):
        ids[row, length] = end_token
        ids[row, length + 1:] = pad
    return ids


def _reference(model, ids):
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
        if hasattr(out, "text_embeds"):
            pooled = model.text_model(torch.tensor(ids)).pooler_output
            return out, pooled.numpy(), out.text_embeds.numpy()
        return out, out.pooler_output.numpy(), None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_matches_transformers(encoders, name):
    folder, model = encoders[name]
    end = END if model.config.eos_token_id == 2 else model.config.eos_token_id
    ids = _input_ids(end)
    if end != END:  # ids above the end token: the legacy argmax rule would pool elsewhere
        assert (ids[:, 1:5] > end).any()
    module, params, config = load_text_encoder(folder)
    assert config["architectures"] == [CONFIGS[name][0]]
    assert module.hidden_act == CONFIGS[name][1]["hidden_act"]
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    reference, pooled, text_embeds = _reference(model, ids)
    assert len(out.hidden_states) == len(reference.hidden_states) == 4
    errors = {
        "last_hidden_state": np.abs(out.last_hidden_state - reference.last_hidden_state.numpy()),
        "hidden_states[-2]": np.abs(out.hidden_states[-2] - reference.hidden_states[-2].numpy()),
        "hidden_states[0]": np.abs(out.hidden_states[0] - reference.hidden_states[0].numpy()),
        "pooled": np.abs(out.pooled - pooled),
    }
    if text_embeds is not None:
        assert out.text_embeds.shape == (3, 24)
        errors["text_embeds"] = np.abs(out.text_embeds - text_embeds)
    else:
        assert out.text_embeds is None
    worst = {key: float(value.max()) for key, value in errors.items()}
    print(name, "worst absolute errors:", worst)
    assert max(worst.values()) < TOLERANCE, worst
    # The pooled state really is the end token's (not, say, the last position's).
    positions = [5, 30, 76]
    np.testing.assert_array_equal(out.pooled, out.last_hidden_state[np.arange(3), positions])


def test_parameter_tree_mirrors_the_state_dict_names(encoders):
    _, params, _ = load_text_encoder(encoders["sdxl_2"][0])
    assert params["embeddings"]["token_embedding"]["embedding"].shape == (VOCAB, 32)
    assert params["embeddings"]["position_embedding"]["embedding"].shape == (77, 32)
    assert params["encoder"]["layers_2"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    assert params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].shape == (32, 64)
    assert set(params["final_layer_norm"]) == {"scale", "bias"}
    assert set(params["text_projection"]) == {"kernel"}
    assert params["text_projection"]["kernel"].shape == (32, 24)


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _rewrite_weights(folder, change, file_name="model.safetensors"):
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    save_file(change(tensors), os.path.join(folder, file_name))


def test_transformers_4_files_with_prefix_and_position_ids_load_the_same(encoders, tmp_path):
    """The published SD folders name CLIPTextModel tensors text_model.* and keep position_ids."""
    folder, _ = encoders["sd1"]
    _, expected, _ = load_text_encoder(folder)
    old = _copy(folder, tmp_path)
    _rewrite_weights(old, lambda t: {
        **{f"text_model.{k}": v for k, v in t.items()},
        "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
    _, params, _ = load_text_encoder(old)
    jax.tree.map(np.testing.assert_array_equal, params, expected)

    _rewrite_weights(old, lambda t: {
        **t, "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None, ::-1]})
    with pytest.raises(ValueError, match=r"text_model\.embeddings\.position_ids.*arange\(77\)"):
        load_text_encoder(old)


def test_fp16_and_sharded_weights(encoders, tmp_path):
    folder, _ = encoders["sdxl_2"]
    _, expected, _ = load_text_encoder(folder)
    half = _copy(folder, tmp_path, "half")
    _rewrite_weights(half, lambda t: {k: v.astype(np.float16) for k, v in t.items()},
                     "model.fp16.safetensors")
    _, params, _ = load_text_encoder(half)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        a, np.asarray(b).astype(np.float16).astype(np.float32)), params, expected)

    sharded = _copy(folder, tmp_path, "sharded")
    tensors = load_file(os.path.join(sharded, "model.safetensors"))
    os.remove(os.path.join(sharded, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(sharded, shard))
        weight_map.update({n: shard for n in part})
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _, params, _ = load_text_encoder(sharded)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_bfloat16_computation_keeps_float32_parameters(encoders):
    folder, model = encoders["sd1"]
    ids = jnp.asarray(_input_ids(500), jnp.int32)
    module, params, _ = load_text_encoder(folder, dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(module.apply)({"params": params}, ids)
    assert out.last_hidden_state.dtype == out.pooled.dtype == jnp.bfloat16
    assert all(h.dtype == jnp.bfloat16 for h in out.hidden_states)
    reference, _, _ = _reference(model, np.asarray(ids))
    error = np.abs(np.asarray(out.last_hidden_state, np.float32)
                   - reference.last_hidden_state.numpy()).max()
    assert 0 < error < 0.1, error  # bfloat16's 8 mantissa bits over three layers

    _, half, _ = load_text_encoder(folder, param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_parameters_are_placed_by_sharding_for(encoders):
    folder, _ = encoders["sd1"]
    device = jax.devices()[0]
    asked = []

    def sharding_for(path, shape):
        asked.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    _, params, _ = load_text_encoder(folder, sharding_for=sharding_for)
    assert len(asked) == len(jax.tree.leaves(params))
    assert ("embeddings", "token_embedding", "embedding") in asked
    assert all(p.sharding == jax.sharding.SingleDeviceSharding(device)
               for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- refusals


def test_refuses_a_folder_with_only_pickled_weights(encoders, tmp_path):
    folder, model = encoders["sd1"]
    pickled = _copy(folder, tmp_path)
    os.remove(pickled / "model.safetensors")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*pickle"):
        load_text_encoder(pickled)


def test_refuses_wrong_shaped_and_unused_tensors_naming_them(encoders, tmp_path):
    folder, _ = encoders["sd1"]
    bad = _copy(folder, tmp_path)
    name = "encoder.layers.1.mlp.fc1.weight"
    _rewrite_weights(bad, lambda t: {**t, name: np.zeros((65, 32), np.float32),
                                     "encoder.layers.3.mlp.fc1.weight": t[name]})
    with pytest.raises(ValueError) as err:
        load_text_encoder(bad)
    message = str(err.value)
    assert "encoder.layers.1.mlp.fc1.weight (65, 32)" in message
    assert "does not use" in message and "encoder.layers.3.mlp.fc1.weight" in message
    assert str(bad) in message

    # A CLIPTextModel config beside CLIPTextModelWithProjection weights.
    mixed = _copy(encoders["sdxl_2"][0], tmp_path, "mixed")
    config = json.loads((mixed / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(ValueError, match=r"text_projection\.weight"):
        load_text_encoder(mixed)


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["BertModel"]}, r"architectures=\['BertModel'\]"),
    ({"model_type": "clip"}, "model_type='clip'"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"use_rotary_embeddings": True}, r"\['use_rotary_embeddings'\]"),
    ({"num_attention_heads": 5}, "num_attention_heads=5"),
    ({"num_hidden_layers": "3"}, "num_hidden_layers='3'"),
])
def test_refuses_configs_it_cannot_build(encoders, tmp_path, change, match):
    folder = _copy(encoders["sd1"][0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match) as err:
        load_text_encoder(folder)
    assert os.path.join(folder, "config.json") in str(err.value)


def test_config_keys_that_do_not_shape_the_network_are_ignored():
    config = {"architectures": ["CLIPTextModel"], "vocab_size": 99, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "projection_dim": 4, "dropout": 0.1, "torch_dtype": "float16",
              "_name_or_path": "x", "transformers_version": "4.22.0", "bos_token_id": 0,
              "pad_token_id": 1, "eos_token_id": 2, "initializer_factor": 1.0}
    module = text_encoder_from_config(config)
    assert isinstance(module, CLIPTextTransformer)
    assert (module.projection_dim, module.eos_token_id, module.max_positions) == (None, 2, 77)
    assert text_encoder_from_config({**config, "architectures": ["CLIPTextModelWithProjection"]}
                                    ).projection_dim == 4


def test_missing_and_malformed_files(encoders, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_text_encoder(tmp_path / "nowhere")
    pipeline = tmp_path / "pipeline"
    shutil.copytree(encoders["sd1"][0], pipeline / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist.*text_encoder"):
        load_text_encoder(pipeline)
    folder = pipeline / "text_encoder"
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no weights.*model\.safetensors"):
        load_text_encoder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_text_encoder(folder)


def test_too_many_tokens_are_refused():
    module = CLIPTextTransformer(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                                 num_heads=2, max_positions=4, eos_token_id=9)
    with pytest.raises(ValueError, match="5 tokens exceed the text encoder's 4 positions"):
        jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))


# ----------------------------------------------------------------------------- tokenizer

TRAINING_TEXT = """A photograph of an astronaut riding a horse on the moon, highly detailed, 4k.
The quick brown fox jumps over the lazy dog! Isn't it lovely? We'll see: they're here, I'm fine.
Café crème brûlée, naïve façade, smörgåsbord; 東京の夜景 and 北京; emoji 🐱🚀✨ rocket-powered cats.
Numbers 1234567890 and prices like $19.99 or 50% off; e-mail me@example.com #hashtag @handle.
Oil painting of a lighthouse at sunset by the sea, dramatic clouds, trending on artstation.
A watercolor portrait of a woman with red hair, soft lighting, bokeh, 35mm photograph.
""".splitlines() * 3

PROMPTS = [
    "a photo of a cat", "A PHOTO OF A Cat", "Hello, World!!", "!!!", "don't STOP!",
    "it's 3.14159 o'clock; we'll see, they've gone", "  extra   white\tspace\n\nhere  ", "",
    "Café naïve façade", "e\u0301 (combining) vs \u00e9", "東京の夜景 and 北京 🐱🚀✨ 👩‍👩‍👧",
    "ＦＵＬＬ　ｗｉｄｔｈ and nbsp\u00a0and zero\u200bwidth", "<|endoftext|> inside",
    "<|ENDOFTEXT|> shouted", "<|startoftext|>again", "$19.99, 50% off: me@example.com #tag",
    "an oil painting of a lighthouse, " * 20, "supercalifragilisticexpialidocious " * 30,
    "a " * 74, "a " * 75, "a " * 76,
]


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """name -> folder: raw SD 1.x / SD 2.x style folders, transformers' re-saves, bare files."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from diffusion_jax.pretrained.clip_tokenizer import CLIP_SPLIT_PATTERN

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=600, min_frequency=2, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for token in (alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
                  + ["<|startoftext|>", "<|endoftext|>"]):
        vocab.setdefault(token, len(vocab))
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name, pad in (("sd1", _added("<|endoftext|>")), ("sd2", "!"), ("bare", None)):
        folder = root / name
        folder.mkdir()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
        folders[name] = folder
        if pad is None:
            continue
        special = {"bos_token": _added("<|startoftext|>"), "eos_token": _added("<|endoftext|>"),
                   "unk_token": _added("<|endoftext|>"), "pad_token": pad}
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            **special, "pad_token": pad if isinstance(pad, str) else "<|endoftext|>",
            "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
            "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
        saved = root / f"{name}_saved"
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file()
        folders[f"{name}_saved"] = saved
        # transformers 5 writes its special tokens as plain strings: matched in the raw text.
        plain = root / f"{name}_plain"
        shutil.copytree(saved, plain)
        os.remove(plain / "tokenizer.json")
        for file in ("vocab.json", "merges.txt"):
            shutil.copy(folder / file, plain / file)
        folders[f"{name}_plain"] = plain
    return folders


@pytest.mark.parametrize("name", ["sd1", "sd1_saved", "sd1_plain", "sd2", "sd2_saved",
                                  "sd2_plain", "bare"])
def test_tokenizer_matches_transformers(tokenizer_folders, name):
    folder = tokenizer_folders[name]
    theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.model_max_length == 77
    expected = np.array(theirs(PROMPTS, padding="max_length", max_length=77,
                               truncation=True).input_ids)
    got = ours(PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    different = [f"{p!r}: ours {got[i].tolist()} transformers {expected[i].tolist()}"
                 for i, p in enumerate(PROMPTS) if not np.array_equal(got[i], expected[i])]
    assert not different, "\n".join(different)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.pad_token_id == (0 if name.startswith("sd2") else ours.eos_token_id)
    np.testing.assert_array_equal(ours(PROMPTS[0]), got[:1])
    # The prompts exercise truncation and the byte fallback.
    assert got[-1, -1] == ours.eos_token_id and got[-3, -2] == ours.eos_token_id


def test_tokenizer_refuses_missing_and_broken_files(tokenizer_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json.*tokenizer/ folder"):
        CLIPTokenizer.from_folder(tmp_path)
    folder = tmp_path / "tokenizer"
    shutil.copy(tokenizer_folders["bare"] / "vocab.json", folder / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        CLIPTokenizer.from_folder(folder)
    shutil.copy(tokenizer_folders["bare"] / "merges.txt", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    with pytest.raises(ValueError, match=r"pad_token .<\|pad\|>. not in the vocabulary"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1}))
    with pytest.raises(ValueError, match="model_max_length=1"):
        CLIPTokenizer.from_folder(folder)
    with pytest.raises(TypeError, match="prompts must be strings"):
        CLIPTokenizer.from_folder(tokenizer_folders["bare"])(["ok", None])
