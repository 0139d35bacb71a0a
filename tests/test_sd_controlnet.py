"""Diffusers ControlNet folders load onto our ControlNet and give diffusers' ControlNet images.

A random-weight ``ControlNetModel`` for a tiny Stable Diffusion folder (``sd_folders``), its
zero-initialised convolutions made random so that the control shows, is saved by diffusers and
loaded by :func:`diffusion_jax.pretrained.controlnet.load_controlnet` and by
:meth:`StableDiffusion.load_controlnet`. From the same latents, prompts and control images our
pipeline must give diffusers' ``StableDiffusionControlNetPipeline`` images to 2e-3 (float32).
Worst differences seen, images in [0, 1]:

- residuals of the ControlNet alone (outputs up to ~7): 9.1e-6;
- SD 1.x-like, DDIM, conditioning scale 0.6, window (0.2, 0.7) of 6 steps: 1.6e-6;
- SD 1.x-like, PNDM, scale 1 (slow): 1.1e-6; SD 2.x-like, v prediction, DPM-Solver++, scale
  1.5 (slow): 1.6e-6;
- two ControlNets (one BGR) with their own scales and windows (slow): 1.9e-6;
- SDXL-like with its text_time conditioning, 32 x 48 (slow): 2.2e-6;
- image-to-image, strength 0.7, window end 0.8 (slow): 1.3e-6;
- a BGR, one-channel ControlNet with global_pool_conditions (guess mode, slow): 2.3e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
from PIL import Image  # noqa: E402

import sd_folders  # noqa: E402
from diffusion_jax.pipelines import StableDiffusion  # noqa: E402
from diffusion_jax.pipelines import control as control_lib  # noqa: E402
from diffusion_jax.pretrained import controlnet as controlnet_lib  # noqa: E402
from diffusion_jax.pretrained import sd_unet  # noqa: E402

BOUND = 2e-3
PROMPTS = ["a red circle, on blue!", "a green square"]
NEGATIVE = ["blurry", ""]
SIZE = 32  # the tiny folders' image size (UNet sample size 16, VAE factor 2)
STEPS = 6


def _latents(seed=0, size=(SIZE, SIZE)):
    shape = (len(PROMPTS), size[0] // 2, size[1] // 2, 4)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _control_images(seed=0, size=(SIZE, SIZE)):
    """Smooth control images with edges, one per prompt, [2, H, W, 3] in [0, 1]."""
    y, x = np.mgrid[0:size[0], 0:size[1]] / max(size)
    images = [np.stack([(np.sin(9 * x + k + seed) > 0), (y > 0.3 + 0.2 * k),
                        0.5 + 0.5 * np.cos(7 * y * x + seed)], -1) for k in range(2)]
    return np.stack(images).astype(np.float32)


def _reference(pipe, controlnet, cls=None):
    """diffusers' ControlNet pipeline over ``pipe``'s components."""
    cls = cls or diffusers.StableDiffusionControlNetPipeline
    reference = cls(**pipe.components, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    return reference


def _parity(ours, theirs, what: str) -> None:
    """Our images against diffusers': the worst absolute difference, printed, within BOUND."""
    error = float(np.abs(ours - theirs).max())
    print(f"{what}: max abs image difference {error:.2e}")
    assert error <= BOUND


