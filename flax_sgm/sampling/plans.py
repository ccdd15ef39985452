"""Per-sampler plans: the host-side tables of one run (numpy) and the pure step that uses them.

A plan's rows hold, for every scheduler step actually run, the timestep the model sees, the
scale of its input and the scalars the step needs; its `step` is a pure JAX function
(carry, row, model_output, noise) -> carry, so the whole loop is one lax.scan. Decisions that
diffusers makes from counters (DPM++'s lower orders, PNDM's warm-up, LMS's order) depend only on
the step index, so they are rows too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from flax_sgm.sampling import schedules
from flax_sgm.sampling.config import SchedulerConfig

f32 = np.float32


@dataclasses.dataclass(frozen=True)
class Plan:
    timesteps: np.ndarray  # [L] every timestep of diffusers' scheduler.timesteps
    rows: dict  # name -> [L, ...] arrays, row i for timesteps[i]
    init_noise_sigma: float
    init_carry: Callable  # x -> carry (a dict of arrays)
    step: Callable  # (carry, row, model_output, noise) -> carry; carry["x"] is the latent
    model_input: Callable  # (x, row) -> the UNet's input
    prepare: Callable | None = None  # (carry, row, noise) -> carry before the model call (sgm's EDM churn)


def _identity_input(x, row):
    return x


def _sigma_input(x, row):
    return x / ((row["sigma_in"] ** 2 + 1) ** 0.5)


def _x0_alpha(cfg, x, out, a_t):
    """Predicted clean sample and noise from alpha_cumprod-space outputs (DDIM, LCM)."""
    b_t = 1 - a_t
    if cfg.prediction_type == "epsilon":
        return (x - b_t**0.5 * out) / a_t**0.5, out
    if cfg.prediction_type == "sample":
        return out, (x - a_t**0.5 * out) / b_t**0.5
    return a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x


def _x0_sigma(cfg, x, out, sigma):
    """Predicted clean sample from sigma-space outputs (Euler, Heun, LMS); x is unscaled."""
    if cfg.prediction_type == "epsilon":
        return x - sigma * out
    if cfg.prediction_type == "sample":
        return out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def _clip(cfg, x0):
    return jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range) if cfg.clip_sample else x0


def _final_alpha(cfg, ac):
    return f32(1.0) if cfg.set_alpha_to_one else ac[0]


def _in_schedule(cfg, ts: np.ndarray, n: int) -> np.ndarray:
    """The timesteps of a sampler that indexes alphas_cumprod by them (DDIM, PNDM), all within it: 'leading'
    spacing plus steps_offset reaches T at n = T, where diffusers' DDIM and PNDM raise an IndexError."""
    if ts.max() >= cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps={n} with {cfg.timestep_spacing!r} spacing and steps_offset="
                         f"{cfg.steps_offset} reaches timestep {int(ts.max())}, past num_train_timesteps="
                         f"{cfg.num_train_timesteps} ({cfg.kind} indexes its schedule by timestep); take fewer steps")
    return ts


# --- DDIM (eta = 0) ---

def ddim(cfg: SchedulerConfig, n: int) -> Plan:
    ac = schedules.alphas_cumprod(cfg)
    ts = _in_schedule(cfg, schedules.spaced_timesteps(cfg, n, rounded_linspace=True, dtype=np.int64), n)
    prev = ts - cfg.num_train_timesteps // n  # diffusers' DDIM steps back by T // n whatever the spacing
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], _final_alpha(cfg, ac)).astype(f32)

    def step(carry, row, out, noise):
        x = carry["x"]
        x0, eps = _x0_alpha(cfg, x, out, row["a_t"])
        x0 = _clip(cfg, x0)
        a_prev = row["a_prev"]
        return {"x": a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps}

    return Plan(ts, {"a_t": ac[ts], "a_prev": a_prev}, 1.0, lambda x: {"x": x}, step, _identity_input)


# --- the sigma-space family: Euler, Euler ancestral, Heun, LMS ---

def _sigma_schedule(cfg: SchedulerConfig, n: int, *, final_sigma_type: str = "zero"):
    """(timesteps [n], sigmas [n + 1]) as Euler/Heun/LMS's set_timesteps builds them."""
    ac = schedules.alphas_cumprod(cfg)
    ts = schedules.spaced_timesteps(cfg, n, rounded_linspace=False, dtype=np.float32)
    train = schedules.train_sigmas(ac)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if cfg.use_karras_sigmas:
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
        sigmas = schedules.karras_sigmas(lo, hi, n)
        ts = schedules.sigma_to_t(sigmas, np.log(train))
    last = train[0] if final_sigma_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(f32)
    return ts.astype(f32), sigmas


