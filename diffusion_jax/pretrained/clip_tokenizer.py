"""CLIP's byte-level BPE tokenizer, read from a diffusers ``tokenizer/`` folder.

Stable Diffusion's pipelines turn a prompt into exactly ``model_max_length`` (77) token ids:
``<|startoftext|>``, the prompt's BPE tokens (cut after 75), ``<|endoftext|>``, then the pad
token (``<|endoftext|>`` for SD 1.x and SDXL's first tokenizer, ``!`` for SD 2.x and SDXL's
second). :class:`CLIPTokenizer` produces those ids with the ``tokenizers`` library, from the
folder's ``tokenizer.json`` when it has one, else from ``vocab.json`` and ``merges.txt`` with the
settings of CLIP's tokenizer (Radford et al. 2021): NFC, runs of white space collapsed to one
space, lower case; split into contractions, letter runs, single digits and runs of other
symbols; bytes mapped to printable characters; BPE whose word-final tokens end in ``</w>``.

OpenAI's original tokenizer also repairs mojibake and unescapes HTML entities with ``ftfy``
before this; transformers' ``CLIPTokenizer`` (what diffusers' pipelines call) does not, and
neither does this one, so both give the same ids.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from diffusion_jax.pretrained.weights import read_json_object

__all__ = ["CLIPTokenizer", "CLIP_SPLIT_PATTERN", "DEFAULT_MAX_LENGTH"]

# Contractions, runs of letters, single digits, runs of anything else but white space; the
# special tokens first so that they stay whole.
CLIP_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                      r"[\p{N}]|[^\s\p{L}\p{N}]+")
DEFAULT_MAX_LENGTH = 77  # CLIP's context length: what model_max_length is when a folder omits it
# transformers writes model_max_length=int(1e30) to mean "not set".
_UNSET_MAX_LENGTH = 10**18
# key -> (token, matched after normalisation)
_DEFAULT_TOKENS = {"bos_token": ("<|startoftext|>", False), "eos_token": ("<|endoftext|>", False),
                   "pad_token": ("<|endoftext|>", False), "unk_token": ("<|endoftext|>", False)}
_END_OF_WORD = "</w>"


def _token_text(value: Any, key: str, path: str) -> tuple[str, bool]:
    """A special token as a config writes it: (text, whether it is matched after normalising).

    A plain string is matched in the raw text; an AddedToken object says so in "normalized"
    (the published SD 1.x folders set it, so "<|ENDOFTEXT|>" lower-cases into the end token)."""
    normalized = False
    if isinstance(value, dict):
        normalized = bool(value.get("normalized", False))
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: {key} must be a token string (or an object with a "
                         f"'content' string), got {value!r}")
    return value, normalized


def _settings(folder: str) -> tuple[dict, Optional[int]]:
    """Special tokens and model_max_length from tokenizer_config.json and special_tokens_map.json.

    special_tokens_map.json wins where both name a token, as in transformers."""
    tokens, max_length = dict(_DEFAULT_TOKENS), None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        settings = read_json_object(path)
        if not isinstance(settings, dict):
            raise ValueError(f"{path} holds a JSON {type(settings).__name__}, not an object")
        for key in _DEFAULT_TOKENS:
            if settings.get(key) is not None:
                tokens[key] = _token_text(settings[key], key, path)
        value = settings.get("model_max_length")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 2:
                raise ValueError(f"{path}: model_max_length={value!r} must be an integer >= 2 "
                                 "(room for the start and end tokens)")
            if value < _UNSET_MAX_LENGTH:
                max_length = int(value)
    return tokens, max_length


def _clip_bpe(folder: str, tokens: dict):
    """A ``tokenizers.Tokenizer`` with CLIP's settings over ``vocab.json`` and ``merges.txt``."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    model = models.BPE.from_file(os.path.join(folder, "vocab.json"),
                                 os.path.join(folder, "merges.txt"),
                                 unk_token=tokens["unk_token"][0], end_of_word_suffix=_END_OF_WORD,
                                 continuing_subword_prefix="", fuse_unk=False)
    absent = sorted({f"{key} {text!r}" for key, (text, _) in tokens.items()
                     if model.token_to_id(text) is None})
    if absent:
        # transformers would append them to the vocabulary, past the text encoder's embeddings.
        raise ValueError(f"the CLIP tokenizer in {folder}: {', '.join(absent)} not in the "
                         "vocabulary of vocab.json; the tokenizer files do not belong together")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # The special tokens are kept whole wherever a prompt spells them (as transformers does,
    # which makes SD 2.x's pad token "!" a token of its own, not a BPE piece).
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=normalized)
                                  for key in ("bos_token", "eos_token", "unk_token",
                                              "pad_token")
                                  for text, normalized in [tokens[key]]])
    return tokenizer


