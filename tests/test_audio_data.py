"""Audio: the procedural Tones source, the AudioFolder reader, and the signal utilities.

Numbers are checked against closed forms: the frequency of a synthesised sine, the 1/k odd
harmonics of a square wave, 16-bit quantisation, the resampled length of a clip.
"""

import math
import os
import pickle

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from diffusion_jax import audio
from diffusion_jax.data.audio import AudioFolder, Tones, read_audio
from diffusion_jax.data.sources import DataError


def _cents(estimate, truth):
    return 1200.0 * math.log2(estimate / truth)


def _tone(kind, freq, sample_rate, length, seed=0):
    """A test tone of our own: sine, band-limited square (odd 1/k) or pluck (all 1/k, decaying)."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / sample_rate
    x = np.zeros(length)
    for k in range(1, int(math.ceil(sample_rate / 2 / freq))):
        if (kind == "sine" and k > 1) or (kind == "square" and k % 2 == 0):
            continue
        decay = np.exp(-t * (2.0 + 1.5 * k)) if kind == "pluck" else 1.0
        x += np.sin(2 * np.pi * k * freq * t + rng.uniform(0, 2 * np.pi)) * decay / k
    return 0.5 * x / np.abs(x).max()


def _records_by(source, want, count, limit=3000):
    """Indices of the first ``count`` records for which ``want(attributes)`` gives each key."""
    found = {}
    for i in range(limit):
        key = want(source.attributes(i))
        if key is not None and len(found.setdefault(key, [])) < count:
            found[key].append(i)
    return found


# --- pitch and names ---------------------------------------------------------------------------

def test_midi_and_note_names():
    assert audio.midi_to_hz(audio.MIDI_A4) == 440.0
    assert audio.midi_to_hz(60) == pytest.approx(440.0 * 2 ** (-9 / 12))
    assert audio.midi_to_hz(81) == pytest.approx(880.0)
    assert audio.hz_to_midi(880.0) == pytest.approx(81.0)
    assert audio.hz_to_midi(audio.midi_to_hz(64.37)) == pytest.approx(64.37)
    np.testing.assert_allclose(audio.hz_to_midi(audio.midi_to_hz(np.arange(20, 100))),
                               np.arange(20, 100))
    assert [audio.note_name(m) for m in (60, 61, 64, 69, 70, 72, 21, 59.6)] == [
        "C4", "C#4", "E4", "A4", "A#4", "C5", "A0", "C4"]
    with pytest.raises(ValueError, match="above 0 Hz"):
        audio.hz_to_midi(0.0)


@pytest.mark.parametrize("sample_rate,freq", [(8000, 440.0), (8000, 97.3), (16000, 1234.5),
                                               (16000, 180.0)])
def test_estimate_pitch_of_a_pure_sine_within_5_cents(sample_rate, freq):
    t = np.arange(4096) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t + 0.7)
    assert abs(_cents(audio.estimate_pitch(wave, sample_rate), freq)) < 5.0
    stereo = np.stack([wave, 0.5 * wave], axis=1)  # channels are averaged
    assert abs(_cents(audio.estimate_pitch(stereo, sample_rate), freq)) < 5.0


def test_estimate_pitch_of_silence_is_zero():
    assert audio.estimate_pitch(np.zeros(4096), 8000) == 0.0
    assert audio.estimate_pitch(np.full((4096, 2), 5e-5), 8000) == 0.0


def test_estimate_pitch_finds_the_fundamental_not_an_octave():
    """Sine, square and pluck tones, MIDI 55 .. 84, at 8 and 16 kHz, clips of 4096 and 16384."""
    worst = 0.0
    for sample_rate in (8000, 16000):
        for length in (4096, 16384):
            for kind in ("sine", "square", "pluck"):
                step = 1 if length == 4096 else 5  # every note on short clips, some on long
                for midi in range(55 + (kind == "square"), 85, step):
                    freq = audio.midi_to_hz(midi + 0.13)
                    wave = _tone(kind, freq, sample_rate, length, seed=midi)
                    error = _cents(audio.estimate_pitch(wave, sample_rate), freq)
                    assert abs(error) < 20, (sample_rate, length, kind, midi, error)
                    worst = max(worst, abs(error))
    assert worst < 5.0


def test_estimate_pitches_of_a_batch():
    waves = np.stack([_tone("square", f, 8000, 4096)[:, None] for f in (200.0, 300.0, 450.0)])
    pitches = audio.estimate_pitches(waves, 8000)
    assert pitches.shape == (3,)
    np.testing.assert_allclose(pitches, [200.0, 300.0, 450.0], rtol=3e-3)


# --- spectrograms ------------------------------------------------------------------------------

@pytest.mark.parametrize("sample_rate,freq", [(8000, 1000.0), (8000, 1234.5), (16000, 330.0)])
def test_spectrogram_of_a_sine_peaks_at_its_frequency(sample_rate, freq):
    n_fft = audio.default_n_fft(sample_rate)
    assert n_fft == {8000: 256, 16000: 512}[sample_rate]
    wave = np.sin(2 * np.pi * freq * np.arange(4000) / sample_rate)
    db = audio.spectrogram(wave, sample_rate)
    assert db.dtype == np.float32
    assert db.shape == (1 + 4000 // (n_fft // 4), n_fft // 2 + 1)
    inner = db[4:-4]  # frames that lie wholly inside the clip
    bins = np.argmax(inner, axis=1)
    assert np.all(bins == round(freq * n_fft / sample_rate))
    if (freq * n_fft / sample_rate).is_integer():  # on a bin: a full-scale sine reads 0 dB
        np.testing.assert_allclose(inner.max(axis=1), 0.0, atol=0.01)
    assert db.min() == pytest.approx(db.max() - 80.0)


def test_spectrogram_image_and_grid():
    assert np.array_equal(audio.colour_map([0.0, 1.0]), [[0, 0, 0], [255, 250, 190]])
    low = 0.9 * np.sin(2 * np.pi * 250.0 * np.arange(4096) / 8000)
    image = audio.spectrogram_image(low, 8000)
    assert image.dtype == np.uint8 and image.shape == (129, 1 + 4096 // 64, 3)
    brightest = np.argmax(image[:, 30].astype(int).sum(axis=1))
    assert brightest == 128 - 8  # 250 Hz is bin 8 of 129, counted from the bottom row
    assert audio.spectrogram_image(low, 8000, height=64).shape == (64, 65, 3)
    grid = audio.spectrogram_grid(np.stack([low, low, low])[..., None], 8000, columns=2)
    assert grid.shape == (2 * 129 + 2, 2 * 65 + 2, 3)
    assert np.all(grid[129:131] == 255) and np.all(grid[:, 65:67] == 255)
    assert np.array_equal(grid[:129, :65], image)
    assert np.all(grid[131:, 67:] == 255)  # no fourth clip: background


# --- WAV files ---------------------------------------------------------------------------------

def test_write_wav_round_trips_within_one_step(tmp_path):
    rng = np.random.default_rng(0)
    mono = np.concatenate([rng.uniform(-1, 1, 999), [1.0, -1.0, 1.7, -3.0]])
    stereo = np.stack([mono, -0.5 * mono], axis=1).astype(np.float32)
    for name, wave in (("mono.wav", mono), ("sub/stereo.wav", stereo)):
        path = tmp_path / name
        audio.write_wav(str(path), wave, 11025)
        back, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
        info = soundfile.info(str(path))
        assert (rate, info.subtype, info.format) == (11025, "PCM_16", "WAV")
        expected = np.clip(np.asarray(wave, np.float64).reshape(len(wave), -1), -1, 1)
        assert back.shape == expected.shape
        assert np.abs(back - expected).max() <= 1.0 / 32767
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["mono.wav",
                                                                          "stereo.wav"]
    with pytest.raises(ValueError, match="NaN"):
        audio.write_wav(str(tmp_path / "nan.wav"), np.array([0.0, np.nan]), 8000)
    assert not (tmp_path / "nan.wav").exists()


# --- Tones -------------------------------------------------------------------------------------

def test_tones_classes():
    assert len(Tones.CLASSES) == 36 == Tones(size=4).num_classes
    kinds = [c.kind for c in Tones.CLASSES]
    assert (kinds.count("note"), kinds.count("chord"), kinds.count("hit")) == (24, 9, 3)
    names = [Tones.class_name(i) for i in range(36)]
    assert len(set(names)) == 36
    assert {"square note E4", "pluck chord F major", "kick hit", "sine note C5"} <= set(names)
    assert {c.midi for c in Tones.CLASSES if c.kind == "note"} == {60, 62, 64, 65, 67, 69, 71,
                                                                   72}


def test_tones_records_are_deterministic_and_well_formed():
    source = Tones(size=40, sample_rate=8000, length=4096, seed=3)
    again = Tones(size=40, sample_rate=8000, length=4096, seed=3)
    other = Tones(size=40, sample_rate=8000, length=4096, seed=4)
    assert len(source) == 40
    assert repr(source) == ("Tones(size=40, sample_rate=8000, length=4096, seed=3, "
                            "captions=False)")
    for i in range(40):
        record = source[i]
        assert set(record) == {"audio", "label"}
        x = record["audio"]
        assert x.dtype == np.float32 and x.shape == (4096, 1)
        assert record["label"].dtype == np.int32 and 0 <= record["label"] < 36
        np.testing.assert_array_equal(x, source[i]["audio"])
        np.testing.assert_array_equal(x, again[i]["audio"])
        assert not np.array_equal(x, other[i]["audio"])
        a = source.attributes(i)
        assert a["label"] == record["label"]
        assert np.abs(x).max() == np.float32(a["peak"]) <= 1.0
        assert (0.2 <= a["peak"] <= 0.4) if a["loudness"] == "soft" else (0.6 <= a["peak"] <= 0.9)
        assert a["beats"] == len(a["onsets"]) and 1 <= a["beats"] <= 3
        assert a["onsets"][0] <= 0.1 * 4096 + 1
        assert np.all(x[:a["onsets"][0]] == 0)  # silence before the first onset
        for onset in a["onsets"]:  # every event sounds
            assert np.abs(x[onset:onset + a["span"]]).max() > 0.1 * a["peak"]
    with pytest.raises(IndexError):
        source[40]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[7]["audio"],
                                  source[7]["audio"])


def test_tones_captions_and_hits():
    source = Tones(size=200, sample_rate=8000, length=2048, seed=0, captions=True)
    assert "captions=True" in repr(source)
    words = {1: "one beat", 2: "two beats", 3: "three beats"}
    hits = 0
    for i in range(200):
        a, record = source.attributes(i), source[i]
        assert record["caption"] == f"a {a['loudness']} {a['class_name']}, {words[a['beats']]}"
        if a["kind"] == "hit":
            hits += 1
            assert a["midi"] is None and a["pitches"] == ()
            assert record["caption"].split(",")[0].endswith(" hit")
        elif a["kind"] == "chord":
            assert a["pitches"] == (a["midi"], a["midi"] + 4, a["midi"] + 7)
        else:
            assert a["pitches"] == (a["midi"],)
    assert hits > 0


def test_each_note_class_pitch_is_recovered():
    """Three records of each of the 24 note classes: the nearest MIDI note is the class's."""
    source = Tones(size=100_000, sample_rate=8000, length=4096, seed=1)
    found = _records_by(source, lambda a: a["label"] if a["kind"] == "note" else None, 3)
    assert len(found) == 24 and all(len(v) == 3 for v in found.values())
    worst = 0.0
    for indices in found.values():
        for i in indices:
            a = source.attributes(i)
            estimate = audio.estimate_pitch(source[i]["audio"], 8000)
            assert round(audio.hz_to_midi(estimate)) == a["midi"], (i, a, estimate)
            truth = audio.midi_to_hz(a["midi"] + a["detune_cents"] / 100.0)
            worst = max(worst, abs(_cents(estimate, truth)))
    assert worst < 10.0


