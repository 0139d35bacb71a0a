"""The Stable Diffusion pipeline gives diffusers' images from the same latents and prompts.

Tiny random-weight folders (``sd_folders.build``: SD 1.x-like with epsilon prediction, SD
2.x-like with v prediction, SDXL-like with two text encoders) are written by diffusers and
transformers and loaded by :class:`diffusion_jax.pipelines.StableDiffusion`. Both pipelines start
from the same standard-normal latents (NHWC here, NCHW there), with the same prompts and
negative prompts, 10 steps, guidance 7.5, in float32, each with the folder's own scheduler:
our sampler, timesteps and final step come from ``scheduler_config.json``. The images (in
[0, 1]) must agree to 2e-3; the worst differences seen are printed and listed in
docs/stable_diffusion.md.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sd_folders  # noqa: E402
from diffusion_jax.pipelines import StableDiffusion  # noqa: E402

# Images in [0, 1]: float32 round-off where our sampler reproduces the scheduler exactly (worst
# seen 2.7e-6); the bound where it approximates it (Karras sigmas: diffusers feeds the
# network rounded timesteps, 1.6e-3 seen).
EXACT, APPROXIMATE = 1e-5, 2e-3
PROMPTS = ["a red circle, on blue!", "Ünïcode café — 東京 🙂 " + "very long " * 40]
NEGATIVE = ["blurry", ""]


def _diffusers_images(pipe, latents, steps=10, scale=7.5, negative=NEGATIVE, rescale=0.0,
                      size=None):
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(prompt=PROMPTS, negative_prompt=negative, num_inference_steps=steps,
                  guidance_scale=scale, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                  output_type="np", generator=generator, guidance_rescale=rescale)
    if size is not None:
        kwargs.update(height=size[0], width=size[1])
    with torch.no_grad():
        return pipe(**kwargs).images


def _latents(pipe, seed=0, size=None):
    height, width = size or (2 * pipe.unet.config.sample_size,) * 2
    shape = (len(PROMPTS), height // 2, width // 2, 4)  # the tiny VAE halves the size
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# One case per family and each default scheduler of the published folders (SD 1.5: PNDM, SD 2.1:
# DDIM with v prediction, SDXL: Euler, here non-square and without a negative prompt, so that
# SDXL's zero negative conditioning and its (height, width) time ids are compared) plus
# DPM-Solver++ in the default suite; the other combinations in the slow one.
SDXL_NO_NEGATIVE = dict(negative=None, size=(32, 48))
CASES = [("sd1", "pndm", {}), ("sd1", "dpmpp", {}), ("sd2", "ddim", {}),
         ("sdxl", "euler", SDXL_NO_NEGATIVE)] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in
    [("sd1", "ddim", {}), ("sd1", "euler", {}), ("sd1", "dpmpp_karras", {}),
     ("sd2", "euler", {}), ("sd2", "dpmpp", {}), ("sdxl", "euler", {}), ("sdxl", "dpmpp", {}),
     ("sdxl", "ddim", {})]]


@pytest.mark.parametrize("family, scheduler, case", CASES)
def test_pipeline_matches_diffusers(tmp_path, family, scheduler, case):
    negative, size = case.get("negative", NEGATIVE), case.get("size")
    pipe = sd_folders.build(tmp_path / "model", family, scheduler)
    latents = _latents(pipe, size=size)
    theirs = _diffusers_images(pipe, latents, negative=negative, size=size)
    ours_pipe = StableDiffusion.from_pretrained(tmp_path / "model")
    height, width = size or (None, None)
    ours = ours_pipe(PROMPTS, negative_prompt=negative, num_steps=10, guidance_scale=7.5,
                     latents=latents, key=jax.random.key(0), height=height, width=width)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    error = float(np.abs(ours - theirs).max())
    print(f"{family} {scheduler} {case}: max abs image difference {error:.2e}")
    assert error <= (APPROXIMATE if "karras" in scheduler else EXACT)
    # Not trivially equal: other latents give other images.
    other = ours_pipe(PROMPTS, negative_prompt=negative, num_steps=10, guidance_scale=7.5,
                      latents=_latents(pipe, seed=1, size=size), key=jax.random.key(0),
                      height=height, width=width)
    assert np.abs(other - theirs).max() > 100 * EXACT


@pytest.mark.slow
def test_guidance_rescale_matches_diffusers(tmp_path):
    """Lin et al.'s rescale acts on the model's own prediction (v here), as in diffusers."""
    pipe = sd_folders.build(tmp_path / "model", "sd2", "ddim")
    latents = _latents(pipe)
    theirs = _diffusers_images(pipe, latents, rescale=0.7)
    ours = StableDiffusion.from_pretrained(tmp_path / "model")(
        PROMPTS, negative_prompt=NEGATIVE, num_steps=10, guidance_scale=7.5, latents=latents,
        guidance_rescale=0.7)
    error = float(np.abs(ours - theirs).max())
    print(f"sd2 ddim, guidance rescale 0.7: max abs image difference {error:.2e}")
    assert error <= EXACT


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "model"
    return folder, sd_folders.build(folder, "sd1", "dpmpp")


def test_batch_is_split_over_a_mesh_and_sizes_checked(sd1_folder):
    folder, _ = sd1_folder
    from diffusion_jax import parallel

    mesh = parallel.make_mesh(-1, 1)
    pipe = StableDiffusion.from_pretrained(folder, mesh=mesh)
    images = pipe(["a", "b"], num_steps=2, guidance_scale=3.0, height=16, width=24)
    assert images.shape == (2, 16, 24, 3) and np.all((images >= 0) & (images <= 1))
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("a", height=18)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 16, 16, 4\)"):
        pipe("a", latents=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipe("a", negative_prompt=["x", "y"])


@pytest.mark.slow  # compiles the pipeline for several samplers
def test_any_library_sampler_runs_on_the_folder(sd1_folder):
    folder, _ = sd1_folder
    pipe = StableDiffusion.from_pretrained(folder)
    default = pipe("a cat", num_steps=4)
    heun = pipe("a cat", num_steps=4, method="heun", grid="karras")
    assert heun.shape == default.shape and np.abs(heun - default).max() > 1e-3
    unguided = pipe("a cat", num_steps=4, guidance_scale=1.0)
    assert np.abs(unguided - default).max() > 1e-3


def test_command_line_samples_a_folder(sd1_folder, tmp_path):
    import importlib

    from diffusion_jax import configuration, generate

    folder, _ = sd1_folder
    config = importlib.import_module("configs.stable_diffusion").get_config()
    config.pretrained.path = str(folder)
    config.sampling.update(prompt="a red circle|a blue square", num_samples=3, num_steps=3)
    config.pretrained.batch_size = 2
    configuration.validate(config)
    written = generate.generate_to_files(config, str(tmp_path))
    assert [os.path.splitext(p)[1] for p in written] == [".npz", ".png", ".json"]
    arrays = np.load(written[0], allow_pickle=False)
    assert arrays["samples"].shape == (3, 32, 32, 3)
    assert list(arrays["prompts"]) == ["a red circle", "a blue square", "a red circle"]
    config.pretrained.path = str(tmp_path / "missing")
    with pytest.raises(configuration.ConfigError, match="pretrained.path: .* is not a directory"):
        generate.generate_to_files(config, str(tmp_path))


def test_folders_that_cannot_be_loaded_are_refused(sd1_folder, tmp_path):
    import json
    import shutil

    from diffusion_jax.pretrained import stable_diffusion

    folder, _ = sd1_folder
    with pytest.raises(FileNotFoundError, match="model_index.json does not exist.*parent"):
        stable_diffusion.read_model_index(folder / "unet")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline', which diffusion_jax cannot load"):
        StableDiffusion.from_pretrained(copy)
    (copy / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(copy / "vae")
    with pytest.raises(FileNotFoundError, match="has no vae/ folder"):
        StableDiffusion.from_pretrained(copy)
    shutil.copytree(folder / "vae", copy / "vae")
    os.remove(copy / "vae" / "diffusion_pytorch_model.safetensors")
    (copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(FileNotFoundError, match="never loads pickles"):
        StableDiffusion.from_pretrained(copy)


def _eval_config(folder, tmp_path):
    config = importlib.import_module("configs.stable_diffusion").get_config()
    config.pretrained.path = str(folder)
    config.data.update(name="captions", resolution=32, size=16)
    config.evaluation.update(feature_extractor="inception", num_samples=4, batch_size=2,
                             inception_weights=str(tmp_path / "inception.npz"))
    config.sampling.num_steps = 2
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n", "utf-8")
    config.evaluation.prompts_file = str(tmp_path / "prompts.txt")
    return config


def test_eval_prompts_come_from_a_file_or_the_captions(sd1_folder, tmp_path):
    from diffusion_jax import configuration, evaluate

    config = _eval_config(sd1_folder[0], tmp_path)
    assert evaluate.evaluation_prompts(config, 3) == ["a red circle", "a blue square",
                                                      "a red circle"]
    config.evaluation.prompts_file = ""  # the data's captions instead
    assert len(set(evaluate.evaluation_prompts(config, 4))) > 1
    config.evaluation.prompts_file = str(tmp_path / "missing.txt")
    with pytest.raises(configuration.ConfigError, match="prompts_file=.*cannot be read"):
        evaluate.evaluation_prompts(config, 3)
    config.evaluation.feature_extractor = "classifier"
    with pytest.raises(configuration.ConfigError, match="feature_extractor='inception'"):
        evaluate.evaluate_pretrained(config, str(tmp_path))


@pytest.mark.slow  # Inception-v3 at 299 x 299 on a CPU
def test_eval_of_a_folder_measures_inception_features(sd1_folder, tmp_path):
    import json

    from diffusion_jax import evaluate
    from diffusion_jax.models import inception

    variables = inception.InceptionV3FID().init(jax.random.key(0),
                                                jnp.zeros((1, 75, 75, 3), jnp.float32))
    inception.save_npz(variables, str(tmp_path / "inception.npz"))  # random weights: not FID
    config = _eval_config(sd1_folder[0], tmp_path)
    workdir = str(tmp_path / "eval")
    results = evaluate.evaluate_pretrained(config, workdir, log=lambda line: None)
    assert results["num_samples"] == 4 and np.isfinite(results["frechet_distance"])
    assert 0.0 <= results["precision"] <= 1.0 and 0.0 <= results["recall"] <= 1.0
    (written,) = [n for n in os.listdir(os.path.join(workdir, "eval"))
                  if n.startswith("pretrained_")]
    with open(os.path.join(workdir, "eval", written)) as f:
        assert json.load(f)["settings"]["prompts"] == ["a blue square", "a red circle"]


_EIGHT_DEVICES = """
import sys
import jax
import numpy as np
from diffusion_jax import parallel
from diffusion_jax.pipelines import StableDiffusion

