"""What differs between data types: their sources, their previews and the files of their samples.

The schedules, losses, samplers, guidance, training loop, checkpoints and mesh never look at what
an example is; only its shape tells, and only the code here uses that:

    rank 1  vectors [features]                       (2-D toys)
    rank 2  audio [length, channels] in [-1, 1]      (waveforms at ``config.data.sample_rate``)
    rank 3  images [height, width, channels]
    rank 4  videos [frames, height, width, channels] (played at ``config.data.fps``)

except sets of 3-D points ([members, 3 + features]: point clouds, molecules), which have the
rank of audio and are told by ``config.data.name`` (:data:`KINDS`).

:func:`preview` turns a batch of samples into the one image a training run writes and logs
(a grid of images, of spectrograms, of frames or of 3-D renders); :func:`write_samples` writes
``--mode=sample``'s files beside its ``.npz`` (a PNG grid; WAV files and spectrograms; GIF and
MP4 clips; PLY point clouds; XYZ and SDF molecules).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from diffusion_jax import audio, files, set_files, video
from diffusion_jax.config_checks import comma_list
from diffusion_jax.data.audio import AudioFolder, Tones
from diffusion_jax.data.molecules import MoleculeFolder, SmilesMolecules
from diffusion_jax.data.points import ShapePoints
from diffusion_jax.data.video import MovingShapes, VideoFolder

__all__ = ["MODALITIES", "SET_KINDS", "modality", "preview", "write_samples", "CaptionsOnly", "SOURCES",
           "KINDS", "TEXT_SOURCES"]

MODALITIES = {1: "vector", 2: "audio", 3: "image", 4: "video"}
SET_KINDS = ("points", "molecules")  # the kinds of data that are sets of 3-D points


def modality(example_shape, config=None) -> str:
    """What examples of ``example_shape`` are: "vector", "audio", "image" or "video".

    With a ``config`` whose data are sets of points, "points" or "molecules" (the rank of
    sets, [members, 3 + features], is that of audio)."""
    if config is not None and KINDS.get(config.data.name) in SET_KINDS:
        return KINDS[config.data.name]
    return MODALITIES.get(len(example_shape), "vector")


def preview(samples, config):
    """One uint8 image of a batch of samples in [-1, 1], or None for vectors.

    Images tile into a grid; audio clips become a grid of their spectrograms; videos one row of
    frames per clip; point clouds and molecules a grid of 3-D scatter renders."""
    samples = np.asarray(samples, np.float32)
    kind = modality(samples.shape[1:], config)
    if kind in SET_KINDS:
        return set_files.render_sets(samples, config)
    if kind == "image":
        return files.make_grid(samples)
    if kind == "audio":
        return audio.spectrogram_grid(samples, config.data.sample_rate)
    if kind == "video":
        return video.frame_grid(samples)
    return None


def write_samples(stem: str, samples, config) -> list:
    """Write the files of ``--mode=sample``'s samples beside ``stem + ".npz"``; their paths.

    Images: ``stem.png`` (the grid). Audio: ``stem_<i>.wav`` and ``stem_<i>.png`` (its
    spectrogram) per sample, and ``stem.png`` (the spectrograms' grid). Video: ``stem_<i>.gif``
    and ``stem_<i>.mp4`` per sample, and ``stem.png`` (a row of frames per clip). Point
    clouds: ``stem_<i>.ply`` per sample; molecules: ``stem_<i>.xyz`` per sample and ``stem.sdf``
    (all of them, with the bonds their distances give); both a ``stem.png`` grid of renders.
    Vectors: nothing (the ``.npz`` holds them)."""
    samples = np.asarray(samples, np.float32)
    kind = modality(samples.shape[1:], config)
    written = []
    if kind in SET_KINDS:
        written = set_files.write_sets(stem, samples, config)
    if kind == "audio":
        for i, wave in enumerate(samples):
            audio.write_wav(f"{stem}_{i:03d}.wav", wave, config.data.sample_rate)
            files.save_png(audio.spectrogram_image(wave, config.data.sample_rate),
                      f"{stem}_{i:03d}.png")
            written += [f"{stem}_{i:03d}.wav", f"{stem}_{i:03d}.png"]
    elif kind == "video":
        for i, clip in enumerate(samples):
            video.write_gif(f"{stem}_{i:03d}.gif", clip, fps=config.data.fps)
            video.write_mp4(f"{stem}_{i:03d}.mp4", clip, fps=config.data.fps)
            written += [f"{stem}_{i:03d}.gif", f"{stem}_{i:03d}.mp4"]
    grid = preview(samples, config)
    if grid is not None:
        files.save_png(grid, stem + ".png")
        written.insert(0, stem + ".png")
    return written


class CaptionsOnly:
    """A source's records without their ``label``: a captioned run conditions on text alone.

    Everything else (``attributes``, ``geometry``, ``sample_rate``, ...) is the source's."""

    num_classes = None

    def __init__(self, source):
        self._source = source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        return {k: v for k, v in self._source[index].items() if k != "label"}

    def __getattr__(self, name):
        if name == "_source":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self._source, name)

    def __repr__(self):
        return f"CaptionsOnly({self._source!r})"


def _procedural_seed(split):
    return 0 if split == "train" else 1  # any other split: fresh examples


def _log():
    """Folder notes from process 0; the others stay quiet."""
    return print if jax.process_index() == 0 else (lambda line: None)


def _captioned(d, source):
    return CaptionsOnly(source) if d.captions != "none" else source


def _tones(d, split):
    return _captioned(d, Tones(d.size, d.sample_rate, d.clip_length,
                               seed=_procedural_seed(split), captions=d.captions != "none"))


def _audio_folder(d, split):
    del split  # a folder has no splits: every split reads all of it
    return AudioFolder(os.path.expanduser(d.path), d.sample_rate, d.clip_length,
                       channels=d.audio_channels, log=_log())


def _moving_shapes(d, split):
    return _captioned(d, MovingShapes(d.size, d.frames, d.resolution,
                                      seed=_procedural_seed(split),
                                      captions=d.captions != "none"))


def _video_folder(d, split):
    del split
    return VideoFolder(os.path.expanduser(d.path), d.frames, d.resolution,
                       stride=d.frame_stride, log=_log())


def _shape_points(d, split):
    return ShapePoints(d.size, d.num_points, seed=_procedural_seed(split))


def _molecules(d, split):
    return SmilesMolecules(d.size, d.max_atoms, elements=tuple(comma_list(d.elements)),
                           feature_scale=d.feature_scale, seed=_procedural_seed(split),
                           max_heavy_atoms=d.max_heavy_atoms)


def _molecule_folder(d, split):
    del split
    return MoleculeFolder(os.path.expanduser(d.path), d.max_atoms,
                          elements=tuple(comma_list(d.elements)), feature_scale=d.feature_scale,
                          log=_log())


# The audio, video and 3-D sources by config.data.name (configuration.SOURCES holds them all).
SOURCES = {"tones": _tones, "audio_folder": _audio_folder, "moving_shapes": _moving_shapes,
           "video_folder": _video_folder, "shape_points": _shape_points,
           "molecules": _molecules, "molecule_folder": _molecule_folder}
# What each of these sources' examples are (configuration.data_kind: any other is "image").
KINDS = {"tones": "audio", "audio_folder": "audio", "moving_shapes": "video",
         "video_folder": "video", "shape_points": "points", "molecules": "molecules",
         "molecule_folder": "molecules"}
# Sources that give captions (a text-conditioned run) when config.data.captions != "none".
TEXT_SOURCES = ("folder", "tones", "moving_shapes")