def test_tones_square_notes_hold_odd_harmonics_below_nyquist_only():
    sample_rate, length = 8000, 16384
    source = Tones(size=100_000, sample_rate=sample_rate, length=length, seed=2)
    found = _records_by(source, lambda a: a["midi"] if a["timbre"] == "square" and a["kind"]
                        == "note" and a["beats"] == 1 else None, 1, limit=600)
    assert {60, 72} <= set(found)  # C4 has 15 harmonics below 4 kHz, C5 seven
    for midi in (60, 72):
        a = source.attributes(found[midi][0])
        x = source[found[midi][0]]["audio"][:, 0].astype(np.float64)
        freq = audio.midi_to_hz(midi + a["detune_cents"] / 100.0)
        n_fft = 4 * length
        mag = np.abs(np.fft.rfft(x * np.hanning(length), n_fft))
        hz = np.arange(len(mag)) * sample_rate / n_fft

        def level(f):  # the spectrum's peak near f, relative to the fundamental's
            return mag[np.abs(hz - f) <= 3 * sample_rate / length].max()

        fundamental = level(freq)
        below = int(math.ceil(sample_rate / 2 / freq)) - 1  # harmonics under Nyquist
        for k in range(2, below + 1):
            if k % 2:
                assert level(k * freq) / fundamental == pytest.approx(1 / k, rel=0.02)
            else:
                assert level(k * freq) / fundamental < 1e-3
        for k in range(below + 1, below + 6):  # where harmonics above Nyquist would alias
            assert level(sample_rate - k * freq) / fundamental < 1e-2


