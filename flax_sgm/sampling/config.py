"""SchedulerConfig: which sampler and every scheduler field that changes the maths.

`SchedulerConfig.from_diffusers` reads a diffusers `scheduler_config.json` as a spec. Each class
in SCHEDULERS lists its `__init__` fields in exactly one of three rooms: honoured (read into the
config, with diffusers' default when the file leaves it out), fixed (refused in one line unless
it holds the value our sampler computes with) and irrelevant (does not change the samples, with
why). A field in none of them is refused too, so a field diffusers adds later is noticed
(parity_tests/test_sampling.py walks the signatures).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from flax_sgm.config_io import ConfigIO

KINDS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "heun", "lms", "pndm", "lcm")
STOCHASTIC = frozenset({"euler_ancestral", "lcm"})
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(ConfigIO):
    """A sampler and its noise schedule. Field names and meanings are diffusers'."""

    NAME = "scheduler"

    kind: str
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # DDIM, PNDM, LCM: alpha_cumprod after the last step (1, or alphas_cumprod[0]).
    set_alpha_to_one: bool = True
    # DDIM, Heun, LCM: clamp the predicted clean sample.
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # Euler, DPM++, Heun, LMS: Karras et al.'s rho=7 sigmas; sigma_min/max bound them (Euler only).
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    # Euler, DPM++: the sigma after the last step ("zero" or "sigma_min").
    final_sigmas_type: str = "zero"
    # DPM++ 2M.
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    # LCM.
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self):
        checks = (
            ("kind", self.kind, KINDS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", self.timestep_spacing, SPACINGS),
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min")),
            ("solver_type", self.solver_type, ("midpoint", "heun")),
            ("solver_order", self.solver_order, (1, 2)),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"SchedulerConfig: {name}={value!r} is not supported; supported: {list(allowed)}")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"SchedulerConfig: trained_betas has {len(self.trained_betas)} entries; "
                                 f"num_train_timesteps is {self.num_train_timesteps}")
        if self.kind == "euler_ancestral" and self.prediction_type == "sample":
            raise ValueError("SchedulerConfig: euler_ancestral does not take prediction_type='sample' "
                             "(diffusers' EulerAncestralDiscreteScheduler refuses it too)")
        if self.kind == "pndm" and self.prediction_type == "sample":
            raise ValueError("SchedulerConfig: pndm takes prediction_type 'epsilon' or 'v_prediction' "
                             "(diffusers' PNDMScheduler refuses 'sample')")

    @property
    def stochastic(self) -> bool:
        """Whether `sample` needs a PRNG key."""
        return self.kind in STOCHASTIC

    @property
    def order(self) -> int:
        """Model evaluations per inference step (diffusers' `scheduler.order`)."""
        return 2 if self.kind == "heun" else 1

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], *, source: str = "scheduler_config.json",
                       kind: str | None = None) -> "SchedulerConfig":
        """Read a diffusers scheduler config. `kind` picks another sampler on the same schedule, as
        `OtherScheduler.from_config(config)` does: then the fields the other class does not take are
        dropped (diffusers drops them too), and the rest are read as that class's."""
        return scheduler_from_diffusers(d, source=source, kind=kind)


_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_THRESHOLDING = {"dynamic_thresholding_ratio": "used only with thresholding, which is refused",
                 "sample_max_value": "used only with thresholding, which is refused"}
_OTHER_SIGMAS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str
    honoured: dict[str, Any]  # field -> diffusers' default
    fixed: dict[str, Any]  # field -> the only value accepted
    irrelevant: dict[str, str]  # field -> why it does not change the samples
    fixed_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # diffusers' default, where not the accepted one


