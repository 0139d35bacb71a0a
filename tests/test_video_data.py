"""Video data: procedural moving shapes, a folder of clips, and writing GIF/MP4 files and grids."""

import time

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data.captions import COLOURS, PALETTE, SHAPES
from diffusion_jax.data.sources import DataError
from diffusion_jax.data.video import MOTIONS, MovingShapes, VideoFolder, read_video
from diffusion_jax.video import frame_grid, write_gif, write_mp4

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("imageio_ffmpeg")

SOURCE = MovingShapes(size=1000, frames=16, resolution=32, seed=3, captions=True)
# Enough records for every motion several times (each is drawn with probability 1/6).
SCANNED = 240


@pytest.fixture(scope="module")
def by_motion():
    """Record indices of SOURCE, grouped by motion."""
    found = {motion: [] for motion in MOTIONS}
    for i in range(SCANNED):
        found[MOTIONS[int(SOURCE[i]["label"])]].append(i)
    assert all(len(found[m]) >= 10 for m in MOTIONS), {m: len(v) for m, v in found.items()}
    return found


# --- MovingShapes -------------------------------------------------------------------------------

def test_records_are_deterministic_clips_of_the_stated_shape_and_type():
    again = MovingShapes(size=1000, frames=16, resolution=32, seed=3, captions=True)
    other_seed = MovingShapes(size=1000, frames=16, resolution=32, seed=4)
    for i in (0, 1, 17, 999, -1):
        record = SOURCE[i]
        assert set(record) == {"video", "label", "caption"}
        assert record["video"].shape == (16, 32, 32, 3) and record["video"].dtype == np.uint8
        assert record["label"].dtype == np.int32 and 0 <= record["label"] < len(MOTIONS)
        np.testing.assert_array_equal(record["video"], again[i]["video"])
        assert record["caption"] == again[i]["caption"] and record["label"] == again[i]["label"]
    assert any(not np.array_equal(SOURCE[i]["video"], other_seed[i]["video"]) for i in range(4))
    assert set(other_seed[0]) == {"video", "label"}  # no caption unless asked
    small = MovingShapes(size=5, frames=5, resolution=16)
    assert small[4]["video"].shape == (5, 16, 16, 3) and len(small) == 5
    with pytest.raises(IndexError):
        small[5]
    assert (SOURCE.num_classes, len(SOURCE)) == (len(MOTIONS), 1000)
    assert repr(SOURCE) == ("MovingShapes(size=1000, frames=16, resolution=32, seed=3, "
                            "captions=True)")
    with pytest.raises(DataError, match="at least 3 frames"):
        MovingShapes(frames=2)
    with pytest.raises(DataError, match="resolution"):
        MovingShapes(resolution=8)


def test_each_motion_moves_the_centre_as_its_name_says(by_motion):
    for motion, indices in by_motion.items():
        for i in indices:
            g = SOURCE.geometry(i)
            assert g["motion"] == motion and MOTIONS[int(SOURCE[i]["label"])] == motion
            assert g["centre"].shape == (16, 2) and g["centre"].dtype == np.float32
            assert g["colour"].shape == (16,) and g["colour"].dtype == np.int32
            dy, dx = np.diff(g["centre"][:, 0]), np.diff(g["centre"][:, 1])
            changes = np.flatnonzero(np.diff(g["colour"]))
            if motion != "colour":
                assert changes.size == 0, (i, g["colour"])
            travel = 0.1  # at least a tenth of the frame over the clip (far more in practice)
            if motion in ("right", "left"):
                assert np.all(dy == 0) and np.all(dx > 0 if motion == "right" else dx < 0), i
                assert abs(g["centre"][-1, 1] - g["centre"][0, 1]) > travel
            elif motion in ("up", "down"):  # y grows downwards
                assert np.all(dx == 0) and np.all(dy < 0 if motion == "up" else dy > 0), i
                assert abs(g["centre"][-1, 0] - g["centre"][0, 0]) > travel
            elif motion == "bounce":
                signs = np.sign(dx[np.abs(dx) > 1e-6])
                assert np.all(dy == 0) and np.any(signs[1:] != signs[:-1]), (i, dx)
                # faster than a straight motion: more path than the straightest could travel
                assert np.abs(dx).sum() > 0.5
            else:
                assert np.all(dx == 0) and np.all(dy == 0), i
                assert changes.size == 1, (i, g["colour"])
                assert 16 / 3 <= changes[0] + 1 <= 2 * 16 / 3, (i, changes)  # middle third
                assert g["colour"][0] != g["colour"][-1]
            assert np.all(g["colour"] != g["background"]), i


