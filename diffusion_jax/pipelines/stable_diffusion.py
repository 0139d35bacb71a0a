"""Pretrained Stable Diffusion models (1.x, 2.x, XL base) in JAX: text-to-image and editing.

``pipe = StableDiffusion.from_pretrained(path, dtype=jnp.bfloat16)`` loads a diffusers folder;
``pipe(prompt, negative_prompt=None, num_steps=50, guidance_scale=7.5, method=None, ...)``
returns float images in [0, 1], NHWC numpy, as diffusers' pipelines with ``output_type="np"``.
``pipe.img2img(prompt, image, strength=0.8, ...)`` and ``pipe.inpaint(prompt, image, mask, ...)``
edit images (:mod:`diffusion_jax.editing`): with an inpainting checkpoint (a UNet of 9 input
channels) as diffusers' ``StableDiffusionInpaintPipeline`` does, with any other by keeping the
unmasked latents (RePaint).

One call is one compiled program per (batch, size, sampler settings): the prompts are encoded,
the sampler's ``lax.scan`` runs with classifier-free guidance as one batched UNet call per step
(conditional and unconditional halves), and the latents are decoded. The parameters are
arguments of that program, not constants in it. By default the folder's scheduler decides the
sampler, its timesteps and its final step (:mod:`diffusion_jax.pretrained.scheduler`), so the
same ``latents`` give diffusers' images; ``method=`` (and ``grid=``) pick any of the library's
samplers instead. With a mesh the batch is split over its devices.

``pipe.load_controlnet(folder)`` adds a diffusers ``ControlNetModel``, and ``control_image=``
(with ``controlnet_conditioning_scale=``, ``control_guidance_start=``, ``control_guidance_end=``)
guides a call as diffusers' ``StableDiffusionControlNetPipeline`` does
(:mod:`diffusion_jax.pipelines.control`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import editing, guidance, parallel, parameterization, samplers
from diffusion_jax.pipelines import control as control_lib
from diffusion_jax.pretrained import lora_files
from diffusion_jax.pretrained import scheduler as scheduler_lib
from diffusion_jax.pretrained.stable_diffusion import StableDiffusionModels, load_stable_diffusion

__all__ = ["StableDiffusion"]


def _apply_unet(unet, params, x, t, cond):
    if "concat" in cond:  # an inpainting UNet's extra input channels: mask, masked latents
        x = jnp.concatenate([x, cond["concat"].astype(x.dtype)], axis=-1)
    control = {k: cond[k] for k in ("control", "control_scale") if k in cond}  # ControlNets
    return unet.apply({"params": params}, x, t, context=cond["context"],
                      pooled=cond.get("pooled"), time_ids=cond.get("time_ids"), **control)


def _encode(models: StableDiffusionModels, encoder_params, ids):
    """Token ids (one array per encoder) -> the UNet's conditioning (context, and pooled)."""
    if models.family == "sd":
        out = models.text_encoders[0].apply({"params": encoder_params[0]}, ids[0])
        return {"context": out.last_hidden_state}
    # SDXL: both encoders' penultimate hidden states side by side; the second's projection pooled.
    states, pooled = [], None
    for module, params, tokens in zip(models.text_encoders, encoder_params, ids):
        out = module.apply({"params": params}, tokens)
        states.append(out.hidden_states[-2])
        pooled = out.text_embeds
    return {"context": jnp.concatenate(states, axis=-1), "pooled": pooled}


