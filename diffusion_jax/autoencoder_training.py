"""Training the first stage of latent diffusion: a KL autoencoder, optionally with a discriminator.

The objective is that of Rombach et al. 2022 (their ``LPIPSWithDiscriminator``), after Esser et
al. 2021: per example, the reconstruction error summed over the image (L1 or L2, plus
``perceptual_weight`` times the LPIPS distance at every value) and ``kl_weight`` times the KL
divergence of the posterior from N(0, I); once the discriminator is on, the hinge GAN loss,
weighted adaptively by the ratio of the two losses' gradient norms at the decoder's last layer.

Both networks live in one parameter tree, ``{"autoencoder": ..., "discriminator": ...}``, and
one scalar loss gives both their gradients: the generator's terms see the discriminator through
``stop_gradient`` and the discriminator's terms see the reconstructions through it. So the train
step, the optimizer, checkpoints and resume are those of every other run.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import configuration
from diffusion_jax.models import lpips
from diffusion_jax.models.autoencoder import AutoencoderKL, kl_divergence
from diffusion_jax.models.patchgan import PatchDiscriminator

__all__ = ["AutoencoderTask", "AutoencoderLoss", "loss_from_config", "perceptual_status", "hinge_discriminator_loss", "adaptive_weight",
           "make_reconstruct_fn", "pair_grid"]


class AutoencoderTask(nn.Module):
    """The networks an autoencoder run trains: the autoencoder and, when used, the discriminator.

    Called like a denoiser (``model.init(key, x, noise_level)``; the extra arguments are
    ignored) so that the train state is created as for every run; it returns the
    reconstruction.
    """

    autoencoder: AutoencoderKL
    discriminator: Optional[PatchDiscriminator] = None

    @nn.compact
    def __call__(self, x, *unused, **unused_keywords):
        del unused, unused_keywords
        reconstruction, _, _ = self.autoencoder(x)
        if self.discriminator is not None:
            self.discriminator(reconstruction)
        return reconstruction


def hinge_discriminator_loss(logits_real, logits_fake):
    """The discriminator's hinge loss, ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``.

    Lim & Ye 2017, as used by Esser et al. 2021.
    """
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                  + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(nll_grad, gan_grad, *, maximum: float = 1e4):
    """``||grad nll|| / (||grad gan|| + 1e-4)``, clipped to [0, maximum] (Esser et al. 2021, eq. 7).

    Both gradients are taken at the decoder's last layer; the weight balances the GAN loss
    against the reconstruction loss and is not itself differentiated.
    """
    ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, maximum))


class AutoencoderLoss:
    """``loss(params, batch, key)`` of an autoencoder run, in the draw/compute stages of the step.

    ``draw(batch, key, step)`` draws the posterior noise for the whole batch from the step's key
    (so a resumed run repeats the same samples) and flags whether the discriminator is on at
    ``step``; ``compute(params, batch, draws) -> (loss, aux)`` is differentiated. The adaptive
    GAN weight is a ratio of gradient norms over the batch ``compute`` sees, which is why a
    discriminator is refused with microbatches or the per-device shard_map path.
    """

    draw_takes_step = True

    def __init__(self, autoencoder: AutoencoderKL,
                 discriminator: Optional[PatchDiscriminator] = None, *,
                 reconstruction: str = "l1", kl_weight: float = 1e-6,
                 perceptual_fn: Optional[Callable] = None, perceptual_weight: float = 0.0,
                 disc_weight: float = 0.0, disc_start: int = 0):
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if (discriminator is None) != (disc_weight == 0):
            raise ValueError("a discriminator goes with disc_weight > 0, and only then")
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.reconstruction, self.kl_weight = reconstruction, kl_weight
        self.perceptual_fn = perceptual_fn if perceptual_weight else None
        self.perceptual_weight = perceptual_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        # The decoder's last convolution, applied on its own to get gradients at that layer.
        self._conv_out = nn.Conv(autoencoder.out_channels, (3, 3), padding=1,
                                 dtype=autoencoder.dtype)

    def draw(self, batch, key, step=0):
        """The posterior noise of the whole batch, and the discriminator's flag per example.

        Drawn before the batch is split into microbatches or over devices, so that the noise of
        each example does not depend on the split; the flag is 1.0 from ``disc_start`` on.
        """
        x = batch["x"]
        f = self.autoencoder.downsampling_factor
        shape = (x.shape[0], x.shape[1] // f, x.shape[2] // f, self.autoencoder.latent_channels)
        on = jnp.asarray(step >= self.disc_start, jnp.float32)
        return batch, {"key": key, "noise": jax.random.normal(key, shape, jnp.float32),
                       "gan_on": jnp.broadcast_to(on, x.shape[:1])}

    def _nll(self, x, reconstruction):
        """Per-example reconstruction loss: the error summed over the image's values."""
        difference = x - reconstruction
        error = jnp.abs(difference) if self.reconstruction == "l1" else difference ** 2
        per_example = jnp.sum(error, axis=tuple(range(1, x.ndim)))
        if self.perceptual_fn is not None:  # LPIPS at every value, as the published loss adds it
            size = x[0].size
            per_example = per_example + self.perceptual_weight * size * self.perceptual_fn(
                x, reconstruction)
        return jnp.mean(per_example)

    def compute(self, params, batch, draws):
        """``(loss, aux)``: the generator's and discriminator's losses in one differentiable sum."""
        x = batch["x"]
        ae = self.autoencoder
        mean, logvar = ae.apply({"params": params["autoencoder"]}, x, method=AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * draws["noise"]  # the reparameterisation trick
        hidden = ae.apply({"params": params["autoencoder"]}, z,
                          method=AutoencoderKL.decode_hidden)
        last = params["autoencoder"]["decoder"]["conv_out"]
        to_image = lambda p: self._conv_out.apply(  # noqa: E731
            {"params": p}, hidden).astype(jnp.float32)
        reconstruction = to_image(last)
        nll = self._nll(x, reconstruction)
        kl = jnp.mean(kl_divergence(mean, logvar))
        loss = nll + self.kl_weight * kl
        aux = {"reconstruction": nll, "kl": kl}
        if self.discriminator is not None:
            loss, aux = self._with_gan(params, x, reconstruction, nll, to_image, last,
                                       draws["gan_on"][0], loss, aux)
        return loss, aux

    def _with_gan(self, params, x, reconstruction, nll, to_image, last, on, loss, aux):
        """Add the generator's adaptively weighted GAN loss and the discriminator's hinge loss."""
        disc = self.discriminator
        frozen = jax.lax.stop_gradient(params["discriminator"])
        gan = lambda r: -jnp.mean(disc.apply({"params": frozen}, r))  # noqa: E731
        generator = gan(reconstruction)
        # Gradients at the last layer's kernel: pull each loss's gradient with respect to the
        # reconstruction back through that one convolution.
        _, pull = jax.vjp(to_image, last)
        nll_grad = pull(jax.grad(lambda r: self._nll(x, r))(reconstruction))[0]["kernel"]
        gan_grad = pull(jax.grad(gan)(reconstruction))[0]["kernel"]
        weight = self.disc_weight * adaptive_weight(nll_grad, gan_grad)
        logits_real = disc.apply({"params": params["discriminator"]}, x)
        logits_fake = disc.apply({"params": params["discriminator"]},
                                 jax.lax.stop_gradient(reconstruction))
        discriminator = hinge_discriminator_loss(logits_real, logits_fake)
        loss = loss + on * (weight * generator + discriminator)
        return loss, {**aux, "generator": generator, "discriminator": discriminator,
                      "gan_weight": weight}


def perceptual_status(group) -> str:
    """Whether the perceptual loss is on, in words for the run's log."""
    if not group.perceptual_weight:
        return "perceptual loss off (config.autoencoder.perceptual_weight=0)"
    if not group.lpips_weights:
        return ("perceptual loss off: no LPIPS weights file (config.autoencoder.lpips_weights; "
                "docs/latent_diffusion.md says how to make one)")
    return f"perceptual loss on: LPIPS-VGG from {group.lpips_weights}"


def loss_from_config(config, model: AutoencoderTask) -> AutoencoderLoss:
    """The :class:`AutoencoderLoss` of ``config.autoencoder`` for ``model``."""
    a = config.autoencoder
    perceptual = None
    if a.perceptual_weight and a.lpips_weights:
        try:
            perceptual = lpips.make_lpips_fn(lpips.load_weights(a.lpips_weights))
        except (OSError, ValueError) as err:
            raise configuration.ConfigError(f"config.autoencoder.lpips_weights: {err}") from err
    return AutoencoderLoss(model.autoencoder, model.discriminator, reconstruction=a.reconstruction,
                           kl_weight=a.kl_weight, perceptual_fn=perceptual,
                           perceptual_weight=a.perceptual_weight if perceptual else 0.0,
                           disc_weight=a.disc_weight, disc_start=a.disc_start)


def make_reconstruct_fn(autoencoder: AutoencoderKL):
    """A jitted ``fn(params, images) -> reconstructions`` through the posterior means.

    ``params`` is an autoencoder run's parameter tree (with its ``"autoencoder"`` entry) or the
    autoencoder's own.
    """
    def reconstruct(params, images):
        params = params.get("autoencoder", params)
        mean, _ = autoencoder.apply({"params": params}, images, method=AutoencoderKL.encode)
        return autoencoder.apply({"params": params}, mean, method=AutoencoderKL.decode)

    return jax.jit(reconstruct)


def pair_grid(originals, reconstructions):
    """Originals and reconstructions interleaved (o0, r0, o1, r1, ...) for a grid of pairs."""
    stacked = jnp.stack([jnp.asarray(originals), jnp.asarray(reconstructions, jnp.float32)], 1)
    return stacked.reshape((-1,) + stacked.shape[2:])
