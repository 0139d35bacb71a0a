"""Model families by name: each family's own config keys, their checks, and how to build it.

``config.model.name`` picks a family; the family's own keys live in the sub-group of the same name
(``config.model.unet.channels``, ``config.model.dit.size``, ...), and the keys every denoiser
shares (``dtype``, ``dropout``, ``noise_scale``, ``remat``, ``attention``, ``dropout_rng``,
``context_dim``, ``pooled_dim``) stay in ``config.model``. Adding a family is one
:class:`Family` record passed to :func:`register`, beside the module that defines its network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Union

import ml_collections

from diffusion_jax.models.dit import DIT_SIZES, dit
from diffusion_jax.models.egnn import EGNN
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.point_transformer import PointTransformer
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.video_unet import TEMPORAL_INITS, VideoUNet

__all__ = ["Family", "FAMILIES", "register", "get", "SHARED_KEYS"]

# Keys of config.model that every family reads (each may refuse the ones it cannot honour).
SHARED_KEYS = ("dtype", "dropout", "noise_scale", "remat", "attention", "dropout_rng",
               "context_dim", "pooled_dim")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its config sub-group, checks and builder.

    ``defaults()`` returns the family's own keys with their default values (the sub-group
    ``config.model.<name>``); ``ranges`` gives each numeric one its type and range (a rule of
    :data:`diffusion_jax.configuration.RULES`, e.g. ``(int, "> 0")``); ``check(group,
    example_shape)`` raises ``ValueError`` naming the key for anything else wrong;
    ``build(group, example_shape, common)`` returns the Flax module, where ``common`` holds the
    shared settings as keyword arguments. ``data_rank`` is the rank of one example the family
    takes (3 for images, 2 for signals such as audio [length, channels], 1 for vectors), or a
    tuple of the ranks it takes and ``text`` whether it can cross-attend to text.
    ``sets`` marks the families of sets of points ([members, 3 + features]: point clouds,
    molecules), which take set data only and which no other family takes.
    ``fingerprint_names`` maps a key to the name checkpoints store it under (the flat names
    of the layout before families had groups, so that older checkpoints still restore).
    """

    name: str
    defaults: Callable[[], Mapping[str, Any]]
    build: Callable[..., Any]
    data_rank: Union[int, tuple]
    text: bool
    ranges: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    check: Callable[..., None] = lambda group, example_shape: None
    fingerprint_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sets: bool = False

    def takes(self, rank: int) -> bool:
        """Whether the family's networks take examples of ``rank`` axes."""
        ranks = self.data_rank if isinstance(self.data_rank, tuple) else (self.data_rank,)
        return rank in ranks

    def default_group(self) -> ml_collections.ConfigDict:
        """The sub-group ``config.model.<name>`` with the family's defaults."""
        return ml_collections.ConfigDict(dict(self.defaults()))

    def fingerprint(self, group) -> dict:
        """The family's keys as a checkpoint stores them (see ``fingerprint_names``)."""
        return {self.fingerprint_names.get(k, k): v for k, v in group.to_dict().items()}


FAMILIES: dict = {}


def register(family: Family) -> Family:
    """Make ``family`` available as ``config.model.name = family.name``."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    """The registered family called ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {tuple(FAMILIES)}")
    return FAMILIES[name]


def _unet_defaults():
    return dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                attention_resolutions=(16,), num_heads=1, scale_shift=False, head_dim=0,
                mid_attention=True, transformer_depth=1, temporal_init="zeros")


def _check_unet(group, example_shape):
    levels = len(group.channel_mult)
    if levels < 1:
        raise ValueError("config.model.unet.channel_mult needs at least one level")
    sizes = example_shape[-3:-1] if len(example_shape) == 4 else example_shape[:-1]
    if any(size % 2 ** (levels - 1) for size in sizes):
        what = {1: "signal length", 2: "image size"}[len(sizes)]
        if len(example_shape) == 4:
            what = "frame size"
        raise ValueError(f"config.model.unet.channel_mult has {levels} levels; the {what} "
                         f"{sizes[0]} must be divisible by {2 ** (levels - 1)}")
    if group.temporal_init not in TEMPORAL_INITS:
        raise ValueError(f"config.model.unet.temporal_init={group.temporal_init!r} is not one "
                         f"of {TEMPORAL_INITS}")
    if group.temporal_init != "zeros" and len(example_shape) != 4:
        raise ValueError("config.model.unet.temporal_init sets the temporal layers of a video "
                         "UNet; this data has no frames, so leave it at 'zeros'")


