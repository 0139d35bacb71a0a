"""The LPIPS perceptual distance with a VGG-16 backbone, in Flax linen.

LPIPS is the "Learned Perceptual Image Patch Similarity" of Zhang et al. (2018), "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric". Both images pass through the
convolutional part of VGG-16 (Simonyan and Zisserman, 2015); at the last ReLU of each of its five
stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) the features are scaled to unit length along
the channels, their squared difference is weighted per channel by a learned 1x1 convolution with
one output and no bias (the "lin" layers), averaged over the image, and the five numbers are
summed. The computation follows the reference ``lpips`` package (version 0.1, ``net="vgg"``),
including its input scaling layer, so that its weights give the same distances.

Weights are not downloaded at run time. They come from two files the user fetches: torchvision's
ImageNet VGG-16 weights (``vgg16-397923af.pth``) for the backbone and the ``lpips`` package's
``weights/v0.1/vgg.pth`` for the lin layers. Convert them once to ``.npz`` (needs PyTorch; the
``.npz`` then loads without it)::

    python -m diffusion_jax.models.lpips convert vgg16-397923af.pth vgg.pth lpips_vgg.npz

and then::

    variables = load_weights("lpips_vgg.npz")
    distance = make_lpips_fn(variables)(x, y)   # NHWC images in [-1, 1] -> [batch]
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
    "VGG16_WEIGHTS_FILE",
    "LPIPS_LIN_WEIGHTS_FILE",
    "LPIPS",
    "convert_torch_state_dicts",
    "save_npz",
    "load_weights",
    "make_lpips_fn",
]

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
LPIPS_LIN_WEIGHTS_FILE = "vgg.pth"
_WEIGHTS_HELP = (
    "The LPIPS (VGG-16) weights are not downloaded at run time. Two files are needed: "
    f"torchvision's ImageNet VGG-16 weights '{VGG16_WEIGHTS_FILE}' "
    f"(https://download.pytorch.org/models/{VGG16_WEIGHTS_FILE}, the file that "
    "torchvision.models.vgg16(weights='IMAGENET1K_V1') fetches) and the lin-layer weights "
    f"'{LPIPS_LIN_WEIGHTS_FILE}' that ship with the lpips package (`pip install lpips`, then "
    "lpips/weights/v0.1/vgg.pth in its install folder, or the same path in "
    "github.com/richzhang/PerceptualSimilarity). Convert them once, with PyTorch installed, "
    "to a single .npz with `python -m diffusion_jax.models.lpips convert "
    f"{VGG16_WEIGHTS_FILE} {LPIPS_LIN_WEIGHTS_FILE} lpips_vgg.npz` and pass the .npz."
)

# The input scaling of lpips v0.1: (x - shift) / scale maps [-1, 1] images to roughly the
# ImageNet normalisation that VGG-16 was trained with. lpips holds them as float32 tensors, so
# they are rounded to float32 here too (which matters only when computing in float64).
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_NORM_EPS = 1e-10
# The five stages of VGG-16's convolutional part: (name, output channels, number of 3x3 convs).
# Each stage but the first starts with a 2x2 max pool; LPIPS reads the last ReLU of each stage.
_STAGES = ((1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3), (5, 512, 3))
_MIN_SIZE = 16  # four 2x2 pools leave 1 x 1 features at the last stage


def _conv_names() -> list[tuple[str, int]]:
    """``[(flax name, index in torchvision's vgg16().features)]`` of the 13 convolutions."""
    names, index = [], 0
    for stage, _, count in _STAGES:
        if stage > 1:
            index += 1  # the max pool
        for i in range(count):
            names.append((f"conv{stage}_{i + 1}", index))
            index += 2  # the convolution and its ReLU
    return names


def _unit_normalize(features):
    """Divide ``features`` by their Euclidean norm over channels plus 1e-10, as lpips does.

    The norm's gradient is taken as zero where all channels are exactly zero (plain ``sqrt``
    would give NaN there); the values are those of lpips everywhere."""
    sumsq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    positive = sumsq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1.0)), 0.0)
    return features / (norm + _NORM_EPS)


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> [batch]`` perceptual distances between two batches of images.

    ``x`` and ``y`` are NHWC with values in [-1, 1], the same shape, at least 16 x 16, with 3
    channels or 1 (grayscale, repeated to 3). ``dtype`` is the computation dtype of the VGG-16
    convolutions (parameters stay float32); the normalisation, lin layers and averages run in
    float32 at least (float64 if that is ``dtype``), and so does the result. ``precision`` is that
    of the convolutions: the default ``HIGHEST`` keeps float32 accuracy on accelerators that
    would otherwise use TF32 or bfloat16 passes. The variables are a single ``params`` collection,
    e.g. from :func:`load_weights`.
    """

    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    # Submodules: conv1_1 ... conv5_3 (VGG-16's convolutions, by stage and position) and lin0 ...
    # lin4 (one per stage, as lpips names them).

    @nn.compact
    def __call__(self, x, y):
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected NHWC images with 3 (or 1) channels, got shape {x.shape}")
        if min(x.shape[1:3]) < _MIN_SIZE:
            raise ValueError(f"LPIPS (VGG-16) needs images of at least {_MIN_SIZE} x {_MIN_SIZE} "
                             f"pixels, got {x.shape[1]} x {x.shape[2]}")
        wide = jnp.promote_types(self.dtype, jnp.float32)
        names = iter(_conv_names())
        convs = [[nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          precision=self.precision, name=next(names)[0])
                  for _ in range(count)] for _, channels, count in _STAGES]
        lins = [nn.Conv(1, (1, 1), use_bias=False, dtype=wide, precision=self.precision,
                        name=f"lin{stage}") for stage in range(len(_STAGES))]

        def stage_features(images):
            # The unit-normalised last ReLU of each stage, in the wide dtype.
            h = images.astype(wide)
            if h.shape[-1] == 1:
                h = jnp.repeat(h, 3, axis=-1)
            h = ((h - _SHIFT.astype(wide)) / _SCALE.astype(wide)).astype(self.dtype)
            outputs = []
            for stage, stage_convs in enumerate(convs):
                if stage > 0:
                    h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
                for conv in stage_convs:
                    h = nn.relu(conv(h))
                outputs.append(_unit_normalize(h.astype(wide)))
            return outputs

        # x and y pass through the network separately, as in lpips, so that the distance of an
        # image to itself is exactly zero.
        total = jnp.zeros((x.shape[0],), wide)
        for lin, fx, fy in zip(lins, stage_features(x), stage_features(y)):
            total = total + jnp.mean(lin(jnp.square(fx - fy)), axis=(1, 2, 3))
        return total


# --- weights ----------------------------------------------------------------------------------

# Entries of torchvision's VGG-16 state dict that LPIPS does not use.
_IGNORED_VGG_PREFIXES = ("classifier.",)


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict:
    """Flattened {("params", module, leaf): shape} of the model's variables (no compute)."""
    image = jax.ShapeDtypeStruct((1, _MIN_SIZE, _MIN_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), image, image)
    return {path: leaf.shape for path, leaf in flatten_dict(abstract).items()}


