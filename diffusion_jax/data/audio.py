"""Audio data sources: procedural tones with known ground truth, and a folder of the user's clips.

``Tones(...)[i]`` is ``{"audio": float32 [length, 1] in [-1, 1], "label": int32}`` (plus
``"caption"`` with ``captions=True``): a short clip of a note, a major triad or a drum hit,
synthesised from (seed, i). Its 36 classes (:attr:`Tones.CLASSES`) are

    notes   ("sine", "square", "pluck") x the C-major scale C4 .. C5 (MIDI 60 62 64 65 67 69 71 72)
    chords  the same three timbres x major triads on C4, F4 and G4
    hits    "kick", "snare", "hat"

and ``attributes(i)`` gives what record i holds (its pitches, number of onsets, loudness and
peak), so a generated clip can be checked against the truth (``diffusion_jax.audio`` estimates
the pitch of a clip). Tones are band-limited additive syntheses: every harmonic lies below the
Nyquist frequency, so nothing aliases.

``AudioFolder(path, sample_rate, length)`` reads every .wav, .flac, .ogg, .aiff and .aif file
under ``path`` (any letter case, subfolders included, hidden files and folders left out), in the
sorted order of their paths relative to ``path``. Each record is ``{"audio": float32 [length,
channels]}``: the file decoded with soundfile, mixed down to mono by the mean when ``channels``
is 1, resampled to ``sample_rate`` (``scipy.signal.resample_poly``), then its centre ``length``
samples, clipped to [-1, 1]. Building the source reads only the files' headers; unreadable files
and clips too short for ``length`` are left out with one log line each group.
"""

from __future__ import annotations

import math
import os
from collections import namedtuple
from typing import Callable, Optional

import numpy as np

from diffusion_jax.data.folder import _scan, _some
from diffusion_jax.data.sources import DataError, _rng