def _their_images(reference, latents, control, steps=STEPS, negative=NEGATIVE, **kwargs):
    with torch.no_grad():
        return reference(prompt=PROMPTS, negative_prompt=negative, num_inference_steps=steps,
                         guidance_scale=7.5, image=control, output_type="np",
                         latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                         generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1.x-like folder (DDIM), a ControlNet for it, and one for another base."""
    root = tmp_path_factory.mktemp("controlnet")
    pipe = sd_folders.build(root / "model", "sd1", "ddim")
    controlnet = sd_folders.build_controlnet(root / "controlnet", pipe)
    sd_folders.build_controlnet(root / "other_base", pipe, other_base=True)
    return root, pipe, controlnet


@pytest.fixture(scope="module")
def loaded(sd1):
    """Our pipeline on the folder with its ControlNet, and its images without the ControlNet.

    The images without are made before the ControlNet is loaded (the tests share the pipeline's
    compiled programs)."""
    root, _, _ = sd1
    pipe = StableDiffusion.from_pretrained(root / "model")
    without = pipe(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=_latents())
    pipe.load_controlnet(root / "controlnet")
    return pipe, without


# -- the converter -------------------------------------------------------------------------------


def _their_residuals(controlnet, x, k, control, context):
    with torch.no_grad():
        down, mid = controlnet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(k),
                               encoder_hidden_states=torch.from_numpy(context),
                               controlnet_cond=torch.from_numpy(control).permute(0, 3, 1, 2),
                               return_dict=False)
    return [d.permute(0, 2, 3, 1).numpy() for d in down], mid.permute(0, 2, 3, 1).numpy()


def test_every_tensor_is_mapped_and_the_residuals_match(sd1):
    root, _, controlnet = sd1
    module, params, config = controlnet_lib.load_controlnet(root / "controlnet")
    assert config["_class_name"] == "ControlNetModel"
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    assert count == sum(p.numel() for p in controlnet.parameters())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    k = np.array([500.0, 20.0], np.float32)
    control = rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    down, mid = _their_residuals(controlnet, x, k, control, context)
    ours_down, ours_mid = jax.jit(module.apply)({"params": params}, x, (k + 1.0) / 1000.0,
                                                control, context=context)
    assert len(ours_down) == len(down)
    errors = [np.abs(np.asarray(a) - b).max() for a, b in zip(ours_down + (ours_mid,),
                                                             down + [mid])]
    print(f"ControlNet residuals: worst {max(errors):.2e} (outputs up to "
          f"{max(np.abs(r).max() for r in down + [mid]):.1f})")
    assert max(errors) < 1e-4


def test_unknown_and_missing_tensors_are_refused(sd1):
    root, _, controlnet = sd1
    module = controlnet_lib.controlnet_from_config(sd_unet.read_config(root / "controlnet",
                                                                       "ControlNetModel"))
    state = {name: t.numpy() for name, t in controlnet.state_dict().items()}
    controlnet_lib.convert_state_dict(state, module)
    with pytest.raises(ValueError, match=r"does not use \(1\): controlnet_extra\.weight"):
        controlnet_lib.convert_state_dict({**state, "controlnet_extra.weight": np.zeros(3)},
                                          module)
    name = "controlnet_cond_embedding.blocks.1.weight"
    with pytest.raises(ValueError, match=r"missing from the weights \(1\): " + name):
        controlnet_lib.convert_state_dict({n: v for n, v in state.items() if n != name}, module)


@pytest.mark.parametrize("change, key", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type"),
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(encoder_hid_dim=32, encoder_hid_dim_type="text_proj"), "encoder_hid_dim"),
    (dict(controlnet_conditioning_channel_order="rbg"), "controlnet_conditioning_channel_order"),
    (dict(conditioning_embedding_out_channels=None), "conditioning_embedding_out_channels"),
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(down_block_types=["CrossAttnDownBlock2D", "AttnDownBlock2D"]), "down_block_types"),
    (dict(up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), "up_block_types"),
    (dict(something_new=1), "something_new"),
    (dict(_class_name="UNet2DConditionModel"), "not a Stable Diffusion ControlNet"),
])
def test_unsupported_configurations_name_the_key(sd1, change, key):
    root, _, _ = sd1
    config = {**sd_unet.read_config(root / "controlnet", "ControlNetModel"), **change}
    with pytest.raises(ValueError, match=key):
        controlnet_lib.controlnet_from_config(config)


def _pooling_controlnet(folder, pipe):
    """A BGR, pooling, one-channel ControlNet (a shuffle-like ControlNet) for ``pipe``."""
    config = {k: v for k, v in diffusers.ControlNetModel.from_unet(
        pipe.unet, conditioning_embedding_out_channels=(16, 32)).config.items()
        if not k.startswith("_")}  # "_use_default_values" would override the changes
    config.update(controlnet_conditioning_channel_order="bgr", global_pool_conditions=True,
                  conditioning_channels=1)
    torch.manual_seed(0)
    controlnet = sd_folders._perturb(diffusers.ControlNetModel.from_config(config).eval(), 0.1)
    controlnet.save_pretrained(folder)
    return controlnet


def test_channel_order_pooling_and_grey_controls_match_diffusers(tmp_path, sd1):
    """``controlnet_conditioning_channel_order="bgr"``, ``global_pool_conditions`` and one
    conditioning channel, each read from the config."""
    _, pipe, _ = sd1
    controlnet = _pooling_controlnet(tmp_path / "controlnet", pipe)
    module, params, _ = controlnet_lib.load_controlnet(tmp_path / "controlnet")
    assert module.bgr and module.pool_residuals and module.control_channels == 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    k = np.array([300.0], np.float32)
    control = rng.uniform(size=(1, SIZE, SIZE, 1)).astype(np.float32)
    context = rng.standard_normal((1, 5, 32)).astype(np.float32)
    down, mid = _their_residuals(controlnet, x, k, control, context)
    ours_down, ours_mid = jax.jit(module.apply)({"params": params}, x, (k + 1.0) / 1000.0,
                                                control, context=context)
    assert ours_mid.shape == mid.shape == (1, 1, 1, 64)
    errors = [np.abs(np.asarray(a) - b).max() for a, b in zip(ours_down + (ours_mid,),
                                                             down + [mid])]
    assert max(errors) < 1e-4


def test_control_images_are_prepared_as_diffusers_prepares_them(tmp_path):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 24), np.uint8), mode="L")
    picture.save(tmp_path / "edges.png")
    theirs = processor.preprocess(picture, height=SIZE, width=48)[0].permute(1, 2, 0).numpy()
    for value in (picture, tmp_path / "edges.png", str(tmp_path / "edges.png")):
        ours = control_lib.read_control_image(value, SIZE, 48)
        assert ours.shape == (SIZE, 48, 3) and np.array_equal(ours, theirs)
    for shape in ((48, 20, 3), (16, 40, 3)):  # arrays: nearest-neighbour down and up
        array = rng.uniform(size=shape).astype(np.float32)
        theirs = processor.preprocess(array[None], height=SIZE, width=SIZE)
        ours = control_lib.read_control_image(array, SIZE, SIZE)
        assert np.array_equal(ours, theirs[0].permute(1, 2, 0).numpy())
    uint8 = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    assert np.allclose(control_lib.read_control_image(uint8, SIZE, SIZE), uint8 / 255.0)


# -- the pipeline --------------------------------------------------------------------------------


def test_pipeline_matches_diffusers_with_scale_and_window(sd1, loaded):
    """Conditioning scale 0.6, control over steps 2 and 3 of 6 (start 0.2, end 0.7)."""
    _, pipe, controlnet = sd1
    loaded, without = loaded
    latents, control = _latents(), _control_images()
    window = dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2,
                  control_guidance_end=0.7)
    theirs = _their_images(_reference(pipe, controlnet), latents, control, **window)
    ours = loaded(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=latents,
                  control_image=control, **window)
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    _parity(ours, theirs, "sd1 ddim, scale 0.6, window (0.2, 0.7)")
    # The control shows: without it, or with another window, the images differ.
    assert np.abs(without - theirs).max() > 10 * BOUND
    programs = len(loaded._programs)
    other = loaded(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=latents,
                   control_image=_control_images(seed=3), controlnet_conditioning_scale=1.2,
                   control_guidance_end=0.5)
    assert np.abs(other - theirs).max() > 10 * BOUND
    assert len(loaded._programs) == programs  # new images, scales and windows are data


def test_scale_zero_is_the_pipeline_without_controlnet(loaded):
    loaded, without = loaded
    latents = _latents()
    zero = loaded(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=latents,
                  control_image=_control_images(seed=1), controlnet_conditioning_scale=0.0)
    assert np.array_equal(zero, without)
    # A loaded ControlNet leaves calls without control_image as they were, same program.
    programs = len(loaded._programs)
    again = loaded(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=latents)
    assert np.array_equal(again, without) and len(loaded._programs) == programs


def test_errors_name_the_argument_or_folder(sd1, loaded):
    root, _, _ = sd1
    loaded, _ = loaded
    control = _control_images()
    with pytest.raises(ValueError, match="control_image has 4 channels.*reads 3"):
        loaded(PROMPTS, control_image=np.concatenate([control, control[..., :1]], -1))
    with pytest.raises(ValueError, match="3 control images for 2 prompts"):
        loaded(PROMPTS, control_image=[control[0]] * 3)
    with pytest.raises(ValueError, match="control_image array has shape"):
        loaded(PROMPTS, control_image=control[0, ..., 0])
    with pytest.raises(ValueError, match=r"control_image array must hold values in \[0, 1\]"):
        loaded(PROMPTS, control_image=control * 2.0)
    with pytest.raises(FileNotFoundError, match="control_image .*missing.png does not exist"):
        loaded(PROMPTS, control_image=str(root / "missing.png"))
    with pytest.raises(ValueError, match="control window needs 0 <= start < end <= 1"):
        loaded(PROMPTS, control_image=control, control_guidance_start=0.8,
               control_guidance_end=0.3)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 2 values for 1"):
        loaded(PROMPTS, control_image=control, controlnet_conditioning_scale=[1.0, 0.5])
    with pytest.raises(ValueError, match="multiples of 4"):  # the size comes from the image
        loaded(PROMPTS, control_image=control[:, :30, :30])
    plain = StableDiffusion.from_pretrained(root / "model")
    with pytest.raises(ValueError, match="no ControlNet is loaded.*load_controlnet"):
        plain(PROMPTS, control_image=control)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale was given without "
                                         "control_image"):
        loaded(PROMPTS, controlnet_conditioning_scale=0.5)
    other = str(root / "other_base")
    with pytest.raises(ValueError, match=rf"ControlNet in {other} was built for another base"
                                         r"(.|\n)*block_out_channels: \[16, 32\] in the "
                                         r"ControlNet, \[32, 64\] in the UNet(.|\n)*"
                                         r"down_blocks\.0\.resnets\.0\.conv1\.weight"):
        plain.load_controlnet(other)
    assert plain.controlnets == []
    plain.load_controlnet(root / "controlnet")
    plain.load_controlnet(root / "controlnet")
    with pytest.raises(ValueError, match="2 ControlNets are loaded: give control_image as a "
                                         "list with one entry per ControlNet"):
        plain(PROMPTS, control_image=control[0])


# -- slower cases --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family, scheduler, scale", [("sd1", "pndm", 1.0),
                                                      ("sd2", "dpmpp", 1.5)])
def test_pipeline_matches_diffusers(tmp_path, family, scheduler, scale):
    pipe = sd_folders.build(tmp_path / "model", family, scheduler)
    controlnet = sd_folders.build_controlnet(tmp_path / "controlnet", pipe)
    latents, control = _latents(), _control_images()
    theirs = _their_images(_reference(pipe, controlnet), latents, list(control), steps=10,
                           controlnet_conditioning_scale=scale)
    ours = StableDiffusion.from_pretrained(tmp_path / "model", controlnet=tmp_path / "controlnet")(
        PROMPTS, negative_prompt=NEGATIVE, num_steps=10, latents=latents,
        control_image=list(control), controlnet_conditioning_scale=scale)
    _parity(ours, theirs, f"{family} {scheduler}, scale {scale}")


@pytest.mark.slow
def test_two_controlnets_match_diffusers_multicontrolnet(tmp_path, sd1):
    root, pipe, controlnet = sd1
    second = sd_folders.build_controlnet(tmp_path / "bgr", pipe, seed=2,
                                         controlnet_conditioning_channel_order="bgr")
    latents = _latents()
    controls = [_control_images(), _control_images(seed=5)]
    options = dict(controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[0.75, 1.0])
    theirs = _their_images(_reference(pipe, [controlnet, second]), latents, controls, **options)
    ours = StableDiffusion.from_pretrained(
        root / "model", controlnet=[root / "controlnet", tmp_path / "bgr"])(
        PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=latents,
        control_image=controls, **options)
    _parity(ours, theirs, "two ControlNets")


@pytest.mark.slow
def test_sdxl_controlnet_matches_diffusers(tmp_path):
    pipe = sd_folders.build(tmp_path / "model", "sdxl", "euler")
    controlnet = sd_folders.build_controlnet(tmp_path / "controlnet", pipe)
    size = (32, 48)
    latents, control = _latents(size=size), _control_images(size=size)
    reference = _reference(pipe, controlnet, diffusers.StableDiffusionXLControlNetPipeline)
    theirs = _their_images(reference, latents, control, negative=None,
                           controlnet_conditioning_scale=0.8)
    ours = StableDiffusion.from_pretrained(tmp_path / "model", controlnet=tmp_path / "controlnet")(
        PROMPTS, num_steps=STEPS, latents=latents, control_image=control,
        controlnet_conditioning_scale=0.8)
    _parity(ours, theirs, "sdxl euler")


@pytest.mark.slow
def test_img2img_with_controlnet_matches_diffusers(sd1):
    """diffusers' ControlNet img2img pipeline defaults to scale 0.8, ours to 1 (as __call__)."""
    root, pipe, controlnet = sd1
    image = _control_images(seed=7)[:, :, :, ::-1].copy()
    generator = torch.Generator().manual_seed(0)
    shape = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)
    posterior, noise = (torch.randn(shape, generator=generator).permute(0, 2, 3, 1).numpy()
                        for _ in range(2))
    reference = _reference(pipe, controlnet, diffusers.StableDiffusionControlNetImg2ImgPipeline)
    with torch.no_grad():
        theirs = reference(prompt=PROMPTS, negative_prompt=NEGATIVE, image=image,
                           control_image=_control_images(), strength=0.7,
                           num_inference_steps=10, guidance_scale=7.5, output_type="np",
                           control_guidance_end=0.8, controlnet_conditioning_scale=1.0,
                           generator=torch.Generator().manual_seed(0)).images
    ours = StableDiffusion.from_pretrained(root / "model", controlnet=root / "controlnet").img2img(
        PROMPTS, image, strength=0.7, negative_prompt=NEGATIVE, num_steps=10, latents=noise,
        image_noise=posterior, control_image=_control_images(), control_guidance_end=0.8)
    _parity(ours, theirs, "img2img with a ControlNet, strength 0.7")


