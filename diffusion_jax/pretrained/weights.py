"""Streaming safetensors weights onto Flax parameter trees.

A component folder of a diffusers model (``unet/``, ``vae/``, ``text_encoder/``) holds one
safetensors file, an fp16 variant of it, or shards listed in an index. :class:`WeightsFile` opens
them lazily with ``safetensors.safe_open(framework="numpy")``: names and shapes come from the
headers, and each tensor is read only when asked for. :func:`load_tree` first plans the whole
conversion from the headers (every parameter has its tensors, every tensor is used, every shape
fits), so that a wrong folder fails before anything is read; then it reads, converts and places
one tensor at a time, so that host memory holds about one copy of the model (the parameters
already placed) plus the tensor in flight. Nothing is unpickled: a folder with only PyTorch
``.bin`` files is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Mapping, Optional, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["WeightsFile", "DictWeights", "Source", "torch_to_flax", "load_tree", "listed",
           "read_json_object"]

_MAX_LISTED = 40  # names listed per kind of problem in an error message
# safe_open memory-maps the file, and the pages a read touches stay in this process's resident
# memory while the map lives; the file is reopened after this many bytes, so that at most this
# much of it is resident beside the parameters (and RSS-based limits see about one model).
_REMAP_BYTES = 256 * 2**20


def listed(names) -> str:
    """Up to 40 names, comma-separated, with a count of the rest."""
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def read_json_object(path: str) -> dict:
    """The JSON object in the file ``path`` (a config, index or tokenizer file of a folder).

    Malformed JSON, or JSON that is not an object, is a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download it again from the "
                         "model's repository") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def read_bfloat16(path: str, name: str) -> np.ndarray:
    """One bfloat16 tensor of a safetensors file, from its bytes (``ml_dtypes.bfloat16``).

    safetensors' numpy API cannot return bfloat16 (numpy has no such type); the header gives the
    tensor's byte range, and ml_dtypes the type."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + length + start)
        data = np.frombuffer(f.read(end - start), ml_dtypes.bfloat16)
    return data.reshape(entry["shape"])


class WeightsFile:
    """All tensors of one component's safetensors file(s), read on demand.

    Build it with :meth:`in_folder`; ``names()``, ``shape(name)`` come from the headers and
    ``read(name)`` reads one tensor (float16, bfloat16 or float32 as stored)."""

    def __init__(self, paths: Sequence[str], description: str):
        self.description = description
        self._files = {}
        self._where = {}
        self._bytes_mapped = 0
        for path in paths:
            handle = self._open(path)
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name} is in both {self._where[name]} and {path}")
                self._where[name] = path

    @classmethod
    def in_folder(cls, folder, file_names: Sequence[str], index_name: str,
                  what: str) -> "WeightsFile":
        """The weights of ``folder``: the first of ``file_names`` present, else indexed shards.

        The shards are those ``index_name`` lists. ``what`` names the component in errors
        ("the UNet", ...)."""
        folder = os.fspath(folder)
        for name in file_names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return cls([path], path)
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index} is not a safetensors index (a JSON object with a "
                                 f"'weight_map'): {err}; download it again") from err
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: "
                                        f"{listed(missing)}; download them too")
            return cls([os.path.join(folder, s) for s in shards], index)
        pickled = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else ())
                         if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickled:
            raise FileNotFoundError(
                f"{folder} has only PyTorch pickle weights ({listed(pickled)}) for {what}. "
                "diffusion_jax never loads pickles, because unpickling can run arbitrary code. "
                "Convert the folder once with the library that wrote it, e.g. in Python: "
                "`from diffusers import DiffusionPipeline; "
                "DiffusionPipeline.from_pretrained(SRC).save_pretrained(DST)` "
                "(save_pretrained writes .safetensors), and pass DST.")
        raise FileNotFoundError(f"{folder} has no weights for {what}: expected "
                                f"{' or '.join(file_names)} (or the shards of {index_name})")

    def _open(self, path):
        from safetensors import safe_open  # optional at import time: only loading weights needs it

        if path not in self._files:
            try:
                self._files[path] = safe_open(path, framework="numpy")
            except Exception as err:  # the library raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file ({err}); download "
                                 "it again") from err
        return self._files[path]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """One tensor, copied out of the file (nothing keeps the file mapped)."""
        path = self._where[name]
        handle = self._open(path)
        if handle.get_slice(name).get_dtype() == "BF16":
            tensor = read_bfloat16(path, name)
        else:
            tensor = handle.get_tensor(name)
        self._bytes_mapped += tensor.nbytes
        if self._bytes_mapped > _REMAP_BYTES:
            self._files.clear()  # unmaps the files; they are reopened on the next read
            self._bytes_mapped = 0
        return tensor


class DictWeights:
    """An in-memory state dict (name -> array) with :class:`WeightsFile`'s interface."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], description: str = "the state dict"):
        self._tensors = state_dict
        self.description = description

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._tensors[name]))

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._tensors[name])