assert jax.device_count() == 8
latents = np.load(sys.argv[2])
out = {}
for name, (data, fsdp) in {"data8": (8, 1), "data4_fsdp2": (4, 2)}.items():
    pipe = StableDiffusion.from_pretrained(sys.argv[1], mesh=parallel.make_mesh(data, fsdp),
                                           fsdp=fsdp > 1)
    leaf = pipe.models.unet_params["conv_in"]["kernel"]
    assert len(leaf.sharding.device_set) == 8
    out[name] = pipe(["a red circle", "a blue square"] * 4, num_steps=3, latents=latents)
np.savez(sys.argv[3], **out)
"""


@pytest.mark.slow  # a subprocess with 8 simulated devices
def test_eight_devices_generate_what_one_does(sd1_folder, tmp_path):
    """The batch split over 8 simulated devices (data parallel, and 4 x 2 with fsdp parameters)
    gives one device's images, up to float32 round-off of other reduction orders."""
    import subprocess
    import sys

    folder, _ = sd1_folder
    latents = np.random.default_rng(0).standard_normal((8, 16, 16, 4)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root,
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=8").strip()}
    done = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(folder),
                           str(tmp_path / "latents.npy"), str(tmp_path / "out.npz")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    one = StableDiffusion.from_pretrained(folder)(["a red circle", "a blue square"] * 4,
                                                  num_steps=3, latents=latents)
    for name, images in np.load(tmp_path / "out.npz").items():
        error = float(np.abs(images - one).max())
        print(f"{name}: max abs difference from one device {error:.2e}")
        assert error < 1e-4, name


@pytest.mark.slow  # compiles the pipeline for several schedulers
def test_scheduler_options_keep_the_folders_plan_and_other_schedulers_need_a_method(
        sd1_folder, tmp_path):
    import json
    import shutil

    folder, _ = sd1_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    ddim = {**config, "_class_name": "DDIMScheduler", "set_alpha_to_one": False,
            "clip_sample": False, "steps_offset": 1, "timestep_spacing": "leading"}
    path.write_text(json.dumps(ddim))
    pipe = StableDiffusion.from_pretrained(copy)
    assert pipe.plan.sample_kwargs(3)["t_end"] > 0  # DDIM stops short of clean data
    default = pipe("a cat", num_steps=3)
    # An option of the folder's sampler keeps its plan (timesteps and final step) ...
    np.testing.assert_array_equal(pipe("a cat", num_steps=3, eta=0.0), default)
    # ... while naming the method replans: our ddim on the folder's spacing, ending clean.
    assert np.abs(pipe("a cat", num_steps=3, method="ddim") - default).max() > 1e-4
    path.write_text(json.dumps({**config, "_class_name": "LMSDiscreteScheduler"}))
    pipe = StableDiffusion.from_pretrained(copy)
    assert pipe.plan is None
    with pytest.raises(ValueError, match="LMSDiscreteScheduler.*pass method="):
        pipe("a cat", num_steps=3)
    assert pipe("a cat", num_steps=3, method="dpmpp_2m").shape == (1, 32, 32, 3)


def test_a_vae_normalising_latents_per_channel_is_refused(sd1_folder, tmp_path):
    import json
    import shutil

    from diffusion_jax import autoencoders, configuration

    folder, _ = sd1_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "latents_mean": [0.0] * 4}))
    with pytest.raises(ValueError, match=r"normalises latents per channel \(latents_mean\)"):
        StableDiffusion.from_pretrained(copy)
    with pytest.raises(configuration.ConfigError, match="normalises latents per channel"):
        autoencoders.describe(str(copy / "vae"))