@pytest.mark.slow
def test_pooling_controlnet_acts_on_the_conditional_half_as_in_diffusers(tmp_path, sd1):
    """diffusers' pipelines take guess mode for a ControlNet with global_pool_conditions."""
    root, pipe, _ = sd1
    controlnet = _pooling_controlnet(tmp_path / "pooled", pipe)
    latents, control = _latents(), _control_images()[..., 1:2]
    theirs = _their_images(_reference(pipe, controlnet), latents, control)
    ours = StableDiffusion.from_pretrained(root / "model", controlnet=tmp_path / "pooled")(
        PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, latents=latents,
        control_image=control)
    _parity(ours, theirs, "pooling ControlNet (guess mode)")


@pytest.mark.slow  # a CLI run of the pipeline under control
def test_command_line_samples_a_folder_under_control(sd1, tmp_path):
    """--config.pretrained.controlnet and sampling.control_*: the pipeline's images, and a
    control type computed from an ordinary image."""
    import importlib

    from diffusion_jax import configuration, generate
    from diffusion_jax.data import controls

    root, _, _ = sd1
    image = (_control_images()[0] * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "control.png")
    config = importlib.import_module("configs.stable_diffusion").get_config()
    config.pretrained.update(path=str(root / "model"), controlnet=str(root / "controlnet"),
                             batch_size=2)
    config.sampling.update(prompt="a red circle", num_samples=2, num_steps=3, method="ddim",
                           grid="uniform", control_image=str(tmp_path / "control.png"),
                           control_scales=(0.7,), control_end=0.7)
    configuration.validate(config)
    written = generate.generate_to_files(config, str(tmp_path / "run"))
    ours = np.load(written[0], allow_pickle=False)["samples"]
    pipe = generate.load_pipeline(config)
    direct = pipe(["a red circle"] * 2, num_steps=3, method="ddim", grid="uniform",
                  guidance_scale=config.sampling.guidance_scale, key=jax.random.fold_in(
                      jax.random.key(0), 0), control_image=str(tmp_path / "control.png"),
                  controlnet_conditioning_scale=0.7, control_guidance_end=0.7)
    np.testing.assert_array_equal(ours, direct * 2.0 - 1.0)
    # control_type "canny": the file's edges are the control image.
    config.sampling.control_type = "canny"
    edges = generate.generate_pretrained(config, pipe, ["a red circle"] * 2)
    direct = pipe(["a red circle"] * 2, num_steps=3, method="ddim", grid="uniform",
                  guidance_scale=config.sampling.guidance_scale, key=jax.random.fold_in(
                      jax.random.key(0), 0), control_image=controls.canny(image),
                  controlnet_conditioning_scale=0.7, control_guidance_end=0.7)
    np.testing.assert_array_equal(edges, direct * 2.0 - 1.0)
    config.sampling.update(control_type="", control_image="")
    with pytest.raises(configuration.ConfigError, match="needs its control images"):
        configuration.validate(config)
