"""Signal utilities for audio: pitch in MIDI and Hz, pitch estimation, spectrograms, WAV files.

Waveforms are floats in [-1, 1], ``[length]`` or ``[length, channels]`` (channels are averaged
where one signal is needed); batches are ``[n, length, channels]``. Everything is numpy, except
that :func:`write_wav` needs soundfile (imported when called).

:func:`estimate_pitch` finds the fundamental by harmonic summation: every candidate f0 on a
10-cent grid scores the magnitudes of its first five harmonics, weighted 1/k, in the mean
magnitude spectrum of Hann-windowed, zero-padded frames (each harmonic read as the largest
magnitude within its grid cell, so narrow spectral lines are not missed between grid points);
the best candidate is then refined by interpolating the peaks of its harmonics.
:func:`spectrogram_image` draws a log-magnitude spectrogram with a colour map of its own
(black, purple, orange, pale yellow), low frequencies at the bottom.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_jax.data.audio import import_soundfile
from diffusion_jax.files import atomic_write

__all__ = ["MIDI_A4", "DB_RANGE", "midi_to_hz", "hz_to_midi", "note_name", "estimate_pitch",
           "estimate_pitches", "default_n_fft", "spectrogram", "spectrogram_image",
           "spectrogram_grid", "colour_map", "write_wav", "import_soundfile"]

MIDI_A4 = 69  # the MIDI note of A4, 440 Hz
A4_HZ = 440.0
DB_RANGE = 80.0  # spectrograms show this many dB below their loudest bin
_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_HARMONICS = 5
_GRID_CENTS = 10.0
_SILENCE = 1e-4
_COLOUR_ANCHORS = (  # (position in [0, 1], RGB): black -> purple -> orange -> pale yellow
    (0.0, (0, 0, 0)),
    (0.35, (110, 30, 130)),
    (0.7, (240, 110, 40)),
    (1.0, (255, 250, 190)),
)
_GAP = 2  # pixels between the tiles of a grid


def midi_to_hz(midi):
    """The frequency in Hz of a MIDI note number (69 is A4, 440 Hz; fractions are cents / 100)."""
    hz = A4_HZ * 2.0 ** ((np.asarray(midi, np.float64) - MIDI_A4) / 12.0)
    return float(hz) if hz.ndim == 0 else hz


def hz_to_midi(hz):
    """The MIDI note number (a float: 69.5 is a quarter tone above A4) of a frequency in Hz."""
    hz = np.asarray(hz, np.float64)
    if np.any(~(hz > 0)):
        raise ValueError(f"hz_to_midi needs frequencies above 0 Hz, got {hz}")
    midi = MIDI_A4 + 12.0 * np.log2(hz / A4_HZ)
    return float(midi) if midi.ndim == 0 else midi


def note_name(midi) -> str:
    """The name of the MIDI note nearest ``midi``, sharps and octave: 60 -> "C4", 61 -> "C#4"."""
    number = int(round(float(midi)))
    return f"{_NOTE_NAMES[number % 12]}{number // 12 - 1}"


def _mono(wave, what: str) -> np.ndarray:
    """``wave`` as one float64 channel (channels averaged), checked to be finite."""
    x = np.asarray(wave, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"{what} needs a waveform [length] or [length, channels], got an array "
                         f"of shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: the waveform holds {int(np.sum(~np.isfinite(x)))} values that "
                         "are NaN or infinite; a model that produced it has diverged")
    return x


def _hann(n: int) -> np.ndarray:
    """The periodic Hann window of ``n`` samples."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def _harmonic_scores(mag: np.ndarray, bin_hz: float, grid: np.ndarray, nyquist: float):
    """Each candidate's weighted sum of its harmonics' magnitudes, ``sum_k mag(k f) / k``.

    Harmonic k of candidate j is read as the largest magnitude of the bins in the cell
    ``k f_j * 2^(+-5 cents)`` (and at its centre, by linear interpolation, when the cell holds
    no bin); harmonics at or above the Nyquist frequency count nothing.
    """
    half = 2.0 ** (_GRID_CENTS / 2400.0)
    edges = np.append(grid / half, grid[-1] * half)  # cell j spans edges[j] .. edges[j + 1]
    bins = np.arange(len(mag))
    scores = np.zeros(len(grid))
    for k in range(1, _HARMONICS + 1):
        lo = np.minimum(np.ceil(k * edges / bin_hz).astype(np.int64), len(mag) - 1)
        pooled = np.maximum.reduceat(mag, lo)[:len(grid)]
        centre = np.interp(k * grid / bin_hz, bins, mag)
        value = np.where(lo[1:] > lo[:-1], np.maximum(pooled, centre), centre)
        scores += np.where(k * grid < nyquist, value, 0.0) / k
    return scores


