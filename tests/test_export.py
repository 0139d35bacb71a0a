"""Our networks and runs written as diffusers folders: diffusers loads them to the same function.

Tiny random networks (parameters drawn by shape with numpy, so that nothing is zero-initialised
and nothing is compiled to make them) are exported with :mod:`diffusion_jax.pretrained.export`,
loaded with diffusers' ``from_pretrained`` and run on the same float32 inputs as ours; they are
also read back with our own loaders, bit for bit. Runs are fabricated as a trained run leaves
them (config.json, latent.json, an Orbax checkpoint of random parameters) and exported with
:func:`diffusion_jax.run_export.export_run`. Worst absolute errors seen (CPU, float32), on
outputs of magnitude 1.4 to 2.7: pixel UNets 1.4e-6 (2.6e-6 with a timestep shift folded into the
time embedding), text-conditioned UNets 2.2e-6, the autoencoder 3.7e-6 (decoded image), UNets of
exported runs 1.9e-6; the bound is ``RTOL`` = 1e-5 times the output's largest magnitude.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import flax.traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import tiny  # noqa: E402
from diffusion_jax import autoencoders, files, latent, run, schedules, train_state  # noqa: E402
from diffusion_jax.models import AutoencoderKL, TextConditioned, TextEncoder, UNet, dit  # noqa: E402
from diffusion_jax.pretrained import export, load_unet, load_vae, plan_from_config  # noqa: E402
from diffusion_jax.run_export import export_run  # noqa: E402

RTOL = 1e-5  # of the output's largest magnitude


def random_tree(shapes, seed=0):
    """Parameters of ``shapes`` (a pytree of ShapeDtypeStructs), scaled as initialisers do."""
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        leaf = getattr(path[-1], "key", None)
        if not np.issubdtype(spec.dtype, np.floating):
            return np.zeros(spec.shape, spec.dtype)
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        if leaf == "kernel":
            return (noise / np.sqrt(np.prod(spec.shape[:-1]))).astype(np.float32)
        return (1.0 + 0.1 * noise) if leaf == "scale" else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def init_shapes(model, *args, **kwargs):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]


def apply(model, params, *args, method=None, **kwargs):
    """``model.apply`` of ``params`` as a numpy array."""
    return np.asarray(model.apply({"params": params}, *args, method=method, **kwargs))


def assert_close(ours, theirs, rtol, what):
    scale = float(np.abs(theirs).max())
    error = float(np.abs(np.asarray(ours) - theirs).max())
    print(f"{what}: max abs error {error:.2e} on outputs up to {scale:.2f}")
    assert error <= rtol * scale, f"{what}: max abs error {error:.2e} (outputs up to {scale:.2f})"


def assert_same_tree(a, b):
    flat_a = flax.traverse_util.flatten_dict(a)
    flat_b = flax.traverse_util.flatten_dict(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]),
                                      err_msg="/".join(path))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


X = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
T = np.array([0.013, 0.71], np.float32)


# ------------------------------------------------------------------------------------------
# Networks.
# ------------------------------------------------------------------------------------------

PIXEL = {
    "unconditional": (dict(), None),
    # class labels (the null one too), scale-shift conditioning, and diffusers' timesteps
    # k = 1000 t - 1 folded into the time embedding of a network trained on 1000 t
    "classes_scale_shift": (dict(num_classes=3, scale_shift=True, head_dim=8), -1.0),
}


@pytest.mark.parametrize("name", sorted(PIXEL))
def test_pixel_unet_matches_diffusers_and_reads_back(name, tmp_path):
    kwargs, shift = PIXEL[name]
    model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 num_heads=2, dropout=0.0, num_groups=8, **kwargs)
    labels = np.array([0, 3]) if "num_classes" in kwargs else None
    params = random_tree(init_shapes(model, X, T, labels))
    config = export.export_pixel_unet(tmp_path / "unet", model, params, sample_size=16,
                                      timestep_shift=shift)
    assert config["_timestep"] == {"scale": 1000.0, "shift": 0.0 if shift is None else shift}
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    k = torch.from_numpy(1000.0 * T + (shift or 0.0))
    with torch.no_grad():
        out = theirs(nchw(X), k, None if labels is None else torch.from_numpy(labels)).sample
    ours = apply(model, params, X, T, labels)
    assert_close(ours, nhwc(out), RTOL, f"UNet2DModel {name}")
    loaded, loaded_params, _ = export.load_pixel_unet(tmp_path / "unet")
    if shift is None:  # the weights as they were (a folded shift changes the time embedding)
        assert_same_tree(loaded_params, params)
        theirs.save_pretrained(tmp_path / "resaved")  # a config with all of diffusers' keys
        assert_same_tree(export.load_pixel_unet(tmp_path / "resaved")[1], params)
        np.testing.assert_array_equal(
            apply(loaded, loaded_params, X, 1000.0 * T, labels), ours)


CONTEXT = np.random.default_rng(2).standard_normal((2, 5, 24)).astype(np.float32)
MASK = np.array([[True] * 5, [True, True, False, False, False]])
CONDITIONAL = {
    # Stable Diffusion 1.x's shape: attention per level, 1x1-convolution projections, timestep
    # k = 1000 t - 1; read back by sd_unet.load_unet
    "sd1": dict(attention_levels=(1,), num_heads=(2, 4), transformer_depth=(1, 2),
                norm_eps=1e-5, noise_shift=-1.0),
    # a captioned run's UNet: pooled text projection, heads of one width, scale-shift, a mask
    "text_run": dict(attention_resolutions=(8,), head_dim=8, pooled_dim=12, scale_shift=True),
}


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_conditional_unet_matches_diffusers(name, tmp_path):
    model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0, num_groups=8,
                 context_dim=24, **CONDITIONAL[name])
    pooled = np.random.default_rng(3).standard_normal((2, 12)).astype(np.float32)
    extra = dict(pooled=pooled, context_mask=MASK) if name == "text_run" else {}
    params = random_tree(init_shapes(model, X, T, context=CONTEXT, **extra))
    sd1 = name == "sd1"
    export.export_unet(tmp_path / "unet", model, params, use_linear_projection=not sd1)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    if sd1:
        assert tuple(theirs.state_dict()["down_blocks.1.attentions.0.proj_in.weight"].shape) == \
            (32, 32, 1, 1)
    kwargs = dict(class_labels=torch.from_numpy(pooled), encoder_attention_mask=torch.from_numpy(
        MASK)) if not sd1 else {}
    k = torch.from_numpy(1000.0 * T + model.noise_shift)
    with torch.no_grad():
        out = theirs(nchw(X), k, torch.from_numpy(CONTEXT), **kwargs).sample
    ours = apply(model, params, X, T, context=CONTEXT, **extra)
    assert_close(ours, nhwc(out), RTOL, f"UNet2DConditionModel {name}")
    if sd1:
        loaded, loaded_params, _ = load_unet(tmp_path / "unet")
        assert_same_tree(loaded_params, params)
        assert loaded.attention_levels == (1,) and loaded.num_heads == (2, 4)


def test_sdxl_style_unet_reads_back_bit_for_bit(tmp_path):
    model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_heads=(2, 4), transformer_depth=(1, 3), dropout=0.0, num_groups=8,
                 context_dim=24, pooled_dim=12, time_ids_dim=4, norm_eps=1e-5, noise_shift=-1.0)
    params = random_tree(init_shapes(model, X[..., :1], T, context=CONTEXT,
                                     pooled=np.zeros((2, 12)), time_ids=np.zeros((2, 6))))
    config = export.export_unet(tmp_path / "unet", model, params)
    assert config["addition_embed_type"] == "text_time"
    loaded, loaded_params, _ = load_unet(tmp_path / "unet")
    assert_same_tree(loaded_params, params)
    assert (loaded.time_ids_dim, loaded.pooled_dim) == (4, 12)


def test_autoencoder_matches_diffusers_and_reads_back(tmp_path):
    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                          latent_channels=2, norm_num_groups=4)
    params = random_tree(init_shapes(model, X))
    export.export_autoencoder(tmp_path / "vae", model, params, scaling_factor=0.7)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == 0.7
    mean, logvar = apply(model, params, X, method=AutoencoderKL.encode)
    decoded = apply(model, params, mean, method=AutoencoderKL.decode)
    with torch.no_grad():
        posterior = theirs.encode(nchw(X)).latent_dist
        their_decoded = theirs.decode(posterior.mean).sample
    assert_close(mean, nhwc(posterior.mean), RTOL, "AutoencoderKL mean")
    assert_close(logvar, nhwc(posterior.logvar), RTOL, "AutoencoderKL logvar")
    assert_close(decoded, nhwc(their_decoded), RTOL, "AutoencoderKL decoded")
    _, loaded_params, info = load_vae(str(tmp_path / "vae"))
    assert_same_tree(loaded_params, params)
    assert info["scaling_factor"] == 0.7


# ------------------------------------------------------------------------------------------
# What has no counterpart, and how folders are written.
# ------------------------------------------------------------------------------------------


def _unet(**kwargs):
    settings = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                    dropout=0.0, num_groups=8)
    return UNet(**{**settings, **kwargs})


@pytest.mark.parametrize("model, write, match", [
    (dit("S", 2), export.export_pixel_unet, "DiT has no diffusers counterpart"),
    (TextConditioned(_unet(context_dim=8, pooled_dim=8), TextEncoder(width=8, depth=1)),
     export.export_unet, "byte-level text encoder .* no diffusers counterpart"),
    (_unet(attention_levels=(0, 1), num_heads=2), export.export_pixel_unet,
     "one attention_head_dim .* head widths \\[8, 16\\]"),
    (_unet(norm_eps=1e-5), export.export_pixel_unet, "norm_eps=1e-05: UNet2DModel's attention"),
    (_unet(), export.export_unet, "no cross-attention .* export_pixel_unet"),
    (_unet(context_dim=8), export.export_pixel_unet, "reads text .* export_unet"),
    (_unet(context_dim=8, mid_attention=False), export.export_unet, "mid_attention=False"),
    (_unet(context_dim=8, num_classes=3, pooled_dim=4), export.export_unet,
     "one class embedding"),
])
def test_what_has_no_diffusers_counterpart_is_refused(model, write, match, tmp_path):
    inputs = {}
    if isinstance(model, UNet):
        inputs = {k: v for k, v in dict(
            labels=np.zeros(2, int) if model.num_classes else None,
            context=np.zeros((2, 1, 8)) if model.context_dim else None,
            pooled=np.zeros((2, 4)) if model.pooled_dim else None).items() if v is not None}
    shapes = init_shapes(model, X, T, **inputs) if isinstance(model, UNet) else {}
    with pytest.raises(ValueError, match=match):
        write(tmp_path / "out", model, random_tree(shapes))
    assert os.listdir(tmp_path) == []  # nothing half-written is left behind


def test_parameters_of_another_network_are_named(tmp_path):
    model = _unet()
    params = random_tree(init_shapes(model, X, T))
    params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    del params["conv_out"]["bias"]
    with pytest.raises(ValueError, match=r"(?s)no diffusers tensor takes \(1\): extra/kernel.*"
                                         r"missing \(1\): conv_out/bias"):
        export.export_pixel_unet(tmp_path / "out", _unet(), params)


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path):
    model = _unet()
    params = random_tree(init_shapes(model, X, T))
    target = tmp_path / "unet"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        export.export_pixel_unet(target, model, params)
    assert os.listdir(target) == ["keep.txt"]
    with pytest.raises(ValueError):  # a failure with overwrite=True leaves the old folder too
        export.export_unet(target, model, params, overwrite=True)
    assert os.listdir(target) == ["keep.txt"]
    export.export_pixel_unet(target, model, params, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", export.WEIGHTS_NAME]
    assert sorted(os.listdir(tmp_path)) == ["unet"]


# ------------------------------------------------------------------------------------------
# Schedulers.
# ------------------------------------------------------------------------------------------


def test_scheduler_configs_reproduce_the_schedules(x64):
    ddpm = schedules.get("scaled_linear", zero_terminal_snr=True)
    config, shift = export.scheduler_config(ddpm, "v", noise_scale=1000)
    assert shift == -1.0
    theirs = diffusers.DDPMScheduler.from_config(config)
    k = np.arange(1000)
    ours = np.asarray(ddpm.alpha((k + 1) / 1000.0)) ** 2
    # (diffusers rescales to zero terminal SNR in float32: the last alpha-bars lose digits)
    np.testing.assert_allclose(theirs.alphas_cumprod.numpy(), ours, rtol=1e-4, atol=1e-12)
    assert theirs.alphas_cumprod[-1] == ours[-1] == 0
    plan = plan_from_config(config)
    assert plan.schedule == ddpm and plan.prediction == "v"

    edm = schedules.get("edm", sigma_max=40.0)
    config, _ = export.scheduler_config(edm, "edm", noise_scale=1.0, sigma_data=0.6)
    theirs = diffusers.EDMEulerScheduler.from_config(config)
    theirs.set_timesteps(5)
    np.testing.assert_allclose(theirs.sigmas.numpy()[:-1],
                               np.asarray(edm.sigma(np.linspace(1, 0, 5))), rtol=1e-6)

    flow = schedules.get("rectified_flow")
    config, _ = export.scheduler_config(flow, "flow", noise_scale=1000)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    theirs.set_timesteps(4)  # the network sees 1000 sigma = 1000 t
    np.testing.assert_allclose(theirs.timesteps.numpy(), 1000.0 * theirs.sigmas.numpy()[:-1],
                               rtol=1e-6)


@pytest.mark.parametrize("schedule, target, scale, match", [
    ("cosine", "v", 1000, "squaredcos_cap_v2 clips the last beta"),
    ("ddpm_linear", "eps", 250, "noise_scale=250"),
    ("ddpm_linear", "flow", 1000, "predicts"),
    ("edm", "edm", 250, "c_noise = log\\(sigma\\) / 4 itself"),
    ("ve", "eps", 1000, "no diffusers scheduler reproduces the 've' schedule"),
])
def test_schedules_without_a_diffusers_scheduler_are_refused(schedule, target, scale, match):
    with pytest.raises(ValueError, match=match):
        export.scheduler_config(schedule, target, noise_scale=scale)


def test_a_folder_without_a_matching_scheduler_says_how_to_write_the_networks(tmp_path):
    model = _unet()
    with pytest.raises(ValueError, match=r"squaredcos_cap_v2.*; without a scheduler \(schedule="
                                         r"None, or export_run\(..., scheduler=False\)\)"):
        export.export_pipeline(tmp_path / "out", model, random_tree(init_shapes(model, X, T)),
                               schedule="cosine", target="v")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# Runs.
# ------------------------------------------------------------------------------------------


def fabricate_run(config, workdir, seed=0):
    """A workdir as training leaves it at step 2: config.json and a checkpoint of random values."""
    _, model, shape, num_classes, optimizer = run.build(config)
    abstract = train_state.abstract_train_state(model, optimizer, shape, num_classes, config.seed)
    state = random_tree(abstract, seed).replace(step=np.int32(2))
    manager = run.open_checkpoints(config, str(workdir), shape, num_classes)
    manager.save(2, state)
    manager.close()
    files.save_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    return model, state


def _tiny(**diffusion):
    config = tiny.get_config()
    config.diffusion.update(diffusion)
    return config


def test_a_pixel_run_exports_as_a_ddpm_pipeline(tmp_path):
    config = _tiny(schedule="ddpm_linear", target="eps")
    config.data.class_conditional = False
    model, state = fabricate_run(config, tmp_path / "run")
    summary = export_run(tmp_path / "run", tmp_path / "out")
    assert summary["pipeline"] == "DDPMPipeline" and summary["source"]["step"] == 2
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.scheduler.config.prediction_type == "epsilon"
    k = torch.tensor([12, 998])  # diffusers' timestep k is our t = (k + 1) / 1000
    with torch.no_grad():
        out = pipe.unet(nchw(X), k).sample
    ours = apply(model, state.ema_params, X, (k.numpy() + 1) / 1000.0)
    assert_close(ours, nhwc(out), RTOL, "DDPMPipeline's UNet")
    # Without the scheduler the weights are copied as they are: timestep 1000 t.
    export_run(tmp_path / "run", tmp_path / "plain", scheduler=False, use_ema=False)
    _, params, _ = export.load_pixel_unet(tmp_path / "plain" / "unet")
    assert_same_tree(params, jax.tree_util.tree_map(np.asarray, state.params))
    with pytest.raises(FileExistsError):
        export_run(tmp_path / "run", tmp_path / "out")


def test_a_latent_run_exports_its_autoencoder_and_scale(tmp_path):
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        latent_channels=2, norm_num_groups=4)
    vae_params = random_tree(init_shapes(vae, X))
    export.export_autoencoder(tmp_path / "vae", vae, vae_params, scaling_factor=0.5)
    config = _tiny(schedule="scaled_linear", target="v")
    config.latent.autoencoder = str(tmp_path / "vae")
    config.model.unet.attention_resolutions = (4,)
    workdir = tmp_path / "run"
    model, state = fabricate_run(config, workdir)
    source = autoencoders.describe(config.latent.autoencoder)
    files.save_json(os.path.join(workdir, latent.LATENT_FILE), {
        "scale": 1.25, "shift": 0.0, "how": "test", "autoencoder": source.fingerprint(),
        "autoencoder_path": os.path.realpath(config.latent.autoencoder), "autoencoder_step": None})
    summary = export_run(workdir, tmp_path / "out")
    assert summary["vae"] == {"scaling_factor": 1.25, "shift_factor": None}
    assert summary["null_label"] == 3 and summary["pipeline"] is None
    _, params, info = load_vae(str(tmp_path / "out" / "vae"))
    assert_same_tree(params, vae_params)
    assert info["scaling_factor"] == 1.25
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    z = X[:, :8, :8, :2]
    labels = np.array([1, 3])  # 3: the null label of guidance
    with torch.no_grad():
        out = unet(nchw(z), torch.tensor([40, 999]), torch.from_numpy(labels)).sample
    ours = apply(model, state.ema_params, z, np.array([41, 1000]) / 1000.0, labels)
    assert_close(ours, nhwc(out), RTOL, "latent run's UNet")


def test_an_autoencoder_run_exports_as_a_vae_folder(tmp_path):
    config = tiny.get_config()
    config.task = "autoencoder"
    config.autoencoder.update(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=2,
                              disc_weight=0.5, disc_layers=1, disc_channels=8)
    model, state = fabricate_run(config, tmp_path / "run")
    files.save_json(os.path.join(tmp_path / "run", "autoencoder.json"), {
        "image_shape": [16, 16, 3], "latent_shape": [8, 8, 2], "downsampling_factor": 2})
    summary = export_run(tmp_path / "run", tmp_path / "vae")
    assert summary["vae"] == "AutoencoderKL" and summary["source"]["ema"] is True
    _, params, info = load_vae(str(tmp_path / "vae"))
    assert_same_tree(params, jax.tree_util.tree_map(np.asarray, state.ema_params["autoencoder"]))
    assert info["scaling_factor"] == 1.0 and info["config"]["sample_size"] == 16


def test_a_fine_tuned_stable_diffusion_run_exports_as_its_folder(tmp_path):
    import importlib

    import sd_folders
    from diffusion_jax.pretrained import clip_text

    folder = tmp_path / "sd"
    sd_folders.build(folder, "sd1", "ddim")
    config = importlib.import_module("configs.stable_diffusion_finetune").get_config()
    config.sized_for = "any"
    config.pretrained.path, config.latent.autoencoder = str(folder), str(folder / "vae")
    config.data.update(name="captions", resolution=32, batch_size=2, size=64)
    config.model.update(dtype="float32", remat=False, attention="xla")
    workdir = tmp_path / "run"
    model, state = fabricate_run(config, workdir)
    _, encoder, _ = clip_text.load_text_encoder(folder / "text_encoder")
    trained = state.replace(params={**state.params, "encoder": encoder},
                            ema_params={**state.ema_params, "encoder": encoder}, step=3)
    manager = run.open_checkpoints(config, str(workdir), (16, 16, 4), None)
    manager.save(3, trained)
    manager.close()
    source = autoencoders.describe(config.latent.autoencoder)
    files.save_json(os.path.join(workdir, latent.LATENT_FILE), {
        "scale": 0.18215, "shift": 0.0, "how": "test", "autoencoder": source.fingerprint(),
        "autoencoder_path": os.path.realpath(config.latent.autoencoder), "autoencoder_step": None})
    with pytest.raises(ValueError, match="changed the CLIP text encoder"):
        export_run(workdir, tmp_path / "out", step=2)
    export_run(workdir, tmp_path / "out")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.unet.config.use_linear_projection is False  # kept from the folder's UNet
    # (the UNet's outputs are compared with diffusers' above: here its weights are the run's)
    _, unet_params, _ = load_unet(tmp_path / "out" / "unet")
    assert_same_tree(unet_params, jax.tree_util.tree_map(np.asarray,
                                                         trained.ema_params["denoiser"]))
    for part in ("text_encoder", "tokenizer", "scheduler", "vae"):
        for name in os.listdir(folder / part):
            assert (folder / part / name).read_bytes() == \
                (tmp_path / "out" / part / name).read_bytes()