def test_the_object_stays_wholly_inside_the_frame():
    for i in range(SCANNED):
        mask = SOURCE.geometry(i)["mask"]
        assert mask.shape == (16, 32, 32) and mask.dtype == bool
        areas = mask.sum(axis=(1, 2))
        # A background pixel all around: nothing touches the edge, so nothing is cut off.
        edges = mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or \
            mask[:, :, -1].any()
        assert not edges and areas.min() > 0, i
        assert areas.max() <= 1.35 * areas.min(), (i, areas)  # a whole object in every frame


def test_rendered_pixels_agree_with_the_geometry():
    for i in range(60):
        video, g = SOURCE[i]["video"], SOURCE.geometry(i)
        for t in range(16):
            colour, background = PALETTE[g["colour"][t]], PALETTE[g["background"]]
            painted = np.all(video[t] == colour, axis=-1)
            np.testing.assert_array_equal(painted, g["mask"][t])
            assert np.all(video[t][~g["mask"][t]] == background)
            rows, columns = np.nonzero(painted)
            centroid = np.array([rows.mean(), columns.mean()]) + 0.5  # pixel centres
            assert np.all(np.abs(centroid - g["centre"][t] * 32) < 1.0), (i, t)


def test_captions_name_the_colour_shape_motion_and_background(by_motion):
    words = {"right": "moving to the right", "left": "moving to the left", "up": "moving up",
             "down": "moving down", "bounce": "bouncing left and right"}
    for motion, indices in by_motion.items():
        for i in indices[:5]:
            g, caption = SOURCE.geometry(i), SOURCE[i]["caption"]
            first, last = COLOURS[g["colour"][0]], COLOURS[g["colour"][-1]]
            phrase = words.get(motion, f"changing from {first} to {last}")
            assert caption == (f"a {first} {SHAPES[g['shape']]} {phrase} on a "
                               f"{COLOURS[g['background']]} background"), (i, caption)
    assert SOURCE[by_motion["bounce"][0]]["caption"].split()[3] == "bouncing"


def test_a_clip_renders_quickly():
    start = time.perf_counter()
    for i in range(100):
        SOURCE[i]
    assert (time.perf_counter() - start) / 100 < 5e-3


# --- Writing clips ------------------------------------------------------------------------------

def test_write_gif_keeps_every_frame_and_palette_colours(tmp_path, by_motion):
    still = SOURCE[by_motion["colour"][0]]["video"]  # many repeated frames
    moving = SOURCE[by_motion["right"][0]]["video"]
    for name, clip in (("still.gif", still), ("moving.gif", moving)):
        write_gif(str(tmp_path / name), clip, fps=10)
        back = iio.imread(tmp_path / name, index=None, plugin="pillow", mode="RGB")
        assert back.shape == clip.shape
        np.testing.assert_array_equal(back, clip)
        with Image.open(tmp_path / name) as image:
            assert image.info["loop"] == 0 and image.info["duration"] == 100
    floats = moving.astype(np.float32) / 127.5 - 1.0  # the model's range
    write_gif(str(tmp_path / "floats.gif"), floats)
    back = iio.imread(tmp_path / "floats.gif", index=None, plugin="pillow", mode="RGB")
    assert np.abs(back.astype(int) - moving).max() <= 1
    noise = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    write_gif(str(tmp_path / "noise.gif"), noise)  # over 256 colours: quantised
    back = iio.imread(tmp_path / "noise.gif", index=None, plugin="pillow", mode="RGB")
    assert back.shape == noise.shape and np.abs(back.astype(int) - noise).mean() < 30
    with pytest.raises(ValueError, match="frames, height, width"):
        write_gif(str(tmp_path / "image.gif"), moving[0])  # one image, not a clip
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "floats.gif", "moving.gif", "noise.gif", "still.gif"]  # no temporary file left


