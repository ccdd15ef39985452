"""Noise schedules and timestep tables, in numpy on the host, as diffusers' set_timesteps builds them.

Tables are computed in float32 where diffusers computes in float32 (betas, alphas_cumprod, sigmas)
and in float64 where it uses numpy's default (interpolation, Karras sigmas), so the samplers see
the same numbers to the last bits or nearly.
"""

from __future__ import annotations

import math

import numpy as np

from flax_sgm.sampling.config import SchedulerConfig

ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24  # diffusers' stand-in for alpha_cumprod = 0 in sigma-space schedulers
KARRAS_RHO = 7.0


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU, bit for bit: a float32 step, the first half
    counted from the start and the second from the end, each value one fused multiply-add (emulated in
    float64, where step * i is exact)."""
    if n == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return values.astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_cumprod) so the last is 0."""
    alphas_bar_sqrt = np.sqrt(np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def betas(cfg: SchedulerConfig) -> np.ndarray:
    """[num_train_timesteps] float32."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        out = np.asarray(cfg.trained_betas, np.float32)
    elif cfg.beta_schedule == "linear":
        out = _linspace32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        out = _linspace32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    else:  # squaredcos_cap_v2
        out = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        out = _rescale_zero_terminal_snr(out)
    return out


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """[num_train_timesteps] float32. Sigma-space samplers replace a zero last entry (zero terminal SNR)
    by 2**-24 as diffusers does, so sigma stays finite."""
    # torch's CPU cumprod of float32 accumulates in float64 and rounds each product.
    ac = np.cumprod((np.float32(1.0) - betas(cfg)).astype(np.float64)).astype(np.float32)
    if cfg.rescale_betas_zero_snr and cfg.kind in ("euler", "euler_ancestral", "dpmpp_2m"):
        ac = ac.copy()
        ac[-1] = ZERO_SNR_LAST_ALPHA_CUMPROD
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """sqrt((1 - alpha_cumprod) / alpha_cumprod), float32, indexed by training timestep."""
    return (((np.float32(1) - ac) / ac) ** np.float32(0.5)).astype(np.float32)


def spaced_timesteps(cfg: SchedulerConfig, n: int, *, rounded_linspace: bool, dtype) -> np.ndarray:
    """The n timesteps, descending, of cfg.timestep_spacing (diffusers' three spacings)."""
    T = cfg.num_train_timesteps
    if n > T:
        raise ValueError(f"num_inference_steps={n} is more than num_train_timesteps={T}")
    if cfg.timestep_spacing == "linspace":
        if rounded_linspace:
            ts = np.linspace(0, T - 1, n).round()[::-1]
        else:
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(dtype) + cfg.steps_offset
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / n)).astype(dtype) - 1
    return np.ascontiguousarray(ts).astype(dtype)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, by linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. 2022 (eq. 5), rho = 7, float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO
