"""sgm's own samplers (sgm/modules/diffusionmodules/sampling.py) as plans of the one sampling loop.

`SgmSamplerConfig.from_sgm(sampler_config, denoiser_config)` reads sgm's `{target, params}` dicts (what
its yaml and scripts/demo build) as a spec: the sampler (EulerEDM, HeunEDM, EulerAncestral,
DPMPP2SAncestral, DPMPP2M, LinearMultistep), its discretization (LegacyDDPM, EDM), its guider
(VanillaCFG's scale, or IdentityGuider) and the denoiser (Denoiser or DiscreteDenoiser, with the Eps, V,
EDM or V-with-EDM-c_noise scaling). Every param that changes the maths is honoured or refused in one line.

Each plan row is one network evaluation. Every sigma a network sees is known on the host (churn, Heun's
corrector, DPM++ 2S's midpoint), so the DiscreteDenoiser's quantization (sigma -> nearest table sigma,
c_noise -> its index) and the scalings (c_in, c_out, c_skip) are rows too; the step forms sgm's
`denoised = network(x * c_in, c_noise) * c_out + x * c_skip` from the network's output. The guider's
combination (uncond + scale * (cond - uncond)) is linear, so the caller applies it to the network's
output (`vanilla_cfg`) and the denoised sample is sgm's up to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_sgm.config_io import ConfigIO
from flax_sgm.sampling import schedules
from flax_sgm.sampling.plans import Plan, _lagrange_integral

f32 = np.float32
_MODULE = "sgm.modules.diffusionmodules."
SAMPLERS = {  # sgm class -> kind
    "EulerEDMSampler": "euler_edm",
    "HeunEDMSampler": "heun_edm",
    "EulerAncestralSampler": "euler_ancestral",
    "DPMPP2SAncestralSampler": "dpmpp_2s_ancestral",
    "DPMPP2MSampler": "dpmpp_2m",
    "LinearMultistepSampler": "lms",
}
SGM_KINDS = tuple(SAMPLERS.values())
DISCRETIZATIONS = {"LegacyDDPMDiscretization": "legacy_ddpm", "EDMDiscretization": "edm"}
SCALINGS = {"EpsScaling": "eps", "VScaling": "v", "EDMScaling": "edm", "VScalingWithEDMcNoise": "v_edm_c_noise"}
# Each sampler class's params (beside discretization_config, num_steps, guider_config) and sgm's defaults.
_SAMPLER_PARAMS = {
    "euler_edm": {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0},
    "heun_edm": {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0},
    "euler_ancestral": {"eta": 1.0, "s_noise": 1.0},
    "dpmpp_2s_ancestral": {"eta": 1.0, "s_noise": 1.0},
    "dpmpp_2m": {},
    "lms": {"order": 4},
}
# Params that do not change the samples.
_IRRELEVANT = {"verbose": "prints and a progress bar", "device": "where torch computes"}


@dataclasses.dataclass(frozen=True)
class SgmSamplerConfig(ConfigIO):
    """An sgm sampler, its discretization, guider and denoiser. Names follow sgm's params."""

    NAME = "sgm sampler"

    kind: str  # one of SGM_KINDS
    num_steps: int | None = None  # the sampler's num_steps (a default; sample()'s steps win, as sgm's __call__)
    # The sampler's discretization: LegacyDDPM's linear betas, or EDM's rho-schedule.
    discretization: str = "legacy_ddpm"
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    num_timesteps: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # EDM samplers' churn; ancestral samplers' eta; both take s_noise.
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    eta: float = 1.0
    lms_order: int = 4
    # VanillaCFG's scale; None: IdentityGuider (no guidance).
    guidance_scale: float | None = None
    # The denoiser: its scaling, and (DiscreteDenoiser) the LegacyDDPM table sigmas are quantized to.
    scaling: str = "eps"
    sigma_data: float = 0.5
    discrete: bool = True
    num_idx: int = 1000
    idx_linear_start: float = 0.00085
    idx_linear_end: float = 0.0120
    idx_num_timesteps: int = 1000
    quantize_c_noise: bool = True

    def __post_init__(self):
        for name, value, allowed in (("kind", self.kind, SGM_KINDS),
                                     ("discretization", self.discretization, tuple(DISCRETIZATIONS.values())),
                                     ("scaling", self.scaling, tuple(SCALINGS.values()))):
            if value not in allowed:
                raise ValueError(f"SgmSamplerConfig: {name}={value!r} is not supported; supported: {list(allowed)}")
        if self.lms_order < 1:
            raise ValueError(f"SgmSamplerConfig: lms_order must be >= 1; got {self.lms_order}")
        if self.discrete and not 1 <= self.num_idx <= self.idx_num_timesteps:
            raise ValueError(f"SgmSamplerConfig: num_idx={self.num_idx} must be in [1, {self.idx_num_timesteps}]")

    @property
    def stochastic(self) -> bool:
        """Whether `sample` needs a PRNG key (churn, or ancestral noise)."""
        if self.kind in ("euler_edm", "heun_edm"):
            return self.s_churn > 0
        return self.kind in ("euler_ancestral", "dpmpp_2s_ancestral") and self.eta != 0

    @property
    def order(self) -> int:
        return 1

    @classmethod
    def from_sgm(cls, sampler_config: Mapping[str, Any], denoiser_config: Mapping[str, Any] | None = None, *,
                 source: str = "sampler_config") -> "SgmSamplerConfig":
        """Read sgm's `sampler_config` ({target, params}) and the model's `denoiser_config` (None: sgm's
        released SD/SDXL denoiser, a DiscreteDenoiser of 1000 LegacyDDPM sigmas with EpsScaling)."""
        target, params = _target(sampler_config, f"{source}")
        if target not in SAMPLERS:
            raise ValueError(f"{source}: sampler {target!r} is not supported; supported: {sorted(SAMPLERS)}")
        kind = SAMPLERS[target]
        own = _SAMPLER_PARAMS[kind]
        values: dict[str, Any] = {"kind": kind}
        for name, value in params.items():
            if name == "num_steps":
                values["num_steps"] = None if value is None else int(value)
            elif name == "discretization_config":
                values.update(_discretization(value, f"{source}: discretization_config", prefix=""))
            elif name == "guider_config":
                values["guidance_scale"] = _guider(value, f"{source}: guider_config")
            elif name == "order" and name in own:
                values["lms_order"] = int(value)
            elif name in own:
                values[name] = float(value)
            elif name not in _IRRELEVANT:
                raise ValueError(f"{source}: {target} param {name!r} is not known to flax_sgm's sgm samplers")
        if "discretization" not in values:
            raise ValueError(f"{source}: {target} needs params.discretization_config")
        values.update(_denoiser(denoiser_config, "denoiser_config"))
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None


