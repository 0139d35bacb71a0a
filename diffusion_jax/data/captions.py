"""Procedural captioned images for text-to-image models: a few shapes on a plain background.

``CaptionedShapes(...)[i]`` is ``{"image": uint8 [H, W, 3], "caption": str, "attributes": {...}}``
where every attribute is a numpy int32 scalar, so records of a batch stack into fixed-shape arrays:

    shape       index into SHAPES     ("circle", "square", "triangle")
    colour      index into COLOURS    (the objects' colour; every object of a record shares it)
    size        index into SIZES      ("small", "large"; shared too)
    count       number of objects, 1 .. max_objects
    position    index into POSITIONS  (3x3 grid cell of a single object; -1 when count > 1)
    background  index into COLOURS   (never the objects' colour)

Images use the exact palette colours with hard edges, so whether a picture shows what a caption
asks for can be checked by classifying pixels to the nearest palette colour. The caption always
names every attribute above (with the count and, for one object, the position), in one of several
phrasings drawn per record, e.g. "a small red circle in the top left on a black background" or
"yellow background, two large blue squares".

What split "train" leaves out and split "heldout" holds exclusively is chosen by ``heldout``:

- "pairs" (the default): HELDOUT_PAIRS, (shape, colour) pairs; every shape and every colour still
  appears in "train" with other partners, so the held-out pairs measure compositional
  generalisation;
- a colour name (e.g. "yellow"): a concept that "train" never shows nor names, neither as the
  objects' colour nor as the background; "heldout" records all have objects of that colour;
- a shape name (e.g. "triangle"): "train" has no objects of that shape, "heldout" only those.

Split "all" holds everything. Record i of a split is generated from (seed, i, split), by drawing
each attribute from the values the split allows (no rejection loops); with heldout="pairs" the
records are those of earlier versions.

The renderer knows where it drew: ``geometry(i)`` (or ``render(..., with_geometry=True)``) gives
the objects' exact mask and a depth-like map (``sources.dome_depth``), from which
``data.controls`` makes ControlNet's mask and depth control maps. Asking for them draws nothing
more from the record's random stream, so images and captions stay as they were.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from diffusion_jax.data.sources import DataError, dome_depth

__all__ = ["CaptionedShapes", "caption_for", "concept_attribute"]

SHAPES = ("circle", "square", "triangle")
SHAPES_PLURAL = ("circles", "squares", "triangles")
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
PALETTE = np.array(
    [[220, 30, 30], [30, 170, 50], [30, 70, 220], [240, 210, 30], [245, 245, 245], [15, 15, 15]],
    np.uint8,
)
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# One pair per shape and a different colour for each, so "train" still shows every shape in five
# colours and every colour on at least two shapes.
HELDOUT_PAIRS = ((0, 2), (1, 0), (2, 1))  # blue circle, red square, green triangle
SPLITS = ("train", "heldout", "all")
HELDOUT_CHOICES = ("pairs",) + COLOURS + SHAPES  # what split "train" leaves out
ATTRIBUTE_KEYS = ("shape", "colour", "size", "count", "position", "background")

# Geometry in unit image coordinates (0..1). ``r`` is a shape's nominal radius: a circle's radius,
# 0.8 r a square's half side, 1.2 r an upward triangle's circumradius, so no shape reaches past
# _EXTENT * r from its centre.
_RADIUS = ((0.08, 0.10), (0.14, 0.17))  # per size: small, large
_EXTENT = 1.2
# A single object sits near the centre of its named 3x3 cell. Several objects each take a distinct
# cell of a 3x3 grid (small) or a 2x2 grid (large): cell spacing minus twice the jitter exceeds
# twice the largest extent, so objects never touch and can be counted.
_JITTER_SINGLE = 0.05
_JITTER_MULTI = 0.03


def _position_phrases(position: int):
    name = POSITIONS[position]
    if " " in name:  # corners
        return (f"in the {name}", f"in the {name} corner", f"at the {name}")
    if name in ("top", "bottom"):
        return (f"at the {name}", f"near the {name}", f"along the {name}")
    if name in ("left", "right"):
        return (f"on the {name}", f"on the {name} side", f"at the {name}")
    return ("in the center", "at the center", "in the center of the image")


# {things}: the noun phrase; {where}: " " + a position phrase, or "" for several objects;
# {bg}: the background colour; {be}: "is" or "are".
_TEMPLATES = (
    "{things}{where} on a {bg} background",
    "{things}{where}, {bg} background",
    "{things}{where} against a {bg} background",
    "a {bg} background with {things}{where}",
    "{bg} background, {things}{where}",
    "an image of {things}{where} on {bg}",
    "a picture of {things}{where}; the background is {bg}",
    "there {be} {things}{where} on a {bg} background",
    "{things} on a plain {bg} background{where}",
    "{things}{where} over a solid {bg} background",
)


def concept_attribute(heldout: str):
    """``(attribute, index)`` of a held-out colour or shape, or None for "pairs".

    E.g. ``("colour", 3)`` for "yellow"."""
    if heldout in COLOURS:
        return "colour", COLOURS.index(heldout)
    if heldout in SHAPES:
        return "shape", SHAPES.index(heldout)
    return None


def _as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _attribute(attributes: Mapping, key: str, default: int | None = None) -> int:
    if key not in attributes:
        if default is None:
            raise KeyError(f"attributes need {key!r} (one of {ATTRIBUTE_KEYS}); "
                           f"got {sorted(attributes)}")
        return default
    return int(np.asarray(attributes[key]))


def _unpack(attributes: Mapping) -> tuple:
    """The attributes as ints: (shape, colour, size, count, position, background).

    count defaults to 1 and position to -1 (unnamed)."""
    return (_attribute(attributes, "shape"), _attribute(attributes, "colour"),
            _attribute(attributes, "size"), _attribute(attributes, "count", 1),
            _attribute(attributes, "position", -1), _attribute(attributes, "background"))


def caption_for(attributes: Mapping, rng: np.random.Generator | int | None = None) -> str:
    """A caption naming every attribute of ``attributes`` (see the module docstring).

    Its phrasing is drawn from ``rng`` (a ``np.random.Generator`` or a seed)."""
    rng = _as_generator(rng)
    shape, colour, size, count, position, background = _unpack(attributes)
    if count == 1:
        article = "an" if SIZES[size][0] in "aeiou" else "a"
        things = f"{article} {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]}"
    else:
        things = f"{NUMBER_WORDS[count]} {SIZES[size]} {COLOURS[colour]} {SHAPES_PLURAL[shape]}"
    where = ""
    if count == 1 and position >= 0:
        phrases = _position_phrases(position)
        where = " " + phrases[int(rng.integers(len(phrases)))]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(things=things, where=where, bg=COLOURS[background],
                           be="is" if count == 1 else "are")


class CaptionedShapes:
    """Captioned images of 1 to ``max_objects`` identical shapes on a plain background.

    ``split``: "train" (without what ``heldout`` names), "heldout" (only that) or "all";
    ``heldout``: "pairs" (HELDOUT_PAIRS), a colour or a shape (see the module docstring). ``size``
    is the number of records; record i is generated from (seed, i, split) whenever it is read.
    """

    SHAPES = SHAPES
    COLOURS = COLOURS
    PALETTE = PALETTE
    SIZES = SIZES
    POSITIONS = POSITIONS
    HELDOUT_PAIRS = HELDOUT_PAIRS
    HELDOUT_CHOICES = HELDOUT_CHOICES
    SPLITS = SPLITS
    ATTRIBUTE_KEYS = ATTRIBUTE_KEYS
    caption_for = staticmethod(caption_for)

    def __init__(self, size: int = 50_000, resolution: int = 32, seed: int = 0,
                 split: str = "train", max_objects: int = 3, heldout: str = "pairs"):
        if split not in SPLITS:
            raise DataError(f"CaptionedShapes split must be one of {SPLITS}, got {split!r}")
        if heldout not in HELDOUT_CHOICES:
            raise DataError(f"CaptionedShapes heldout must be 'pairs', a colour {COLOURS} or a "
                            f"shape {SHAPES}; got {heldout!r}")
        if resolution < 16:
            raise DataError(f"CaptionedShapes resolution must be at least 16, got {resolution}")
        if not 1 <= max_objects <= 4:
            raise DataError(
                f"CaptionedShapes max_objects must be between 1 and 4, got {max_objects}")
        self.size, self.resolution, self.seed = int(size), int(resolution), int(seed)
        self.split, self.max_objects, self.heldout = split, int(max_objects), heldout
        # A held-out colour is not even a background in "train": the word never appears there.
        concept = concept_attribute(heldout)
        self._hidden_colour = (concept[1] if concept and concept[0] == "colour"
                               and split == "train" else -1)
        pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
        if split == "train":
            pairs = [p for p in pairs if not self.is_heldout(*p)]
        elif split == "heldout":
            pairs = [p for p in pairs if self.is_heldout(*p)]
        self._pairs = np.array(pairs, np.int32)
        grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
        self._yy = grid[None, :, None]  # [objects, H, W] after broadcasting
        self._xx = grid[None, None, :]

    def __len__(self):
        return self.size

    def is_heldout(self, shape: int, colour: int) -> bool:
        """Whether objects of this (shape, colour) belong to split "heldout" (never to "train")."""
        concept = concept_attribute(self.heldout)
        if concept is None:
            return (int(shape), int(colour)) in HELDOUT_PAIRS
        attribute, index = concept
        return int(colour if attribute == "colour" else shape) == index

    @property
    def heldout_pairs(self) -> tuple:
        """The (shape, colour) pairs of split "heldout"."""
        return tuple((s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))
                     if self.is_heldout(s, c))

    def sample_attributes(self, rng) -> dict:
        """Draw a record's attributes from the values this split allows."""
        rng = _as_generator(rng)
        shape, colour = self._pairs[int(rng.integers(len(self._pairs)))]
        # Any palette colour but the objects' (and a hidden colour's): index i of the allowed
        # colours, which with nothing hidden is i + (i >= colour), as records always were drawn.
        allowed = [k for k in range(len(COLOURS)) if k != colour and k != self._hidden_colour]
        background = allowed[int(rng.integers(len(allowed)))]
        count = int(rng.integers(1, self.max_objects + 1))
        position = int(rng.integers(len(POSITIONS))) if count == 1 else -1
        values = {"shape": shape, "colour": colour, "size": rng.integers(len(SIZES)),
                  "count": count, "position": position, "background": background}
        return {k: np.int32(values[k]) for k in ATTRIBUTE_KEYS}

    def _centres(self, size: int, count: int, position: int, rng: np.random.Generator):
        if count == 1:
            cells = np.array([position if position >= 0 else rng.integers(9)])
            grid, jitter = 3, _JITTER_SINGLE
        else:
            grid = 3 if size == 0 else 2
            if count > grid * grid:
                raise ValueError(f"cannot place {count} {SIZES[size]} objects without overlap")
            cells = rng.choice(grid * grid, count, replace=False)
            jitter = _JITTER_MULTI
        rows, cols = np.divmod(cells, grid)
        centres = (np.stack([rows, cols], -1) + 0.5) / grid
        return centres + rng.uniform(-jitter, jitter, centres.shape)

    def _draw(self, attributes: Mapping, rng: np.random.Generator):
        """``(image, masks [objects, H, W], distances from each centre, reach [objects, 1, 1])``."""
        shape, colour, size, count, position, background = _unpack(attributes)
        if colour == background:
            raise ValueError(f"object and background are both {COLOURS[colour]}")
        radius = rng.uniform(*_RADIUS[size], size=(count, 1, 1)).astype(np.float32)
        centres = self._centres(size, count, position, rng)
        reach = _EXTENT * radius[:, 0]  # keep every object inside the image
        centres = np.clip(centres, reach, 1.0 - reach).astype(np.float32)
        dy = self._yy - centres[:, 0, None, None]
        dx = self._xx - centres[:, 1, None, None]
        if shape == 0:
            masks = dy * dy + dx * dx <= radius * radius
        elif shape == 1:
            masks = np.maximum(np.abs(dy), np.abs(dx)) <= 0.8 * radius
        else:  # upward equilateral triangle centred on its centroid, circumradius 1.2 r
            circumradius = _EXTENT * radius
            below_apex = dy + circumradius  # 0 at the apex, 1.5 circumradius at the base
            masks = (below_apex >= 0) & (dy <= 0.5 * circumradius) & (
                np.abs(dx) <= below_apex / np.sqrt(3.0))
        image = np.where(masks.any(axis=0)[..., None], PALETTE[colour], PALETTE[background])
        return image, masks, np.sqrt(dy * dy + dx * dx), _EXTENT * radius

    def render(self, attributes: Mapping, rng: np.random.Generator | int | None = None,
               with_geometry: bool = False):
        """An image (uint8 [H, W, 3]) showing ``attributes``.

        What they leave open (exact sizes and places, the cells of several objects, a single
        object's cell when position is -1 or absent) is drawn from ``rng``. Evaluation uses it to
        make reference images for a prompt. ``with_geometry=True`` returns ``(image,
        geometry)`` with the geometry of :meth:`geometry`, drawing nothing more from ``rng``."""
        image, masks, distances, reach = self._draw(attributes, _as_generator(rng))
        if not with_geometry:
            return image
        return image, {"mask": masks.any(axis=0), "depth": dome_depth(masks, distances, reach)}

    def _record_rng(self, index) -> np.random.Generator:
        """The random stream record ``index`` is drawn from: (seed, index, split)."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} is out of range for {self!r}")
        index %= self.size
        return np.random.default_rng([self.seed, index, SPLITS.index(self.split)])

    def geometry(self, index) -> dict:
        """Where record ``index``'s objects are: ``{"mask": bool [H, W], "depth": float32 [H, W]}``.

        ``mask`` is the union of the objects' pixels, exactly those the image paints in the
        objects' colour; ``depth`` is a depth-like map (``sources.dome_depth``): on each object a
        dome, 1 at its centre and at least ``sources.DEPTH_FLOOR`` at its edge, 0 on the
        background. Record ``index`` itself is unchanged by asking."""
        rng = self._record_rng(index)
        return self.render(self.sample_attributes(rng), rng, with_geometry=True)[1]

    def __getitem__(self, index):
        rng = self._record_rng(index)
        attributes = self.sample_attributes(rng)
        image = self.render(attributes, rng)
        return {"image": image, "caption": caption_for(attributes, rng), "attributes": attributes}

    def __repr__(self):
        return (f"CaptionedShapes(size={self.size}, resolution={self.resolution}, "
                f"seed={self.seed}, split={self.split!r}, max_objects={self.max_objects}, "
                f"heldout={self.heldout!r})")
