"""Latents precomputed once (``--mode=encode_dataset``), read back as a random-access source.

The folder holds ``moments.npy`` (float32 ``[N, h, w, 2 * latent_channels]``: each example's
posterior mean and log-variance, concatenated on the channel axis), ``labels.npy`` (int32
``[N]``) when the data has classes, ``captions.json`` (a list of N strings) when it has captions,
and ``info.json`` (what was encoded, with which autoencoder). Arrays are memory-mapped and read
with ``allow_pickle=False``. The posterior is sampled in the training step, from the step's key,
as for latents encoded on the fly.
"""

from __future__ import annotations

import json
import os

import numpy as np

from diffusion_jax.data.sources import DataError

__all__ = ["PrecomputedLatents", "LATENT_FILES"]

LATENT_FILES = ("info.json", "moments.npy")


class PrecomputedLatents:
    """The records ``{"moments", "label"?, "caption"?}`` of a folder of precomputed latents."""

    def __init__(self, path: str):
        self.path = path
        missing = [f for f in LATENT_FILES if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise DataError(
                f"config.latent.precomputed={path!r} has no {' or '.join(missing)}: it is not a "
                "folder of precomputed latents; write one with `python main.py --config=... "
                "--workdir=DIR --mode=encode_dataset`, or set config.latent.precomputed='' to "
                "encode on the fly")
        try:
            with open(os.path.join(path, "info.json")) as f:
                self.info = json.load(f)
            self._moments = np.load(os.path.join(path, "moments.npy"), mmap_mode="r",
                                    allow_pickle=False)
            self._labels = self._optional_array("labels.npy")
            self._captions = None
            if os.path.isfile(os.path.join(path, "captions.json")):
                with open(os.path.join(path, "captions.json")) as f:
                    self._captions = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(f"the precomputed latents in {path} are damaged ({err}); write them "
                            "again with --mode=encode_dataset") from err
        count = len(self._moments)
        for name, values in (("labels.npy", self._labels), ("captions.json", self._captions)):
            if values is not None and len(values) != count:
                raise DataError(f"{path}: {name} has {len(values)} entries for {count} latents; "
                                "write the folder again with --mode=encode_dataset")
        if self.info.get("count") != count:
            raise DataError(f"{path}: info.json says {self.info.get('count')} latents and "
                            f"moments.npy holds {count}; write the folder again")
        if self._labels is not None:
            self.num_classes = int(self.info["num_classes"])

    def _optional_array(self, name):
        file = os.path.join(self.path, name)
        return np.load(file, mmap_mode="r", allow_pickle=False) if os.path.isfile(file) else None

    def __len__(self):
        return len(self._moments)

    def __getitem__(self, index):
        record = {"moments": np.asarray(self._moments[index])}
        if self._labels is not None:
            record["label"] = np.int32(self._labels[index])
        if self._captions is not None:
            record["caption"] = self._captions[index]
        return record

    def __repr__(self):
        return f"PrecomputedLatents({self.path!r}, {len(self)} latents)"