def _target(config, source: str) -> tuple[str, dict]:
    if not isinstance(config, Mapping) or "target" not in config:
        raise ValueError(f"{source}: an sgm config must be a mapping with 'target' (and 'params')")
    target, params = str(config["target"]), config.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: params must be a mapping; got {type(params).__name__}")
    return target.removeprefix(_MODULE).rsplit(".", 1)[-1], dict(params)


def _only(params: dict, known: dict, source: str, target: str) -> dict:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{source}: {target} param {unknown[0]!r} is not known to flax_sgm's sgm samplers")
    return {k: params.get(k, default) for k, default in known.items()}


def _discretization(config, source: str, *, prefix: str) -> dict:
    target, params = _target(config, source)
    if target not in DISCRETIZATIONS:
        raise ValueError(f"{source}: discretization {target!r} is not supported; supported: {sorted(DISCRETIZATIONS)}")
    if target == "LegacyDDPMDiscretization":
        p = _only(params, {"linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps": 1000}, source, target)
        out = {"linear_start": float(p["linear_start"]), "linear_end": float(p["linear_end"]),
               "num_timesteps": int(p["num_timesteps"])}
    else:
        if prefix:
            raise ValueError(f"{source}: a DiscreteDenoiser over {target} is not supported (only LegacyDDPMDiscretization)")
        p = _only(params, {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}, source, target)
        out = {k: float(v) for k, v in p.items()}
    out = {prefix + k: v for k, v in out.items()}
    if not prefix:
        out["discretization"] = DISCRETIZATIONS[target]
    return out


def _guider(config, source: str) -> float | None:
    if config is None:
        return None
    target, params = _target(config, source)
    if target == "IdentityGuider":
        _only(params, {}, source, target)
        return None
    if target != "VanillaCFG":
        raise ValueError(f"{source}: guider {target!r} is not supported; supported: ['IdentityGuider', 'VanillaCFG']")
    if "scale" not in params:
        raise ValueError(f"{source}: VanillaCFG needs params.scale")
    return float(_only(params, {"scale": None}, source, target)["scale"])