@dataclasses.dataclass(frozen=True)
class Source:
    """The state-dict tensors one parameter is made of, and how.

    ``combine(tensors) -> array`` in Flax layout; ``None`` means the single tensor put in Flax
    layout by :func:`torch_to_flax`."""

    names: tuple[str, ...]
    combine: Optional[Callable[[list], np.ndarray]] = None


def torch_to_flax(leaf: str, tensor, expected_shape) -> np.ndarray:
    """A PyTorch weight in Flax's layout for a parameter ``leaf`` of shape ``expected_shape``.

    Convolutions go from [out, in, kh, kw] to [kh, kw, in, out], linear layers from [out, in]
    to [in, out] (a 1x1 convolution's weight also serves a linear layer); anything else, such
    as biases, norms and embedding tables, is unchanged."""
    if leaf == "kernel" and len(expected_shape) == 4 and tensor.ndim == 4:
        return np.transpose(tensor, (2, 3, 1, 0))
    if leaf == "kernel" and len(expected_shape) == 2:
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if tensor.ndim == 2:
            return tensor.T
    return tensor


def _placeholder(shape, dtype=np.float32):
    """An array of ``shape`` that occupies no memory (a broadcast scalar), for planning."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def _converted(path, source: Source, tensors):
    if source.combine is not None:
        return source.combine(tensors)
    if len(tensors) != 1:
        raise ValueError(f"{'/'.join(path)}: {len(tensors)} tensors need a combine function")
    return tensors[0]


def load_tree(weights: WeightsFile, shapes: Mapping[tuple, tuple], source_for,
              *, what: str, dtype=jnp.float32, sharding_for=None,
              ignore: Callable[[str], bool] = lambda name: False) -> dict:
    """Fill a Flax parameter tree from ``weights``, one tensor at a time.

    Args:
      weights: the component's tensors.
      shapes: every parameter's flattened path -> shape (e.g. from ``jax.eval_shape`` of the
        module's ``init``).
      source_for: ``source_for(path) -> Source``: which tensors make that parameter.
      what: the model, as named in errors (include the settings that shape it).
      dtype: the parameters' dtype (float32; bfloat16 halves the memory).
      sharding_for: ``sharding_for(path, shape) -> Sharding`` places each parameter where it
        will live (replicated or fsdp over a mesh); None: the default device.
      ignore: state-dict names that may be present and unused (buffers such as position ids).

    Every parameter must find its tensors, every tensor must be used (or ignored) and every
    shape must fit: otherwise one ValueError lists all the problems, before any tensor is read.
    Returns the nested parameter dict.
    """
    available = set(weights.names())
    plan, missing, mismatched, used = {}, [], [], set()
    for path, shape in shapes.items():
        source = source_for(path)
        absent = [n for n in source.names if n not in available]
        if absent:
            missing.extend(absent)
            continue
        used.update(source.names)
        planned = [_placeholder(weights.shape(n)) for n in source.names]
        try:
            result_shape = tuple(np.shape(_converted(path, source, planned)))
            if source.combine is None:
                result_shape = tuple(torch_to_flax(path[-1], planned[0], shape).shape)
        except ValueError as err:
            result_shape = f"not combinable ({err})"
        if result_shape != tuple(shape):
            sizes = ", ".join(f"{n} {weights.shape(n)}" for n in source.names)
            mismatched.append(f"{sizes} -> {result_shape}, expected {tuple(shape)} in Flax "
                              "layout")
            continue
        plan[path] = (source, shape)
    unused = sorted(n for n in available - used if not ignore(n))
    problems = [f"{kind} ({len(items)}): {listed(items)}"
                for kind, items in (("tensors the model does not use", unused),
                                    ("tensors missing from the weights", sorted(set(missing))),
                                    ("shape mismatches", mismatched)) if items]
    if problems:
        raise ValueError(f"the weights in {weights.description} do not fit {what}; check that "
                         "the config.json beside them belongs to these weights.\n"
                         + "\n".join(problems))
    flat = {}
    for path, (source, shape) in plan.items():
        tensors = [weights.read(n) for n in source.names]
        value = _converted(path, source, tensors)
        if source.combine is None:
            value = torch_to_flax(path[-1], value, shape)
        value = np.asarray(value).astype(jnp.dtype(dtype), copy=False)
        sharding = sharding_for(path, shape) if sharding_for is not None else None
        flat[path] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        del tensors, value
    return flax.traverse_util.unflatten_dict(flat)
