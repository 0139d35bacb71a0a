"""Image-to-image and inpainting at the sampler level (diffusion_jax.editing, samplers.KnownRegion).

Exact properties: strength 1 is text-to-image bit for bit, strength 0 returns the input, the
known region of an inpainted sample equals the input exactly after the last step (for every
sampler, with and without resampling jumps, with a final step to t_end > 0 too), and RePaint's
jump schedule has its structure. The pipelines' parity with diffusers is test_sd_editing.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import editing, samplers

SHAPE = (3, 8, 8, 2)


def _denoiser(x, t):
    """A smooth, time-dependent stand-in for a network (x0_hat shaped like x)."""
    return jnp.tanh(0.7 * x) * (1.0 - 0.3 * t[:, None, None, None])


def _data():
    x0 = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    keep = np.ones(SHAPE[:-1] + (1,), np.float32)
    keep[:, 2:6, 1:7] = 0.0
    return x0, noise, jnp.asarray(keep)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_known_region_is_the_input_after_the_last_step(method):
    x0, noise, keep = _data()
    out = samplers.sample(_denoiser, noise, schedule="cosine", method=method, num_steps=6,
                          key=jax.random.key(0), known=samplers.KnownRegion(x0, keep)).samples
    kept = np.asarray(keep[..., 0]) == 1
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(x0)[kept])
    assert np.abs(np.asarray(out - x0)[~kept]).max() > 0.05  # the rest was painted


@pytest.mark.parametrize("options", [dict(jump_length=2, jump_n_sample=3),
                                     dict(t_end=0.01), dict(grid="trailing")])
def test_known_region_exact_with_jumps_and_t_end(options):
    x0, noise, keep = _data()
    kwargs = dict(num_steps=6, **options)
    if "t_end" in options:  # t_end needs an explicit grid ending above it
        kwargs = dict(time_grid=np.linspace(0.9, 0.1, 6), t_end=0.01)
    out = samplers.sample(_denoiser, noise, schedule="ddpm_linear", method="ddim",
                          key=jax.random.key(0), known=samplers.KnownRegion(x0, keep, noise),
                          **kwargs).samples
    kept = np.asarray(keep[..., 0]) == 1
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(x0)[kept])


def test_fixed_noise_needs_no_key_and_fresh_noise_does():
    x0, noise, keep = _data()
    samplers.sample(_denoiser, noise, schedule="cosine", method="ddim", num_steps=3,
                    known=samplers.KnownRegion(x0, keep, noise))
    with pytest.raises(ValueError, match="fresh noise at each step: pass key="):
        samplers.sample(_denoiser, noise, schedule="cosine", method="ddim", num_steps=3,
                        known=samplers.KnownRegion(x0, keep))


def test_jump_schedule_structure():
    ops = samplers.jump_schedule(10, 3, 3)
    steps = ops[ops[:, 1] > ops[:, 0]]
    jumps = ops[ops[:, 1] < ops[:, 0]]
    assert np.all(steps[:, 1] == steps[:, 0] + 1)
    assert np.all(jumps[:, 0] - jumps[:, 1] == 3)
    # Each jump point (7 and 4 steps done, 3 and 6 to go) is left twice, so its stretch runs
    # three times; sampling ends at the last index, every step visited at least once.
    assert sorted(map(tuple, jumps.tolist())) == [(4, 1), (4, 1), (7, 4), (7, 4)]
    assert ops[-1, 1] == 10 and set(steps[:, 0]) == set(range(10))
    np.testing.assert_array_equal(samplers.jump_schedule(5, 10, 1),
                                  [[i, i + 1] for i in range(5)])
    # The evaluations count the repeated steps.
    x0, noise, keep = _data()
    result = samplers.sample(_denoiser, noise, schedule="cosine", method="ddim", num_steps=10,
                             key=jax.random.key(0), jump_length=3, jump_n_sample=3)
    assert result.nfe == len(steps) == 10 + 2 * 2 * 3
    with pytest.raises(ValueError, match="jump_n_sample must be a positive integer"):
        samplers.jump_schedule(10, 3, 0)
    with pytest.raises(ValueError, match="keeps no history"):
        samplers.sample(_denoiser, noise, schedule="cosine", method="unipc", num_steps=10,
                        key=jax.random.key(0), jump_length=3, jump_n_sample=2)


def test_renoising_jump_has_the_forward_marginal():
    """A jump from t_b to t_a maps alpha_b x0 + sigma_b z to a draw of alpha_a x0 + sigma_a z'."""
    from diffusion_jax import repaint, schedules
    x0 = jnp.full((20000, 1), 0.8)
    ops_state = editing.noised("cosine", x0, jax.random.normal(jax.random.key(0), x0.shape), 0.3)
    sched = schedules.get("cosine")
    s = {name: fn(jnp.asarray(t)) for t, suffix in ((0.3, ""), (0.6, "_next"))
         for name, fn in (("alpha" + suffix, sched.alpha), ("sigma" + suffix, sched.sigma),
                          ("logsnr" + suffix, sched.logsnr))}
    out = repaint.renoise(ops_state, s, jax.random.normal(jax.random.key(1), x0.shape))
    mean, std = float(out.mean()), float(out.std())
    assert abs(mean - float(sched.alpha(0.6)) * 0.8) < 0.02
    assert abs(std - float(sched.sigma(0.6))) < 0.02


