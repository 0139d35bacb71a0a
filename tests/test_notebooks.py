"""The Colab notebooks run top to bottom, headless, on tiny settings."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name, overrides):
    path = os.path.join(ROOT, "colab", name)
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # committed clean, so diffs show code, not outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1, f"{name} needs one cell tagged 'parameters'"
    parameters[0].source += "\n# test overrides\n" + "\n".join(
        f"{key} = {value!r}" for key, value in overrides.items())
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    return notebook


def _outputs(notebook):
    text, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text.append(output["text"])
            images += "image/png" in output.get("data", {})
    return "".join(text), images


@pytest.mark.slow  # a minute or more: the notebook trains and samples
def test_quickstart_notebook_runs(tmp_path):
    # Run in colab/ of this checkout, as a person running it in a clone would; the package is
    # installed already, so nothing is fetched.
    notebook = _run("quickstart.ipynb", {
        "WORKDIR": str(tmp_path / "run"), "NUM_STEPS": 4, "BATCH_SIZE": 8, "RESOLUTION": 16,
        "CHANNELS": 16, "NUM_RES_BLOCKS": 1})
    text, images = _outputs(notebook)
    assert "step 4/4" in text
    assert "finished at step 4" in text
    assert images == 4 + 3 + 4  # samplers, step counts, guidance scales
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")


@pytest.mark.slow  # a minute or more: the notebook trains and samples
def test_text_to_image_notebook_runs(tmp_path):
    # The tiny text model of tests/test_text_to_image.py: 16x16 images, a 1-block text encoder,
    # a few training steps and 2 sampling steps.
    notebook = _run("text_to_image.ipynb", {
        "WORKDIR": str(tmp_path / "run"), "PRESET": "text_shapes_cpu", "NUM_STEPS": 4,
        "BATCH_SIZE": 8, "RESOLUTION": 16, "SAMPLING_STEPS": 2,
        "CONFIG_OVERRIDES": {"model.unet.channels": 16, "model.unet.channel_mult": (1, 2),
                             "model.unet.attention_resolutions": (8,), "text.width": 32,
                             "text.depth": 1, "text.num_heads": 2}})
    text, images = _outputs(notebook)
    assert "preset text_shapes_cpu: 4 steps of 8 16x16 images" in text
    assert "step 4/4" in text
    assert "finished at step 4" in text
    assert "0: " in text  # the captions of the data
    assert "found in 0 of 500 training records" in text  # held-out pairs never trained on
    assert "held-out images" in text  # the last cell ran to the end
    # data, prompts, 4 guidance scales, 2 negative prompt, 2 rescale, held out
    assert images == 1 + 1 + 4 + 2 + 2 + 1
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")


@pytest.mark.slow  # half a minute or more: the notebook trains two models and samples
def test_latent_diffusion_notebook_runs(tmp_path):
    # Both stages shrunk to a few steps of tiny networks; the notebook itself picks the data
    # (Fashion-MNIST where its files are installed, else procedural shapes), as a person's run would.
    import json
    import math

    import numpy as np

    from diffusion_jax import data

    try:
        data.FashionMNIST("test")
        channels, classes = 1, data.FASHION_MNIST_CLASSES
    except data.DataError:
        channels, classes = 3, data.Shapes.CLASSES
    workdir = tmp_path / "run"
    notebook = _run("latent_diffusion.ipynb", {
        "WORKDIR": str(workdir), "AUTOENCODER_STEPS": 4, "DIFFUSION_STEPS": 4, "BATCH_SIZE": 8,
        "NUM_SAMPLES": 4, "SAMPLING_STEPS": 3,
        "AUTOENCODER_OVERRIDES": {"autoencoder.block_out_channels": (8, 16, 16),
                                  "autoencoder.norm_num_groups": 8,
                                  "sampling.num_samples": 8},
        "DIFFUSION_OVERRIDES": {"model.unet.channels": 16, "model.unet.num_res_blocks": 1,
                                "latent.scale_batches": 2}})
    text, images = _outputs(notebook)
    assert f"({len(classes)} classes: {', '.join(classes)})" in text
    assert "28x28 -> 7x7x4" in text
    assert text.count("step 4/4") == 2  # both stages
    assert text.count("finished at step 4") == 2
    assert "latents (7, 7, 4)" in text
    assert images == 3  # reconstructions, latents, samples

    autoencoder, latent_dir = workdir / "autoencoder", workdir / "latent"
    assert (autoencoder / "samples" / "step_00000004.png").is_file()  # the reconstruction grid
    with open(latent_dir / "latent.json") as f:
        kept = json.load(f)
    assert math.isfinite(kept["scale"]) and kept["scale"] > 0
    assert f"latent scale {kept['scale']:.4f}" in text
    assert kept["autoencoder_path"] == str(autoencoder)
    written = sorted(os.listdir(latent_dir / "samples"))
    assert [os.path.splitext(name)[1] for name in written] == [".json", ".npz", ".png"]
    samples = np.load(latent_dir / "samples" / written[1])
    assert samples["samples"].shape == (4, 28, 28, channels)
    assert np.all(np.abs(samples["samples"]) <= 1)  # decoded images in [-1, 1]
    assert list(samples["labels"]) == [i % len(classes) for i in range(4)]


@pytest.mark.slow  # a minute or more: the notebook trains a base and its adapters, and samples
def test_editing_notebook_runs(tmp_path):
    # The tiny text model of test_text_to_image_notebook_runs; 4 sampling steps, so that every
    # strength runs a different number of them (1, 2, 3 and 4).
    import glob
    import json

    import numpy as np

    from diffusion_jax import editing

    workdir = tmp_path / "run"
    notebook = _run("editing.ipynb", {
        "WORKDIR": str(workdir), "PRESET": "text_shapes_cpu", "BASE_STEPS": 4, "LORA_STEPS": 4,
        "BATCH_SIZE": 8, "RESOLUTION": 16, "SAMPLING_STEPS": 4, "NUM_SAMPLES": 2,
        "CONFIG_OVERRIDES": {"model.unet.channels": 16, "model.unet.channel_mult": (1, 2),
                             "model.unet.attention_resolutions": (8,), "text.width": 32,
                             "text.depth": 1, "text.num_heads": 2}})
    text, images = _outputs(notebook)
    assert "of split 'train'" in text
    assert "base finished at step 4" in text
    for strength, steps in ((0.3, 1), (0.6, 2), (0.9, 3), (1.0, 4)):
        assert f"strength {strength:g}: ran {steps} of 4 steps" in text
    assert "unmasked pixels equal the input exactly in all 2 samples (192 of 256 pixels" in text
    assert "pairs in its first 200 records: blue circle, red square, green triangle" in text
    assert "model: LoRA adapters (rank 4," in text
    assert "adapters finished at step 4" in text
    assert "colours right: base" in text  # the last cell ran to the end
    # input, strengths, inpainting, the adapters' data, before and after
    assert images == 1 + 1 + 1 + 1 + 1

    # The files the edits wrote, checked here too: one img2img output per strength, and an
    # inpainting whose kept pixels are the input's, bit for bit.
    samples = workdir / "base" / "samples"
    for strength in (0.3, 0.6, 0.9, 1):
        assert len(glob.glob(str(samples / f"step4_img2img{strength:g}_*.npz"))) == 1
    [inpainted] = glob.glob(str(samples / "step4_inpaint1_*.npz"))
    inpainted = np.load(inpainted)["samples"]
    assert inpainted.shape == (2, 16, 16, 3)
    x0 = editing.read_image(str(workdir / "input.png"), 16, 16) * 2.0 - 1.0
    keep = editing.read_mask(str(workdir / "mask.png"), 16, 16)[..., 0] == 0
    assert keep.sum() == 256 - 64
    np.testing.assert_array_equal(inpainted[:, keep], np.broadcast_to(x0[keep], (2, 192, 3)))
    assert not np.array_equal(inpainted[:, ~keep], np.broadcast_to(x0[~keep], (2, 64, 3)))

    # The adapter run: its own checkpoints, on the base's last step, and adapters that moved.
    lora_dir = workdir / "lora"
    assert os.path.isdir(lora_dir / "checkpoints" / "4")
    with open(lora_dir / "lora.json") as f:
        assert json.load(f) == {"base": os.path.realpath(workdir / "base"), "base_step": 4}
    change = float(text.split("largest change of a base weight after merging: ")[1].split()[0])
    assert change > 0  # the adapters trained, and sampling runs with them
    assert "mean |LoRA - base| per pixel" in text


@pytest.mark.slow  # a minute or more: the notebook trains a base and its ControlNet, and samples
def test_controlnet_notebook_runs(tmp_path):
    # The tiny text model of test_text_to_image_notebook_runs, narrower still (8 channels); 2
    # sampling steps, so that each half of the control window is one step.
    import json

    import numpy as np
    from PIL import Image

    workdir = tmp_path / "run"
    notebook = _run("controlnet.ipynb", {
        "WORKDIR": str(workdir), "PRESET": "text_shapes_cpu", "CONTROL": "mask", "BASE_STEPS": 4,
        "CONTROLNET_STEPS": 4, "BATCH_SIZE": 8, "RESOLUTION": 16, "SAMPLING_STEPS": 2,
        "NUM_EVAL": 8,
        "CONFIG_OVERRIDES": {"model.unet.channels": 8, "model.unet.channel_mult": (1, 2),
                             "model.unet.attention_resolutions": (8,), "model.unet.head_dim": 8,
                             "text.width": 32, "text.depth": 1, "text.num_heads": 2}})
    text, images = _outputs(notebook)
    assert "of split 'train'" in text
    assert "base finished at step 4" in text
    assert "record 0 holds ['attributes', 'caption', 'control', 'image']" in text
    assert "model: a ControlNet (mask control," in text
    assert "ControlNet finished at step 4" in text
    assert "(0 before training)" in text  # the zero convolutions trained
    assert "8 control images; adherence of the generated images: mask_iou " in text
    for scale in (0, 0.5, 1, 1.5):
        assert f"conditioning scale {scale:g}: mask_iou " in text
    # Scale 0 is the base: the same images as the base run's own, from the same noise.
    assert "scale 0 against the base run, from the same noise: largest difference 0.00e+00" \
        in text
    assert "control from 0 to 0.5 of the steps (steps [0] of 2)" in text
    assert "control from 0.5 to 1 of the steps (steps [1] of 2)" in text
    assert "adherence to the mask control on 8 test records" in text
    ceiling = text.split("real images, their own control (ceiling)")[1].split()[0]
    assert float(ceiling) == 1.0  # the mask IoU of real images is exact
    assert "generated with the ControlNet (scale 1)" in text  # the last code cell ran to the end
    # training data, the headline, 4 scales, 2 windows, evaluated examples
    assert images == 1 + 1 + 4 + 2 + 1

    # The ControlNet run: its own checkpoints, on the base's last step; hand-drawn maps saved.
    assert os.path.isdir(workdir / "controlnet_mask" / "checkpoints" / "4")
    with open(workdir / "controlnet_mask" / "controlnet.json") as f:
        assert json.load(f) == {"base": os.path.realpath(workdir / "base"), "base_step": 4}
    circle = np.asarray(Image.open(workdir / "control_circle.png"))
    assert circle.shape == (16, 16, 3) and set(np.unique(circle)) == {0, 255}


@pytest.mark.slow  # a minute or more: the notebook trains, samples and trains a classifier
def test_audio_notebook_runs(tmp_path):
    # The CPU preset shrunk: a 2-level UNet of 16 channels on clips of 1,024 samples, 256 records
    # per split, 4 training steps, 2 sampling steps, one clip per class per guidance scale.
    import glob

    import numpy as np
    import soundfile

    workdir = tmp_path / "run"
    notebook = _run("audio.ipynb", {
        "WORKDIR": str(workdir), "PRESET": "tones_cpu", "NUM_STEPS": 4, "BATCH_SIZE": 8,
        "SAMPLING_STEPS": 2, "NUM_EVAL": 36, "CLASSIFIER_STEPS": 10,
        "CONFIG_OVERRIDES": {"model.unet.channels": 16, "model.unet.channel_mult": (1, 2),
                             "model.unet.attention_resolutions": (512,),
                             "data.clip_length": 1024, "data.size": 256}})
    text, images = _outputs(notebook)
    assert "preset tones_cpu: 4 steps of 8 clips, 1024 samples at 8000 Hz (0.128 s)" in text
    assert "evaluation: 36 clips per scale (1 per class) in batches of 36" in text
    assert "256 training records of 36 classes" in text
    assert "record " in text and "heard C4 (" in text  # the real sine C4 is heard as C4
    # Real notes: nearly all right even at 1,024 samples (all at the presets' 2,048 and more).
    real = float(text.split("real held-out clips: pitch accuracy ")[1].split()[0])
    assert real >= 0.9
    assert "sine notes: the note heard" in text
    assert "step 4/4" in text
    assert "finished at step 4" in text
    assert "wrote 7 WAV files to" in text
    for scale in (0, 1, 2, 4):
        assert f"guidance {scale}: pitch accuracy " in text
    assert "classifier: test accuracy " in text  # train_classifier's own line
    for row in ("cfg 0", "cfg 1", "cfg 2", "cfg 4", "real", "chance"):
        assert f"\n{row:>10} " in text  # the rows of audio_eval.format_table
    assert "highest label accuracy at guidance " in text  # the last code cell ran to the end
    # real clips, generated clips, one grid of notes per guidance scale
    assert images == 1 + 1 + 4
    # players (IPython's Audio, HTML with an embedded WAV): 7 real, 7 generated, one per scale
    players = sum(output.get("data", {}).get("text/html", "").count("<audio")
                  for cell in notebook.cells for output in cell.get("outputs", []))
    assert players == 7 + 7 + 4

    # The WAV files: one per chosen class, 16-bit, at the run's rate and length.
    written = sorted(os.path.basename(p) for p in glob.glob(str(workdir / "clips" / "*.wav")))
    assert written == sorted(["sine_note_C4.wav", "square_note_E4.wav", "pluck_note_G4.wav",
                              "square_chord_F_major.wav", "pluck_chord_C_major.wav",
                              "kick_hit.wav", "snare_hit.wav"])
    wave, rate = soundfile.read(str(workdir / "clips" / "kick_hit.wav"))
    info = soundfile.info(str(workdir / "clips" / "kick_hit.wav"))
    assert rate == 8000 and info.subtype == "PCM_16" and wave.shape == (1024,)
    assert np.all(np.isfinite(wave)) and np.abs(wave).max() <= 1
    assert os.path.isdir(workdir / "checkpoints" / "4")
    assert os.path.isfile(workdir / "classifier" / "classifier.json")
    assert glob.glob(str(workdir / "eval" / "step4_dpmpp_2m_2steps_audio*.json"))


@pytest.mark.slow  # a minute or two: the notebook trains, samples, trains the judge, evaluates
def test_video_notebook_runs(tmp_path):
    # The CPU preset shrunk: a 2-level UNet of 16 channels and a 1-block text encoder on clips of
    # 4 frames of 16x16, 256 records per split, 4 training steps, 2 sampling steps, 6 held-out
    # captions per guidance scale and a judge of 10 steps.
    import glob
    import json

    from PIL import Image

    from diffusion_jax.data.video import MOTIONS

    workdir = tmp_path / "run"
    notebook = _run("video.ipynb", {
        "WORKDIR": str(workdir), "PRESET": "moving_shapes_cpu", "NUM_STEPS": 4, "BATCH_SIZE": 8,
        "SAMPLING_STEPS": 2, "NUM_EVAL": 6, "CLASSIFIER_STEPS": 10,
        "CONFIG_OVERRIDES": {"model.unet.channels": 16, "model.unet.channel_mult": (1, 2),
                             "model.unet.attention_resolutions": (8,), "data.frames": 4,
                             "data.size": 256, "text.width": 32, "text.depth": 1,
                             "text.num_heads": 2}})
    text, images = _outputs(notebook)
    assert "preset moving_shapes_cpu: 4 steps of 8 clips, 4 frames of 16x16" in text
    assert "evaluation: 6 held-out captions per scale in batches of 6" in text
    assert "256 training clips of 4 frames of 16x16" in text
    # The notebook's reading of sentences agrees with the ground truth of real captions.
    assert "asked() reads 200 of 200 training captions as their ground truth" in text
    assert "is not in the captions' words" not in text  # every default prompt is scored
    assert "step 4/4" in text
    assert "finished at step 4" in text
    assert "wrote 6 GIF and 6 MP4 files to" in text
    # Image-to-video keeps the given first frame bit for bit.
    assert "frame 0 of each of the 6 clips is the given frame: largest difference 0.00e+00" \
        in text
    assert "frame judge step 10/10" in text and "frame judge: held-out accuracy" in text
    for scale in (0, 1, 3):
        # once in the notebook's sweep, once from evaluate_video, which also runs from the
        # first frame
        assert text.count(f"guidance {scale}: motion accuracy ") == 2
        assert f"guidance {scale}, first frame given: motion accuracy " in text
    assert text.count("; frames right: shape ") == 3
    for row in ("cfg 0", "cfg 0 i2v", "cfg 1", "cfg 1 i2v", "cfg 3", "cfg 3 i2v", "real",
                "chance"):
        assert f"\n{row:>10} " in text  # the rows of video_eval.format_table
    assert "highest motion accuracy at guidance " in text  # the last code cell ran to the end
    # real clips, generated clips, image-to-video, one per guidance scale
    assert images == 1 + 1 + 1 + 3
    # GIFs (HTML with embedded GIFs): 6 real, 6 generated, 6 image-to-video
    gifs = sum(output.get("data", {}).get("text/html", "").count("data:image/gif;base64,")
               for cell in notebook.cells for output in cell.get("outputs", []))
    assert gifs == 6 + 6 + 6

    # The clips written: a GIF of every clip shown, an MP4 of every generated one.
    clips = workdir / "clips"
    written = sorted(os.path.basename(p) for p in glob.glob(str(clips / "*")))
    prompts = ["a_red_circle_moving_to_the_right_on_a_blue_background",
               "a_yellow_square_moving_to_the_left_on_a_black_background",
               "a_white_triangle_moving_up_on_a_green_background",
               "a_green_circle_moving_down_on_a_white_background",
               "a_blue_square_bouncing_left_and_right_on_a_yellow_background",
               "a_red_triangle_changing_from_red_to_yellow_on_a_black_background"]
    assert written == sorted([f"real_{m}.gif" for m in MOTIONS] + [f"i2v_{m}.gif" for m in MOTIONS]
                             + [f"{p}.gif" for p in prompts] + [f"{p}.mp4" for p in prompts])
    with Image.open(clips / "i2v_bounce.gif") as gif:
        assert gif.size == (16, 16) and gif.n_frames == 4
    assert os.path.getsize(clips / f"{prompts[0]}.mp4") > 0
    assert os.path.isdir(workdir / "checkpoints" / "4")
    with open(workdir / "classifier" / "classifier.json") as f:
        assert json.load(f)["kind"] == "frame_judge"
    [results] = glob.glob(str(workdir / "eval" / "step4_*_video*.json"))
    with open(results) as f:
        results = json.load(f)
    assert [(r["guidance_scale"], r["first_frame"]) for r in results["scales"]] == [
        (0.0, False), (0.0, True), (1.0, False), (1.0, True), (3.0, False), (3.0, True)]
    assert results["num_samples"] == 6


@pytest.mark.slow  # half a minute or more: the notebook trains, samples and evaluates
def test_molecules_notebook_runs(tmp_path):
    pytest.importorskip("rdkit")
    notebook = _run("molecules.ipynb", {
        "WORKDIR": str(tmp_path / "run"), "PRESET": "molecules_cpu", "NUM_STEPS": 4,
        "BATCH_SIZE": 8, "SAMPLING_STEPS": 5, "NUM_SAMPLES": 4, "NUM_EVAL": 8,
        "CONFIG_OVERRIDES": {"data.max_atoms": 12, "data.max_heavy_atoms": 3,
                             "model.egnn.hidden": 16, "model.egnn.depth": 2}})
    text, images = _outputs(notebook)
    assert "preset molecules_cpu: 4 steps of 8 molecules, up to 12 atoms" in text
    assert "atom_stability" in text  # the real molecules' metrics
    # The symmetries hold to float32 round-off: the printed errors are tiny.
    for line in text.splitlines():
        if line.startswith(("positions, rotated back:", "atom types:", "atoms reordered:")):
            assert float(line.split(":")[1]) < 1e-4, line
    assert "finished at step 4" in text
    assert ".xyz" in text and "generated sample 0" in text
    assert "evaluation finished" in text and "real" in text
    assert images == 2  # the real molecules and the generated ones
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