def _torch_names() -> dict[str, tuple[str, tuple]]:
    """``{torch key: (which state dict, flax path)}`` for every variable of :class:`LPIPS`."""
    names = {}
    for name, index in _conv_names():
        names[f"features.{index}.weight"] = ("vgg", ("params", name, "kernel"))
        names[f"features.{index}.bias"] = ("vgg", ("params", name, "bias"))
    for stage in range(len(_STAGES)):
        names[f"lin{stage}.model.1.weight"] = ("lin", ("params", f"lin{stage}", "kernel"))
    return names


def _check_keys(state_dict: Mapping[str, Any], wanted: set, ignored: tuple, what: str,
                other: set) -> None:
    given = {k for k in state_dict if not k.startswith(ignored)}
    missing = sorted(wanted - given)
    unexpected = sorted(given - wanted)
    if missing or unexpected:
        swapped = " (were the VGG-16 and lin-layer files swapped?)" if given & other else ""
        raise ValueError(f"{what} state dict does not match{swapped}: missing keys {missing}, "
                         f"unexpected keys {unexpected}")


def convert_torch_state_dicts(vgg_state_dict: Mapping[str, Any],
                              lin_state_dict: Mapping[str, Any]) -> dict:
    """Flax variables of :class:`LPIPS` from torchvision's VGG-16 and lpips' lin state dicts.

    ``vgg_state_dict`` is that of ``torchvision.models.vgg16()`` (names ``features.0.weight`` ...
    ``features.28.bias``); its classifier entries (``classifier.*``) are ignored deliberately,
    since LPIPS uses only the convolutional part. ``lin_state_dict`` is lpips' ``vgg.pth``
    (names ``lin0.model.1.weight`` ... ``lin4.model.1.weight``). Values may be numpy arrays or
    torch tensors; kernels go from OIHW to HWIO. Any other missing, unexpected or mis-shaped
    entry raises ``ValueError`` naming it. The result is ``{"params": ...}``.
    """
    shapes = _variable_shapes()
    names = _torch_names()
    sources = {"vgg": vgg_state_dict, "lin": lin_state_dict}
    vgg_keys = {k for k, (source, _) in names.items() if source == "vgg"}
    lin_keys = set(names) - vgg_keys
    _check_keys(vgg_state_dict, vgg_keys, _IGNORED_VGG_PREFIXES, "VGG-16 (torchvision vgg16)",
                lin_keys)
    _check_keys(lin_state_dict, lin_keys, (), "LPIPS lin-layer (lpips weights/v0.1/vgg.pth)",
                vgg_keys)
    return weight_files.place_tensors(
        {key: (sources[source][key], path) for key, (source, path) in names.items()}, shapes)


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch weights file {path} needs PyTorch (`pip install torch`); "
            "alternatively convert the two files to .npz once, on a machine with PyTorch, with "
            "`python -m diffusion_jax.models.lpips convert VGG16.pth LIN.pth OUT.npz`") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS {what} weights file not found: {path!r}. {_WEIGHTS_HELP}")