class StableDiffusion:
    """A loaded Stable Diffusion model, called like diffusers' pipelines.

    Build it with :meth:`from_pretrained`. ``models`` holds the modules and parameters
    (:class:`~diffusion_jax.pretrained.stable_diffusion.StableDiffusionModels`); ``plan`` the
    folder's scheduler mapped onto the library (:class:`~diffusion_jax.pretrained.scheduler.SamplerPlan`),
    or None when the library does not reproduce that scheduler (then ``method=`` picks one of
    its samplers for the folder's noise schedule, and ``plan_error`` says why)."""

    def __init__(self, models: StableDiffusionModels, mesh=None):
        self.models = models
        self.mesh = mesh
        # The noise schedule and prediction target alone (any representable schedule has them).
        self.base_plan = scheduler_lib.plan_from_config(models.scheduler_config, method="ddim")
        try:
            self.plan, self.plan_error = scheduler_lib.plan_from_config(
                models.scheduler_config), None
        except ValueError as err:
            self.plan, self.plan_error = None, err
        self.force_zeros_for_empty_prompt = bool(
            models.index.get("force_zeros_for_empty_prompt", models.family == "sdxl"))
        self._programs = {}
        self.loras, self.lora_scales = [], []
        self.controlnets: list[control_lib.LoadedControlNet] = []
        self.fsdp = False

    @classmethod
    def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                        fsdp: bool = False, attention: str = "xla",
                        controlnet=None) -> "StableDiffusion":
        """Load the diffusers folder ``path``.

        ``dtype`` is the networks' computation dtype and ``param_dtype`` their parameters'
        (default: ``dtype``); with a ``mesh`` (:func:`diffusion_jax.parallel.make_mesh`) each
        parameter is placed on it as it is read, replicated, or with ``fsdp=True`` split over
        its ``fsdp`` axis (large tensors only), and the batch is split over its devices.
        ``controlnet``: a ControlNet folder or a list of them (:meth:`load_controlnet`)."""
        models = load_stable_diffusion(path, dtype=dtype, param_dtype=param_dtype,
                                       sharding_for=functools.partial(_sharding, mesh, fsdp),
                                       attention=attention)
        pipe = cls(models, mesh=mesh)
        pipe.fsdp = fsdp
        for folder in controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]:
            if folder is not None:
                pipe.load_controlnet(folder)
        return pipe

    # -- ControlNets -----------------------------------------------------------------------------

    def load_controlnet(self, path) -> control_lib.LoadedControlNet:
        """Use the diffusers ``ControlNetModel`` folder ``path`` (after those loaded before).

        Calls then take ``control_image=``. One built for another base model is refused, naming
        the folder and the config keys and tensors that differ (:func:`.control.load`)."""
        self.controlnets.append(control_lib.load(
            path, self.models, sharding_for=functools.partial(_sharding, self.mesh, self.fsdp)))
        return self.controlnets[-1]

    def unload_controlnets(self) -> None:
        """Back to the UNet alone."""
        self.controlnets = []

    @property
    def params(self) -> dict:
        """Every parameter the generation program reads (the LoRAs' factors and scales too)."""
        return {"unet": self.models.unet_params, "vae": self.models.vae_params,
                "text_encoders": list(self.models.text_encoder_params),
                "loras": list(self.loras),
                "lora_scales": jnp.asarray(self.lora_scales, jnp.float32)}

    # -- LoRA ------------------------------------------------------------------------------------

    def load_lora(self, path, scale: float = 1.0) -> lora_files.StableDiffusionLora:
        """Use the LoRA file ``path`` (diffusers/PEFT or kohya naming) at strength ``scale``.

        LoRAs add up, each with its own scale (:meth:`set_lora_scales`); they are merged into
        the weights inside each call's program, so changing a scale does not recompile.
        ``path`` is a ``.safetensors`` file or a folder holding
        ``pytorch_lora_weights.safetensors``. A LoRA of another model is refused, naming the
        layer and the shapes."""
        loaded = lora_files.load_lora(path, self.models)
        self.loras.append(loaded)
        self.lora_scales.append(float(scale))
        return loaded

    def set_lora_scales(self, scales) -> None:
        """One strength per loaded LoRA, in the order they were loaded."""
        scales = [float(s) for s in (scales if isinstance(scales, (list, tuple)) else [scales])]
        if len(scales) != len(self.loras):
            raise ValueError(f"{len(scales)} scales for {len(self.loras)} loaded LoRAs")
        self.lora_scales = scales

    def unload_loras(self) -> None:
        """Back to the folder's own weights."""
        self.loras, self.lora_scales = [], []

    def fuse_loras(self) -> None:
        """Merge the loaded LoRAs into the weights at their scales, once (no merge per call)."""
        if self.loras:
            self.models = lora_files.merge_into(self.models, self.loras, self.lora_scales)
            self.unload_loras()

    # -- inputs ----------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> list:
        """Token ids [batch, 77] for each of the model's tokenizers."""
        return [np.asarray(tokenizer(list(prompts)), np.int32)
                for tokenizer in self.models.tokenizers]

    def _size(self, height, width):
        models = self.models
        height = models.default_size if height is None else int(height)
        width = models.default_size if width is None else int(width)
        multiple = models.latent_factor * 2 ** (len(models.unet.channel_mult) - 1)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple} for "
                             f"this model (latent factor {models.latent_factor} x "
                             f"{2 ** (len(models.unet.channel_mult) - 1)} for the UNet's "
                             f"levels), got {height} x {width}")
        return height, width

    # -- generation ------------------------------------------------------------------------------

    def __call__(self, prompt: Union[str, Sequence[str]],
                 negative_prompt: Union[None, str, Sequence[str]] = None, num_steps: int = 50,
                 guidance_scale: float = 7.5, method: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None, key=None,
                 latents=None, guidance_rescale: float = 0.0, grid: Optional[str] = None,
                 control_image=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0,
                 **sampler_options) -> np.ndarray:
        """Generate one image per prompt: float32 [batch, height, width, 3] in [0, 1].

        Args:
          prompt: a prompt or a list of them (the batch).
          negative_prompt: guidance moves away from it; one, or one per prompt. None: the empty
            prompt (SDXL, as diffusers: zero conditioning).
          num_steps: sampler steps.
          guidance_scale: classifier-free guidance scale; <= 1 runs the conditional model alone.
          method: None for the folder's scheduler; else one of the library's samplers
            (``samplers.METHODS``), on ``grid`` (None: the folder's timestep spacing) with
            ``sampler_options``.
          height, width: image size (default: the size the model was trained for).
          key: PRNG key for the initial noise (when ``latents`` is None) and stochastic
            samplers; default ``jax.random.key(0)``.
          latents: the initial standard-normal latents [batch, height/8, width/8, channels]
            (NHWC); the same array diffusers takes (permuted to NCHW) gives its images.
          guidance_rescale: Lin et al. 2023's rescale phi, in the model's prediction space.
          control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end: the loaded ControlNets' images (None: the UNet alone), scales
            and windows, as in diffusers (:func:`diffusion_jax.pipelines.control.request`).
        """
        if self.inpainting_model:
            raise ValueError("this folder's UNet is an inpainting model (9 input channels: "
                             "latents, mask, masked-image latents); call pipe.inpaint(prompt, "
                             "image, mask)")
        return self._run(prompt, negative_prompt, num_steps, guidance_scale, method, height,
                         width, key, latents, guidance_rescale, grid, sampler_options,
                         control=(control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end))

    def img2img(self, prompt: Union[str, Sequence[str]], image, strength: float = 0.8,
                negative_prompt: Union[None, str, Sequence[str]] = None, num_steps: int = 50,
                guidance_scale: float = 7.5, method: Optional[str] = None,
                height: Optional[int] = None, width: Optional[int] = None, key=None,
                latents=None, image_noise=None, guidance_rescale: float = 0.0,
                grid: Optional[str] = None, control_image=None,
                controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                control_guidance_end=1.0, **sampler_options) -> np.ndarray:
        """Image-to-image (SDEdit): ``image`` noised by ``strength``, then denoised with ``prompt``.

        Of ``num_steps`` steps the last ``min(int(num_steps * strength), num_steps)`` run, as
        in diffusers' ``StableDiffusionImg2ImgPipeline``; strength 0 returns ``image`` and
        strength 1 is text-to-image from ``latents`` (the image plays no part).

        Args:
          image: a path (read and resized to ``height`` x ``width``, default the model's size),
            or an array [height, width, 3] or [batch, height, width, 3] in [0, 1] (uint8 in
            [0, 255] too): one for every prompt, or one per prompt.
          latents: the standard normal noise added to the image latents (default: from key).
          image_noise: the standard normal draw of the VAE posterior sample of each image
            latent (default: from ``key``); with the draws diffusers makes from its generator
            (the posterior's first, then the noise), its images are reproduced.
          The other arguments are those of ``__call__``.
        """
        if self.inpainting_model:
            raise ValueError("this folder's UNet is an inpainting model; call pipe.inpaint")
        return self._run(prompt, negative_prompt, num_steps, guidance_scale, method, height,
                         width, key, latents, guidance_rescale, grid, sampler_options,
                         edit=_EditRequest(image, strength, image_noise=image_noise),
                         control=(control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end))

    def inpaint(self, prompt: Union[str, Sequence[str]], image, mask, strength: float = 1.0,
                negative_prompt: Union[None, str, Sequence[str]] = None, num_steps: int = 50,
                guidance_scale: float = 7.5, method: Optional[str] = None,
                height: Optional[int] = None, width: Optional[int] = None, key=None,
                latents=None, image_noise=None, masked_image_noise=None,
                guidance_rescale: float = 0.0, grid: Optional[str] = None,
                jump_length: int = 10, jump_n_sample: int = 1, control_image=None,
                controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                control_guidance_end=1.0, **sampler_options) -> np.ndarray:
        """Repaint where ``mask`` is white, keep the rest; ``prompt`` says what to paint.

        With an inpainting checkpoint (UNet input: latents, the mask at latent size, the
        latents of the image with the masked region set to grey) this is diffusers'
        ``StableDiffusionInpaintPipeline``. With an ordinary checkpoint the latents outside the
        mask are replaced after every step by the image's latents noised to that step
        (with the initial noise, as diffusers does; exactly the image latents after the last
        step), and RePaint's resampling jumps are available (``jump_n_sample`` > 1, one-step
        samplers only).

        Args:
          image: as for :meth:`img2img`.
          mask: a path (grey; resized with nearest-neighbour sampling) or an array [height,
            width(, 1)] or [batch, height, width(, 1)]: values >= 0.5 are repainted.
          strength: as for :meth:`img2img`; 1 (the default) starts the masked region from pure
            noise.
          image_noise, masked_image_noise: the posterior draws of the image's and the masked
            image's VAE latents (default: from ``key``); diffusers draws them from its generator
            in the order image (only when strength < 1 or the UNet has 4 channels), noise,
            masked image.
          The other arguments are those of ``__call__``.
        """
        return self._run(prompt, negative_prompt, num_steps, guidance_scale, method, height,
                         width, key, latents, guidance_rescale, grid, sampler_options,
                         edit=_EditRequest(image, strength, mask=mask, image_noise=image_noise,
                                           masked_image_noise=masked_image_noise,
                                           jump_length=jump_length,
                                           jump_n_sample=jump_n_sample),
                         control=(control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end))

    @property
    def inpainting_model(self) -> bool:
        """Whether the UNet reads 9 channels (an inpainting checkpoint)."""
        return self._unet_in_channels == 9

    @property
    def _unet_in_channels(self) -> int:
        return int(self.models.unet_config.get("in_channels", 4))

    def _edit_inputs(self, edit, batch, height, width, key):
        """The arrays an editing program reads, and the image itself (for strength 0)."""
        models = self.models

        def read(image):  # a file is resized to the size asked for; an array sets the size
            if isinstance(image, (str, os.PathLike)):
                return editing.read_image(image, height or models.default_size,
                                          width or models.default_size, 3)
            shape = np.shape(image)
            return editing.read_image(image, height or shape[0], width or shape[1], 3)

        images = _batch_of(edit.image, batch, "image", read)
        height, width = self._size(*images.shape[1:3])
        latent_shape = (batch, height // models.latent_factor, width // models.latent_factor,
                        models.vae.latent_channels)
        key_image, key_masked = jax.random.split(jax.random.fold_in(key, 1))
        inputs = {"image": jnp.asarray(images) * 2.0 - 1.0,
                  "image_noise": _noise(edit.image_noise, key_image, latent_shape,
                                        "image_noise")}
        if edit.mask is not None:
            inputs["mask"] = jnp.asarray(_batch_of(
                edit.mask, batch, "mask", lambda m: editing.read_mask(m, height, width)))
            if self.inpainting_model:
                inputs["masked_image_noise"] = _noise(edit.masked_image_noise, key_masked,
                                                      latent_shape, "masked_image_noise")
        return inputs, images, height, width

    def _run(self, prompt, negative_prompt, num_steps, guidance_scale, method, height, width,
             key, latents, guidance_rescale, grid, sampler_options, edit=None, control=()):
        control = control_lib.ControlRequest.of(self.controlnets, *control)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        batch = len(prompts)
        negatives = self._negatives(negative_prompt, batch)
        key = jax.random.key(0) if key is None else key
        key_noise, key_sampler = jax.random.split(key)
        edit_inputs = None
        if edit is not None:
            steps_run = editing.steps_to_run(num_steps, edit.strength)
            edit_inputs, images, height, width = self._edit_inputs(edit, batch, height, width,
                                                                   key)
            if steps_run == 0:  # strength 0: nothing is noised, nothing repainted
                return images
        if control is not None:  # diffusers' default size: the control image's
            height, width = control.size(height, width, self.models.latent_factor)
        height, width = self._size(height, width)
        latent_shape = (batch, height // self.models.latent_factor,
                        width // self.models.latent_factor, self.models.unet.out_channels)
        if latents is None:
            latents = jax.random.normal(key_noise, latent_shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape} (batch, height / "
                             f"{self.models.latent_factor}, width / {self.models.latent_factor},"
                             f" channels; NHWC), got {latents.shape}")
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        sample_kwargs = self._sample_kwargs(int(num_steps), method, grid, sampler_options)
        control_inputs = None if control is None else control.inputs(
            batch, height, width, sample_kwargs, None if edit is None else edit.strength)
        inpaint = None
        if edit is not None and edit.mask is not None:
            inpaint = "channels" if self.inpainting_model else "known"
            if inpaint == "known" and edit.jump_n_sample != 1:
                sample_kwargs.update(jump_length=edit.jump_length,
                                     jump_n_sample=edit.jump_n_sample)
            elif inpaint == "channels" and edit.jump_n_sample != 1:
                raise ValueError("resampling jumps (jump_n_sample > 1) are for ordinary "
                                 "checkpoints; an inpainting checkpoint sees the mask itself")
        guided = float(guidance_scale) > 1.0
        ids = self.tokenize(prompts)
        negative_ids = None
        zero_negative = guided and negatives is None and self.models.family == "sdxl" and \
            self.force_zeros_for_empty_prompt
        if guided and not zero_negative:
            negative_ids = self.tokenize(negatives if negatives is not None else [""] * batch)
        time_ids = None
        if self.models.family == "sdxl":
            row = [height, width, 0, 0, height, width]  # original size, crop offset, target size
            time_ids = jnp.asarray([row] * batch, jnp.float32)
        program = self._program(_Static(prediction=self.base_plan.prediction,
            guided=guided, zero_negative=zero_negative, rescale=float(guidance_rescale),
            sample_kwargs=_freeze(sample_kwargs),
            strength=None if edit is None else float(edit.strength), inpaint=inpaint,
            control=None if control is None else control.static))
        images = program(self.params, ids, negative_ids, time_ids, latents,
                         jnp.float32(guidance_scale), key_sampler, edit_inputs, control_inputs)
        return parallel.to_host(images)

    def _sample_kwargs(self, num_steps, method, grid, options):
        """The keyword arguments of ``samplers.sample`` for one call.

        The folder's scheduler (with ``options`` merged into its own), or the library's
        ``method`` on the folder's spacing or ``grid``."""
        if method is None:
            if self.plan is None:
                raise ValueError(f"{self.plan_error}; pass method= (one of "
                                 f"{samplers.METHODS}) to sample this folder with one of the "
                                 "library's samplers")
            if grid is not None:
                raise ValueError(f"grid={grid!r} needs method=: the folder's scheduler "
                                 f"({self.plan.scheduler_class}) brings its own timesteps")
            kwargs = self.plan.sample_kwargs(num_steps)
        else:
            kwargs = scheduler_lib.plan_from_config(
                self.models.scheduler_config, method=method, grid=grid).sample_kwargs(num_steps)
        return {**kwargs, **options}

    def _negatives(self, negative_prompt, batch):
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else \
            list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts: give one, "
                             "or one per prompt")
        return negatives

    def _program(self, static):
        if static not in self._programs:
            self._programs[static] = jax.jit(functools.partial(self._generate, static))
        return self._programs[static]

    def _encode_image(self, params, images, noise):
        """Images in [-1, 1] -> scaled latents, a posterior draw with the standard normal noise."""
        models = self.models
        mean, logvar = models.vae.apply({"params": params["vae"]}, images,
                                        method=models.vae.encode)
        z = mean + jnp.exp(0.5 * logvar) * noise
        info = models.vae_info
        return (z - (info.get("shift_factor") or 0.0)) * info["scaling_factor"]

    def _generate(self, static, params, ids, negative_ids, time_ids, latents, scale, key, edit,
                  control):
        models = self.models
        params = _with_loras(params)
        sample_kwargs = _thaw(static.sample_kwargs)
        schedule = sample_kwargs.pop("schedule")
        cond = _encode(models, params["text_encoders"], ids)
        if static.guided:
            uncond = (jax.tree_util.tree_map(jnp.zeros_like, cond) if static.zero_negative
                      else _encode(models, params["text_encoders"], negative_ids))
        if time_ids is not None:
            cond["time_ids"] = time_ids
            if static.guided:
                uncond["time_ids"] = time_ids
        known = None
        if static.inpaint is not None:
            mask = editing.resize_mask(edit["mask"], *latents.shape[1:3])
            if static.inpaint == "channels":
                masked = edit["image"] * (edit["mask"] < 0.5)
                extra = jnp.concatenate(
                    [mask, self._encode_image(params, masked, edit["masked_image_noise"])], -1)
                cond["concat"] = extra
                if static.guided:
                    uncond["concat"] = extra
        unet, unet_params = models.unet, params["unet"]
        if static.control is not None:  # the control images and scales join the conditions
            modules, guess = static.control
            unet, unet_params = control_lib.controlled(unet, modules, unet_params, control)
            cond, uncond = control_lib.conditioning(control, cond, uncond if static.guided
                                                    else None, guess)
        unet = jax.tree_util.Partial(functools.partial(_apply_unet, unet), unet_params)
        denoise = parameterization.make_denoise_fn(unet, schedule, static.prediction)
        if static.control is not None:
            denoise = control_lib.windowed(denoise, control)
        if static.guided:
            fn = guidance.classifier_free_guidance(
                denoise, cond=cond, uncond=uncond, scale=scale, rescale=static.rescale,
                rescale_space=static.prediction, schedule=schedule)
        else:
            fn = jax.tree_util.Partial(lambda d, c, x, t: d(x, t, c), denoise, cond)
        if self.mesh is not None and latents.shape[0] % self.mesh.devices.size == 0:
            latents = jax.lax.with_sharding_constraint(latents, parallel.batch_sharding(self.mesh))
        if static.strength is None:
            final = samplers.sample(fn, latents, schedule=schedule, key=key,
                                    **sample_kwargs).samples
        else:
            # The image's latents are needed unless the sampler starts from pure noise and
            # nothing outside the mask is kept (text-to-image, or an inpainting UNet).
            pure = static.strength == 1.0 and static.inpaint != "known"
            x0 = (jnp.zeros_like(latents) if pure
                  else self._encode_image(params, edit["image"], edit["image_noise"]))
            if static.inpaint == "known":
                known = samplers.KnownRegion(x0, editing.keep_from_mask(mask), noise=latents)
            final = editing.image_to_image(fn, x0, latents, strength=static.strength,
                                           schedule=schedule, key=key, known=known,
                                           **sample_kwargs).samples
        info = models.vae_info
        z = final / info["scaling_factor"] + (info.get("shift_factor") or 0.0)
        images = models.vae.apply({"params": params["vae"]}, z, method=models.vae.decode)
        return jnp.clip(images / 2.0 + 0.5, 0.0, 1.0)