__all__ = ["AUDIO_EXTENSIONS", "AudioFolder", "ToneClass", "Tones", "import_soundfile",
           "read_audio"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_NUMBER_WORDS = {1: "one beat", 2: "two beats", 3: "three beats"}
_FADE = math.log(1000.0)  # an exponential decay falls by 60 dB after this many time constants


def import_soundfile(purpose: str):
    """The ``soundfile`` module, or a DataError saying how to install it."""
    try:
        import soundfile
    except (ImportError, OSError) as err:  # OSError: the libsndfile library is missing
        raise DataError(f"{purpose} needs soundfile: `pip install -e \".[audio]\"` (or `pip "
                        f"install soundfile`) ({type(err).__name__}: {err})") from err
    return soundfile


def _whole(value, name: str, minimum: int) -> int:
    """``value`` as an int, or a DataError unless it is a whole number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Procedural tones.

ToneClass = namedtuple("ToneClass", "kind timbre midi")
ToneClass.__doc__ = "A class of :class:`Tones`: kind, timbre and root MIDI note (None for hits)."

_TIMBRES = ("sine", "square", "pluck")
_SCALE = (60, 62, 64, 65, 67, 69, 71, 72)
_CHORD_ROOTS = (60, 65, 67)
_HITS = ("kick", "snare", "hat")
_MAJOR_TRIAD = (0, 4, 7)


def _midi_name(midi: int, octave: bool = True) -> str:
    return _NOTE_NAMES[midi % 12] + (str(midi // 12 - 1) if octave else "")


def _class_name(cls: ToneClass) -> str:
    if cls.kind == "note":
        return f"{cls.timbre} note {_midi_name(cls.midi)}"
    if cls.kind == "chord":
        return f"{cls.timbre} chord {_midi_name(cls.midi, octave=False)} major"
    return f"{cls.timbre} hit"


def _envelope(n: int, attack: int, tau: float) -> np.ndarray:
    """A raised-cosine attack of ``attack`` samples, then an exponential decay (``tau`` samples)."""
    t = np.arange(n, dtype=np.float64)
    env = np.exp(-np.maximum(t - attack, 0.0) / tau)
    rise = t < attack
    env[rise] *= 0.5 - 0.5 * np.cos(np.pi * t[rise] / attack)
    return env


def _harmonics(freq: float, amps: np.ndarray, phases: np.ndarray, n: int, sample_rate: int,
               decay: float = 0.0) -> np.ndarray:
    """``sum_k amps[k-1] sin(2 pi k freq t + phases[k-1]) exp(-k decay t)`` over ``n`` samples.

    The sum is a polynomial in ``w = exp((2 pi i freq - decay) t)``, evaluated by Horner's rule:
    one complex multiply-add per harmonic instead of a sine per harmonic and sample.
    """
    t = np.arange(n, dtype=np.float64) / sample_rate
    w = np.exp((2j * np.pi * freq - decay) * t)
    acc = np.zeros(n, np.complex128)
    for coefficient in (amps * np.exp(1j * phases))[::-1]:
        acc *= w
        acc += coefficient
    acc *= w
    return acc.imag


def _timbre_amplitudes(timbre: str, freq: float, sample_rate: int) -> np.ndarray:
    """Harmonic amplitudes of ``timbre`` at ``freq``: only harmonics below the Nyquist frequency."""
    count = int(math.ceil(sample_rate / 2.0 / freq)) - 1  # k * freq < Nyquist
    k = np.arange(1, count + 1, dtype=np.float64)
    if timbre == "sine":
        return np.where(k == 1, 1.0, np.where(k == 2, 0.1, 0.0))[:2]
    if timbre == "square":
        return np.where(k % 2 == 1, 1.0 / k, 0.0)
    return 1.0 / k  # pluck


class Tones:
    """Procedural audio clips of notes, major chords and drum hits in 36 classes, with captions.

    Record i is synthesised from ``np.random.default_rng([seed, i])``: its class, a detune of up
    to 15 cents, 1 to 3 onsets evenly spaced (the first after up to a tenth of the clip), an
    attack of 3 to 15 ms, a decay that fades each event by 60 dB within its beat, random phases
    and a loudness, "soft" (peak 0.2 .. 0.4) or "loud" (peak 0.6 .. 0.9); the clip is scaled so
    its largest magnitude equals the peak. Notes and chords are additive: "sine" (a second
    harmonic at 0.1), "square" (odd harmonics at 1/k) and "pluck" (all harmonics at 1/k, the
    higher ones decaying faster). Hits: "kick" (a sine swept down from about 150 Hz to 50 Hz),
    "snare" (a noise burst and a 190 Hz tone), "hat" (a short burst of differenced noise).
    ``attributes(i)`` is the ground truth of record i; ``class_name(label)`` names a class.
    """

    CLASSES = tuple(
        [ToneClass("note", t, m) for t in _TIMBRES for m in _SCALE]
        + [ToneClass("chord", t, r) for t in _TIMBRES for r in _CHORD_ROOTS]
        + [ToneClass("hit", h, None) for h in _HITS])
    CLASS_NAMES = tuple(_class_name(c) for c in CLASSES)

    def __init__(self, size: int = 50_000, sample_rate: int = 8000, length: int = 4096,
                 seed: int = 0, captions: bool = False):
        self.size = _whole(size, "Tones size (the number of records)", 1)
        self.sample_rate = _whole(sample_rate, "Tones sample_rate (Hz; the highest note "
                                  "sounds at 587 Hz, so 4000 or more)", 4000)
        self.length = _whole(length, "Tones length (samples per clip)", 256)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise DataError(f"Tones seed must be a whole number, got {seed!r}")
        if not isinstance(captions, (bool, np.bool_)):
            raise DataError(f"Tones captions must be True or False, got {captions!r}")
        self.seed, self.captions = int(seed), bool(captions)
        self.has_captions = self.captions
        self.num_classes = len(self.CLASSES)

    def __len__(self):
        return self.size

    @classmethod
    def class_name(cls, label: int) -> str:
        """The name of class ``label``, e.g. "square note E4", "pluck chord F major", "kick hit"."""
        return cls.CLASS_NAMES[int(label)]

    def _draw(self, index: int):
        """``(attributes, rng)``: record ``index``'s parameters, and its stream to synthesise."""
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"Tones record {index} is out of range: there are {self.size}")
        rng = _rng(self.seed, index)
        label = int(rng.integers(len(self.CLASSES)))
        detune = float(rng.uniform(-15.0, 15.0))
        beats = int(rng.integers(1, 4))
        loud = bool(rng.random() < 0.5)
        peak = float(np.float32(rng.uniform(0.6, 0.9) if loud else rng.uniform(0.2, 0.4)))
        attack_seconds, offset, fade = rng.uniform(0.003, 0.015), rng.uniform(0.0, 0.1), \
            rng.uniform(0.5, 1.0)
        spacing = self.length / beats
        onsets = tuple(int(round(offset * self.length + j * spacing)) for j in range(beats))
        ends = onsets[1:] + (self.length,)
        span = min(e - o for o, e in zip(onsets, ends))
        attack = max(1, min(int(round(attack_seconds * self.sample_rate)), span // 4))
        cls = self.CLASSES[label]
        pitches = () if cls.kind == "hit" else (
            (cls.midi,) if cls.kind == "note" else tuple(cls.midi + i for i in _MAJOR_TRIAD))
        attributes = {
            "label": label, "class_name": self.CLASS_NAMES[label], "kind": cls.kind,
            "timbre": cls.timbre, "midi": cls.midi, "pitches": pitches, "beats": beats,
            "loudness": "loud" if loud else "soft", "peak": peak,
            "detune_cents": detune if cls.kind != "hit" else 0.0, "onsets": onsets,
            "span": span, "attack": attack, "tau": fade * (span - attack) / _FADE,
        }
        return attributes, rng

    def attributes(self, index: int) -> dict:
        """Ground truth of record ``index``: kind, timbre, midi, pitches, beats, loudness, peak.

        ``midi`` is the root MIDI note (None for hits) and ``pitches`` every MIDI note sounding
        (() for hits), before ``detune_cents``; ``onsets`` are the sample indices where the
        events start, each lasting at most ``span`` samples (``attack`` of them rising, then
        decaying with time constant ``tau`` samples). ``peak`` is the clip's largest magnitude.
        """
        return {k: v for k, v in self._draw(index)[0].items()}

    def _event(self, a: dict, rng) -> np.ndarray:
        """One event of the record: ``span`` samples of its note, chord or hit, enveloped."""
        n, sr, tau = a["span"], self.sample_rate, a["tau"]
        if a["kind"] == "hit":
            return self._hit(a, rng)
        out = np.zeros(n)
        for midi in a["pitches"]:
            freq = 440.0 * 2.0 ** ((midi - 69 + a["detune_cents"] / 100.0) / 12.0)
            amps = _timbre_amplitudes(a["timbre"], freq, sr)
            phases = rng.uniform(0.0, 2.0 * np.pi, len(amps))
            # A pluck's harmonic k decays at 1/tau + k/(3 tau): the higher, the faster.
            decay = sr / (3.0 * tau) if a["timbre"] == "pluck" else 0.0
            out += _harmonics(freq, amps, phases, n, sr, decay)
        return out * _envelope(n, a["attack"], tau)

    def _hit(self, a: dict, rng) -> np.ndarray:
        """A kick, snare or hat of ``span`` samples; each decays faster than the record's tau."""
        n, sr, tau, attack = a["span"], self.sample_rate, a["tau"], a["attack"]
        t = np.arange(n) / sr
        if a["timbre"] == "kick":
            start, end, sweep = rng.uniform(130.0, 170.0), rng.uniform(45.0, 55.0), 0.04
            phase = rng.uniform(0.0, 2.0 * np.pi) + 2.0 * np.pi * (
                end * t + (start - end) * sweep * (1.0 - np.exp(-t / sweep)))
            return np.sin(phase) * _envelope(n, attack, min(tau, 0.12 * sr))
        noise = rng.standard_normal(n + 1)
        if a["timbre"] == "snare":
            noise = 0.5 * (noise[1:] + noise[:-1])  # a light low-pass
            tone = np.sin(2.0 * np.pi * rng.uniform(180.0, 200.0) * t + rng.uniform(0, 2 * np.pi))
            return (0.6 * noise * _envelope(n, attack, min(tau, 0.05 * sr))
                    + tone * _envelope(n, attack, min(tau, 0.08 * sr)))
        hat = np.diff(noise)  # first difference: a high-pass
        return hat * _envelope(n, min(attack, int(0.003 * sr) + 1), min(tau, 0.02 * sr))

    def __getitem__(self, index):
        a, rng = self._draw(index)
        event = self._event(a, rng)
        clip = np.zeros(self.length)
        for onset in a["onsets"]:
            part = event[:self.length - onset]
            clip[onset:onset + len(part)] += part
        loudest = int(np.argmax(np.abs(clip)))
        audio = (clip * (a["peak"] / abs(clip[loudest]))).astype(np.float32)
        audio[loudest] = np.float32(math.copysign(a["peak"], clip[loudest]))  # exactly the peak
        record = {"audio": audio[:, None], "label": np.int32(a["label"])}
        if self.captions:
            record["caption"] = (f"a {a['loudness']} {a['class_name']}, "
                                 f"{_NUMBER_WORDS[a['beats']]}")
        return record

    def __repr__(self):
        return (f"Tones(size={self.size}, sample_rate={self.sample_rate}, length={self.length}, "
                f"seed={self.seed}, captions={self.captions})")


# ---------------------------------------------------------------------------------------------
# Files.

def _header(soundfile, full_path: str):
    """``(info, None)`` from the file's header, or ``(None, why it cannot be read)``."""
    try:
        info = soundfile.info(full_path)
    except Exception as err:  # libsndfile's errors, OSError, or a foreign format
        return None, f"{type(err).__name__}: {str(err).strip()}"
    if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        return None, f"holds no samples ({info.frames} frames at {info.samplerate} Hz)"
    return info, None


def _resampled_length(frames: int, file_rate: int, sample_rate: int) -> int:
    """How many samples ``frames`` at ``file_rate`` become at ``sample_rate`` (resample_poly)."""
    g = math.gcd(int(file_rate), int(sample_rate))
    up, down = sample_rate // g, file_rate // g
    return -(-frames * up // down)


def _channel_problem(file_channels: int, channels: int) -> Optional[str]:
    if file_channels == channels or channels == 1 or file_channels == 1:
        return None  # as it is, mixed down by the mean, or a mono file copied to every channel
    return (f"has {file_channels} channels, which cannot become {channels}: set channels=1 to "
            f"mix every file down to mono, or convert the file to {channels} channels")


def _too_short(full_path: str, frames: int, file_rate: int, sample_rate: int,
               length: int) -> str:
    seconds = frames / file_rate
    return (f"{full_path} lasts {seconds:.3f} s ({frames} samples at {file_rate} Hz), shorter "
            f"than a clip of {length} samples at {sample_rate} Hz ({length / sample_rate:.3f} "
            "s): lower config.data.clip_length or use longer clips")


def _decode(full_path: str, frames: int, file_rate: int, sample_rate: int, length: int,
            channels: int) -> np.ndarray:
    """The centre ``length`` samples of the file at ``sample_rate``: float32 [length, channels].

    Only the part of the file that the centre needs is decoded: from a multiple of the
    resampling's ``down`` factor (so the polyphase filter meets the same input samples as it
    would in the whole file) to past the centre's end by the filter's half-length, which gives
    the samples that resampling the whole file would give.
    """
    from scipy.signal import resample_poly

    soundfile = import_soundfile("reading audio files")
    g = math.gcd(file_rate, sample_rate)
    up, down = sample_rate // g, file_rate // g
    total = _resampled_length(frames, file_rate, sample_rate)
    if total < length:
        raise DataError(_too_short(full_path, frames, file_rate, sample_rate, length))
    first = (total - length) // 2  # of the resampled clip
    margin = 0 if up == down else 10 * max(up, down) // up + 2  # resample_poly's half-length
    start = max(0, (first * down // up - margin) // down * down)
    stop = min(frames, -(-(first + length) * down // up) + margin)
    try:
        data = soundfile.read(full_path, start=start, stop=stop, dtype="float32",
                              always_2d=True)[0]
    except Exception as err:  # libsndfile raises several types for a damaged stream
        raise DataError(f"cannot decode the audio file {full_path} ({type(err).__name__}: "
                        f"{str(err).strip()}); its header reads, so it is damaged past it: "
                        "repair or delete this file") from err
    if data.shape[0] != stop - start:
        raise DataError(f"the audio file {full_path} ends early: its header declares {frames} "
                        f"samples, but samples {start} .. {stop} gave {data.shape[0]}; it is "
                        "truncated, so re-export or delete it")
    if channels == 1 and data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)
    if up != down:
        data = resample_poly(data.astype(np.float64), up, down, axis=0)
    offset = first - start * up // down
    clip = np.clip(data[offset:offset + length], -1.0, 1.0).astype(np.float32)
    if clip.shape[1] != channels:
        clip = np.repeat(clip, channels, axis=1)
    return np.ascontiguousarray(clip)


def read_audio(path: str, sample_rate: int, length: int, channels: int = 1) -> np.ndarray:
    """The centre ``length`` samples of an audio file at ``sample_rate``: float32 [length, ch].

    The file is decoded with soundfile, mixed down by the mean when ``channels`` is 1 (a mono
    file is copied to every channel; other channel counts that differ raise), resampled with
    ``scipy.signal.resample_poly`` (up and down by the rates over their gcd) and clipped to
    [-1, 1]. Raises :class:`DataError` for a file that is missing, unreadable, damaged, shorter
    than ``length`` samples at ``sample_rate``, or of channels that do not fit.
    """
    soundfile = import_soundfile("reading audio files")
    sample_rate = _whole(sample_rate, "the sample rate (Hz)", 1)
    length = _whole(length, "the clip length (samples)", 1)
    channels = _whole(channels, "the number of channels", 1)
    if not os.path.isfile(path):
        raise DataError(f"the audio file {path} does not exist (or is not a file)")
    info, problem = _header(soundfile, path)
    if problem:
        raise DataError(f"cannot read the audio file {path} ({problem}): it is damaged, or not "
                        "audio although its name ends like it; repair or delete it")
    mismatch = _channel_problem(int(info.channels), channels)
    if mismatch:
        raise DataError(f"the audio file {path} {mismatch}")
    return _decode(path, int(info.frames), int(info.samplerate), sample_rate, length, channels)


class AudioFolder:
    """The audio files under a folder as clips of ``length`` samples at ``sample_rate``.

    Records are ``{"audio": float32 [length, channels]}`` in [-1, 1], read by :func:`read_audio`
    (the centre of each file). Building the source reads only the files' headers: unreadable
    files, and clips shorter than ``length`` samples at ``sample_rate``, are left out, each group
    with one line to ``log`` (``print`` when None). A file damaged past its header raises
    :class:`DataError` naming it when its record is read. There are no labels.
    """

    # libsndfile decodes and scipy resamples mostly outside the interpreter lock, so reader
    # threads overlap the decoding of several files.
    read_threads = 8
    num_classes = None
    has_captions = False

    def __init__(self, path: str, sample_rate: int, length: int, channels: int = 1,
                 log: Optional[Callable[[str], None]] = None):
        self.sample_rate = _whole(sample_rate, "AudioFolder sample_rate (Hz)", 1)
        self.length = _whole(length, "AudioFolder length (samples per clip)", 1)
        self.channels = _whole(channels, "AudioFolder channels", 1)
        self.path = path
        log = print if log is None else log
        if not os.path.exists(path):
            raise DataError(f"the audio folder {path} does not exist: set the path of a folder "
                            f"of {'/'.join(e[1:] for e in AUDIO_EXTENSIONS)} files")
        if not os.path.isdir(path):
            raise DataError(f"{path} is a file, not a folder: give the folder that holds the "
                            "audio files")
        names = _scan(path, AUDIO_EXTENSIONS)
        if not names:
            raise DataError(f"the folder {path} holds no audio files (searched with its "
                            f"subfolders for {', '.join(AUDIO_EXTENSIONS)}, any letter case, "
                            "hidden files left out): put the training clips there")
        self._files, self._headers = self._usable(names, log)

    def _usable(self, names: list, log: Callable) -> tuple:
        """``(names, [(frames, rate)])`` of the files that give a clip; the others are logged."""
        soundfile = import_soundfile("AudioFolder")
        unreadable, short, wrong, usable, headers = [], [], [], [], []
        for name in names:
            info, problem = _header(soundfile, os.path.join(self.path, name))
            if problem:
                unreadable.append(f"{name} ({problem})")
            elif _channel_problem(int(info.channels), self.channels):
                wrong.append(f"{name} ({info.channels} channels)")
            elif _resampled_length(int(info.frames), int(info.samplerate),
                                   self.sample_rate) < self.length:
                short.append(f"{name} ({info.frames / info.samplerate:.3f} s)")
            else:
                usable.append(name)
                headers.append((int(info.frames), int(info.samplerate)))
        if wrong:
            raise DataError(
                f"{len(wrong)} audio files in {self.path} have more than one channel but not "
                f"{self.channels}, the channels asked for: {_some(wrong, 3)}; set channels=1 to "
                f"mix every file down to mono, or convert them to {self.channels} channels")
        clip = (f"{self.length} samples at {self.sample_rate} Hz "
                f"({self.length / self.sample_rate:.3f} s)")
        fix_short = "lower config.data.clip_length, or use longer clips"
        if not usable:
            why = []
            if unreadable:
                why.append(f"{len(unreadable)} are not readable audio (damaged, or not audio "
                           f"although their names end like it): {_some(unreadable, 3)}")
            if short:
                why.append(f"{len(short)} are shorter than a clip of {clip}: {_some(short, 3)}; "
                           f"{fix_short}")
            raise DataError(f"none of the {len(names)} audio files in {self.path} can be read "
                            f"as a clip: " + "; and ".join(why))
        if unreadable:
            log(f"AudioFolder: skipped {len(unreadable)} of {len(names)} files in {self.path} "
                f"that are not readable audio: {_some(unreadable, 3)}")
        if short:
            log(f"AudioFolder: skipped {len(short)} of {len(names)} files in {self.path} "
                f"shorter than a clip of {clip}: {_some(short, 3)}; {fix_short} to train on "
                "them")
        return usable, headers

    def __len__(self):
        return len(self._files)

    def file(self, index: int) -> str:
        """The path of record ``index``'s audio file."""
        return os.path.join(self.path, self._files[index])

    def __getitem__(self, index):
        index = int(index)
        frames, file_rate = self._headers[index]
        audio = _decode(self.file(index), frames, file_rate, self.sample_rate, self.length,
                        self.channels)
        return {"audio": audio}

    def __repr__(self):
        return (f"AudioFolder(path={self.path!r}, sample_rate={self.sample_rate}, "
                f"length={self.length}, channels={self.channels}, num_files={len(self)})")