def _peak_bin(mag: np.ndarray, centre: float, reach: float):
    """The interpolated position of the peak of ``mag`` within ``centre +- reach`` bins, or None.

    None when the largest bin of that range lies on its edge (no peak inside); the position
    comes from the parabola through the log magnitudes of the largest bin and its neighbours.
    """
    lo = max(1, int(math.floor(centre - reach)))
    hi = min(len(mag) - 2, int(math.ceil(centre + reach)))
    if hi - lo < 2:
        return None
    top = lo + int(np.argmax(mag[lo:hi + 1]))
    if top in (lo, hi) or mag[top] <= 0:
        return None
    a, b, c = np.log(np.maximum(mag[top - 1:top + 2], 1e-300))
    curvature = a - 2.0 * b + c
    return top + (0.5 * (a - c) / curvature if curvature < 0 else 0.0), mag[top]


def _average_spectrum(x: np.ndarray, sample_rate: int, fmin: float):
    """``(frame, magnitudes)``: the mean Hann-windowed magnitude spectrum of ``x``'s frames.

    Frames are a power of two of samples, at least a tenth of a second and four periods of
    ``fmin`` (the whole clip when it is shorter), a quarter frame apart, each zero-padded to
    four times its length. Averaging magnitudes over frames (Welch's method), rather than
    taking one spectrum of the whole clip, keeps repeated notes from combing the spectrum
    into lines spaced by their repetition rate.
    """
    frame = 1 << int(math.ceil(math.log2(max(0.1 * sample_rate, 4.0 * sample_rate / fmin))))
    frame = min(frame, x.size)
    n_fft = 1 << int(math.ceil(math.log2(4 * frame)))
    hop = max(1, frame // 4)
    starts = np.arange(0, x.size - frame + 1, hop)
    if starts[-1] + frame < x.size:
        starts = np.append(starts, x.size - frame)  # the last samples too
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[starts]
    return frame, np.abs(np.fft.rfft(frames * _hann(frame), n_fft, axis=-1)).mean(axis=0)


def estimate_pitch(wave, sample_rate: int, fmin: float = 60.0, fmax: float = 2000.0) -> float:
    """The fundamental frequency of a waveform in Hz, by harmonic summation; 0.0 when silent.

    ``wave`` is ``[length]`` or ``[length, channels]`` (channels averaged). Candidates run from
    ``fmin`` to ``fmax`` (below the Nyquist frequency) on a 10-cent grid, each scored by its
    first five harmonics weighted 1/k in the mean spectrum of the clip's frames
    (:func:`_average_spectrum`); the best one is refined to the magnitude-weighted mean of its
    harmonics' interpolated peaks, each divided by its number. Silence (every ``|x| < 1e-4``)
    gives 0.0.
    """
    x = _mono(wave, "estimate_pitch")
    nyquist = sample_rate / 2.0
    if not 0 < fmin < fmax:
        raise ValueError(f"estimate_pitch needs 0 < fmin < fmax, got fmin={fmin}, fmax={fmax}")
    if fmin >= nyquist:
        raise ValueError(f"estimate_pitch: fmin={fmin} Hz is at or above the Nyquist frequency "
                         f"({nyquist} Hz at {sample_rate} Hz); lower fmin")
    if x.size < 4 or np.max(np.abs(x)) < _SILENCE:
        return 0.0
    frame, mag = _average_spectrum(x - x.mean(), sample_rate, fmin)
    n_fft = 2 * (len(mag) - 1)
    bin_hz = sample_rate / n_fft
    top = min(fmax, nyquist * 0.999)
    steps = int(math.floor(1200.0 * math.log2(top / fmin) / _GRID_CENTS))
    grid = fmin * 2.0 ** (np.arange(steps + 1) * _GRID_CENTS / 1200.0)
    best = float(grid[int(np.argmax(_harmonic_scores(mag, bin_hz, grid, nyquist)))])
    # Refine: each harmonic's peak near k * best (within a grid step, or the Hann main lobe).
    estimates, weights = [], []
    for k in range(1, _HARMONICS + 1):
        if k * best * 2.0 ** (_GRID_CENTS / 1200.0) >= nyquist:
            break
        centre = k * best / bin_hz
        reach = max(centre * (2.0 ** (_GRID_CENTS / 1200.0) - 1.0), 2.5 * n_fft / frame)
        found = _peak_bin(mag, centre, reach)
        if found is not None:
            estimates.append(found[0] * bin_hz / k)
            weights.append(found[1] / k)
    return float(np.average(estimates, weights=weights)) if estimates else best


def estimate_pitches(waves, sample_rate: int, fmin: float = 60.0,
                     fmax: float = 2000.0) -> np.ndarray:
    """:func:`estimate_pitch` of each waveform of a batch ``[n, length(, channels)]``: Hz [n]."""
    waves = np.asarray(waves)
    if waves.ndim not in (2, 3):
        raise ValueError(f"estimate_pitches needs a batch [n, length] or [n, length, channels], "
                         f"got an array of shape {waves.shape}")
    return np.array([estimate_pitch(w, sample_rate, fmin, fmax) for w in waves], np.float64)


def default_n_fft(sample_rate: int) -> int:
    """The power of two nearest 32 ms of samples: 256 at 8 kHz, 512 at 16 kHz."""
    return 1 << max(3, int(round(math.log2(0.032 * sample_rate))))


def spectrogram(wave, sample_rate: int, n_fft: int = None, hop: int = None) -> np.ndarray:
    """Log-magnitude spectrogram in dB: float32 ``[frames, n_fft // 2 + 1]``, Hann windows.

    0 dB is the magnitude of a full-scale sine (amplitude 1) at a bin's frequency; values are
    floored at 80 dB below the loudest bin. Frames are centred on samples ``0, hop, 2 hop, ...``
    (the signal is padded with ``n_fft // 2`` zeros at each end), so there are
    ``1 + length // hop``. Bin b is at ``b * sample_rate / n_fft`` Hz. ``n_fft`` defaults to
    :func:`default_n_fft`, ``hop`` to ``n_fft // 4``.
    """
    x = _mono(wave, "spectrogram")
    n_fft = default_n_fft(sample_rate) if n_fft is None else int(n_fft)
    hop = max(1, n_fft // 4) if hop is None else int(hop)
    if n_fft < 2 or hop < 1:
        raise ValueError(f"spectrogram needs n_fft >= 2 and hop >= 1, got {n_fft} and {hop}")
    padded = np.pad(x, (n_fft // 2, n_fft // 2))
    if padded.size < n_fft:
        padded = np.pad(padded, (0, n_fft - padded.size))
    window = _hann(n_fft)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    mag = np.abs(np.fft.rfft(frames * window, axis=-1)) / (window.sum() / 2.0)
    db = 20.0 * np.log10(np.maximum(mag, 1e-10))
    return np.maximum(db, db.max() - DB_RANGE).astype(np.float32)


def colour_map(values) -> np.ndarray:
    """uint8 RGB colours of values in [0, 1]: black, purple, orange, pale yellow (clipped)."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    positions = [p for p, _ in _COLOUR_ANCHORS]
    rgb = [np.interp(v, positions, [c[i] for _, c in _COLOUR_ANCHORS]) for i in range(3)]
    return np.round(np.stack(rgb, axis=-1)).astype(np.uint8)


def spectrogram_image(wave, sample_rate: int, height: int = None) -> np.ndarray:
    """A spectrogram as a picture: uint8 ``[height, frames, 3]``, low frequencies at the bottom.

    Time runs left to right; dB from -80 to 0 (:func:`spectrogram`) map through
    :func:`colour_map`. ``height`` (default: the ``n_fft // 2 + 1`` bins) resamples the
    frequency axis linearly.
    """
    db = spectrogram(wave, sample_rate).T  # [bins, frames]
    bins = db.shape[0]
    if height is not None and int(height) != bins:
        if int(height) < 1:
            raise ValueError(f"spectrogram_image height must be >= 1, got {height}")
        position = np.linspace(0.0, bins - 1.0, int(height))
        lo = np.floor(position).astype(np.int64)
        hi = np.minimum(lo + 1, bins - 1)
        frac = (position - lo)[:, None]
        db = db[lo] * (1.0 - frac) + db[hi] * frac
    return colour_map((db[::-1] + DB_RANGE) / DB_RANGE)


def spectrogram_grid(waves, sample_rate: int, columns: int = None) -> np.ndarray:
    """The spectrogram images of a batch tiled row by row, 2 white pixels apart: uint8 RGB."""
    images = [spectrogram_image(w, sample_rate) for w in np.asarray(waves)]
    if not images:
        raise ValueError("spectrogram_grid needs at least one waveform")
    height, width = images[0].shape[:2]
    columns = int(columns or math.ceil(math.sqrt(len(images))))
    rows = int(math.ceil(len(images) / columns))
    grid = np.full((rows * height + (rows - 1) * _GAP, columns * width + (columns - 1) * _GAP, 3),
                   255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = r * (height + _GAP), c * (width + _GAP)
        grid[top:top + height, left:left + width] = image
    return grid


def write_wav(path: str, wave, sample_rate: int) -> None:
    """Write a waveform in [-1, 1] as a 16-bit PCM WAV file, atomically.

    ``wave`` is ``[length]`` or ``[length, channels]``; values are clipped to [-1, 1] and
    stored as ``round(32768 x)`` (at most 32767), which soundfile reads back as ``n / 32768``:
    within 1/32768 of the value written.
    """
    soundfile = import_soundfile("write_wav")
    x = np.asarray(wave, np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"write_wav needs a waveform [length] or [length, channels], got an "
                         f"array of shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"write_wav: the waveform holds {int(np.sum(~np.isfinite(x)))} values "
                         f"that are NaN or infinite, so {path} was not written")
    pcm = np.clip(np.round(np.clip(x, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)
    atomic_write(path, lambda tmp: soundfile.write(tmp, pcm, int(sample_rate), subtype="PCM_16",
                                                   format="WAV"))