def _sharding(mesh, fsdp, _, shape):
    """Where a parameter read from a folder lives: replicated, split over ``fsdp``, or default."""
    if mesh is None:
        return None
    return parallel.parameter_sharding(mesh, shape) if fsdp else parallel.replicated(mesh)


def _with_loras(params: dict) -> dict:
    """The UNet's and text encoders' parameters with the LoRAs merged in at their scales."""
    if not params["loras"]:
        return params
    unet, encoders = lora_files.merged_params(params["unet"], params["text_encoders"],
                                              params["loras"], params["lora_scales"])
    return {**params, "unet": unet, "text_encoders": encoders}


def _batch_of(value, batch, name, read):
    """One image or mask (path or array) for every prompt, or one per prompt, stacked.

    Arrays: an image is [H, W, 3] or a batch [B, H, W, 3]; a mask [H, W] or [H, W, 1], or a
    batch [B, H, W] or [B, H, W, 1]. A list holds one item per prompt."""
    if isinstance(value, (list, tuple)):
        items = [read(v) for v in value]
    elif isinstance(value, (str, os.PathLike)):
        items = [read(value)]
    else:
        array = np.asarray(value)
        single = array.ndim == 3 if name == "image" else (
            array.ndim == 2 or array.ndim == 3 and array.shape[-1] == 1)
        if single:
            items = [read(array)]
        elif array.ndim in ((4,) if name == "image" else (3, 4)):
            items = [read(item) for item in array]
        else:
            raise ValueError(f"{name} has shape {array.shape}; give "
                             f"{'[height, width, 3]' if name == 'image' else '[height, width]'}"
                             " or a batch of them")
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise ValueError(f"{len(items)} {name}s for {batch} prompts: give one, or one per prompt")
    shapes = {item.shape for item in items}
    if len(shapes) != 1:
        raise ValueError(f"the {name}s differ in size ({sorted(shapes)}); give them one size")
    return np.stack(items)


