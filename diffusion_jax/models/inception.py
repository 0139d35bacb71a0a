"""The Inception-v3 feature extractor used for the Frechet Inception Distance, in Flax linen.

Inception-v3 is the network of Szegedy et al. (2016), "Rethinking the Inception Architecture for
Computer Vision"; the Frechet Inception Distance (FID) of Heusel et al. (2017), "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", compares the statistics of its
2048-d pool features. The graph here follows pytorch-fid's FID Inception, which reproduces the
TensorFlow FID graph (``inception-2015-12-05``) rather than torchvision's Inception-v3: the
average pools of the A, C and first E blocks leave padding out of the mean, and the pool branch
of the last E block takes a max instead of an average. Only the layers up to the global average
pool are built; the classifier head is not needed for FID.

Weights are not downloaded at run time. Users fetch pytorch-fid's weights file
(``pt_inception-2015-12-05-6726825d.pth``, from pytorch-fid's GitHub releases) themselves, and
either load it directly (needs PyTorch) or convert it once to ``.npz`` (no PyTorch needed later)::

    python -m diffusion_jax.models.inception convert pt_inception-2015-12-05-6726825d.pth fid.npz

and then::

    variables = load_weights("fid.npz")
    features = make_feature_fn(variables)(images)   # NHWC images in [-1, 1] -> [batch, 2048]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from diffusion_jax.models import weight_files
from diffusion_jax.models.weight_files import save_npz

__all__ = [
    "FID_WEIGHTS_FILE",
    "InceptionV3FID",
    "convert_torch_state_dict",
    "save_npz",
    "load_weights",
    "make_feature_fn",
    "resize_bilinear",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_WEIGHTS_HELP = (
    "The FID Inception weights are not downloaded at run time: download pytorch-fid's "
    f"'{FID_WEIGHTS_FILE}' (attached to the 'fid_weights' release of "
    "github.com/mseitzer/pytorch-fid) and pass its path, or a '.npz' made from it with "
    "`python -m diffusion_jax.models.inception convert IN.pth OUT.npz`."
)

_INPUT_SIZE = 299
_BN_EPSILON = 1e-3


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class ConvBN(nn.Module):
    """Convolution without bias, inference-mode batch norm (eps 0.001) and ReLU."""

    features: int
    kernel: Any = 1
    strides: Any = 1
    padding: Any = 0
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, dtype=self.dtype,
                         name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # TensorFlow's SAME average pool: the mean runs over the in-image taps only.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name: str, features: int, kernel=1, strides=1, padding=0) -> ConvBN:
        return ConvBN(features, kernel, strides, padding, dtype=self.dtype,
                      precision=self.precision, name=name)


class BlockA(_Block):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_1", 48)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(_Block):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class BlockC(_Block):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c)(x)
        b7 = self.conv("branch7x7_2", c, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c)(x)
        bd = self.conv("branch7x7dbl_2", c, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(_Block):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_1", 192)(x)
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class BlockE(_Block):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 outputs.

    ``max_pool`` selects the pool branch of the FID graph's last block (a max) instead of the
    average of the block before it."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images, size: int = _INPUT_SIZE):
    """Bilinear resize of NHWC ``images`` to ``size`` x ``size`` as PyTorch does it.

    As ``F.interpolate(mode='bilinear', align_corners=False)``: half-pixel sample positions and no
    antialiasing when shrinking (``jax.image.resize`` would antialias by default)."""
    batch, _, _, channels = images.shape
    return jax.image.resize(images, (batch, size, size, channels), "bilinear", antialias=False)


class InceptionV3FID(nn.Module):
    """``InceptionV3FID()(images) -> [batch, 2048]`` pool features of the FID Inception network.

    ``images`` are NHWC with 3 channels and values in [-1, 1], of any height and width; they are
    resized bilinearly to 299 x 299 first, as pytorch-fid does with ``resize_input=True``. Batch
    norm always uses its running statistics (the network is for inference only), so ``apply``
    needs the ``params`` and ``batch_stats`` collections, e.g. from :func:`load_weights`.
    ``dtype`` is the computation dtype (parameters stay float32); features are returned as
    float32 (float64 if that is ``dtype``). ``precision`` is that of the convolutions: the
    default ``HIGHEST`` keeps float32 accuracy on accelerators that would otherwise use TF32 or
    bfloat16 passes.
    """

    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST
    resize_input: bool = True

    # Submodule names are those of pytorch-fid's network (Conv2d_1a_3x3 ... Mixed_7c, and within
    # the blocks branch1x1, branch5x5_1, ...), so that its weights map one to one.

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
        # Resizing and the final mean run in float32 at least (float64 if that is ``dtype``).
        wide = jnp.promote_types(self.dtype, jnp.float32)
        x = images.astype(wide)
        if self.resize_input:
            x = resize_bilinear(x, _INPUT_SIZE)
        x = x.astype(self.dtype)
        kw = {"dtype": self.dtype, "precision": self.precision}

        def conv(name, features, kernel=1, strides=1, padding=0):
            return ConvBN(features, kernel, strides, padding, name=name, **kw)

        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)     # 149
        x = conv("Conv2d_2a_3x3", 32, 3)(x)                # 147
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)     # 147
        x = _max_pool_3x3_s2(x)                            # 73
        x = conv("Conv2d_3b_1x1", 80)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)               # 71
        x = _max_pool_3x3_s2(x)                            # 35
        x = BlockA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = BlockA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = BlockA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = BlockB(name="Mixed_6a", **kw)(x)               # 17
        x = BlockC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = BlockC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = BlockC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = BlockC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = BlockD(name="Mixed_7a", **kw)(x)               # 8
        x = BlockE(max_pool=False, name="Mixed_7b", **kw)(x)
        x = BlockE(max_pool=True, name="Mixed_7c", **kw)(x)
        return jnp.mean(x.astype(wide), axis=(1, 2))


# --- weights ----------------------------------------------------------------------------------

# Flax leaf name -> PyTorch parameter suffix, per collection.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "conv.weight",
    ("params", "scale"): "bn.weight",
    ("params", "bias"): "bn.bias",
    ("batch_stats", "mean"): "bn.running_mean",
    ("batch_stats", "var"): "bn.running_var",
}
# Entries of a pytorch-fid / torchvision state dict that the feature extractor does not use.
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
_IGNORED_SUFFIXES = (".num_batches_tracked",)


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict:
    """Flattened {(collection, module..., leaf): shape} of the model's variables (no compute)."""
    abstract = jax.eval_shape(InceptionV3FID().init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, _INPUT_SIZE, _INPUT_SIZE, 3), jnp.float32))
    return {path: leaf.shape for path, leaf in flatten_dict(abstract).items()}