def _build_unet(group, example_shape, common):
    # Clips [frames, height, width, channels] get the factorised space-time UNet of the same keys.
    video = len(example_shape) == 4
    extra = {"temporal_init": group.temporal_init} if video else {}
    network = VideoUNet if video else UNet
    return network(channels=group.channels, channel_mult=tuple(group.channel_mult),
                   num_res_blocks=group.num_res_blocks,
                   attention_resolutions=tuple(group.attention_resolutions),
                   num_heads=group.num_heads, scale_shift=group.scale_shift,
                   num_groups=min(32, group.channels), head_dim=group.head_dim or None,
                   mid_attention=group.mid_attention, transformer_depth=group.transformer_depth,
                   **extra, **common)


def _check_dit(group, example_shape):
    if group.size not in DIT_SIZES:
        raise ValueError(f"config.model.dit.size={group.size!r} is not one of "
                         f"{tuple(DIT_SIZES)}")
    sizes = tuple(example_shape[:-1])
    if len(sizes) == 3 and sizes[0] % group.temporal_patch:
        raise ValueError(f"config.model.dit.temporal_patch={group.temporal_patch} does not "
                         f"divide the {sizes[0]} frames of a clip")
    if any(size % group.patch_size for size in sizes[-2:] if len(sizes) > 1) or (
            len(sizes) == 1 and sizes[0] % group.patch_size):
        what = {1: "signal length", 2: "image size", 3: "frame size"}[len(sizes)]
        shown = sizes[0] if len(sizes) == 1 else sizes[-2:]
        raise ValueError(f"config.model.dit.patch_size={group.patch_size} does not divide the "
                         f"{what} {shown}")


def _build_dit(group, example_shape, common):
    del example_shape
    # DiT has no dropout layers (as in Peebles & Xie 2023); config.model.dropout does not apply.
    return dit(group.size, group.patch_size, temporal_patch=group.temporal_patch,
               **{k: v for k, v in common.items() if k != "dropout"})


def _build_mlp(group, example_shape, common):
    del example_shape
    return MLP(hidden=group.hidden, depth=group.depth, num_classes=common["num_classes"],
               noise_scale=common["noise_scale"], dropout=common["dropout"],
               dtype=common["dtype"])


register(Family(
    name="unet", defaults=_unet_defaults, build=_build_unet, data_rank=(2, 3, 4), text=True,
    ranges={"channels": (int, "> 0"), "channel_mult": (int, "> 0"),
            "num_res_blocks": (int, "> 0"), "attention_resolutions": (int, "> 0"),
            "num_heads": (int, "> 0"), "head_dim": (int, ">= 0 (0 = num_heads heads)"),
            "transformer_depth": (int, "> 0")},
    check=_check_unet))
register(Family(
    name="dit", defaults=lambda: dict(size="S", patch_size=2, temporal_patch=1),
    build=_build_dit, data_rank=(2, 3, 4), text=True,
    ranges={"patch_size": (int, "> 0"), "temporal_patch": (int, "> 0")}, check=_check_dit,
    fingerprint_names={"size": "dit_size"}))
register(Family(
    name="mlp", defaults=lambda: dict(hidden=256, depth=4), build=_build_mlp, data_rank=1,
    text=False, ranges={"hidden": (int, "> 0"), "depth": (int, "> 0")}))


def _build_egnn(group, example_shape, common):
    del example_shape
    return EGNN(hidden=group.hidden, depth=group.depth, normalization=group.normalization,
                coordinate_range=group.coordinate_range, num_classes=common["num_classes"],
                noise_scale=common["noise_scale"], remat=common["remat"], dtype=common["dtype"])


def _build_point_transformer(group, example_shape, common):
    del example_shape
    return PointTransformer(hidden=group.hidden, depth=group.depth, num_heads=group.num_heads,
                            fourier_features=group.fourier_features,
                            fourier_scale=group.fourier_scale, num_classes=common["num_classes"],
                            noise_scale=common["noise_scale"], remat=common["remat"],
                            attention=common["attention"], dtype=common["dtype"])


def _check_point_transformer(group, example_shape):
    del example_shape
    if group.hidden % group.num_heads:
        raise ValueError(f"config.model.point_transformer.hidden={group.hidden} does not split "
                         f"into num_heads={group.num_heads} heads")


register(Family(
    name="egnn", defaults=lambda: dict(hidden=128, depth=4, normalization=1.0,
                                       coordinate_range=15.0),
    build=_build_egnn, data_rank=2, text=False, sets=True,
    ranges={"hidden": (int, "> 0"), "depth": (int, "> 0"), "normalization": (float, "> 0"),
            "coordinate_range": (float, "> 0")}))
register(Family(
    name="point_transformer", defaults=lambda: dict(hidden=128, depth=4, num_heads=4,
                                                    fourier_features=32, fourier_scale=1.0),
    build=_build_point_transformer, data_rank=2, text=False, sets=True,
    ranges={"hidden": (int, "> 0"), "depth": (int, "> 0"), "num_heads": (int, "> 0"),
            "fourier_features": (int, "> 0"), "fourier_scale": (float, "> 0")},
    check=_check_point_transformer))