def _sigma_init(cfg, sigmas) -> float:
    top = sigmas.max()
    return float(top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)


def euler(cfg: SchedulerConfig, n: int) -> Plan:
    ts, sigmas = _sigma_schedule(cfg, n, final_sigma_type=cfg.final_sigmas_type)

    def step(carry, row, out, noise):
        x, sigma = carry["x"], row["sigma_in"]
        x0 = _x0_sigma(cfg, x, out, sigma)
        return {"x": x + (x - x0) / sigma * (row["sigma_next"] - sigma)}

    rows = {"sigma_in": sigmas[:-1], "sigma_next": sigmas[1:]}
    return Plan(ts, rows, _sigma_init(cfg, sigmas), lambda x: {"x": x}, step, _sigma_input)


def euler_ancestral(cfg: SchedulerConfig, n: int) -> Plan:
    ts, sigmas = _sigma_schedule(cfg, n)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    sigma_up = ((s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** f32(0.5)).astype(f32)
    sigma_down = ((s_to**2 - sigma_up**2) ** f32(0.5)).astype(f32)

    def step(carry, row, out, noise):
        x, sigma = carry["x"], row["sigma_in"]
        x0 = _x0_sigma(cfg, x, out, sigma)
        x = x + (x - x0) / sigma * (row["sigma_down"] - sigma)
        return {"x": x + noise * row["sigma_up"]}

    rows = {"sigma_in": s_from, "sigma_up": sigma_up, "sigma_down": sigma_down}
    return Plan(ts, rows, _sigma_init(cfg, sigmas), lambda x: {"x": x}, step, _sigma_input)


def heun(cfg: SchedulerConfig, n: int) -> Plan:
    """Heun's 2nd order: 2n - 1 model calls; odd steps correct the Euler step before them."""
    ts, sigmas = _sigma_schedule(cfg, n)
    ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(f32)
    inter = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])  # diffusers' self.sigmas
    L = len(ts)
    second = (np.arange(L) % 2 == 1)
    # First order at j: sigma = inter[j], next = inter[j + 1]; second order: sigma = inter[j - 1], next = inter[j].
    sigma_pred = np.where(second, inter[1:L + 1], inter[:L]).astype(f32)
    dt = (inter[1:L + 1] - inter[:L]).astype(f32)

    def step(carry, row, out, noise):
        x, s = carry["x"], row["sigma_pred"]
        x0 = _clip(cfg, _x0_sigma(cfg, x, out, s))
        d = (x - x0) / s
        first = {"x": x + d * row["dt"], "d": d, "dt": row["dt"], "x_saved": x}
        d2 = (carry["d"] + d) / 2
        corrected = {"x": carry["x_saved"] + d2 * carry["dt"], "d": d, "dt": carry["dt"], "x_saved": x}
        return {k: jnp.where(row["second"], corrected[k], first[k]) for k in first}

    def init(x):
        return {"x": x, "d": jnp.zeros_like(x), "dt": jnp.zeros((), jnp.float32), "x_saved": x}

    rows = {"sigma_in": inter[:L], "sigma_pred": sigma_pred, "dt": dt, "second": second}
    return Plan(ts, rows, _sigma_init(cfg, sigmas), init, step, _sigma_input)


LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step(order=4), what its pipelines use


