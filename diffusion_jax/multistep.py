"""Multistep solvers of the probability-flow ODE: DPM-Solver++(2M, 3M), UniPC and PLMS.

Step functions for :data:`diffusion_jax.samplers.METHODS_TABLE` (``step(run, carry, s)``, see
:class:`diffusion_jax.samplers.Method`) and the per-step orders that the grid fixes before
compiling. DPM-Solver++ and UniPC are exponential integrators in ``lambda = logSNR / 2``: the exact
solution ``x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda)
dlambda`` (Lu et al. 2022a, Eq. 3.4, in the data-prediction form of Lu et al. 2022b) with ``x0``
replaced by a polynomial through the current and earlier denoiser outputs. PLMS (Liu et al. 2022)
instead extrapolates the noise estimate over grid steps and moves with DDIM's update.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dpmpp_2m_step", "dpmpp_3m_step", "unipc_step", "unipc_init", "multistep_orders",
           "dpmpp_3m_orders", "unipc_flags", "phis", "plms_step", "plms_flags",
           "plms_evaluations"]


def dpmpp_2m_update(x, x0_hat, x0_prev, h, h_prev, second, s):
    """One DPM-Solver++(2M) update (Lu et al. 2022b, Algorithm 2).

    With h = lambda' - lambda, lambda = logSNR / 2: x' = (sigma' / sigma) x - alpha' (e^-h - 1) D, D
    = (1 + 1/(2r)) x0_hat - x0_prev / (2r), r = h_prev / h; D = x0_hat (first order, DDIM) where
    ``second`` is off.
    """
    r = jnp.where(second, h_prev / jnp.where(second, h, 1.0), 1.0)
    x0_mix = jnp.where(second, (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev, x0_hat)
    return s["sigma_next"] / s["sigma"] * x - s["alpha_next"] * jnp.expm1(-h) * x0_mix


def dpmpp_2m_step(run, carry, s):
    """DPM-Solver++(2M): second order where flagged (see :func:`multistep_orders`)."""
    x, x0_prev, h_prev = carry
    x0_hat = run.evaluate(x, s["t"])
    h = 0.5 * (s["logsnr_next"] - s["logsnr"])
    return dpmpp_2m_update(x, x0_hat, x0_prev, h, h_prev, s["flag"] >= 2, s), x0_hat, h


def dpmpp_3m_step(run, carry, s):
    """DPM-Solver++(3M): the third-order multistep update of Lu et al.'s DPM-Solver++ code.

    As in diffusers' DPMSolverMultistepScheduler: with r0 = h_1 / h, r1 = h_2 / h,
    D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 (D1_0 - D1_1) / (r0 + r1),
    D2 = (D1_0 - D1_1) / (r0 + r1):
    x' = (sigma' / sigma) x + alpha' (h phi_1 m0 + h phi_2 D1 + w h phi_3 D2), phi_k = phi_k(-h).
    D2 estimates h^2 x0'' / 2, so integrating the quadratic exactly (Lu et al. 2022a, Eq. 3.4)
    takes w = 2 (option ``d2_weight``): third order. The published w = 1, the default, makes the
    method second order (docs/samplers.md). Order 2 (flagged) is the 2M update, order 1 DDIM."""
    x, m1, m2, h1, h2 = carry  # x0_hat and h of the previous two steps
    m0 = run.evaluate(x, s["t"])
    h = 0.5 * (s["logsnr_next"] - s["logsnr"])

    def third():
        r0, r1 = h1 / h, h2 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        h_phi_1 = -jnp.expm1(-h)
        h_phi_2 = 1.0 - h_phi_1 / h
        h_phi_3 = 0.5 - h_phi_2 / h
        return s["sigma_next"] / s["sigma"] * x + s["alpha_next"] * (
            h_phi_1 * m0 + h_phi_2 * d1 + run.options["d2_weight"] * h_phi_3 * d2)

    lower = [functools.partial(dpmpp_2m_update, x, m0, m1, h, h1, second, s)
             for second in (False, True)]
    x_next = jax.lax.switch(s["flag"] - 1, lower + [third])
    return x_next, m0, m1, h, h1


def phis(z, n):
    """The functions phi_1(z) .. phi_n(z) of exponential integrators.

    phi_k(z) = sum_j z^j / (j + k)!, by phi_{k+1} = (phi_k - 1/k!) / z; for |z| < 1, where that
    recurrence loses digits, by the series.
    """
    small = jnp.abs(z) < 1.0
    z_small, z_big = jnp.where(small, z, 0.0), jnp.where(small, 1.0, z)
    phi, out = jnp.expm1(z_big) / z_big, []
    for k in range(1, n + 1):
        series = functools.reduce(lambda acc, j: acc * z_small + 1.0 / math.factorial(j + k),
                                  range(17, -1, -1), 0.0)
        out.append(jnp.where(small, series, phi))
        phi = (phi - 1.0 / math.factorial(k)) / z_big
    return out


def unipc_update(x_s, m_s, lam_s, lam_t, earlier, m_t, sigma_s, sigma_t, alpha_t):
    """One UniP or UniC update from s to t (Zhao et al. 2023).

    UniP when ``m_t`` is None, UniC with ``m_t`` the evaluation at t; data prediction with B(h) =
    e^h - 1, "bh2" (Zhao et al. 2023, Sec. 3.1-3.2 and Appendix): x_t = (sigma_t / sigma_s) x_s +
    alpha_t (1 - e^-h) (m_s + sum_k rho_k D_k), D_k = (m_k - m_s) / r_k over the ``earlier`` (m_k,
    lambda_k), r_k = (lambda_k - lambda_s) / h, then (UniC) r = 1, D = m_t - m_s. rho solves sum_k
    rho_k r_k^(j-1) = j! phi_{j+1}(-h) / phi_1(-h), j = 1..K; rho = 1/2 for K = 1 (Zhao et al.'s
    code, and diffusers).
    """
    h = lam_t - lam_s
    rs = [(lam_k - lam_s) / h for _, lam_k in earlier]
    ds = [(m_k - m_s) / r for (m_k, _), r in zip(earlier, rs)]
    if m_t is not None:
        rs, ds = rs + [jnp.ones_like(h)], ds + [m_t - m_s]
    if len(rs) == 1:
        rhos = [0.5]
    elif rs:
        phi = phis(-h, len(rs) + 1)
        b = jnp.stack([math.factorial(j) * phi[j] / phi[0] for j in range(1, len(rs) + 1)])
        vandermonde = jnp.stack([jnp.stack(rs) ** j for j in range(len(rs))])
        rhos = list(jnp.linalg.solve(vandermonde, b))
    m_mix = m_s + sum(rho * d for rho, d in zip(rhos, ds)) if rs else m_s
    return sigma_t / sigma_s * x_s - alpha_t * jnp.expm1(-h) * m_mix


def unipc_step(run, carry, s):
    """One step of UniPC-p (Zhao et al. 2023): correct, then predict.

    UniC corrects the state just reached with the evaluation made there (flag[1] = its order, 0:
    none), then UniP of order flag[0] takes the next step from the corrected state. One evaluation
    per step: the corrector reuses the predictor's.
    """
    x, x_prev, ms, lams, sigma_prev = carry  # previous corrected state, x0_hats, lambdas, sigma
    m = run.evaluate(x, s["t"])
    lam, lam_next = 0.5 * s["logsnr"], 0.5 * s["logsnr_next"]
    k_max = len(ms)
    unic = [lambda: x] + [
        functools.partial(unipc_update, x_prev, ms[0], lams[0], lam,
                          list(zip(ms[1:k], lams[1:k])), m, sigma_prev, s["sigma"], s["alpha"])
        for k in range(1, k_max + 1)]
    x_corrected = jax.lax.switch(s["flag"][1], unic)
    unip = [functools.partial(unipc_update, x_corrected, m, lam, lam_next,
                              list(zip(ms[:k - 1], lams[:k - 1])), None, s["sigma"],
                              s["sigma_next"], s["alpha_next"])
            for k in range(1, k_max + 1)]
    x_next = jax.lax.switch(s["flag"][0] - 1, unip)
    return x_next, x_corrected, (m,) + ms[:-1], (lam,) + lams[:-1], s["sigma"]


def unipc_init(x, options):
    k = int(options["order"])
    return x, x, (jnp.zeros_like(x),) * k, (jnp.zeros((), x.dtype),) * k, jnp.ones((), x.dtype)


def multistep_orders(start_finite, max_order, tail=(1,)):
    """The order of each step of a multistep method.

    That is 1 + the number of earlier evaluations it can use (at the consecutive finite-log-SNR
    times just before it: a step from zero SNR is infinitely long in log-SNR), capped at
    ``max_order``, and at ``tail`` for the last steps (the final step, to sigma = 0, is first
    order).
    """
    usable = np.zeros(len(start_finite), dtype=np.int64)
    for i in range(1, len(start_finite)):
        usable[i] = usable[i - 1] + 1 if start_finite[i - 1] else 0
    orders = np.minimum(1 + usable, max_order)
    caps = np.asarray(tail[-len(orders):])
    orders[len(orders) - len(caps):] = np.minimum(orders[len(orders) - len(caps):], caps)
    return orders


def dpmpp_3m_orders(start_finite, options):
    """The orders of DPM-Solver++(3M)'s steps: 1, 2, 3, 3, ..., 3, 1.

    With fewer than 15 steps the second-to-last is second order
    (diffusers' lower_order_final)."""
    return multistep_orders(start_finite, 3, (2, 1) if len(start_finite) < 15 else (1,))


def unipc_flags(start_finite, options):
    """[UniP order, UniC order] per step.

    UniP as diffusers' UniPCMultistepScheduler
    (lower_order_final: min(order, steps left)); UniC of the previous step's order from step 1 on,
    except after a step from zero SNR."""
    predictor = multistep_orders(start_finite, int(options["order"]), (2, 1))
    corrector = np.concatenate([[0], np.where(start_finite[:-1], predictor[:-1], 0)])
    return np.stack([predictor, corrector], axis=1)


# Adams-Bashforth weights of the current and the earlier noise estimates, by order.
_ADAMS_BASHFORTH = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms_step(run, carry, s):
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022).

    The noise estimate eps_hat = (x - alpha x0_hat) / sigma is extrapolated over the grid with
    Adams-Bashforth weights as if the steps were equal, eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3)
    / 24 (orders 2 and 3 while fewer earlier estimates exist), and the state moves with their
    transfer part phi (Eq. 9), DDIM's update with x0 and eps consistent at x: x' = alpha' (x -
    sigma eps') / alpha + sigma' eps'. Flag 0, the first step: the pseudo improved Euler start
    (S-PNDM), a DDIM step to x_pred, an evaluation there, and the step redone from x with the
    average of both noise estimates (one extra evaluation). Flag 1: DDIM (a step from zero SNR,
    or a single step). As in diffusers' PNDMScheduler(skip_prk_steps=True), the start's second
    evaluation is not kept: the next step evaluates again at the corrected state.
    """
    x, earlier = carry[0], carry[1:]  # the noise estimates of the previous three steps
    x0_hat = run.evaluate(x, s["t"])
    eps = (x - s["alpha"] * x0_hat) / s["sigma"]

    def move(eps_mix):
        x0_mix = x0_hat + s["sigma"] / s["alpha"] * (eps - eps_mix)
        return s["alpha_next"] * x0_mix + s["sigma_next"] * eps_mix

    def ddim():
        return s["alpha_next"] * x0_hat + s["sigma_next"] * eps

    def improved_euler():
        x_pred = ddim()
        x0_pred = run.evaluate(x_pred, s["t_next"])
        eps_pred = (x_pred - s["alpha_next"] * x0_pred) / s["sigma_next"]
        return move(0.5 * (eps + eps_pred))

    def adams_bashforth(order):
        weights = _ADAMS_BASHFORTH[order]
        return move(sum(w * e for w, e in zip(weights, (eps,) + earlier)))

    branches = [improved_euler, ddim] + [functools.partial(adams_bashforth, k) for k in (2, 3, 4)]
    return (jax.lax.switch(s["flag"], branches), eps) + earlier[:-1]


def plms_flags(start_finite, options):
    """PLMS's step kinds: 0 (the improved Euler start), then the Adams-Bashforth orders 2, 3, 4.

    A step from zero SNR is DDIM (flag 1; the improved Euler start needs alpha > 0) and, as for
    the other multistep methods, nothing extrapolates through it, so the orders restart after it.
    A single step is DDIM. No final step is lowered (diffusers' PNDM scheduler lowers none).
    """
    flags = multistep_orders(start_finite, 4, tail=(4,))
    if len(flags) > 1 and start_finite[0]:
        flags[0] = 0
    return flags


def plms_evaluations(flags):
    """One evaluation per step, and one more for the improved Euler start."""
    return len(flags) + int(np.sum(np.asarray(flags) == 0))
