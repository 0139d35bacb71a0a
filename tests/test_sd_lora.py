"""LoRA with the Stable Diffusion pipeline and from adapter runs, against diffusers' pipeline.

A PEFT LoRA on the UNet of a tiny random SD 1.x folder (``sd_folders.build``), written by
diffusers' ``save_lora_weights``, is loaded by :meth:`StableDiffusion.load_lora`; the images at
strengths 0.5 and 1 must be diffusers' with the same file and ``set_adapters`` weights (same
latents, prompts, scheduler; float32, 2e-3; worst seen in the comments). The other way, LoRA
adapters trained here by an adapter run on the folder (``config.lora``, ``config.pretrained``)
are written by ``--mode=export`` and loaded by diffusers' ``load_lora_weights``, whose images
must be ours. (Text-encoder LoRAs through diffusers are in test_lora_files.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import sd_folders  # noqa: E402
from diffusion_jax import configuration, lora, run_export, train, train_state  # noqa: E402
from diffusion_jax.pipelines import StableDiffusion  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 2e-3
PROMPTS = ["a red circle", "two blue squares"]


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 16, 16, 4)).astype(np.float32)


def _theirs(pipe, latents, steps=6):
    with torch.no_grad():
        return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=5.0,
                    latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                    output_type="np").images


def test_a_diffusers_lora_file_gives_diffusers_images_at_two_scales(tmp_path):
    pipe = sd_folders.build(tmp_path / "model", "sd1", "ddim")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    unet = pipe.unet
    unet.add_adapter(config)
    with torch.no_grad():  # PEFT's random init is small; make the LoRA matter
        for name, value in unet.named_parameters():
            if "lora_B" in name:
                value.mul_(2.0)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    unet.delete_adapters("default")
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    ours = StableDiffusion.from_pretrained(tmp_path / "model")
    base = ours(PROMPTS, num_steps=6, guidance_scale=5.0, latents=_latents())
    ours.load_lora(tmp_path / "lora", 1.0)
    for scale in (0.5, 1.0):
        pipe.set_adapters(["style"], adapter_weights=[scale])
        theirs = _theirs(pipe, _latents())
        ours.set_lora_scales([scale])
        mine = ours(PROMPTS, num_steps=6, guidance_scale=5.0, latents=_latents())
        worst = float(np.abs(mine - theirs).max())
        print(f"LoRA scale {scale}: worst {worst:.2e}, change {np.abs(mine - base).max():.2f}")
        assert worst <= BOUND
        assert np.abs(mine - base).max() > 0.05  # the LoRA changed the images
    ours.fuse_loras()
    np.testing.assert_allclose(ours(PROMPTS, num_steps=6, guidance_scale=5.0,
                                    latents=_latents()), mine, atol=1e-5)


def _run_config(folder):
    config = sd_folders.finetune_config(folder)
    config.training.update(num_steps=3, checkpoint_every=3, log_every=3, learning_rate=0.05)
    config.lora.update(rank=4, alpha=8.0, text_encoder=True)
    config.text.freeze = False
    config.sampling.use_ema = False  # (three steps barely move an EMA)
    return config


@pytest.mark.slow  # an adapter run on the folder, its export, both pipelines: ~1.5 minutes
def test_adapters_trained_here_give_our_images_in_diffusers(tmp_path):
    pipe = sd_folders.build(tmp_path / "model", "sd1", "ddim")
    folder = str(tmp_path / "model")
    config = _run_config(folder)
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir, log=lambda line: None)
    adapted = run_export.lora_runs.adapter_paths(config, state.frozen)
    assert any(p.startswith("encoder/") for p in adapted)  # on the text encoder too
    written = subprocess.run(
        [sys.executable, "main.py", "--config=configs/stable_diffusion_finetune.py",
         f"--workdir={workdir}", "--mode=export", f"--config.pretrained.path={folder}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=600)
    assert written.returncode == 0, written.stderr[-3000:]
    lora_file = os.path.join(workdir, "export", "pytorch_lora_weights.safetensors")
    assert os.path.isfile(lora_file)
    # Ours: the folder with the exported file; it is the run's merged network.
    ours = StableDiffusion.from_pretrained(folder)
    base = ours(PROMPTS, num_steps=6, guidance_scale=5.0, latents=_latents())
    ours.load_lora(lora_file)
    merged = train_state.model_params(state, use_ema=False)
    unet = lora.apply(ours.models.unet_params, ours.loras[0].unet)
    worst_params = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(unet), jax.tree_util.tree_leaves(merged["denoiser"])))
    assert worst_params < 1e-5
    mine = ours(PROMPTS, num_steps=6, guidance_scale=5.0, latents=_latents())
    # diffusers (UNet adapters; its text-encoder LoRA loading needs PEFT >= 0.22 with
    # transformers 5, see test_lora_files.py).
    for name, encoder in (("text_encoder", pipe.text_encoder),):
        from test_lora_files import _peft_load_adapter
        encoder.load_adapter = _peft_load_adapter(encoder)
    pipe.load_lora_weights(lora_file)
    theirs = _theirs(pipe, _latents())
    worst = float(np.abs(mine - theirs).max())
    print(f"adapters trained here, in diffusers: worst {worst:.2e}, change "
          f"{np.abs(mine - base).max():.3f}")
    assert worst <= BOUND
    assert np.abs(mine - base).max() > 0.01  # the trained adapters change the images


def test_lora_settings_are_checked(tmp_path):
    config = _run_config(str(tmp_path))
    config.pretrained.lora = str(tmp_path / "missing.safetensors")
    with pytest.raises(configuration.ConfigError, match="does not exist"):
        configuration.validate(config)
    with pytest.raises(configuration.ConfigError, match="not a run of LoRA adapters"):
        os.makedirs(tmp_path / "plain")
        with open(tmp_path / "plain" / "config.json", "w") as f:
            f.write('{"lora": {"rank": 0}}')
        run_export.export_lora(str(tmp_path / "plain"), str(tmp_path / "out"))