def test_write_mp4_upscales_to_even_sides_and_keeps_flat_colours(tmp_path):
    clip = SOURCE[0]["video"]
    write_mp4(str(tmp_path / "clip.mp4"), clip)
    back = iio.imread(tmp_path / "clip.mp4", index=None, plugin="FFMPEG")
    assert back.shape == (16, 64, 64, 3)  # 32 px upscaled twice
    mask = SOURCE.geometry(0)["mask"]
    inner = ~(mask | np.roll(mask, 1, 1) | np.roll(mask, -1, 1) | np.roll(mask, 1, 2)
              | np.roll(mask, -1, 2))  # background away from the object's edges
    background = back[:, ::2, ::2][inner].astype(int)
    assert np.abs(background - clip[inner]).max() <= 10
    odd = np.full((3, 21, 28, 3), 128, np.uint8)  # 21 * 4 = 84 (even), 28 * 4 = 112
    write_mp4(str(tmp_path / "odd.mp4"), odd.astype(np.float32) / 127.5 - 1.0)
    back = iio.imread(tmp_path / "odd.mp4", index=None, plugin="FFMPEG")
    assert back.shape == (3, 84, 112, 3) and np.abs(back.astype(int) - 128).max() <= 4


def test_frame_grid_lays_out_a_row_per_clip_and_a_column_per_frame():
    videos = np.stack([SOURCE[i]["video"] for i in range(3)])
    grid = frame_grid(videos)
    assert grid.shape == (3 * 32 + 2 * 2, 16 * 32 + 15 * 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[34:66, 68:100], videos[1, 2])
    assert np.all(grid[32:34] == 255) and np.all(grid[:, 32:34] == 255)  # the gaps
    few = frame_grid(videos, max_frames=4)
    assert few.shape == (100, 4 * 32 + 3 * 2, 3)
    np.testing.assert_array_equal(few[:32, -32:], videos[0, -1])  # ends on the last frame
    grey = frame_grid(np.zeros((2, 5, 8, 8, 1), np.float32))
    assert grey.shape == (18, 48) and grey[0, 0] == 128


# --- VideoFolder --------------------------------------------------------------------------------

def _solid_clip(values, height, width):
    """A clip whose frame t is one flat grey ``values[t]`` (a different grey each frame)."""
    values = np.asarray(values, np.uint8)
    return np.broadcast_to(values[:, None, None, None], (len(values), height, width, 3)).copy()


GREYS = np.arange(12) * 20 + 10  # frame t of every test clip is this flat grey


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """An MP4, a GIF, a folder of PNG frames, a short clip, a garbage .mp4 and hidden files."""
    folder = tmp_path_factory.mktemp("clips")
    write_mp4(str(folder / "b_clip.mp4"), _solid_clip(GREYS, 40, 48))  # written at 80x96
    write_gif(str(folder / "sub" / "a_anim.GIF"), _solid_clip(GREYS[:9], 24, 20))
    frames = folder / "c_frames"
    frames.mkdir()
    for t in range(10):  # 1.png ... 10.png: frames in the numbers' order, not the names'
        Image.fromarray(_solid_clip(GREYS[t:t + 1], 18, 18)[0]).save(frames / f"{t + 1}.png")
    (frames / ".DS_Store").write_bytes(b"\0")  # hidden: still a folder of frames
    write_gif(str(folder / "d_short.gif"), _solid_clip(GREYS[:3], 16, 16))
    (folder / "e_bad.mp4").write_bytes(b"not a video at all" * 50)
    write_gif(str(folder / ".hidden.gif"), _solid_clip(GREYS, 16, 16))
    (folder / ".cache").mkdir()
    write_gif(str(folder / ".cache" / "x.gif"), _solid_clip(GREYS, 16, 16))
    (folder / "notes.txt").write_text("not a clip")
    return folder