def _denoiser(config, source: str) -> dict:
    if config is None:
        return {}
    target, params = _target(config, source)
    if target not in ("Denoiser", "DiscreteDenoiser"):
        raise ValueError(f"{source}: denoiser {target!r} is not supported; supported: ['Denoiser', 'DiscreteDenoiser']")
    if "scaling_config" not in params:
        raise ValueError(f"{source}: {target} needs params.scaling_config")
    scaling_target, scaling_params = _target(params.pop("scaling_config"), f"{source}: scaling_config")
    if scaling_target not in SCALINGS:
        raise ValueError(f"{source}: scaling {scaling_target!r} is not supported; supported: {sorted(SCALINGS)}")
    out: dict[str, Any] = {"scaling": SCALINGS[scaling_target], "discrete": target == "DiscreteDenoiser"}
    known = {"sigma_data": 0.5} if scaling_target == "EDMScaling" else {}
    out.update({k: float(v) for k, v in _only(scaling_params, known, f"{source}: scaling_config",
                                               scaling_target).items()})
    if target == "Denoiser":
        _only(params, {}, source, target)
        return out
    if "discretization_config" not in params or "num_idx" not in params:
        raise ValueError(f"{source}: DiscreteDenoiser needs params.num_idx and params.discretization_config")
    p = _only(params, {"num_idx": None, "discretization_config": None, "do_append_zero": False,
                       "quantize_c_noise": True, "flip": True}, source, target)
    for name, accepted in (("do_append_zero", False), ("flip", True)):
        if bool(p[name]) != accepted:
            raise ValueError(f"{source}: DiscreteDenoiser param {name}={p[name]!r} is not supported (only {accepted!r})")
    out.update(_discretization(p["discretization_config"], f"{source}: discretization_config", prefix="idx_"))
    out.update(num_idx=int(p["num_idx"]), quantize_c_noise=bool(p["quantize_c_noise"]))
    return out


# --- tables (numpy, float32 where sgm computes in float32) ---

def _legacy_sigmas(linear_start: float, linear_end: float, T: int, n: int) -> np.ndarray:
    """LegacyDDPMDiscretization.get_sigmas(n): n sigmas, descending, no zero."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, T, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    if n < T:
        ac = ac[np.linspace(T - 1, 0, n, endpoint=False).astype(int)[::-1]]
    elif n > T:
        raise ValueError(f"LegacyDDPMDiscretization: {n} steps is more than num_timesteps={T}")
    return (((1 - ac) / ac).astype(f32) ** f32(0.5))[::-1].astype(f32)


def sigmas(cfg: SgmSamplerConfig, n: int) -> np.ndarray:
    """The sampler's discretization(n): n sigmas, descending, then 0 (float32)."""
    if cfg.discretization == "legacy_ddpm":
        s = _legacy_sigmas(cfg.linear_start, cfg.linear_end, cfg.num_timesteps, n)
    else:
        ramp = schedules._linspace32(0.0, 1.0, n)
        lo, hi = f32(cfg.sigma_min ** (1 / cfg.rho)), f32(cfg.sigma_max ** (1 / cfg.rho))
        s = ((hi + ramp * (lo - hi)) ** f32(cfg.rho)).astype(f32)
    return np.concatenate([s, [0.0]]).astype(f32)


def denoiser_rows(cfg: SgmSamplerConfig, sigma: np.ndarray) -> dict:
    """The denoiser at each evaluation's sigma: the network's timestep (c_noise) and c_in, c_out, c_skip."""
    sigma = np.asarray(sigma, f32)
    if cfg.discrete:
        table = _legacy_sigmas(cfg.idx_linear_start, cfg.idx_linear_end, cfg.idx_num_timesteps, cfg.num_idx)[::-1]
        table = np.ascontiguousarray(table)

        def to_idx(s):
            return np.abs(s[None, :] - table[:, None]).argmin(axis=0)

        sigma = table[to_idx(sigma)]
    sd = f32(cfg.sigma_data)
    with np.errstate(divide="ignore"):
        if cfg.scaling == "eps":
            c_skip, c_out, c_in, c_noise = np.ones_like(sigma), -sigma, f32(1) / (sigma**2 + f32(1)) ** f32(0.5), sigma
        elif cfg.scaling == "edm":
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / (sigma**2 + sd**2) ** f32(0.5)
            c_in = f32(1) / (sigma**2 + sd**2) ** f32(0.5)
            c_noise = f32(0.25) * np.log(sigma)
        else:  # v, v_edm_c_noise
            c_skip = f32(1) / (sigma**2 + f32(1))
            c_out = -sigma / (sigma**2 + f32(1)) ** f32(0.5)
            c_in = f32(1) / (sigma**2 + f32(1)) ** f32(0.5)
            c_noise = sigma if cfg.scaling == "v" else f32(0.25) * np.log(sigma)
    if cfg.discrete and cfg.quantize_c_noise:
        c_noise = to_idx(np.asarray(c_noise, f32))
    return {"t": np.asarray(c_noise, f32), "c_in": np.asarray(c_in, f32), "c_out": np.asarray(c_out, f32),
            "c_skip": np.asarray(c_skip, f32)}