@pytest.mark.parametrize("method, grid", [("ddim", "uniform"), ("dpmpp_2m", "trailing"),
                                          ("heun", "karras")])
def test_image_to_image_strength_ends(method, grid):
    x0, noise, _ = _data()
    kwargs = dict(schedule="cosine", method=method, num_steps=8, grid=grid)
    full = samplers.sample(_denoiser, noise, **kwargs).samples
    one = editing.image_to_image(_denoiser, x0, noise, strength=1.0, **kwargs)
    np.testing.assert_array_equal(np.asarray(one.samples), np.asarray(full))
    zero = editing.image_to_image(_denoiser, x0, noise, strength=0.0, **kwargs)
    np.testing.assert_array_equal(np.asarray(zero.samples), np.asarray(x0))
    assert zero.nfe == 0
    part = editing.image_to_image(_denoiser, x0, noise, strength=0.5, **kwargs)
    whole = samplers.sample(_denoiser, noise, **kwargs)
    np.testing.assert_allclose(part.times, whole.times[4:])  # the last 4 of 8 steps
    expected = samplers.number_of_evaluations(method, whole.times[4:], "cosine")
    assert part.nfe == expected


def test_image_to_image_starts_on_the_tail_of_the_grid():
    """From the noised input at the start time, the run is the grid's last steps: an oracle
    denoiser (x0_hat = x0) with DDIM lands on x0; the times are the full grid's tail."""
    x0, noise, _ = _data()
    oracle = lambda x, t: jnp.broadcast_to(x0, x.shape)  # noqa: E731
    result = editing.image_to_image(oracle, x0, noise, strength=0.7, schedule="cosine",
                                    method="ddim", num_steps=10)
    np.testing.assert_allclose(np.asarray(result.samples), np.asarray(x0), atol=2e-6)
    full = samplers.time_grid("cosine", 10)
    np.testing.assert_allclose(result.times, full[3:])
    assert editing.steps_to_run(10, 0.7) == 7 and editing.steps_to_run(10, 0.29) == 2
    with pytest.raises(ValueError, match="strength must be in"):
        editing.steps_to_run(10, -0.1)


def test_masks_and_images_from_files(tmp_path):
    from PIL import Image
    picture = np.zeros((20, 30, 3), np.uint8)
    picture[:, :15] = 255
    Image.fromarray(picture).save(tmp_path / "image.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image = editing.read_image(tmp_path / "image.png", 20, 30, 3)
    assert image.shape == (20, 30, 3) and image.min() == 0.0 and image.max() == 1.0
    grey = editing.read_image(tmp_path / "image.png", 10, 15, 1)
    assert grey.shape == (10, 15, 1)
    read = editing.read_mask(tmp_path / "mask.png", 20, 30)
    np.testing.assert_array_equal(read[..., 0], mask / 255)
    # Nearest-neighbour to a smaller grid reads pixel floor(i * factor), as PyTorch does.
    small = editing.resize_mask(read[None], 10, 15)
    np.testing.assert_array_equal(np.asarray(small)[0], read[::2, ::2])
    torch = pytest.importorskip("torch")
    theirs = torch.nn.functional.interpolate(torch.from_numpy(read[None, ..., 0][:, None]),
                                             size=(7, 11))
    np.testing.assert_array_equal(np.asarray(editing.resize_mask(read[None], 7, 11))[0, ..., 0],
                                  theirs[0, 0].numpy())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        editing.read_image(tmp_path / "broken.png", 4, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        editing.read_mask(tmp_path / "nothing.png", 4, 4)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        editing.read_image(np.full((4, 4, 3), 2.0), 4, 4)