def test_tones_rejects_bad_arguments():
    with pytest.raises(DataError, match="sample_rate"):
        Tones(sample_rate=2000)
    with pytest.raises(DataError, match="length"):
        Tones(length=10)
    with pytest.raises(DataError, match="size"):
        Tones(size=0)
    with pytest.raises(DataError, match="captions"):
        Tones(captions="yes")


# --- AudioFolder and read_audio ------------------------------------------------------------------

def _sine(freq, seconds, rate, amplitude=0.5):
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def _folder(tmp_path):
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    soundfile.write(folder / "a_tone.wav", _sine(440.0, 1.0, 22050), 22050)  # resampled
    left, right = _sine(300.0, 0.8, 8000), _sine(300.0, 0.8, 8000, amplitude=-0.1)
    soundfile.write(folder / "sub" / "stereo.flac", np.stack([left, right], axis=1), 8000)
    soundfile.write(folder / "sub" / "LOUD.WAV", _sine(200.0, 0.6, 16000), 16000)
    soundfile.write(folder / "short.wav", _sine(440.0, 0.1, 8000), 8000)
    (folder / "garbage.wav").write_bytes(os.urandom(2000))
    soundfile.write(folder / ".secret.wav", _sine(440.0, 1.0, 8000), 8000)
    soundfile.write(folder / ".hidden" / "x.wav", _sine(440.0, 1.0, 8000), 8000)
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_audio_folder_reads_resamples_and_skips(tmp_path):
    folder, lines = _folder(tmp_path), []
    source = AudioFolder(str(folder), sample_rate=8000, length=4000, log=lines.append)
    assert [os.path.relpath(source.file(i), folder) for i in range(len(source))] == [
        "a_tone.wav", os.path.join("sub", "LOUD.WAV"), os.path.join("sub", "stereo.flac")]
    assert source.num_classes is None
    assert "sample_rate=8000" in repr(source) and "length=4000" in repr(source)
    assert len(lines) == 2
    unreadable, short = lines
    assert "skipped 1 of 5" in unreadable and "garbage.wav" in unreadable
    assert "skipped 1 of 5" in short and "short.wav" in short and "clip_length" in short
    records = [source[i]["audio"] for i in range(len(source))]
    for x in records:
        assert x.dtype == np.float32 and x.shape == (4000, 1) and np.abs(x).max() <= 1.0
    assert abs(_cents(audio.estimate_pitch(records[0], 8000), 440.0)) < 5  # 22050 -> 8000 Hz
    assert abs(_cents(audio.estimate_pitch(records[1], 8000), 200.0)) < 5  # 16000 -> 8000 Hz
    # The stereo file is mixed down by the mean: (1 - 0.2) / 2 of the left channel's sine.
    stereo, _ = soundfile.read(folder / "sub" / "stereo.flac", dtype="float32")
    first = (len(stereo) - 4000) // 2
    np.testing.assert_allclose(records[2][:, 0], stereo[first:first + 4000].mean(axis=1),
                               atol=1e-6)
    copy = pickle.loads(pickle.dumps(source))  # as reader processes receive it
    np.testing.assert_array_equal(copy[1]["audio"], records[1])
    two = AudioFolder(str(folder), sample_rate=8000, length=4000, channels=2, log=lines.append)
    x = two[0]["audio"]  # a mono file, copied to both channels
    assert x.shape == (4000, 2) and np.array_equal(x[:, 0], x[:, 1])
    assert np.array_equal(two[2]["audio"][:, 0], stereo[first:first + 4000, 0])