def _torch_key(path: tuple) -> str:
    collection, *modules, _layer, leaf = path
    return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax variables of :class:`InceptionV3FID` from a pytorch-fid FID Inception state dict.

    The variables are ``{"params": ..., "batch_stats": ...}``; the state dict has names like
    ``Mixed_5b.branch1x1.conv.weight``. Values may be numpy arrays or torch tensors. Convolution
    kernels go from OIHW to HWIO. The classifier (``fc.*``), auxiliary head and
    ``num_batches_tracked`` entries are ignored; any other missing, unexpected or mis-shaped entry
    raises ``ValueError`` naming it.
    """
    shapes = _variable_shapes()
    wanted = {_torch_key(path): path for path in shapes}
    given = {k for k in state_dict
             if not k.startswith(_IGNORED_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(wanted) - given)
    unexpected = sorted(given - set(wanted))
    if missing or unexpected:
        raise ValueError("state dict does not match pytorch-fid's FID Inception: "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    return weight_files.place_tensors(
        {key: (state_dict[key], path) for key, path in wanted.items()}, shapes)


def _load_pth(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch weights file {path} needs PyTorch (`pip install torch`); "
            "alternatively convert it to .npz once, on a machine with PyTorch, with "
            "`python -m diffusion_jax.models.inception convert IN.pth OUT.npz`") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return convert_torch_state_dict(state_dict)


def load_weights(path: str | os.PathLike) -> dict:
    """Flax variables for :class:`InceptionV3FID` from a weights file at ``path``.

    The file is an ``.npz`` written by :func:`save_npz`, or pytorch-fid's ``.pth`` state dict
    (needs PyTorch). Files whose name does not end in ``.npz`` are read as PyTorch files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights file not found: {path!r}. {_WEIGHTS_HELP}")
    if path.endswith(".npz"):
        return weight_files.load_npz(path, _variable_shapes(), 'FID Inception')
    return _load_pth(path)


def make_feature_fn(variables: Mapping[str, Any], dtype: Any = jnp.float32
                    ) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``fn(images) -> [batch, 2048]`` giving float32 pool features of Inception-v3.

    The images are NHWC in [-1, 1], of any size. The weights are passed to the compiled function as
    arguments (not baked into it as constants); each new input shape compiles once."""
    model = InceptionV3FID(dtype=dtype)
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
    apply = jax.jit(model.apply)

    def features(images):
        return apply(variables, images)

    return features


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.models.inception",
        description="Tools for the FID Inception-v3 weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert pytorch-fid's .pth weights to .npz "
                             "(needs PyTorch once; the .npz loads without it)")
    convert.add_argument("src", help=f"pytorch-fid weights file, e.g. {FID_WEIGHTS_FILE}")
    convert.add_argument("dst", help="output .npz file")
    args = parser.parse_args(argv)
    if args.command == "convert":
        try:
            variables = load_weights(args.src)
        except (FileNotFoundError, ImportError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        save_npz(variables, args.dst)
        count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
        print(f"wrote {args.dst} ({count} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
