"""Samplers in pure JAX: diffusers' schedulers read from scheduler_config.json as a spec, and sgm's own
samplers read from its sampler/denoiser configs, each a plan of one lax.scan.

config.py: SchedulerConfig (which sampler, every field that changes the maths) and the diffusers
reader; schedules.py: the host-side noise schedules and timestep tables; plans.py: each sampler's
per-step tables and its pure step; sgm.py: SgmSamplerConfig and sgm's samplers, discretizations,
denoiser scalings and guider as plans; sample.py: the loop, timesteps_for and add_noise.
"""

from flax_sgm.sampling.config import KINDS, SCHEDULERS, SchedulerConfig, scheduler_from_diffusers
from flax_sgm.sampling.sample import add_noise, sample, step_noise, timesteps_for
from flax_sgm.sampling.sgm import SGM_KINDS, SgmSamplerConfig, vanilla_cfg

__all__ = ["KINDS", "SCHEDULERS", "SGM_KINDS", "SchedulerConfig", "SgmSamplerConfig", "add_noise", "sample",
           "scheduler_from_diffusers", "step_noise", "timesteps_for", "vanilla_cfg"]
