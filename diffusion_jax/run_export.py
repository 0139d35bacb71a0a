"""A trained run's workdir -> a diffusers model folder that ``from_pretrained`` loads.

:func:`export_run` reads the run's ``config.json`` and a checkpoint (as sampling does: the data
must be readable to know its shape) and writes it with :mod:`diffusion_jax.pretrained.export`:

* a pixel or latent diffusion run with a UNet: ``unet/``, ``scheduler/`` (the run's schedule and
  target, where a diffusers scheduler reproduces them), for a latent run ``vae/`` with the latent
  scale of its ``latent.json`` as ``scaling_factor``, and for an unconditional pixel run on DDPM
  betas a ``model_index.json`` that ``DDPMPipeline`` loads;
* a run fine-tuned from a Stable Diffusion folder (``config.pretrained.path``): that folder with
  its ``unet/`` replaced by the run's, when the text encoder was left as it was;
* an autoencoder run: one ``AutoencoderKL`` folder (``scaling_factor`` 1: a latent run measures
  its own).

The rest is refused with the reason: a DiT or MLP denoiser, the byte-level text encoder of
captioned runs, a schedule no diffusers scheduler reproduces (``scheduler=False`` writes the
networks without one). This module sits above the run machinery (checkpoints, latents), which
:mod:`diffusion_jax.pretrained` may not import.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np

from diffusion_jax import autoencoders, configuration, controlnet_runs, latent, lora, lora_runs, run
from diffusion_jax import train_state
from diffusion_jax.models.clip_conditioned import CLIPConditioned
from diffusion_jax.models.text_conditioned import TextConditioned
from diffusion_jax.pretrained import clip_text, export, lora_files, sd_unet
from diffusion_jax.pretrained import stable_diffusion as sd_folder

__all__ = ["export_run", "export_lora", "export_to_workdir"]


def _size(shape):
    """diffusers' ``sample_size``: one number for square examples, else [height, width]."""
    return int(shape[0]) if shape[0] == shape[1] else [int(shape[0]), int(shape[1])]


def _source_info(workdir, step, use_ema) -> dict:
    return {"source": {"workdir": os.path.abspath(workdir), "step": step, "ema": use_ema}}


def _export_autoencoder_run(workdir, out_folder, step, use_ema, overwrite) -> dict:
    source = autoencoders.describe(os.fspath(workdir))
    if use_ema is not None:  # (the run's own choice is what a latent run reading it takes)
        source.config.sampling.use_ema = bool(use_ema)
    params, restored = latent.load_autoencoder_params(source, step)
    ema = bool(source.config.sampling.use_ema)
    config = export.export_autoencoder(out_folder, source.autoencoder, params,
                                       sample_size=_size(source.image_shape),
                                       overwrite=overwrite)
    return {"vae": config["_class_name"], **_source_info(workdir, restored, ema)}


def _same_tree(a, b) -> bool:
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in flat_a] == [p for p, _ in flat_b] and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(flat_a, flat_b))