def _lagrange_integral(nodes: np.ndarray, j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial of nodes[j] (exact; diffusers uses quad)."""
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    integral = poly.integ()
    return float(integral(b) - integral(a))


def lms(cfg: SchedulerConfig, n: int, start: int) -> Plan:
    ts, sigmas = _sigma_schedule(cfg, n)
    s64 = sigmas.astype(np.float64)
    coeffs = np.zeros((n, LMS_ORDER), f32)
    for i in range(start, n):
        # diffusers' order counts from step 0 even when img2img starts later; the derivatives it does not
        # hold yet (zip() drops them) are the zeros the history starts with.
        order = min(i + 1, LMS_ORDER)
        nodes = np.array([s64[i - k] for k in range(order)])
        for j in range(order):
            coeffs[i, j] = _lagrange_integral(nodes, j, s64[i], s64[i + 1])

    def step(carry, row, out, noise):
        x, sigma = carry["x"], row["sigma_in"]
        d = (x - _x0_sigma(cfg, x, out, sigma)) / sigma
        c, hist = row["coeffs"], carry["hist"]  # hist[k]: the derivative k + 1 steps back
        acc = c[0] * d
        for k in range(LMS_ORDER - 1):
            acc = acc + c[k + 1] * hist[k]
        return {"x": x + acc, "hist": jnp.concatenate([d[None], hist[:-1]])}

    def init(x):
        return {"x": x, "hist": jnp.zeros((LMS_ORDER - 1, *x.shape), x.dtype)}

    rows = {"sigma_in": sigmas[:-1], "coeffs": coeffs}
    return Plan(ts, rows, _sigma_init(cfg, sigmas), init, step, _sigma_input)


# --- DPM-Solver++ (2M) ---

def dpmpp_2m(cfg: SchedulerConfig, n: int, start: int) -> Plan:
    ac = schedules.alphas_cumprod(cfg)
    T = cfg.num_train_timesteps
    lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))).astype(f32)
    last_t = T - int(np.searchsorted(lam[::-1], cfg.lambda_min_clipped))
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n + 1) * (last_t // (n + 1))).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        ts = np.arange(last_t, 0, -T / n).round().astype(np.int64) - 1
    train = schedules.train_sigmas(ac)
    if cfg.use_karras_sigmas:
        sig = schedules.karras_sigmas(float(train[0]), float(train[-1]), n)
        t_frac = schedules.sigma_to_t(sig, np.log(train))
        ts = (t_frac if cfg.beta_schedule == "squaredcos_cap_v2" else t_frac.round()).astype(np.int64)
    else:
        sig = np.interp(ts, np.arange(len(train)), train)
    last = train[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(f32)
    L = len(ts)

    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (f32(1) / (sigmas**2 + 1) ** f32(0.5)).astype(f32)
        sig_vp = (sigmas * alpha).astype(f32)
        lam_s = (np.log(alpha) - np.log(sig_vp)).astype(f32)
        i = np.arange(L)
        h = lam_s[i + 1] - lam_s[i]
        h0 = np.where(i > 0, lam_s[i] - lam_s[np.maximum(i - 1, 0)], f32(1))
        final_first = cfg.euler_at_final or (cfg.lower_order_final and L < 15) or cfg.final_sigmas_type == "zero"
        order = np.full(L, cfg.solver_order)
        order[i - start < 1] = 1  # no previous output yet
        if final_first:
            order[L - 1] = 1
        a_coef = (sig_vp[i + 1] / sig_vp[i]).astype(f32)
        b_coef = (alpha[i + 1] * (np.exp(-h) - 1)).astype(f32)
        heun_coef = (alpha[i + 1] * ((np.exp(-h) - 1) / h + 1)).astype(f32)
        inv_r0 = np.where(order == 2, 1 / (h0 / h), 0).astype(f32)
    heun_coef = np.where(order == 2, heun_coef, 0).astype(f32)

    def step(carry, row, out, noise):
        x, sigma = carry["x"], row["sigma_in"]
        a_t = 1 / (sigma**2 + 1) ** 0.5
        s_t = sigma * a_t
        if cfg.prediction_type == "epsilon":
            m0 = (x - s_t * out) / a_t
        elif cfg.prediction_type == "sample":
            m0 = out
        else:
            m0 = a_t * x - s_t * out
        d1 = row["inv_r0"] * (m0 - carry["m_prev"])  # zero where the step is first order
        x = row["a"] * x - row["b"] * m0
        if cfg.solver_type == "midpoint":
            x = x - 0.5 * row["b"] * d1
        else:
            x = x + row["heun"] * d1
        return {"x": x, "m_prev": m0}

    rows = {"sigma_in": sigmas[:-1], "a": a_coef, "b": b_coef, "heun": heun_coef, "inv_r0": inv_r0}
    return Plan(ts, rows, 1.0, lambda x: {"x": x, "m_prev": jnp.zeros_like(x)}, step, _identity_input)


# --- PNDM (PLMS steps only) ---

_PLMS_WEIGHTS = {  # weights of (current, 1 back, 2 back, 3 back) once that many outputs are held
    1: (1.0, 0.0, 0.0, 0.0),
    2: (3 / 2, -1 / 2, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def pndm(cfg: SchedulerConfig, n: int, start: int) -> Plan:
    ac = schedules.alphas_cumprod(cfg)
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        base = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + cfg.steps_offset
    else:
        base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    ts = _in_schedule(cfg, np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64), n)
    L = len(ts)
    j = np.arange(L) - start  # PNDM's counter starts at 0 wherever img2img starts
    t_cur = np.where(j == 1, ts + T // n, ts)
    t_prev = np.where(j == 1, ts, ts - T // n)
    a_t = ac[np.clip(t_cur, 0, T - 1)]
    a_prev = np.where(t_prev >= 0, ac[np.clip(t_prev, 0, None)], _final_alpha(cfg, ac)).astype(f32)
    b_t, b_prev = (f32(1) - a_t).astype(f32), (f32(1) - a_prev).astype(f32)
    held = np.where(j >= 2, np.minimum(j, 4), 1)  # outputs held after this step's: e0, e2, e3, ... (e1 is not kept)
    weights = np.array([_PLMS_WEIGHTS[int(k)] for k in held], f32)
    weights[j == 1] = (0.5, 0.5, 0.0, 0.0)
    rows = {
        "sqrt_a": (a_t ** f32(0.5)).astype(f32), "sqrt_b": (b_t ** f32(0.5)).astype(f32),
        "sample_coeff": ((a_prev / a_t) ** f32(0.5)).astype(f32),
        "diff": (a_prev - a_t).astype(f32),
        "denom": (a_t * b_prev ** f32(0.5) + (a_t * b_t * a_prev) ** f32(0.5)).astype(f32),
        "weights": weights, "use_saved": j == 1, "push": j != 1, "save": j == 0,
    }

    def step(carry, row, out, noise):
        x, hist, w = carry["x"], carry["hist"], row["weights"]
        e = w[0] * out + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2]
        sample = jnp.where(row["use_saved"], carry["saved"], x)
        if cfg.prediction_type == "v_prediction":
            e = row["sqrt_a"] * e + row["sqrt_b"] * sample
        x_new = row["sample_coeff"] * sample - row["diff"] * e / row["denom"]
        hist = jnp.where(row["push"], jnp.concatenate([out[None], hist[:-1]]), hist)
        return {"x": x_new, "hist": hist, "saved": jnp.where(row["save"], x, carry["saved"])}

    def init(x):
        return {"x": x, "hist": jnp.zeros((3, *x.shape), x.dtype), "saved": x}

    return Plan(ts, rows, 1.0, init, step, _identity_input)


# --- LCM ---

LCM_SIGMA_DATA = 0.5


def lcm(cfg: SchedulerConfig, n: int) -> Plan:
    ac = schedules.alphas_cumprod(cfg)
    T, orig = cfg.num_train_timesteps, cfg.original_inference_steps
    if orig > T or n > orig:
        raise ValueError(f"lcm: num_inference_steps={n} must be at most original_inference_steps={orig}, "
                         f"and that at most num_train_timesteps={T}")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    t_next = np.concatenate([ts[1:], ts[-1:]])
    a_prev = np.where(t_next >= 0, ac[np.clip(t_next, 0, None)], _final_alpha(cfg, ac)).astype(f32)
    scaled = (ts * f32(cfg.timestep_scaling)).astype(f32)
    sd2 = f32(LCM_SIGMA_DATA**2)
    rows = {"a_t": ac[ts], "a_prev": a_prev, "c_skip": (sd2 / (scaled**2 + sd2)).astype(f32),
            "c_out": (scaled / (scaled**2 + sd2) ** f32(0.5)).astype(f32), "last": np.arange(n) == n - 1}

    def step(carry, row, out, noise):
        x = carry["x"]
        x0, _ = _x0_alpha(cfg, x, out, row["a_t"])
        denoised = row["c_out"] * _clip(cfg, x0) + row["c_skip"] * x
        renoised = row["a_prev"] ** 0.5 * denoised + (1 - row["a_prev"]) ** 0.5 * noise
        return {"x": jnp.where(row["last"], denoised, renoised)}

    return Plan(ts.astype(np.int64), rows, 1.0, lambda x: {"x": x}, step, _identity_input)


def scheduler_plan(cfg: SchedulerConfig, n: int, start: int = 0) -> Plan:
    """The plan of a diffusers scheduler's `n` inference steps; `start` is the first index into its timesteps
    that runs (sample.make_plan picks this or sgm.sgm_plan by the config)."""
    if cfg.kind == "lms":
        return lms(cfg, n, start)
    if cfg.kind == "dpmpp_2m":
        return dpmpp_2m(cfg, n, start)
    if cfg.kind == "pndm":
        return pndm(cfg, n, start)
    return {"ddim": ddim, "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "lcm": lcm}[cfg.kind](cfg, n)
