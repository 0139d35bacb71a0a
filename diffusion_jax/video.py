"""Writing clips: looping GIFs, H.264 MP4 files and a grid of frames, written atomically.

Clips are uint8 ``[frames, height, width, channels]`` (3 channels, or 1 for greyscale) or floats
in [-1, 1], the model's range, converted with :func:`files.to_uint8`.
Every file goes through a temporary file in the target folder that is renamed into place
(:func:`files.atomic_write`).
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
from PIL import GifImagePlugin, Image

from diffusion_jax.files import atomic_write, to_uint8

__all__ = ["write_gif", "write_mp4", "frame_grid", "MP4_MIN_SIDE"]

MP4_MIN_SIDE = 64  # write_mp4 upscales smaller frames to at least this many pixels
_GRID_GAP = 2
_GAP_VALUE = 255  # white between the frames of a grid


def _as_uint8(array, what: str, ndim: int) -> np.ndarray:
    """``array`` as uint8 pixels with ``ndim`` axes, the last being 3 channels (RGB) or 1."""
    array = np.asarray(array)
    if array.ndim != ndim or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise ValueError(f"{what} must be an array [{'videos, ' if ndim == 5 else ''}frames, "
                         f"height, width, 3 or 1 channels], got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = to_uint8(array)
    elif array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 pixels 0..255 or floats in [-1, 1], got "
                         f"{array.dtype}; convert integer pixels with .astype(np.uint8)")
    return array


def _rgb(frames) -> np.ndarray:
    """Clip frames as uint8 RGB [frames, height, width, 3]."""
    pixels = _as_uint8(frames, "a clip", 4)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def _shared_palette(pixels: np.ndarray) -> tuple:
    """``(indices uint8 [T, H, W], palette uint8 [colours, 3])``: one palette for every frame.

    A clip of at most 256 colours keeps them exactly; a richer one is reduced to 256 colours by
    Pillow's median cut over all its frames at once, so colours do not flicker between frames.
    """
    frames, height, width, _ = pixels.shape
    flat = pixels.reshape(-1, 3).astype(np.uint32)
    codes, inverse = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2],
                               return_inverse=True)
    if len(codes) <= 256:
        colours = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
        return inverse.reshape(frames, height, width).astype(np.uint8), colours
    mosaic = Image.fromarray(np.ascontiguousarray(pixels.reshape(frames * height, width, 3)))
    quantized = mosaic.quantize(256, method=Image.Quantize.MEDIANCUT)
    palette = np.array(quantized.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    return np.asarray(quantized).reshape(frames, height, width), palette


def _gif_bytes(pixels: np.ndarray, delay_ms: float) -> bytes:
    """A looping GIF of every frame, with one global palette (see :func:`write_gif`)."""
    indices, palette = _shared_palette(pixels)
    bits = max(1, math.ceil(math.log2(len(palette))))
    table = np.zeros((1 << bits, 3), np.uint8)
    table[: len(palette)] = palette
    _, height, width, _ = pixels.shape
    chunks = [b"GIF89a", struct.pack("<HHBBB", width, height, 0xF0 | (bits - 1), 0, 0),
              table.tobytes(),
              b"!\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", 0) + b"\x00"]  # loop forever
    for frame in indices:
        image = Image.fromarray(np.ascontiguousarray(frame), "P")
        image.putpalette(table.tobytes())
        # Pillow's encoder of one frame: its graphic control (the delay), descriptor and data.
        chunks += GifImagePlugin.getdata(image, duration=delay_ms)
    chunks.append(b";")
    return b"".join(chunks)


def write_gif(path: str, frames, fps: float = 8) -> None:
    """Write a clip as a GIF that loops forever, every frame kept, atomically.

    ``frames`` is uint8 [T, H, W, 3] (or 1 channel) or floats in [-1, 1]. All frames share one
    palette: a clip of at most 256 colours (procedural clips) keeps its colours exactly, a
    richer one is reduced to 256. Each frame shows for 1/fps seconds, rounded down to the GIF's
    hundredths of a second (at least two hundredths, the shortest delay browsers honour).
    Unlike Pillow's own writer, which merges a frame identical to the previous one into it,
    every frame is stored, so reading the file back gives T frames.
    """
    pixels = _rgb(frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    delay_ms = max(20.0, 1000.0 / fps)
    if hasattr(GifImagePlugin, "getdata"):
        data = _gif_bytes(pixels, delay_ms)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
    else:  # a Pillow without the per-frame encoder: its writer (repeated frames merged)
        images = [Image.fromarray(f) for f in pixels]

        def write(tmp):
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=delay_ms, loop=0)
    atomic_write(path, write)


def _mp4_scale(height: int, width: int) -> int:
    """The integer upscaling of :func:`write_mp4`: sides even, the shorter >= MP4_MIN_SIDE."""
    scale = max(1, math.ceil(MP4_MIN_SIDE / min(height, width)))
    if (height * scale) % 2 or (width * scale) % 2:
        scale += 1  # an odd side times an even factor is even
    return scale


def _ffmpeg_writer():
    """``imageio_ffmpeg.write_frames``, or a RuntimeError saying how to get ffmpeg."""
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise RuntimeError(f"writing MP4 files needs ffmpeg, which the imageio-ffmpeg package "
                           f"brings: `pip install -e \".[video]\"` (or `pip install imageio "
                           f"imageio-ffmpeg`) ({type(err).__name__}: {err})") from err
    return imageio_ffmpeg.write_frames


def write_mp4(path: str, frames, fps: float = 8) -> None:
    """Write a clip as an H.264 MP4 file (yuv420p, constant quality), atomically.

    ``frames`` is uint8 [T, H, W, 3] (or 1 channel) or floats in [-1, 1]. H.264 in yuv420p needs
    even sides, and players show tiny videos poorly, so frames are first upscaled by the
    smallest whole factor (nearest neighbour, every pixel a sharp block) that makes both sides
    even and the shorter one at least MP4_MIN_SIDE pixels: 32x32 frames are written at 64x64,
    28x28 at 84x84, larger even frames unchanged. The file is encoded by the ffmpeg of the
    ``imageio-ffmpeg`` package (CRF 18, index at the start of the file for streaming); a
    RuntimeError says how to install it when it is missing.
    """
    pixels = _rgb(frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    write_frames = _ffmpeg_writer()
    scale = _mp4_scale(*pixels.shape[1:3])
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = pixels.shape[1:3]

    def write(tmp):
        # (the temporary name does not end in .mp4, so the container is named with -f)
        writer = write_frames(tmp, (width, height), fps=fps, codec="libx264",
                              pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
                              macro_block_size=1, ffmpeg_log_level="error",
                              output_params=["-crf", "18", "-movflags", "+faststart",
                                             "-f", "mp4"])
        with warnings.catch_warnings():
            # JAX warns on every fork of a process that has started it; ffmpeg is a separate
            # program (fork + exec) that never touches JAX's threads.
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            writer.send(None)  # start ffmpeg
        try:
            for frame in pixels:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
    atomic_write(path, write)


def frame_grid(videos, max_frames=None) -> np.ndarray:
    """Lay clips out as one uint8 image: a row per clip, a column per frame.

    ``videos`` is [n, T, H, W, C] (C is 1 or 3), uint8 or floats in [-1, 1]. Frames are
    separated by 2-pixel white gaps (none around the edge). ``max_frames`` shows at most that
    many columns, evenly spaced over the clip from its first frame to its last. A single channel
    gives a 2-D greyscale image, as :func:`files.make_grid` does.
    """
    pixels = _as_uint8(videos, "videos", 5)
    count, length, height, width, channels = pixels.shape
    columns = np.arange(length)
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        if max_frames < length:
            columns = np.unique(np.round(np.linspace(0, length - 1, max_frames)).astype(int))
    step_y, step_x = height + _GRID_GAP, width + _GRID_GAP
    grid = np.full((count * step_y - _GRID_GAP, len(columns) * step_x - _GRID_GAP, channels),
                   _GAP_VALUE, np.uint8)
    for row in range(count):
        for column, frame in enumerate(columns):
            grid[row * step_y: row * step_y + height,
                 column * step_x: column * step_x + width] = pixels[row, frame]
    return grid[..., 0] if channels == 1 else grid