SCHEDULERS: dict[str, _Spec] = {
    "DDIMScheduler": _Spec(
        "ddim",
        {**_COMMON, "clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 1.0,
         "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
        {"thresholding": False},
        _THRESHOLDING),
    "EulerDiscreteScheduler": _Spec(
        "euler",
        {**_COMMON, "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace",
         "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
        {"interpolation_type": "linear", "timestep_type": "discrete", **_OTHER_SIGMAS},
        {}),
    "EulerAncestralDiscreteScheduler": _Spec(
        "euler_ancestral",
        {**_COMMON, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
        {}, {}),
    "DPMSolverMultistepScheduler": _Spec(
        "dpmpp_2m",
        {**_COMMON, "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
         "use_karras_sigmas": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
         "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
        {"algorithm_type": "dpmsolver++", "thresholding": False, "variance_type": None, "use_lu_lambdas": False,
         "use_flow_sigmas": False, "use_dynamic_shifting": False, **_OTHER_SIGMAS},
        {**_THRESHOLDING,
         "flow_shift": "used only with use_flow_sigmas or use_dynamic_shifting, which are refused",
         "time_shift_type": "used only with use_dynamic_shifting, which is refused"}),
    "HeunDiscreteScheduler": _Spec(
        "heun",
        {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": False, "clip_sample": False,
         "clip_sample_range": 1.0, "timestep_spacing": "linspace"},
        dict(_OTHER_SIGMAS), {}),
    "LMSDiscreteScheduler": _Spec(
        "lms",
        {**_COMMON, "use_karras_sigmas": False, "timestep_spacing": "linspace"},
        dict(_OTHER_SIGMAS), {}),
    "PNDMScheduler": _Spec(
        "pndm",
        {**_COMMON, "set_alpha_to_one": False, "timestep_spacing": "leading"},
        {"skip_prk_steps": True}, {},
        # Without skip_prk_steps diffusers runs Runge-Kutta warm-up steps, which are not implemented.
        fixed_defaults={"skip_prk_steps": False}),
    "LCMScheduler": _Spec(
        "lcm",
        {**{k: v for k, v in _COMMON.items() if k != "steps_offset"}, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
         "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
        {"thresholding": False},
        {**_THRESHOLDING,
         "timestep_spacing": "LCMScheduler.set_timesteps takes its steps from original_inference_steps, never this",
         "steps_offset": "LCMScheduler.set_timesteps takes its steps from original_inference_steps, never this"}),
}
KIND_TO_CLASS = {spec.kind: name for name, spec in SCHEDULERS.items()}
# Keys diffusers writes beside the fields.
METADATA = ("_class_name", "_diffusers_version")
# A config's values diffusers also accepts under another spelling.
_ALIASES = {("prediction_type", "original_sample"): "sample"}


def _fields(spec: _Spec) -> set[str]:
    return set(spec.honoured) | set(spec.fixed) | set(spec.irrelevant)


def scheduler_from_diffusers(d: Mapping[str, Any], *, source: str = "scheduler_config.json",
                             kind: str | None = None) -> SchedulerConfig:
    """See SchedulerConfig.from_diffusers."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: a scheduler config must be a JSON object; got {type(d).__name__}")
    class_name = d.get("_class_name")
    # A config diffusers has loaded (scheduler.config) lists the fields it filled with its own class's defaults;
    # from_config into another class drops them, so that class's defaults apply (diffusers' extract_init_dict).
    defaulted = set(d.get("_use_default_values") or ())
    fields = {k: v for k, v in d.items() if k not in METADATA and k not in defaulted and k != "_use_default_values"}
    if kind is None:
        if class_name not in SCHEDULERS:
            raise ValueError(f"{source}: scheduler class {class_name!r} is not supported; "
                             f"supported: {sorted(SCHEDULERS)}")
        spec = SCHEDULERS[class_name]
        # Released configs carry fields of other classes (SD 1.5's PNDM config has DDIM's clip_sample)
        # for from_config into them; this class never reads them. A field no supported class knows is refused.
        others = set().union(*(_fields(s) for s in SCHEDULERS.values())) - _fields(spec)
        fields = {k: v for k, v in fields.items() if k not in others}
    else:
        if kind not in KIND_TO_CLASS:
            raise ValueError(f"{source}: sampler kind {kind!r} is not supported; supported: {list(KINDS)}")
        class_name = KIND_TO_CLASS[kind]
        spec = SCHEDULERS[class_name]
        # OtherScheduler.from_config(config): only the target class's own fields are read.
        fields = {k: v for k, v in fields.items() if k in _fields(spec)}
    unknown = sorted(set(fields) - _fields(spec))
    if unknown:
        raise ValueError(f"{source}: {class_name} field {unknown[0]!r} is not known to flax_sgm's samplers")
    for name, accepted in spec.fixed.items():
        value = fields.get(name, spec.fixed_defaults.get(name, accepted))  # absent: diffusers' default
        if value != accepted:
            said = "" if name in fields else " (diffusers' default, the config leaves it out)"
            raise ValueError(f"{source}: {class_name} field {name}={value!r}{said} is not supported (only {accepted!r})")
    values = {name: fields.get(name, default) for name, default in spec.honoured.items()}
    values = {k: _ALIASES.get((k, v), v) if isinstance(v, str) else v for k, v in values.items()}
    if values.get("lambda_min_clipped") is not None:
        values["lambda_min_clipped"] = float(values["lambda_min_clipped"])
    if isinstance(values.get("trained_betas"), list):
        values["trained_betas"] = tuple(values["trained_betas"])
    try:
        return SchedulerConfig(kind=spec.kind, **values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {class_name}: {err}") from None
