"""Image-to-image and inpainting with Stable Diffusion folders give diffusers' images.

The tiny random-weight folders of ``sd_folders`` are loaded by
:class:`diffusion_jax.pipelines.StableDiffusion` and by diffusers'
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``. diffusers draws the VAE
posterior samples and the noise from one generator; the same draws, made here in its order, are
given to our pipeline (``image_noise``, ``latents``, ``masked_image_noise``), so both start from
the same numbers. Images in [0, 1] must agree to 2e-3 (float32); the worst differences seen are
in the comments and in docs/editing.md.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402

import sd_folders  # noqa: E402
from diffusion_jax.pipelines import StableDiffusion  # noqa: E402

BOUND = 2e-3
PROMPTS = ["a red circle, on blue!", "a green square"]
NEGATIVE = ["blurry", ""]
SIZE = 32  # the tiny folders' default image size (UNet sample size 16, VAE factor 2)


def _image_and_mask(seed=0):
    rng = np.random.default_rng(seed)
    # A smooth image (the VAE sees structure, not white noise) and a box mask per prompt.
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = np.stack([np.stack([0.5 + 0.4 * np.sin(6 * x + k), 0.5 + 0.4 * np.cos(5 * y - k),
                                np.full_like(x, 0.3 + 0.2 * k)], -1) for k in range(2)])
    image = np.clip(image + 0.02 * rng.standard_normal(image.shape), 0, 1).astype(np.float32)
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[0, 8:24, 4:20] = 1.0
    mask[1, 2:14, 10:30] = 1.0
    return image, mask


def _draws(order, seed=0):
    """Standard normal latents drawn as diffusers draws them from one generator (NHWC)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)
    return {name: torch.randn(shape, generator=generator).permute(0, 2, 3, 1).numpy()
            for name in order}


SLOW = pytest.mark.slow  # the default suite keeps one case of each kind


@pytest.mark.parametrize("family, scheduler, strength", [
    ("sd1", "ddim", 0.6), pytest.param("sd1", "euler", 0.35, marks=SLOW),
    ("sd2", "dpmpp", 0.7), pytest.param("sdxl", "euler", 0.5, marks=SLOW)])
def test_img2img_matches_diffusers(tmp_path, family, scheduler, strength):
    pipe = sd_folders.build(tmp_path / "model", family, scheduler)
    image, _ = _image_and_mask()
    draws = _draws(["posterior", "noise"])
    cls = (diffusers.StableDiffusionXLImg2ImgPipeline if family == "sdxl"
           else diffusers.StableDiffusionImg2ImgPipeline)
    reference = cls(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference(prompt=PROMPTS, negative_prompt=NEGATIVE, image=image,
                           strength=strength, num_inference_steps=10, guidance_scale=7.5,
                           generator=torch.Generator().manual_seed(0), output_type="np").images
    ours = StableDiffusion.from_pretrained(tmp_path / "model").img2img(
        PROMPTS, image, strength=strength, negative_prompt=NEGATIVE, num_steps=10,
        guidance_scale=7.5, latents=draws["noise"], image_noise=draws["posterior"])
    assert ours.shape == theirs.shape
    worst = float(np.abs(ours - theirs).max())
    print(f"img2img {family}/{scheduler} strength {strength}: worst {worst:.2e}")
    assert worst <= BOUND
    # The output moved away from the input (the network ran) but kept its layout.
    assert np.abs(ours - image).mean() > 1e-3


@pytest.mark.parametrize("family, scheduler, inpainting, strength", [
    ("sd1", "ddim", True, 1.0), pytest.param("sd1", "euler", True, 0.6, marks=SLOW),
    ("sd1", "ddim", False, 1.0), pytest.param("sd2", "dpmpp", False, 0.8, marks=SLOW)])
def test_inpaint_matches_diffusers(tmp_path, family, scheduler, inpainting, strength):
    pipe = sd_folders.build(tmp_path / "model", family, scheduler, inpainting=inpainting)
    image, mask = _image_and_mask()
    encodes_image = strength < 1.0 or not inpainting
    draws = _draws((["image"] if encodes_image else []) + ["noise", "masked"])
    reference = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference(prompt=PROMPTS, negative_prompt=NEGATIVE, image=image, mask_image=mask, strength=strength, num_inference_steps=10,
                           guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                           output_type="np").images
    ours = StableDiffusion.from_pretrained(tmp_path / "model").inpaint(
        PROMPTS, image, mask, strength=strength, negative_prompt=NEGATIVE, num_steps=10,
        guidance_scale=7.5, latents=draws["noise"], image_noise=draws.get("image"),
        masked_image_noise=draws["masked"])
    worst = float(np.abs(ours - theirs).max())
    print(f"inpaint {family}/{scheduler} 9-channel={inpainting} strength {strength}: "
          f"worst {worst:.2e}")
    assert worst <= BOUND


def test_strength_zero_returns_the_input_and_one_is_text_to_image(tmp_path):
    sd_folders.build(tmp_path / "model", "sd1", "ddim")
    pipe = StableDiffusion.from_pretrained(tmp_path / "model")
    image, mask = _image_and_mask()
    key = jax.random.key(3)
    np.testing.assert_array_equal(pipe.img2img(PROMPTS, image, strength=0.0, num_steps=10),
                                  image)
    np.testing.assert_array_equal(pipe.inpaint(PROMPTS, image, mask, strength=0.0,
                                               num_steps=10), image)
    # strength 0.05 of 10 steps is int(0.5) = 0 steps: the input too (diffusers' rule).
    np.testing.assert_array_equal(pipe.img2img(PROMPTS, image, strength=0.05, num_steps=10),
                                  image)
    text = pipe(PROMPTS, num_steps=10, key=key)
    np.testing.assert_array_equal(pipe.img2img(PROMPTS, image, strength=1.0, num_steps=10,
                                               key=key), text)
    other = np.ascontiguousarray(image[::-1])
    np.testing.assert_array_equal(pipe.img2img(PROMPTS, other, strength=1.0, num_steps=10,
                                               key=key), text)


def test_editing_inputs_are_checked(tmp_path):
    sd_folders.build(tmp_path / "model", "sd1", "ddim")
    pipe = StableDiffusion.from_pretrained(tmp_path / "model")
    image, mask = _image_and_mask()
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.img2img(PROMPTS, image, strength=1.5, num_steps=4)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        pipe.img2img(PROMPTS, [image[0]] * 3, num_steps=4)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe.img2img(PROMPTS, image[:, :30, :30], num_steps=4)
    with pytest.raises(ValueError, match="the mask has shape"):
        pipe.inpaint(PROMPTS, image, mask[:, :16], num_steps=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.img2img(PROMPTS, tmp_path / "missing.png", num_steps=4)
    with pytest.raises(ValueError, match="image_noise must have shape"):
        pipe.img2img(PROMPTS, image, num_steps=4, image_noise=np.zeros((2, 3, 3, 4)))
    with pytest.raises(ValueError, match="keeps no history"):
        pipe.inpaint(PROMPTS, image, mask, num_steps=4, method="dpmpp_2m", jump_length=2,
                     jump_n_sample=2)
    with pytest.raises(ValueError, match="call pipe.inpaint"):
        sd_folders.build(tmp_path / "inpaint", "sd1", "ddim", inpainting=True)
        StableDiffusion.from_pretrained(tmp_path / "inpaint")(PROMPTS, num_steps=4)
