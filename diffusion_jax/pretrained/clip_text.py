"""Transformers CLIP text-encoder folders -> our CLIPTextTransformer and its parameters.

The ``text_encoder/`` (and SDXL's ``text_encoder_2/``) folder of a diffusers model holds a
transformers ``config.json`` and ``model.safetensors`` (or an fp16 variant, or shards listed in
``model.safetensors.index.json``). :func:`load_text_encoder` builds the module from the config
and streams the weights onto its parameter tree through :mod:`diffusion_jax.pretrained.weights`
(safetensors only: never a pickle) into a
:class:`diffusion_jax.models.clip_text.CLIPTextTransformer`.

The module's parameter paths are the state-dict names with ``/`` for ``.``, ``layers_0`` for
``layers.0`` and ``kernel``/``scale``/``embedding`` for ``weight``. The state dict's names carry
a ``text_model.`` prefix in CLIPTextModelWithProjection and in CLIPTextModel files written by
transformers 4 (the published Stable Diffusion folders); transformers 5 writes CLIPTextModel
without it. Both are read.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.clip_text import ACTIVATIONS, CLIPTextTransformer
from diffusion_jax.pretrained.weights import Source, WeightsFile, load_tree, read_json_object

__all__ = ["text_encoder_from_config", "load_text_encoder", "parameter_shapes", "CONFIG_NAME",
           "WEIGHTS_NAMES", "SHARDED_INDEX_NAME", "ARCHITECTURES"]

CONFIG_NAME = "config.json"
# Looked for in this order; the first present is read.
WEIGHTS_NAMES = ("model.safetensors", "model.fp16.safetensors")
SHARDED_INDEX_NAME = "model.safetensors.index.json"
# architectures entry -> whether the model has text_projection.
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}

# config.json key -> (CLIPTextTransformer field, transformers' CLIPTextConfig default).
_FIELDS = {"vocab_size": ("vocab_size", 49408), "hidden_size": ("hidden_size", 512),
           "intermediate_size": ("intermediate_size", 2048),
           "num_hidden_layers": ("num_layers", 12), "num_attention_heads": ("num_heads", 8),
           "max_position_embeddings": ("max_positions", 77),
           "hidden_act": ("hidden_act", "quick_gelu"), "layer_norm_eps": ("layer_norm_eps", 1e-5),
           "eos_token_id": ("eos_token_id", 49407)}
_PROJECTION_DEFAULT = 512
# Keys that do not change the network's function at inference: bookkeeping (projection_dim is
# read for CLIPTextModelWithProjection only; CLIPTextModel has no projection), dropout (off at
# inference), initialisation, token ids other than the end-of-text id the pooling reads, and
# the generic settings every transformers config carried (generation, output flags, labels).
_IGNORED = frozenset({
    "architectures", "model_type", "projection_dim", "transformers_version", "dtype",
    "torch_dtype", "attention_dropout", "dropout", "hidden_dropout", "initializer_range",
    "initializer_factor", "bos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "output_attentions", "output_hidden_states", "output_scores", "return_dict",
    "return_dict_in_generate", "use_return_dict", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "tie_word_embeddings", "chunk_size_feed_forward", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "use_cache",
})
_POSITION_IDS = "embeddings.position_ids"  # a buffer some files hold: arange(max_positions)
_PREFIX = "text_model."


def _config_value(config: Mapping[str, Any], key: str, where: str):
    field, default = _FIELDS[key]
    value = config.get(key, default)
    if field == "hidden_act":
        if value not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act={value!r} is not supported; diffusion_jax's "
                             f"CLIP text encoder implements {sorted(ACTIVATIONS)}")
        return value
    if field == "layer_norm_eps":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where}: layer_norm_eps={value!r} must be a positive number")
        return float(value)
    lowest = 0 if field == "eos_token_id" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{where}: {key}={value!r} must be an integer >= {lowest}")
    return value


def text_encoder_from_config(config: Mapping[str, Any], dtype=jnp.float32, *,
                             where: str = "config.json",
                             attention: str = "xla") -> CLIPTextTransformer:
    """The :class:`CLIPTextTransformer` a transformers CLIP text ``config.json`` describes.

    ``architectures`` must be ["CLIPTextModel"] or ["CLIPTextModelWithProjection"] (the latter
    adds ``text_projection`` of ``projection_dim``); missing keys take CLIPTextConfig's defaults.
    A value this module does not implement, another architecture or model type, or a key that
    might change the network and is not known raises a ValueError naming the key and ``where``
    (the file, in messages). Keys keeping only bookkeeping, dropout or initialisation are
    ignored."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where} holds a JSON {type(config).__name__}, not an object")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if (not isinstance(architectures, list) or len(architectures) != 1
            or architectures[0] not in ARCHITECTURES):
        raise ValueError(f"{where}: architectures={architectures!r} is not supported; expected "
                         f"one of {[[name] for name in ARCHITECTURES]} (the text_encoder/ or "
                         "text_encoder_2/ folder of a Stable Diffusion model)")
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(f"{where}: model_type={model_type!r} is not 'clip_text_model'; pass "
                         "the folder of a CLIP text encoder (a full CLIPModel's config nests "
                         "it under text_config)")
    unknown = sorted(k for k in config
                     if not k.startswith("_") and k not in _FIELDS and k not in _IGNORED)
    if unknown:
        raise ValueError(f"{where}: config keys {unknown} are not supported by diffusion_jax's "
                         "CLIP text encoder (they may change the network)")
    if config.get("pruned_heads"):
        raise ValueError(f"{where}: pruned_heads={config['pruned_heads']!r}: pruned attention "
                         "heads are not supported")
    fields = {field: _config_value(config, key, where) for key, (field, _) in _FIELDS.items()}
    if fields["hidden_size"] % fields["num_heads"]:
        raise ValueError(f"{where}: hidden_size={fields['hidden_size']} is not divisible by "
                         f"num_attention_heads={fields['num_heads']}")
    projection_dim = None
    if ARCHITECTURES[architectures[0]]:
        projection_dim = config.get("projection_dim", _PROJECTION_DEFAULT)
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) \
                or projection_dim < 1:
            raise ValueError(f"{where}: projection_dim={projection_dim!r} must be a positive "
                             "integer")
    return CLIPTextTransformer(**fields, projection_dim=projection_dim, dtype=dtype,
                               attention=attention)