def _ancestral(s_from, s_to, eta):
    """get_ancestral_step: (sigma_down, sigma_up)."""
    if not eta:
        return s_to.astype(f32), np.zeros_like(s_to)
    up = np.minimum(s_to, f32(eta) * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** f32(0.5)).astype(f32)
    return ((s_to**2 - up**2) ** f32(0.5)).astype(f32), up


# --- plans ---

def sgm_plan(cfg: SgmSamplerConfig, n: int, start: int = 0):
    """The plan of `n` steps of cfg's sampler: a row per network evaluation."""
    if start:
        raise ValueError("sgm samplers start at the first step (img2img through sgm's discretization wrappers is "
                         "not supported)")
    s = sigmas(cfg, n)
    evals: list[dict] = []  # host rows, in order

    def row(sigma_eval, **values):
        evals.append({"sigma_eval": sigma_eval, **values})

    kind = cfg.kind
    if kind in ("euler_edm", "heun_edm"):
        for i in range(n):
            gamma = min(cfg.s_churn / n, 2**0.5 - 1) if cfg.s_tmin <= s[i] <= cfg.s_tmax else 0.0
            hat = f32(s[i] * f32(gamma + 1.0))
            churn = f32(cfg.s_noise) * (hat**2 - s[i] ** 2) ** f32(0.5) if gamma > 0 else f32(0)
            dt = f32(s[i + 1] - hat)
            corrector = kind == "heun_edm" and s[i + 1] > 0
            row(hat, phase=0, churn=churn, sigma_d=hat, dt=dt, draws=gamma > 0)
            if corrector:
                row(s[i + 1], phase=1, churn=f32(0), sigma_d=s[i + 1], dt=dt, draws=False)
    elif kind in ("euler_ancestral", "dpmpp_2s_ancestral"):
        down, up = _ancestral(s[:-1], s[1:], cfg.eta)
        for i in range(n):
            noise = f32(cfg.s_noise) * up[i] if s[i + 1] > 0 else f32(0)
            if kind == "euler_ancestral" or down[i] < 1e-14:
                row(s[i], phase=0, sigma_d=s[i], down=down[i], up=noise, m=np.zeros(4, f32), draws=True, final=True)
                continue
            t, t_next = -np.log(s[i]), -np.log(down[i])
            h = f32(t_next - t)
            mid = f32(t + f32(0.5) * h)
            m = np.array([np.exp(-mid) / np.exp(-t), np.expm1(f32(-0.5) * h),
                          np.exp(-t_next) / np.exp(-t), np.expm1(-h)], f32)
            row(s[i], phase=0, sigma_d=s[i], down=down[i], up=f32(0), m=m, draws=False, final=False)
            row(f32(np.exp(-mid)), phase=1, sigma_d=s[i], down=down[i], up=noise, m=m, draws=True, final=True)
    elif kind == "dpmpp_2m":
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(n):
                t, t_next = -np.log(s[i]), -np.log(s[i + 1])
                h = f32(t_next - t)
                a, b = f32(np.exp(-t_next) / np.exp(-t)), f32(np.expm1(-h))
                c3, c4 = f32(1), f32(0)
                if i > 0 and s[i + 1] >= 1e-14:
                    r = f32((t - (-np.log(s[i - 1]))) / h)
                    c3, c4 = f32(1 + 1 / (2 * r)), f32(1 / (2 * r))
                row(s[i], a=a, b=b, c3=c3, c4=c4, draws=False)
    else:  # lms
        s64 = s.astype(np.float64)
        for i in range(n):
            k = min(i + 1, cfg.lms_order)
            nodes = np.array([s64[i - j] for j in range(k)])
            coeffs = np.zeros(cfg.lms_order, f32)
            coeffs[:k] = [_lagrange_integral(nodes, j, s64[i], s64[i + 1]) for j in range(k)]
            row(s[i], sigma_d=s[i], coeffs=coeffs, draws=False)

    rows = {k: np.stack([np.asarray(r[k]) for r in evals]) for k in evals[0]}
    rows.update(denoiser_rows(cfg, rows.pop("sigma_eval")))
    timesteps = rows.pop("t")
    step, init = _STEPS[kind](cfg)
    return Plan(timesteps, rows, float(f32(1.0 + s[0] ** 2) ** f32(0.5)), init, step, _scaled_input,
                prepare=_churn if kind in ("euler_edm", "heun_edm") else None)