def _noise(value, key, shape, name):
    if value is None:
        return jax.random.normal(key, shape, jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (NHWC latents), got {value.shape}")
    return value


@dataclasses.dataclass(frozen=True)
class _EditRequest:
    """What img2img / inpaint were asked to do (before reading any file)."""

    image: object
    strength: float
    mask: object = None
    image_noise: object = None
    masked_image_noise: object = None
    jump_length: int = 10
    jump_n_sample: int = 1


def _freeze(kwargs: dict) -> tuple:
    """Sampler keyword arguments as a hashable tuple (arrays as tuples of floats)."""
    return tuple((name, ("array", tuple(float(v) for v in np.asarray(value).reshape(-1)))
                  if isinstance(value, (np.ndarray, list, tuple)) else value)
                 for name, value in sorted(kwargs.items()))


def _thaw(frozen: tuple) -> dict:
    return {name: np.asarray(value[1]) if isinstance(value, tuple) and value[:1] == ("array",)
            else value for name, value in frozen}


@dataclasses.dataclass(frozen=True)
class _Static:
    """The settings a compiled generation program is specialised on (hashable)."""

    prediction: str
    guided: bool
    zero_negative: bool
    rescale: float
    sample_kwargs: tuple  # from _freeze
    strength: Optional[float] = None  # image-to-image / inpainting; None: text-to-image
    inpaint: Optional[str] = None  # "channels" (an inpainting UNet), "known" (RePaint) or None
    control: Optional[tuple] = None  # ControlNets: (modules, guess mode), or None