def parameter_shapes(module: CLIPTextTransformer) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's flattened path -> shape, from ``jax.eval_shape`` (nothing allocated)."""
    example = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example)["params"]
    return {path: tuple(leaf.shape)
            for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


def _state_dict_name(path: tuple[str, ...], prefix: str) -> str:
    """The transformers state-dict name of a parameter path of the module."""
    *modules, leaf = path
    names = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
    name = ".".join(names + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])
    return name if name.startswith("text_projection.") else prefix + name


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        hints = [os.path.join(folder, sub) for sub in ("text_encoder", "text_encoder_2")
                 if os.path.isfile(os.path.join(folder, sub, CONFIG_NAME))]
        hint = (f" It holds {' and '.join(hints)}: pass one of them." if hints else
                " Pass the text_encoder/ (or text_encoder_2/) folder of a diffusers model, as "
                "transformers' save_pretrained writes it.")
        raise FileNotFoundError(f"{path} does not exist.{hint}")
    return read_json_object(path)


def _check_position_ids(weights: WeightsFile, name: str, max_positions: int) -> None:
    """Accepts the position-ids buffer of older files only if it is arange(max_positions)."""
    ids = np.asarray(weights.read(name))
    expected = np.arange(max_positions)
    if ids.reshape(-1).shape != expected.shape or not np.array_equal(ids.reshape(-1), expected):
        raise ValueError(f"tensor {name} in {weights.description} (shape {ids.shape}) is not "
                         f"arange({max_positions}); this encoder reads positions in order and "
                         "cannot use other position ids")


def _describe(module: CLIPTextTransformer, folder: str) -> str:
    kind = ("CLIPTextModelWithProjection" if module.projection_dim is not None else
            "CLIPTextModel")
    projection = (f", projection_dim={module.projection_dim}"
                  if module.projection_dim is not None else "")
    return (f"the {kind} of {folder} (vocab_size={module.vocab_size}, "
            f"hidden_size={module.hidden_size}, num_hidden_layers={module.num_layers}, "
            f"intermediate_size={module.intermediate_size}, "
            f"max_position_embeddings={module.max_positions}{projection})")


def load_text_encoder(folder, dtype=jnp.float32, param_dtype=jnp.float32, sharding_for=None,
                      attention: str = "xla"):
    """Loads a transformers CLIP text-encoder folder: ``(module, params, config)``.

    ``dtype`` is the module's computation dtype and ``param_dtype`` the parameters' (float32;
    bfloat16 halves their memory). ``sharding_for(path, shape)`` places each parameter (see
    :func:`diffusion_jax.pretrained.weights.load_tree`); None puts it on the default device.
    ``config`` is the raw ``config.json``. Every tensor of the file must fill a parameter of the
    shape the config implies, and every parameter must be found: otherwise nothing is read and a
    ValueError lists the tensors that do not fit. A missing folder, config or weights file (or
    only pickled ``.bin`` weights, which are never loaded) raise FileNotFoundError."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory; pass the text_encoder/ folder of "
                                "a diffusers model (config.json + model.safetensors)")
    config = _read_config(folder)
    module = text_encoder_from_config(config, dtype=dtype,
                                      where=os.path.join(folder, CONFIG_NAME),
                                      attention=attention)
    weights = WeightsFile.in_folder(folder, WEIGHTS_NAMES, SHARDED_INDEX_NAME,
                                    what="the CLIP text encoder")
    params = convert(weights, module, what=_describe(module, folder), dtype=param_dtype,
                     sharding_for=sharding_for)
    return module, params, config


def read_config(folder) -> dict:
    """The ``config.json`` of a text-encoder folder, with errors that say what to pass."""
    return _read_config(os.fspath(folder))


def convert(weights, module: CLIPTextTransformer, *, what: str, dtype=jnp.float32,
            sharding_for=None):
    """Place the tensors of ``weights`` (a WeightsFile or DictWeights) on ``module``'s tree.

    Reads both the ``text_model.``-prefixed names of transformers 4 and the unprefixed ones of
    transformers 5; see :func:`diffusion_jax.pretrained.weights.load_tree` for the rest."""
    names = weights.names()
    prefix = _PREFIX if any(n.startswith(_PREFIX) for n in names) else ""
    if prefix + _POSITION_IDS in names:
        _check_position_ids(weights, prefix + _POSITION_IDS, module.max_positions)
    return load_tree(weights, parameter_shapes(module),
                     lambda path: Source((_state_dict_name(path, prefix),)),
                     what=what, dtype=dtype, sharding_for=sharding_for,
                     ignore=lambda name: name == prefix + _POSITION_IDS)