def test_video_folder_reads_every_kind_of_clip_and_leaves_out_bad_ones(clip_folder):
    notes = []
    source = VideoFolder(str(clip_folder), frames=4, resolution=16, stride=2, log=notes.append)
    assert len(source) == 3 and source.num_classes is None
    names = [source.file(i)[len(str(clip_folder)) + 1:] for i in range(3)]
    assert names == ["b_clip.mp4", "c_frames", "sub/a_anim.GIF"]  # sorted relative paths
    assert len(notes) == 2, notes
    unreadable = next(n for n in notes if "e_bad.mp4" in n)
    assert "skipped 1 of 5 clips" in unreadable
    short = next(n for n in notes if "d_short.gif" in n)
    assert "left out 1 of 5" in short and "(3 frames)" in short
    assert "config.data.frames" in short and "frame_stride" in short
    for i in range(3):
        video = source[i]["video"]
        assert video.shape == (4, 16, 16, 3) and video.dtype == np.uint8
        # frames 0, 2, 4, 6 of the clip (stride 2), each its flat grey
        expected = np.broadcast_to(GREYS[0:7:2, None, None, None], video.shape)
        tolerance = 6 if names[i].endswith(".mp4") else 0
        assert np.abs(video.astype(int) - expected).max() <= tolerance, (names[i], video[:, 0, 0])
    assert "stride=2" in repr(source) and "num_clips=3" in repr(source)


def test_read_video_takes_every_stride_th_frame(clip_folder):
    every = read_video(str(clip_folder / "c_frames"), 10, 8)
    second = read_video(str(clip_folder / "c_frames"), 5, 8, stride=2)
    assert every.shape == (10, 8, 8, 3) and second.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(second, every[::2])
    gif = read_video(str(clip_folder / "sub" / "a_anim.GIF"), 3, 12, stride=3)
    np.testing.assert_array_equal(gif[:, 5, 5, 0], GREYS[[0, 3, 6]])
    with pytest.raises(DataError, match="ends early"):
        read_video(str(clip_folder / "d_short.gif"), 3, 8, stride=2)


def test_a_folder_without_usable_clips_says_why(tmp_path, clip_folder):
    with pytest.raises(DataError, match="does not exist"):
        VideoFolder(str(tmp_path / "missing"), 4, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no clips"):
        VideoFolder(str(tmp_path / "empty"), 4, 16)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"garbage" * 100)
    (bad / "y.gif").write_bytes(b"GIF89a garbage")
    with pytest.raises(DataError, match=r"none of the 2 clips.*2 cannot be read.*x\.mp4"):
        VideoFolder(str(bad), 4, 16, log=lambda message: None)
    with pytest.raises(DataError, match=r"longest has 12.*config\.data\.frames"):
        VideoFolder(str(clip_folder), 13, 16, log=lambda message: None)


def test_a_truncated_mp4_raises_naming_the_file(tmp_path):
    write_mp4(str(tmp_path / "whole.mp4"), _solid_clip(GREYS, 32, 32))
    data = (tmp_path / "whole.mp4").read_bytes()
    for fraction in (0.5, 0.9):  # inside the stream's data; near its end
        cut = tmp_path / f"cut_{fraction}.mp4"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(DataError, match=f"cut_{fraction}.mp4"):
            read_video(str(cut), 12, 16)
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / "0.png")
    (frames / "1.png").write_bytes(data[:100])  # not a PNG
    with pytest.raises(DataError, match="1.png"):
        read_video(str(frames), 2, 8)
