"""Samplers in pure JAX: diffusers' schedulers read from scheduler_config.json as a spec, one lax.scan.

config.py: SchedulerConfig (which sampler, every field that changes the maths) and the diffusers
reader; schedules.py: the host-side noise schedules and timestep tables; plans.py: each sampler's
per-step tables and its pure step; sample.py: the loop, timesteps_for and add_noise.
"""

from flax_sgm.sampling.config import KINDS, SCHEDULERS, SchedulerConfig, scheduler_from_diffusers
from flax_sgm.sampling.sample import add_noise, sample, step_noise, timesteps_for

__all__ = ["KINDS", "SCHEDULERS", "SchedulerConfig", "add_noise", "sample", "scheduler_from_diffusers",
           "step_noise", "timesteps_for"]