def _export_fine_tuned(config, model, params, out_folder, info, overwrite) -> dict:
    """The pretrained folder with the run's UNet (its text encoder must be unchanged)."""
    folder = config.pretrained.path
    _, original, _ = clip_text.load_text_encoder(os.path.join(folder, "text_encoder"))
    if not _same_tree(original, params["encoder"]):
        raise ValueError("this run changed the CLIP text encoder of its pretrained folder, and "
                         "exporting a CLIP text encoder is not implemented; only runs with the "
                         "encoder unchanged (config.text.freeze=True, no weight decay) export")
    unet_config = sd_unet.read_config(os.path.join(folder, "unet"))
    scale = latent.load_space(config, info["source"]["workdir"], log=lambda line: None).scale
    with export.staged_folder(out_folder, overwrite) as stage:
        os.rmdir(stage)
        top = os.path.realpath(folder)
        shutil.copytree(folder, stage, ignore=lambda d, names: ["unet"] if os.path.realpath(
            d) == top else [])
        vae_config = os.path.join(stage, "vae", "config.json")
        with open(vae_config, encoding="utf-8") as f:
            vae = json.load(f)
        if vae.get("scaling_factor", 0.18215) != scale:  # config.latent.scale overrode it
            vae["scaling_factor"] = scale
            with open(vae_config, "w", encoding="utf-8") as f:
                json.dump(vae, f, indent=2)
        written = export.export_unet(
            os.path.join(stage, "unet"), model.denoiser, params["denoiser"],
            sample_size=unet_config.get("sample_size"),
            use_linear_projection=bool(unet_config.get("use_linear_projection", False)),
            upcast_attention=bool(unet_config.get("upcast_attention", False)))
        summary = {"unet": written["_class_name"], "timestep": written["_timestep"],
                   "pipeline": "copied from " + os.path.abspath(folder), **info}
        with open(os.path.join(stage, export.INFO_NAME), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def export_run(workdir: str, out_folder: str, step: Optional[int] = None, *,
               use_ema: Optional[bool] = None, scheduler: bool = True,
               overwrite: bool = False) -> dict:
    """Write the run in ``workdir`` (checkpoint ``step``, default the latest) as a diffusers folder.

    ``use_ema`` picks the EMA parameters (default: ``config.sampling.use_ema``, as sampling
    does). ``scheduler=False`` leaves out ``scheduler/`` (for schedules no diffusers scheduler
    reproduces; the UNet then takes ``noise_scale * t + noise_shift`` as its timestep). The
    folder is written beside ``out_folder`` and renamed into place when complete; an existing
    non-empty one is replaced only with ``overwrite=True``. Returns the summary also written to
    ``out_folder/diffusion_jax_export.json``."""
    config = run.read_run_config(os.fspath(workdir), f"the run {workdir}")
    if config.task == "autoencoder":
        return _export_autoencoder_run(workdir, out_folder, step, use_ema, overwrite)
    if controlnet_runs.enabled(config):
        raise configuration.ConfigError(
            f"{workdir} trained a ControlNet of a frozen base; writing diffusers "
            "ControlNetModel folders is not supported: export the base run "
            f"({config.pretrained.path or config.controlnet.base}) instead")
    state, model, example_shape, _ = run.restore_run(config, os.fspath(workdir), step=step)
    use_ema = bool(config.sampling.use_ema if use_ema is None else use_ema)
    params = train_state.model_params(state, use_ema)  # (an adapter run: merged)
    info = _source_info(workdir, int(state.step), use_ema)
    if isinstance(model, CLIPConditioned):
        return _export_fine_tuned(config, model, params, out_folder, info, overwrite)
    if isinstance(model, TextConditioned):
        raise ValueError("a captioned run conditions its denoiser on the byte-level text encoder "
                         "trained with it, which has no diffusers counterpart; "
                         "diffusion_jax.pretrained.export.export_unet(folder, model.denoiser, "
                         "params['denoiser']) writes the denoiser alone")
    kwargs = dict(sample_size=_size(example_shape), info=info, overwrite=overwrite)
    if scheduler:
        kwargs.update(schedule=configuration.build_schedule(config),
                      target=config.diffusion.target, sigma_data=config.diffusion.sigma_data)
    if config.latent.autoencoder:
        space = latent.load_space(config, os.fspath(workdir), log=lambda line: None)
        kwargs.update(autoencoder=space.autoencoder, autoencoder_params=space.params,
                      scaling_factor=space.scale, shift_factor=space.shift or None)
    return export.export_pipeline(out_folder, model, params, **kwargs)


def export_lora(workdir: str, path: str, step: Optional[int] = None, *,
                use_ema: Optional[bool] = None) -> str:
    """Write the adapters of an adapter run on a Stable Diffusion folder as a LoRA file.

    The file (``path``: a ``.safetensors`` file, or a folder to hold
    ``pytorch_lora_weights.safetensors``) has the PEFT layout diffusers' ``load_lora_weights``
    reads, with the rank and alpha of every layer; the UNet's adapters and, when the run had
    them, the text encoder's. Returns the file written."""
    config = run.read_run_config(os.fspath(workdir), f"the run {workdir}")
    if not (lora_runs.enabled(config) and config.pretrained.path):
        raise configuration.ConfigError(
            f"{workdir} is not a run of LoRA adapters on a Stable Diffusion folder "
            "(config.lora.rank > 0 with config.pretrained.path); export_run writes other runs")
    state, *_ = run.restore_run(config, os.fspath(workdir), step=step)
    use_ema = bool(config.sampling.use_ema if use_ema is None else use_ema)
    adapter = lora_runs.adapter_of(state.ema_params if use_ema else state.params,
                                   state.compose.alphas)

    def part(prefix):
        paths = [p for p in adapter.paths if p.startswith(prefix)]
        if not paths:
            return None
        return lora.Adapter({p[len(prefix):]: adapter.weights[p] for p in paths},
                            {p[len(prefix):]: adapter.alphas[p] for p in paths})

    models = sd_folder.load_stable_diffusion(
        config.pretrained.path, components=("unet", "text_encoder", "tokenizer"))
    loras = lora_files.StableDiffusionLora(unet=part("denoiser/"),
                                           text_encoders=[part("encoder/")])
    return lora_files.save_lora(path, loras, models)


def export_to_workdir(config, workdir: str) -> list:
    """``--mode=export``: the run in ``workdir`` in diffusers' formats, under ``workdir/export``.

    An adapter run on a Stable Diffusion folder gives ``export/pytorch_lora_weights.safetensors``;
    any other run a model folder ``export/diffusers`` (an adapter run on a run of ours: the
    merged model). ``config.sampling.checkpoint_step`` (-1: the latest) and ``use_ema`` choose
    the parameters. An earlier export there is replaced (it is made again from the checkpoint).
    Returns the paths written."""
    del config  # the run's own config.json decides what it is
    saved = run.read_run_config(os.fspath(workdir), f"the run {workdir}")
    step = None if saved.sampling.checkpoint_step == -1 else saved.sampling.checkpoint_step
    target = os.path.join(workdir, "export")
    os.makedirs(target, exist_ok=True)
    try:
        if lora_runs.enabled(saved) and saved.pretrained.path:
            return [export_lora(workdir, target, step)]
        folder = os.path.join(target, "diffusers")
        export_run(workdir, folder, step, overwrite=True)
    except ValueError as err:
        if isinstance(err, configuration.ConfigError):
            raise
        raise configuration.ConfigError(f"--mode=export: {err}") from err
    return [folder]