def load_weights(path: str | os.PathLike, lin_path: str | os.PathLike | None = None) -> dict:
    """Flax variables for :class:`LPIPS` from a weights file at ``path``.

    The file is an ``.npz`` written by :func:`save_npz` (``lin_path`` is then not used). A
    ``path`` whose name does not end in ``.npz`` is read as torchvision's VGG-16 ``.pth`` (needs
    PyTorch), and ``lin_path`` must then name lpips' lin-layer file ``vgg.pth``."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        _check_file(path, "(.npz)")
        return weight_files.load_npz(path, _variable_shapes(), 'LPIPS (VGG-16)')
    _check_file(path, "VGG-16 backbone")
    if lin_path is None:
        raise ValueError(f"{path!r} is not an .npz file, so it is read as torchvision's VGG-16 "
                         "weights, and lin_path must name the lpips lin-layer file. "
                         + _WEIGHTS_HELP)
    lin_path = os.fspath(lin_path)
    _check_file(lin_path, "lin-layer")
    return convert_torch_state_dicts(_torch_load(path), _torch_load(lin_path))


def make_lpips_fn(variables: Mapping[str, Any], dtype: Any = jnp.float32
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A pure ``fn(x, y) -> [batch]`` giving the LPIPS distance of each pair of images.

    The images are NHWC in [-1, 1] (3 channels, or 1 repeated to 3), at least 16 x 16. ``fn`` is
    not jitted and is differentiable, so that it can sit inside a jitted training loss and be
    differentiated with respect to ``x``. It closes over the weights: built outside a jitted
    function, they become constants compiled into that program (14.7 million values, which makes
    compiling and caching it slow). Building ``fn`` is cheap, so inside a jitted loss prefer to
    take ``variables`` as an argument of the jitted function and call ``make_lpips_fn`` there.
    """
    model = LPIPS(dtype=dtype)
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))

    def distance(x, y):
        return model.apply(variables, x, y)

    return distance


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``convert`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.models.lpips",
        description="Tools for the LPIPS (VGG-16) weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert torchvision's VGG-16 .pth and lpips' "
                             "vgg.pth to one .npz (needs PyTorch once; the .npz loads without it)")
    convert.add_argument("vgg", help=f"torchvision VGG-16 weights, e.g. {VGG16_WEIGHTS_FILE}")
    convert.add_argument("lin", help="lpips lin-layer weights, lpips/weights/v0.1/"
                         f"{LPIPS_LIN_WEIGHTS_FILE}")
    convert.add_argument("dst", help="output .npz file")
    args = parser.parse_args(argv)
    if args.command == "convert":
        if args.vgg.endswith(".npz"):
            print("error: the first argument must be torchvision's VGG-16 .pth file, not an "
                  ".npz", file=sys.stderr)
            return 1
        try:
            variables = load_weights(args.vgg, args.lin)
        except (FileNotFoundError, ImportError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        save_npz(variables, args.dst)
        count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
        print(f"wrote {args.dst} ({count} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
