"""Video data: procedural clips of moving shapes, and a folder of the user's own clips.

Records are ``{"video": uint8 [frames, resolution, resolution, 3]}``: a leading time axis on the
image layout of the image sources.

:class:`MovingShapes` draws one filled shape (captions.SHAPES, in a captions.PALETTE colour) on
a plain background of another palette colour, doing one of MOTIONS: moving right, left, up or
down at a constant speed, bouncing left and right off the frame's edges, or standing still
while it changes colour. The motion is the label; ``captions=True`` adds a caption in the words
of :mod:`~diffusion_jax.data.captions` ("a red circle moving to the right on a blue
background"). Clip i is generated from (seed, i); ``geometry(i)`` gives its ground truth.

:class:`VideoFolder` reads every .mp4, .webm, .mov, .avi, .mkv and .gif file under a folder
(any letter case, subfolders included, hidden files and folders left out) and every folder of
frames (one whose files are all images, folder.IMAGE_EXTENSIONS, and which has no subfolders;
its images are the frames in the natural order of their names, so "2.png" comes before
"10.png"), in the sorted order of their paths relative to the folder. Each record is the first
``(frames - 1) * stride + 1`` frames of a clip, every ``stride``-th one kept, each brought to RGB
and resized and centre-cropped with :func:`~diffusion_jax.data.folder.resize_center_crop`.
Video files are decoded by ffmpeg (the binary of the ``imageio-ffmpeg`` package, through
imageio's FFMPEG plugin), GIFs and frame images by Pillow.

Building the source counts each clip's frames without decoding them (ffmpeg counts the stream's
packets); clips too short for a record and files ffmpeg or Pillow cannot open are left out, with
one log line each. A file damaged past its header raises :class:`DataError` naming it when read.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from diffusion_jax.data.captions import COLOURS, PALETTE, SHAPES
from diffusion_jax.data.folder import (
    IMAGE_EXTENSIONS,
    _check_resolution,
    _some,
    _to_rgb,
    resize_center_crop,
)
from diffusion_jax.data.sources import DataError, _last_line, _rng

__all__ = ["MOTIONS", "VIDEO_EXTENSIONS", "MovingShapes", "VideoFolder", "read_video"]

MOTIONS = ("right", "left", "up", "down", "bounce", "colour")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")
_INSTALL = 'pip install -e ".[video]"` (or `pip install imageio imageio-ffmpeg`)'

# MovingShapes geometry, in units of the frame side. ``r`` is a shape's radius: a circle's radius,
# 0.8 r a square's half side, 1.2 r an upward triangle's circumradius (as in captions.py).
_RADIUS = (0.15, 0.25)
# How far each shape reaches from its centre, in radii: (up, down, left and right).
_EXTENTS = ((1.0, 1.0, 1.0), (0.8, 0.8, 0.8), (1.2, 0.6, 0.6 * math.sqrt(3.0)))
_TRAVEL = (0.6, 1.0)  # a straight motion covers this share of the centre's free range
_BOUNCE_PATH = (1.2, 2.2)  # a bounce's path, in free ranges: faster than any straight motion
_MOTION_WORDS = {"right": "moving to the right", "left": "moving to the left",
                 "up": "moving up", "down": "moving down", "bounce": "bouncing left and right"}


def _shape_mask(shape: int, radius: float, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """The pixels of a shape, from each pixel centre's offset ``(dy, dx)`` from the shape's."""
    if shape == 0:
        return dy * dy + dx * dx <= radius * radius
    if shape == 1:
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.8 * radius
    circumradius = 1.2 * radius  # upward equilateral triangle centred on its centroid
    below_apex = dy + circumradius
    return (below_apex >= 0) & (dy <= 0.5 * circumradius) & (
        np.abs(dx) <= below_apex / math.sqrt(3.0))


def _straight(rng, low: float, high: float, times: np.ndarray, forwards: bool) -> np.ndarray:
    """Positions at a constant speed inside [low, high], increasing unless not ``forwards``."""
    travel = (high - low) * rng.uniform(*_TRAVEL)
    start = rng.uniform(low, high - travel)
    path = start + travel * times / times[-1]
    return path if forwards else low + high - path


def _bounce(rng, low: float, high: float, times: np.ndarray) -> np.ndarray:
    """Positions bouncing between ``low`` and ``high``, reflecting at least once inside the clip.

    The first reflection comes after frame 1 and before the second to last frame, and two
    reflections are at least two frames apart, so the frames show the turn.
    """
    span, last = high - low, float(times[-1])
    path = min(span * rng.uniform(*_BOUNCE_PATH), span * last / 2.0)
    speed = path / last
    turn = rng.uniform(1.0, min(last - 1.0, span / speed))  # time of the first reflection
    unfolded = np.mod(span - speed * turn + speed * times, 2.0 * span)
    folded = low + np.where(unfolded <= span, unfolded, 2.0 * span - unfolded)
    return folded if rng.random() < 0.5 else low + high - folded


def _caption(shape: int, colours: np.ndarray, background: int, motion: str) -> str:
    """The clip in words, e.g. "a red circle moving to the right on a blue background"."""
    first, last = COLOURS[colours[0]], COLOURS[colours[-1]]
    words = _MOTION_WORDS.get(motion, f"changing from {first} to {last}")
    article = "an" if first[0] in "aeiou" else "a"
    return f"{article} {first} {SHAPES[shape]} {words} on a {COLOURS[background]} background"


class MovingShapes:
    """Procedural clips of one shape moving (or changing colour) on a plain background.

    The label is the motion, an index into MOTIONS. Every clip keeps its object wholly inside
    the frame with at least one pixel of background around it; its radius is 0.15 to 0.25 of the
    frame. Straight motions cover 60 to 100% of the free range of the object's centre; a bounce
    travels 1.2 to 2.2 such ranges (less in very short clips) and turns at least once; a colour
    change happens at a frame of the middle third, to a colour that is neither the first nor the
    background. Clip i is generated from ``np.random.default_rng([seed, i])``.
    """

    MOTIONS = MOTIONS

    def __init__(self, size: int = 50_000, frames: int = 16, resolution: int = 32,
                 seed: int = 0, captions: bool = False):
        if resolution < 16:
            raise DataError(f"MovingShapes resolution must be at least 16, got {resolution}")
        if frames < 3:
            raise DataError(f"MovingShapes needs at least 3 frames to show a motion, got "
                            f"{frames}: set config.data.frames to 3 or more")
        if size < 1:
            raise DataError(f"MovingShapes size must be at least 1, got {size}")
        self.size, self.frames, self.resolution = int(size), int(frames), int(resolution)
        self.seed, self.captions = int(seed), bool(captions)
        self.num_classes = len(MOTIONS)
        grid = (np.arange(self.resolution) + 0.5) / self.resolution
        self._yy, self._xx = grid[None, :, None], grid[None, None, :]
        self._times = np.arange(self.frames, dtype=np.float64)

    def __len__(self):
        return self.size

    def _clip(self, index) -> dict:
        """Record ``index``'s ground truth (see :meth:`geometry`) with its video under "video"."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} is out of range for {self!r}")
        rng = _rng(self.seed, index % self.size)
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
        others = [c for c in range(len(COLOURS)) if c != colour]
        background = others[int(rng.integers(len(others)))]
        radius = rng.uniform(*_RADIUS)
        margin = 1.0 / self.resolution  # a pixel of background all around the object
        up, down, side = (e * radius + margin for e in _EXTENTS[shape])
        y = np.full(self.frames, rng.uniform(up, 1.0 - down))
        x = np.full(self.frames, rng.uniform(side, 1.0 - side))
        colours = np.full(self.frames, colour, np.int32)
        if motion in ("right", "left"):
            x = _straight(rng, side, 1.0 - side, self._times, motion == "right")
        elif motion in ("up", "down"):
            y = _straight(rng, up, 1.0 - down, self._times, motion == "down")
        elif motion == "bounce":
            x = _bounce(rng, side, 1.0 - side, self._times)
        else:  # the colour changes at a frame of the middle third
            first = max(1, math.ceil(self.frames / 3))
            switch = int(rng.integers(first, max(first, (2 * self.frames) // 3) + 1))
            choices = [c for c in others if c != background]
            colours[switch:] = choices[int(rng.integers(len(choices)))]
        mask = _shape_mask(shape, radius, self._yy - y[:, None, None], self._xx - x[:, None, None])
        video = np.where(mask[..., None], PALETTE[colours][:, None, None, :], PALETTE[background])
        return {"video": video, "centre": np.stack([y, x], -1).astype(np.float32),
                "colour": colours, "shape": shape, "background": background,
                "motion": motion, "radius": float(radius), "mask": mask}

    def geometry(self, index) -> dict:
        """The ground truth of clip ``index``, frame by frame.

        ``{"centre": float32 [frames, 2]`` (y, x in 0..1, y downwards), ``"colour": int32
        [frames]`` (the object's palette index, captions.COLOURS), ``"shape"``,
        ``"background"`` (ints: captions.SHAPES and COLOURS indices), ``"motion"`` (a name of
        MOTIONS), ``"radius"`` (in frame sides) and ``"mask": bool [frames, R, R]}``, exactly
        the pixels painted in the object's colour.
        """
        clip = self._clip(index)
        del clip["video"]
        return clip

    def __getitem__(self, index):
        clip = self._clip(index)
        record = {"video": clip["video"], "label": np.int32(MOTIONS.index(clip["motion"]))}
        if self.captions:
            record["caption"] = _caption(clip["shape"], clip["colour"], clip["background"],
                                         clip["motion"])
        return record

    def __repr__(self):
        return (f"MovingShapes(size={self.size}, frames={self.frames}, "
                f"resolution={self.resolution}, seed={self.seed}, captions={self.captions})")


def _imageio():
    """``imageio.v3``, or a DataError saying how to install it."""
    try:
        import imageio.v3 as iio
    except ImportError as err:
        raise DataError(f"reading video files needs imageio: `{_INSTALL}") from err
    return iio


def _imageio_ffmpeg():
    """The ``imageio_ffmpeg`` module, or a DataError saying how to install it."""
    try:
        import imageio_ffmpeg
    except ImportError as err:
        raise DataError(f"reading video files needs imageio-ffmpeg (its ffmpeg binary): "
                        f"`{_INSTALL}") from err
    return imageio_ffmpeg


def _natural_key(name: str) -> list:
    """A sort key that orders the numbers in names by value: "2.png" before "10.png"."""
    parts = re.split(r"(\d+)", name.lower())
    return [(int(p) if i % 2 else p) for i, p in enumerate(parts)] + [name]


def _frame_files(folder: str) -> list:
    """The image files of a folder of frames, hidden ones left out, in natural order."""
    names = [n for n in os.listdir(folder)
             if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(folder, n))]
    return sorted(names, key=_natural_key)


def _needed(frames: int, stride: int) -> int:
    """How many frames of a clip one record spans."""
    return (frames - 1) * stride + 1


def _frame_count(path: str) -> int:
    """A clip's number of frames, read without decoding them; raises on an unreadable clip."""
    if os.path.isdir(path):
        files = _frame_files(path)
        with Image.open(os.path.join(path, files[0])) as image:
            image.verify()  # the first frame's header, as a cheap check
        return len(files)
    if path.lower().endswith(".gif"):
        with Image.open(path) as image:
            if image.format != "GIF":
                raise ValueError(f"it is a {image.format} file, not a GIF")
            return int(getattr(image, "n_frames", 1))
    frames, _ = _imageio_ffmpeg().count_frames_and_secs(path)
    return int(frames)


def _decode_images(path: str, wanted: int, stride: int):
    """Yield the first ``wanted`` frames (every ``stride``-th) of a GIF or frame folder, RGB."""
    if os.path.isdir(path):
        for name in _frame_files(path)[: _needed(wanted, stride): stride]:
            try:
                with Image.open(os.path.join(path, name)) as image:
                    pixels = np.array(_to_rgb(ImageOps.exif_transpose(image)))
            except Exception as err:  # Pillow raises many types for a damaged file
                raise DataError(f"cannot decode the frame {os.path.join(path, name)} "
                                f"({type(err).__name__}: {err}); repair or delete it") from err
            yield pixels
        return
    with Image.open(path) as image:
        for position in range(0, min(getattr(image, "n_frames", 1), _needed(wanted, stride)),
                              stride):
            image.seek(position)
            yield np.array(_to_rgb(image))


def _decode_ffmpeg(path: str, wanted: int, stride: int):
    """Yield the first ``wanted`` frames (every ``stride``-th) of a video file, RGB."""
    iio = _imageio()
    _imageio_ffmpeg()
    with iio.imopen(path, "r", plugin="FFMPEG") as video:
        kept = 0
        for position, frame in enumerate(video.iter()):
            if position % stride == 0:
                yield np.asarray(frame)
                kept += 1
                if kept == wanted:
                    return


def read_video(path: str, frames: int, resolution: int, stride: int = 1) -> np.ndarray:
    """Read one clip (a video file, a GIF or a folder of frames) as uint8 [frames, R, R, 3].

    It takes the clip's first ``(frames - 1) * stride + 1`` frames, keeps every ``stride``-th,
    and brings each to RGB at ``resolution`` (resize the shorter side, crop the centre). A clip
    that cannot be decoded, or that ends before enough frames, raises :class:`DataError`.
    """
    frames, stride = _check_count("frames", frames), _check_count("stride", stride)
    resolution = _check_resolution(resolution)
    if not os.path.exists(path):
        raise DataError(f"the clip {path} does not exist")
    is_images = os.path.isdir(path) or path.lower().endswith(".gif")
    decode = _decode_images if is_images else _decode_ffmpeg
    try:
        pixels = [resize_center_crop(np.ascontiguousarray(f, np.uint8), resolution)
                  for f in decode(path, frames, stride)]
    except DataError:
        raise
    except Exception as err:  # ffmpeg and Pillow raise many types for a damaged file
        raise DataError(f"cannot decode the clip {path} ({type(err).__name__}: "
                        f"{_reason(err)}); repair or delete it") from err
    if len(pixels) < frames:
        raise DataError(f"the clip {path} ends early: a record takes {frames} frames (from "
                        f"its first {_needed(frames, stride)}, stride {stride}), but only "
                        f"{len(pixels)} could be read; the file may be truncated (repair or "
                        "delete it), or lower config.data.frames / config.data.frame_stride")
    return np.stack(pixels)


def _reason(err: Exception) -> str:
    """The telling line of an error: ffmpeg's last line naming the problem, else the last one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines
               if re.search(r"error|invalid|not found|no such|end of file", line, re.I)]
    return (telling or [_last_line(err)])[-1]


def _check_count(name: str, value) -> int:
    """``value`` as an int, or a DataError unless it is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"the video {name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _scan(path: str) -> tuple:
    """``(clips, mixed)``: the clips under ``path`` and the folders of images that are not clips.

    Both are sorted paths relative to ``path``; a folder's images are not a clip when it holds
    other files or subfolders too.
    """
    clips, mixed = [], []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        relative = os.path.relpath(folder, path)
        visible = [n for n in names if not n.startswith(".")]
        images = [n for n in visible if n.lower().endswith(IMAGE_EXTENSIONS)]
        if images and len(images) == len(visible) and not subfolders:
            clips.append(os.path.normpath(relative))
        elif images:
            mixed.append(os.path.normpath(relative))
        clips += [os.path.normpath(os.path.join(relative, n)) for n in visible
                  if n.lower().endswith(VIDEO_EXTENSIONS)]
    return sorted(clips), sorted(mixed)


def _count_or_problem(full_path: str):
    """``(frame count, None)``, or ``(0, why the clip cannot be read)``."""
    try:
        return _frame_count(full_path), None
    except DataError:
        raise
    except Exception as err:  # ffmpeg and Pillow raise many types for a damaged file
        return 0, f"{type(err).__name__}: {_reason(err)}"


class VideoFolder:
    """The clips under a folder (video files, GIFs, folders of frames), as fixed-length records.

    Records are ``{"video": uint8 [frames, resolution, resolution, 3]}``: each clip's first
    ``(frames - 1) * stride + 1`` frames, every ``stride``-th kept (see the module docstring).
    ``log`` receives the notes on clips left out (None: print them). There are no labels.
    """

    # ffmpeg decodes in its own process and Pillow without the interpreter lock: reader threads
    # overlap the decoding of several clips.
    read_threads = 8

    def __init__(self, path: str, frames: int, resolution: int, stride: int = 1,
                 log: Optional[Callable[[str], None]] = None):
        self.frames, self.stride = _check_count("frames", frames), _check_count("stride", stride)
        self.resolution = _check_resolution(resolution)
        self.path, self.num_classes = path, None
        log = print if log is None else log
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise DataError(f"the video folder {path} {what}: set config.data.path to a folder "
                            f"of video files ({', '.join(VIDEO_EXTENSIONS)}) or of folders of "
                            "frame images")
        names, mixed = _scan(path)
        if mixed:
            log(f"VideoFolder: the images in {len(mixed)} folders of {path} are not read as "
                f"frames because those folders hold other files or subfolders too "
                f"({_some(mixed, 3)}); a folder of frames must hold only its images")
        if not names:
            raise DataError(f"the folder {path} holds no clips (searched with its subfolders "
                            f"for {', '.join(VIDEO_EXTENSIONS)} files, any letter case, and for "
                            "folders holding only frame images): put the training videos there")
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            found = list(pool.map(_count_or_problem, [os.path.join(path, n) for n in names]))
        self._files = self._usable(names, found, log)

    def _usable(self, names: list, found: list, log: Callable) -> list:
        """``names`` less the clips that cannot be read or are too short, which are logged."""
        needed = _needed(self.frames, self.stride)
        bad = [f"{n} ({why})" for n, (_, why) in zip(names, found) if why is not None]
        short = [(n, count) for n, (count, why) in zip(names, found)
                 if why is None and count < needed]
        good = [n for n, (count, why) in zip(names, found) if why is None and count >= needed]
        shortage = (f"shorter than the {needed} frames a record spans (frames={self.frames}, "
                    f"stride={self.stride})")
        fix = "lower config.data.frames or config.data.frame_stride to use them"
        if not good:
            reasons = []
            if bad:
                reasons.append(f"{len(bad)} cannot be read ({_some(bad, 3)}: damaged, or not "
                               "videos although their names end like one)")
            if short:
                longest = max(count for _, count in short)
                reasons.append(f"{len(short)} are {shortage} (the longest has {longest}; "
                               f"{fix})")
            raise DataError(f"none of the {len(names)} clips in {self.path} can be used: "
                            + "; ".join(reasons))
        if bad:
            log(f"VideoFolder: skipped {len(bad)} of {len(names)} clips in {self.path} that "
                f"are not readable videos: {_some(bad, 3)}")
        if short:
            listed = _some([f"{n} ({count} frames)" for n, count in short], 3)
            log(f"VideoFolder: left out {len(short)} of {len(names)} clips in {self.path} "
                f"{shortage}: {listed}; {fix}")
        return good

    def __len__(self):
        return len(self._files)

    def file(self, index: int) -> str:
        """The path of record ``index``'s clip (a file, or a folder of frames)."""
        return os.path.normpath(os.path.join(self.path, self._files[index]))

    def __getitem__(self, index):
        video = read_video(self.file(int(index)), self.frames, self.resolution, self.stride)
        return {"video": video}

    def __repr__(self):
        return (f"VideoFolder(path={self.path!r}, frames={self.frames}, "
                f"resolution={self.resolution}, stride={self.stride}, num_clips={len(self)})")