def _scaled_input(x, row):
    return x * row["c_in"]


def _denoised(x, row, out):
    return out * row["c_out"] + x * row["c_skip"]


def _churn(carry, row, noise):
    """EDM samplers: x + eps * s_noise * sqrt(sigma_hat^2 - sigma^2) before the step's evaluation."""
    if noise is None:
        return carry
    return {**carry, "x": carry["x"] + noise * row["churn"]}


def _edm_steps(cfg):
    def step(carry, row, out, noise):
        x = carry["x"]
        d = (x - _denoised(x, row, out)) / row["sigma_d"]
        if cfg.kind == "euler_edm":
            return {"x": x + d * row["dt"]}
        first = {"x": x + d * row["dt"], "d": d, "x_saved": x}
        corrected = {"x": carry["x_saved"] + (carry["d"] + d) / 2 * row["dt"], "d": d, "x_saved": x}
        return {k: jnp.where(row["phase"] == 1, corrected[k], first[k]) for k in first}

    def init(x):
        return {"x": x} if cfg.kind == "euler_edm" else {"x": x, "d": jnp.zeros_like(x), "x_saved": x}

    return step, init


def _ancestral_steps(cfg):
    def step(carry, row, out, noise):
        x = carry["x"]
        den = _denoised(x, row, out)
        m = row["m"]
        # phase 0: the Euler step to sigma_down (final) or DPM++ 2S's midpoint (not final); phase 1: its second half
        euler = x + (x - den) / row["sigma_d"] * (row["down"] - row["sigma_d"])
        midpoint = m[0] * x - m[1] * den
        second = m[2] * carry["x_saved"] - m[3] * den
        x_new = jnp.where(row["phase"] == 1, second, jnp.where(row["final"], euler, midpoint))
        if noise is not None:
            x_new = jnp.where(row["final"], x_new + noise * row["up"], x_new)
        return {"x": x_new, "x_saved": jnp.where(row["phase"] == 0, x, carry["x_saved"])}

    return step, lambda x: {"x": x, "x_saved": x}


def _dpmpp_2m_steps(cfg):
    def step(carry, row, out, noise):
        x = carry["x"]
        den = _denoised(x, row, out)
        x_new = row["a"] * x - row["b"] * (row["c3"] * den - row["c4"] * carry["old"])
        return {"x": x_new, "old": den}

    return step, lambda x: {"x": x, "old": jnp.zeros_like(x)}


def _lms_steps(cfg):
    order = cfg.lms_order

    def step(carry, row, out, noise):
        x = carry["x"]
        d = (x - _denoised(x, row, out)) / row["sigma_d"]
        c, hist = row["coeffs"], carry["hist"]  # hist[k]: the derivative k + 1 steps back
        acc = c[0] * d
        for k in range(order - 1):
            acc = acc + c[k + 1] * hist[k]
        hist = jnp.concatenate([d[None], hist[:-1]]) if order > 1 else hist
        return {"x": x + acc, "hist": hist}

    return step, lambda x: {"x": x, "hist": jnp.zeros((max(order - 1, 1), *x.shape), x.dtype)}


_STEPS = {"euler_edm": _edm_steps, "heun_edm": _edm_steps, "euler_ancestral": _ancestral_steps,
          "dpmpp_2s_ancestral": _ancestral_steps, "dpmpp_2m": _dpmpp_2m_steps, "lms": _lms_steps}


def vanilla_cfg(out, scale: float):
    """sgm's VanillaCFG on a batch [uncond, cond]: uncond + scale * (cond - uncond)."""
    uncond, cond = jnp.split(out, 2)
    return uncond + scale * (cond - uncond)