def test_read_audio_decodes_the_centre_as_whole_file_resampling_does(tmp_path):
    rng = np.random.default_rng(0)
    wave = rng.uniform(-0.6, 0.6, (30_000, 2))
    path = str(tmp_path / "noise.wav")
    soundfile.write(path, wave, 44100, subtype="FLOAT")
    decoded = soundfile.read(path, dtype="float32")[0].mean(axis=1)
    whole = resample_poly(decoded.astype(np.float64), 160, 441)  # 44100 -> 16000 Hz
    assert len(whole) == math.ceil(30_000 * 160 / 441)
    first = (len(whole) - 2000) // 2
    got = read_audio(path, 16000, 2000)
    assert got.shape == (2000, 1)
    np.testing.assert_allclose(got[:, 0], whole[first:first + 2000], atol=1e-6)


def test_audio_folder_and_read_audio_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        AudioFolder(str(tmp_path / "nowhere"), 8000, 1000)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no audio files"):
        AudioFolder(str(empty), 8000, 1000)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.wav").write_bytes(os.urandom(500))
    (bad / "b.flac").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 are not readable audio.*a\.wav") as err:
        AudioFolder(str(bad), 8000, 1000)
    assert str(bad) in str(err.value)
    short = tmp_path / "short"
    short.mkdir()
    soundfile.write(short / "s.wav", _sine(440.0, 0.1, 8000), 8000)
    with pytest.raises(DataError, match="shorter than a clip of 1000 samples.*clip_length"):
        AudioFolder(str(short), 8000, 1000)
    with pytest.raises(DataError, match="shorter"):
        read_audio(str(short / "s.wav"), 8000, 1000)
    with pytest.raises(DataError, match="not audio"):
        read_audio(str(bad / "a.wav"), 8000, 100)
    stereo = tmp_path / "stereo"
    stereo.mkdir()
    soundfile.write(stereo / "st.wav", np.zeros((2000, 2)), 8000)
    with pytest.raises(DataError, match="2 channels.*channels=1"):
        AudioFolder(str(stereo), 8000, 1000, channels=3)
    with pytest.raises(DataError, match="channels=1"):
        read_audio(str(stereo / "st.wav"), 8000, 1000, channels=3)


def test_a_file_damaged_past_its_header_raises_when_read(tmp_path):
    path = tmp_path / "cut.flac"
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 40_000), 8000)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 4])  # the header still declares 40000 samples
    source = AudioFolder(str(tmp_path), 8000, 20_000, log=lambda line: None)
    assert len(source) == 1
    with pytest.raises(DataError, match="cut.flac"):
        source[0]
    with pytest.raises(DataError, match="cut.flac"):
        read_audio(str(path), 8000, 20_000)