def _load_backend(folder: str, tokens: dict):
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        try:
            return Tokenizer.from_file(path)
        except Exception as err:  # the library raises its own error types
            raise ValueError(f"{path} is not a tokenizers file ({err}); restore it from the "
                             "model's repository, or delete it to use vocab.json and "
                             "merges.txt") from err
    missing = [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(
        os.path.join(folder, n))]
    if missing:
        hint = (f" It holds a tokenizer/ folder: pass {os.path.join(folder, 'tokenizer')!r}."
                if os.path.isdir(os.path.join(folder, "tokenizer")) else
                " Pass the tokenizer/ (or tokenizer_2/) folder of a diffusers model.")
        raise FileNotFoundError(f"{folder} has no tokenizer.json and no {' or '.join(missing)}: "
                                f"a CLIP tokenizer needs tokenizer.json, or vocab.json and "
                                f"merges.txt.{hint}")
    try:
        return _clip_bpe(folder, tokens)
    except ValueError:
        raise
    except Exception as err:  # the library raises its own error types
        raise ValueError(f"vocab.json and merges.txt in {folder} do not make a BPE model "
                         f"({err}); restore them from the model's repository") from err


class CLIPTokenizer:
    """Prompts -> CLIP token ids, as Stable Diffusion's pipelines compute them.

    Build it with :meth:`from_folder`. Calling it on a prompt or a list of prompts returns
    int32 ids [batch, model_max_length]: the ids of transformers'
    ``CLIPTokenizer(prompts, padding="max_length", max_length=model_max_length,
    truncation=True).input_ids``, which is start token, at most model_max_length - 2 prompt
    tokens, end token, pad tokens."""

    def __init__(self, backend, model_max_length: int, tokens: dict, description: str):
        self._backend = backend
        # Its own truncation or padding settings (a tokenizer.json may carry some) would cut or
        # pad before the start and end tokens are placed; those are applied in __call__.
        self._backend.no_truncation()
        self._backend.no_padding()
        self.model_max_length = int(model_max_length)
        self.description = description
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token_id = backend.token_to_id(tokens[key][0])
            if token_id is None:
                raise ValueError(f"{description}: {key} {tokens[key][0]!r} is not in the "
                                 "vocabulary; the tokenizer files do not belong together")
            ids[key] = token_id
        self.bos_token_id = ids["bos_token"]
        self.eos_token_id = ids["eos_token"]
        self.pad_token_id = ids["pad_token"]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder, model_max_length: Optional[int] = None) -> "CLIPTokenizer":
        """The tokenizer of a diffusers ``tokenizer/`` (or ``tokenizer_2/``) folder.

        Reads ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt``; special tokens
        and ``model_max_length`` come from ``tokenizer_config.json`` / ``special_tokens_map.json``
        (defaults: CLIP's tokens, 77). ``model_max_length`` overrides the folder's value."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is not a directory; pass the tokenizer/ folder of "
                                    "a diffusers model (vocab.json + merges.txt, or "
                                    "tokenizer.json)")
        tokens, length = _settings(folder)
        length = model_max_length or length or DEFAULT_MAX_LENGTH
        if length < 2:
            raise ValueError(f"model_max_length={length} leaves no room for the start and end "
                             "tokens")
        return cls(_load_backend(folder, tokens), length, tokens,
                   f"the CLIP tokenizer in {folder}")

    def encode(self, prompt: str) -> list[int]:
        """The BPE ids of one prompt, without start, end or pad tokens and not truncated."""
        return self._backend.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
        """Token ids [batch, model_max_length] int32 of a prompt or a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; got {', '.join(sorted(set(bad)))}")
        encodings = self._backend.encode_batch(prompts, add_special_tokens=False)
        ids = np.full((len(prompts), self.model_max_length), self.pad_token_id, np.int32)
        room = self.model_max_length - 2
        for row, encoding in zip(ids, encodings):
            tokens = encoding.ids[:room]
            row[0] = self.bos_token_id
            row[1:len(tokens) + 1] = tokens
            row[len(tokens) + 1] = self.eos_token_id
        return ids

    def token_inputs(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [n, model_max_length], mask bool)`` of ``texts``, the mask all True.

        The shape of :func:`diffusion_jax.text.encode`'s result, for the data pipeline and the
        training loop. Stable Diffusion's UNets attend to every position, padding included,
        so every position is marked as a real token."""
        if isinstance(texts, np.ndarray):
            texts = [str(t) for t in texts.reshape(-1)]
        ids = self(texts)
        return ids, np.ones(ids.shape, bool)

