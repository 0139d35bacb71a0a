"""Tiny random-weight Stable Diffusion folders written offline by diffusers and transformers.

``build(folder, family, scheduler)`` writes a complete diffusers model folder with
``save_pretrained``: a UNet2DConditionModel, an AutoencoderKL, CLIP text encoder(s) and
tokenizer(s), and a scheduler, each a few hundred kilobytes. Families: ``"sd1"`` (1x1-convolution
projections, quick-GELU encoder, epsilon prediction), ``"sd2"`` (linear projections, GELU encoder
padding with "!", v prediction) and ``"sdxl"`` (two encoders, the second with a projection,
"text_time" conditioning). The vocabulary is CLIP's byte alphabet without merges (no real
vocabulary can be downloaded); tokenizer parity on real BPE merges is tested in test_clip.py.
Every weight is perturbed from its initialisation so that zero-initialised layers hide nothing.
Returns the diffusers pipeline object, for reference outputs.

``build_controlnet(folder, pipe)`` writes a random-weight ``ControlNetModel`` for such a
pipeline's UNet (``from_unet``, its zero convolutions made random too), and
``other_base=True`` one built for another UNet (other block widths).
"""

from __future__ import annotations

import json
import os

import torch

SCHEDULERS = {  # name -> (diffusers class, config overrides on SD's betas)
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "ddim": ("DDIMScheduler", dict(set_alpha_to_one=False, steps_offset=1, clip_sample=False)),
    "euler": ("EulerDiscreteScheduler", dict(steps_offset=1, timestep_spacing="leading")),
    "dpmpp": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                  steps_offset=1)),
    "dpmpp_karras": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++",
                                                         solver_order=2, use_karras_sigmas=True)),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(steps_offset=1)),
}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000)


def byte_vocabulary(folder, pad="<|endoftext|>"):
    """A CLIP-style vocabulary of the 256 byte characters (with and without "</w>")."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return vocab


def _perturb(module, scale=0.02):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


def _text_encoder(transformers, vocab, pad_id, hidden, act, projection=None):
    config = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=pad_id, projection_dim=projection or hidden)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return _perturb(cls(config).eval())


def build(folder, family="sd1", scheduler="ddim", seed=0, inpainting=False):
    """Write a tiny ``family`` folder with ``scheduler``; return the diffusers pipeline.

    ``inpainting``: an inpainting checkpoint (UNet of 9 input channels, saved as diffusers'
    inpainting pipeline)."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tmp_tokenizer = os.fspath(folder).rstrip("/") + "_vocab"
    pad = "!" if family == "sd2" else "<|endoftext|>"
    vocab = byte_vocabulary(tmp_tokenizer)
    tokenizer = transformers.CLIPTokenizer(os.path.join(tmp_tokenizer, "vocab.json"),
                                           os.path.join(tmp_tokenizer, "merges.txt"),
                                           model_max_length=77, pad_token=pad)
    vae = _perturb(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=32, scaling_factor=0.18215).eval())
    class_name, overrides = SCHEDULERS[scheduler]
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    sched = getattr(diffusers, class_name)(**SD_BETAS, prediction_type=prediction, **overrides)
    common = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, in_channels=9 if inpainting else 4)
    if family in ("sd1", "sd2"):
        unet = _perturb(diffusers.UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4 if family == "sd1" else (2, 4),
            use_linear_projection=family == "sd2", **common).eval())
        encoder = _text_encoder(transformers, vocab, vocab[pad], 32,
                                "quick_gelu" if family == "sd1" else "gelu")
        pipeline_class = (diffusers.StableDiffusionInpaintPipeline if inpainting
                          else diffusers.StableDiffusionPipeline)
        pipe = pipeline_class(
            unet=unet, vae=vae, text_encoder=encoder, tokenizer=tokenizer, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        unet = _perturb(diffusers.UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 48,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
            **common).eval())
        encoder = _text_encoder(transformers, vocab, vocab[pad], 32, "quick_gelu")
        encoder_2 = _text_encoder(transformers, vocab, vocab[pad], 48, "gelu", projection=24)
        pipeline_class = (diffusers.StableDiffusionXLInpaintPipeline if inpainting
                          else diffusers.StableDiffusionXLPipeline)
        pipe = pipeline_class(
            unet=unet, vae=vae, text_encoder=encoder, text_encoder_2=encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


# The tiny VAE halves the image: the control image's encoder has one stride-2 stage.
CONTROL_EMBEDDING = (16, 32)


def build_controlnet(folder, pipe, seed=1, other_base=False, **options):
    """Write a random-weight diffusers ``ControlNetModel`` for ``pipe``'s UNet; return it.

    ``options`` are ``ControlNetModel.from_unet``'s (``controlnet_conditioning_channel_order``,
    ``conditioning_channels``, ...). Every weight is perturbed, the zero-initialised
    convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``,
    ``controlnet_cond_embedding.conv_out``) strongly, so that the control changes the images.
    ``other_base``: a ControlNet of another UNet (block widths (16, 32) instead of (32, 64))."""
    import diffusers

    torch.manual_seed(seed)
    options.setdefault("conditioning_embedding_out_channels", CONTROL_EMBEDDING)
    if other_base:
        config = dict(pipe.unet.config)
        config.update(block_out_channels=(16, 32), sample_size=16)
        unet = diffusers.UNet2DConditionModel.from_config(config)
    else:
        unet = pipe.unet
    controlnet = _perturb(diffusers.ControlNetModel.from_unet(unet, **options).eval())
    zero_initialised = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                        controlnet.controlnet_cond_embedding.conv_out]
    for module in zero_initialised:
        _perturb(module, scale=0.2)
    controlnet.save_pretrained(folder)
    return controlnet


def finetune_config(folder):
    """The fine-tuning preset on ``folder``, sized for the tests (32 px captioned shapes,
    batch 2, float32, no remat, no sample grids)."""
    import importlib

    config = importlib.import_module("configs.stable_diffusion_finetune").get_config()
    config.sized_for = "any"
    config.pretrained.path = os.fspath(folder)
    config.latent.autoencoder = os.path.join(os.fspath(folder), "vae")
    config.data.update(name="captions", resolution=32, batch_size=2, size=64)
    config.model.update(dtype="float32", remat=False, attention="xla")
    config.training.update(sample_every=0, warmup_steps=0)
    return config
