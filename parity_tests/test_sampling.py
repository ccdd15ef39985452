"""flax_sgm.sampling against diffusers' schedulers stepped by hand on the same model outputs.

The model is a fixed elementwise function of (x, t), written once in torch and once in JAX, so
every difference is the sampler's. Stochastic samplers are fed diffusers the same noise by
replacing the randn_tensor its scheduler module calls with sampling.step_noise.
"""

import dataclasses
import inspect
import json
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import assert_close
from flax_sgm import SchedulerConfig, sample
from flax_sgm.sampling import SCHEDULERS, add_noise, step_noise, timesteps_for
from flax_sgm.verify.criteria import SAMPLER

SHAPE = (1, 8, 8, 4)  # one tiny NHWC latent; the schedulers are elementwise, so torch sees the same layout
STEPS = 6
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def jax_model(x, t):
    u = t[:, None, None, None] / 1000.0
    return 0.7 * jnp.tanh(x) + 0.3 * jnp.sin(2.0 * x + 3.0 * u) - 0.2 * u


def torch_model(x, t):
    u = torch.as_tensor(t, dtype=torch.float32) / 1000.0
    return 0.7 * torch.tanh(x) + 0.3 * torch.sin(2.0 * x + 3.0 * u) - 0.2 * u


def latents(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def reference(class_name, fields, n, start_step=0, x=None, clean=None, key=None, monkeypatch=None):
    """diffusers' pipeline loop: set_timesteps, (img2img: set_begin_index, add_noise), then for each
    timestep scale_model_input, the model, step. Returns (final latents, timesteps)."""
    sched = getattr(diffusers, class_name).from_config({"_class_name": class_name, **fields})
    sched.set_timesteps(n)
    order = sched.order
    timesteps = sched.timesteps[start_step * order:]
    if key is not None:
        module = inspect.getmodule(type(sched))
        calls = iter(range(start_step * order, len(sched.timesteps)))

        def fed_noise(shape, **kwargs):
            return torch.from_numpy(np.array(step_noise(key, next(calls), tuple(shape))))  # a writable copy

        monkeypatch.setattr(module, "randn_tensor", fed_noise)
    if start_step:
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start_step * order)
        sample_ = sched.add_noise(torch.from_numpy(clean), torch.from_numpy(x), timesteps[:1])
    else:
        sample_ = torch.from_numpy(x) * sched.init_noise_sigma
    for t in timesteps:
        out = torch_model(sched.scale_model_input(sample_, t), float(t))
        sample_ = sched.step(out, t, sample_).prev_sample
    return sample_.numpy(), sched.timesteps.numpy()


DETERMINISTIC = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-sd": ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "ddim-trailing-v-zero_snr": ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing",
                                                      prediction_type="v_prediction", rescale_betas_zero_snr=True)),
    "ddim-linspace-sample-clip": ("DDIMScheduler", dict(timestep_spacing="linspace", prediction_type="sample",
                                                        clip_sample_range=0.8)),
    "euler-sdxl": ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1)),
    "euler-v": ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction")),
    "euler-karras": ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    "euler-trailing-v": ("EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing",
                                                       prediction_type="v_prediction")),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(SD)),
    "dpmpp_2m-karras-leading": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True,
                                                                     timestep_spacing="leading", steps_offset=1)),
    "dpmpp_2m-v-sigma_min-heun": ("DPMSolverMultistepScheduler", dict(SD, prediction_type="v_prediction",
                                                                       final_sigmas_type="sigma_min",
                                                                       solver_type="heun", lower_order_final=False)),
    "dpmpp_1-trailing": ("DPMSolverMultistepScheduler", dict(solver_order=1, timestep_spacing="trailing")),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun-karras-v": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    "heun-leading-clip": ("HeunDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1,
                                                        prediction_type="sample", clip_sample=True)),
    "lms": ("LMSDiscreteScheduler", dict(SD)),
    "lms-karras-v": ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")),
    "pndm-sd15": ("PNDMScheduler", dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "pndm-linspace-v": ("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="linspace",
                                              prediction_type="v_prediction")),
    "pndm-trailing": ("PNDMScheduler", dict(SD, skip_prk_steps=True, timestep_spacing="trailing")),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_equals_diffusers(name):
    class_name, fields = DETERMINISTIC[name]
    cfg = SchedulerConfig.from_diffusers({"_class_name": class_name, **fields})
    x = latents()
    want, want_ts = reference(class_name, fields, STEPS, x=x)
    np.testing.assert_array_equal(timesteps_for(cfg, STEPS), want_ts)
    got = jax.jit(lambda noise: sample(jax_model, noise, cfg, STEPS))(x)
    assert_close(got, want, SAMPLER, name)


IMG2IMG = ["ddim-sd", "euler-sdxl", "dpmpp_2m", "heun", "lms", "pndm-sd15"]


@pytest.mark.parametrize("name", IMG2IMG)
def test_img2img_equals_diffusers(name):
    """add_noise at the start step, then the remaining steps, as diffusers' img2img pipelines run them."""
    class_name, fields = DETERMINISTIC[name]
    cfg = SchedulerConfig.from_diffusers({"_class_name": class_name, **fields})
    clean, x, start = latents(1), latents(2), 2
    want, _ = reference(class_name, fields, STEPS, start_step=start, x=x, clean=clean)
    noisy = add_noise(cfg, STEPS, clean, x, start)
    sched = getattr(diffusers, class_name).from_config({"_class_name": class_name, **fields})
    sched.set_timesteps(STEPS)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * sched.order)
    want_noisy = sched.add_noise(torch.from_numpy(clean), torch.from_numpy(x), sched.timesteps[start * sched.order:][:1])
    assert_close(noisy, want_noisy.numpy(), SAMPLER, f"{name} add_noise")
    got = sample(jax_model, noisy, cfg, STEPS, start_step=start)
    assert_close(got, want, SAMPLER, name)


STOCHASTIC = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(SD)),
    "euler_ancestral-leading-v": ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="leading",
                                                                          steps_offset=1,
                                                                          prediction_type="v_prediction")),
    "lcm": ("LCMScheduler", {}),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_equals_diffusers_fed_the_same_noise(name, monkeypatch):
    class_name, fields = STOCHASTIC[name]
    cfg = SchedulerConfig.from_diffusers({"_class_name": class_name, **fields})
    key = jax.random.key(3)
    x = latents()
    want, want_ts = reference(class_name, fields, 4, x=x, key=key, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(timesteps_for(cfg, 4), want_ts)
    got = jax.jit(lambda noise: sample(jax_model, noise, cfg, 4, key=key))(x)
    assert_close(got, want, SAMPLER, name)


def test_ancestral_noise_statistics():
    """With a model that predicts zero noise, x0 = x and each Euler ancestral step only adds sigma_up * noise:
    from zero latents the result is zero-mean with variance sum(sigma_up^2) of diffusers' sigmas."""
    cfg = SchedulerConfig(kind="euler_ancestral", **SD, timestep_spacing="linspace")
    x = jnp.zeros((64, 8, 8, 4))
    run = jax.jit(lambda k: sample(lambda x, t: jnp.zeros_like(x), x, cfg, 4, key=k))
    a = np.asarray(run(jax.random.key(0)))
    assert not np.allclose(a, run(jax.random.key(1))), "different keys gave the same samples"
    np.testing.assert_array_equal(a, run(jax.random.key(0)))
    sched = diffusers.EulerAncestralDiscreteScheduler.from_config(dict(SD))
    sched.set_timesteps(4)
    s = sched.sigmas.numpy().astype(np.float64)
    std = math.sqrt(np.sum(s[1:] ** 2 * (s[:-1] ** 2 - s[1:] ** 2) / s[:-1] ** 2))
    n = a.size  # the sample mean and std are within a few standard errors
    assert abs(a.mean()) < 4 * std / math.sqrt(n)
    assert abs(a.std() / std - 1) < 4 / math.sqrt(2 * n)


def test_zero_snr_sigma_table():
    """rescale_betas_zero_snr in sigma space: the last alpha_cumprod becomes 2**-24 (sigma 4096), as in diffusers.
    (The sampler itself is compared on DDIM: at sigma 4096 float32 cancels away the bits a comparison needs.)"""
    fields = dict(SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sched = diffusers.EulerDiscreteScheduler.from_config(fields)
    sched.set_timesteps(STEPS)
    cfg = SchedulerConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler", **fields})
    np.testing.assert_array_equal(timesteps_for(cfg, STEPS), sched.timesteps.numpy())
    x = latents()
    noisy = add_noise(cfg, STEPS, np.zeros_like(x), x, 0)  # sigma_0 * noise
    assert_close(noisy, x * sched.sigmas[0].item(), SAMPLER, "first sigma")


def test_loop_is_one_compiled_scan_with_progress():
    cfg = SchedulerConfig.from_diffusers({"_class_name": "DPMSolverMultistepScheduler", **SD})
    seen = []
    fn = jax.jit(lambda noise: sample(jax_model, noise, cfg, STEPS, progress=seen.append))
    text = fn.lower(latents()).as_text()
    assert text.count("stablehlo.while") == 1, "the sampling loop is not one scan"
    jax.block_until_ready(fn(latents()))
    assert [int(i) for i in seen] == list(range(STEPS))


def test_closed_over_model_and_dtype():
    """A model closed over with its weights as jit arguments; bfloat16 latents in, bfloat16 out."""
    cfg = SchedulerConfig(kind="euler", **SD, timestep_spacing="linspace")
    w = jnp.float32(0.5)

    @jax.jit
    def run(w, noise):
        return sample(lambda x, t: w * jax_model(x, t), noise, cfg, 3)

    out = run(w, latents().astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


# --- the config as a spec ---

def test_every_diffusers_field_is_placed_once():
    """Each __init__ field of each supported diffusers class is honoured, fixed or irrelevant, and our
    defaults are diffusers'. A field diffusers adds later fails here until it is placed."""
    for class_name, spec in SCHEDULERS.items():
        params = {p.name: p.default for p in list(inspect.signature(getattr(diffusers, class_name).__init__)
                                                  .parameters.values())[1:]}
        rooms = [set(spec.honoured), set(spec.fixed), set(spec.irrelevant)]
        placed = set().union(*rooms)
        assert placed == set(params), f"{class_name}: unplaced {set(params) - placed}, stale {placed - set(params)}"
        assert sum(len(r) for r in rooms) == len(placed), f"{class_name}: a field in two rooms"
        defaults = {**spec.honoured, **spec.fixed, **spec.fixed_defaults}
        for name, default in defaults.items():
            assert default == params[name], (class_name, name, default, params[name])


def test_released_configs_read():
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    sdxl = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
    assert SchedulerConfig.from_diffusers(sd15).kind == "pndm"
    cfg = SchedulerConfig.from_diffusers(sdxl)
    assert (cfg.kind, cfg.steps_offset, cfg.timestep_spacing) == ("euler", 1, "leading")
    # Another sampler on the same schedule, as OtherScheduler.from_config(config) reads it.
    dpm = SchedulerConfig.from_diffusers(sd15, kind="dpmpp_2m")
    ref = diffusers.DPMSolverMultistepScheduler.from_config(sd15)
    assert (dpm.kind, dpm.steps_offset, dpm.timestep_spacing) == ("dpmpp_2m", 1, ref.config.timestep_spacing)
    assert SchedulerConfig.from_json(cfg.to_json()) == cfg


def test_a_loaded_schedulers_config_reads_as_from_config_reads_it():
    """scheduler.config of a loaded diffusers scheduler lists in `_use_default_values` the fields its class filled
    with its own defaults; another class's from_config drops them. They were refused (kind=None) or read as
    written (kind=...): PNDM's default timestep_spacing 'leading' instead of Euler's 'linspace'."""
    pndm = diffusers.PNDMScheduler.from_config({"_class_name": "PNDMScheduler", **SD, "skip_prk_steps": True})
    assert "timestep_spacing" in pndm.config["_use_default_values"]
    euler = diffusers.EulerDiscreteScheduler.from_config(pndm.config)
    ours = SchedulerConfig.from_diffusers(pndm.config, kind="euler")
    assert ours.timestep_spacing == euler.config.timestep_spacing == "linspace"
    euler.set_timesteps(5)
    assert np.allclose(timesteps_for(ours, 5), euler.timesteps.numpy())
    assert SchedulerConfig.from_diffusers(pndm.config).kind == "pndm"


@pytest.mark.parametrize("fields, message", [
    ({"_class_name": "UniPCMultistepScheduler"}, "scheduler class 'UniPCMultistepScheduler' is not supported"),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, "DDIMScheduler field thresholding=True is not supported"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
     "algorithm_type='sde-dpmsolver++' is not supported"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, "skip_prk_steps=False is not supported"),
    ({"_class_name": "PNDMScheduler"}, "skip_prk_steps=False (diffusers' default, the config leaves it out)"),
    ({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True}, "use_exponential_sigmas=True"),
    ({"_class_name": "EulerDiscreteScheduler", "shift_everything": 2}, "field 'shift_everything' is not known"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "cubic"}, "timestep_spacing='cubic' is not supported"),
])
def test_refused_in_one_line(fields, message):
    with pytest.raises(ValueError) as err:
        SchedulerConfig.from_diffusers(fields, source="sched.json")
    text = str(err.value)
    assert "\n" not in text and text.startswith("sched.json: ") and message in text, text


def test_bad_calls_in_one_line():
    cfg = SchedulerConfig(kind="euler_ancestral")
    with pytest.raises(ValueError, match="stochastic and needs key"):
        sample(jax_model, latents(), cfg, 3)
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, 3\)"):
        sample(jax_model, latents(), dataclasses.replace(cfg, kind="euler"), 3, start_step=3)
    with pytest.raises(ValueError, match="noise must be"):
        sample(jax_model, latents()[0], dataclasses.replace(cfg, kind="euler"), 3)
    euler = dataclasses.replace(cfg, kind="euler")
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int; got 0"):  # not start_step's
        sample(jax_model, latents(), euler, 0)
    # A model whose output is not one per latent: it broadcast silently ([b, h, w, 1]) or failed in scan ([2b, ...]).
    for wrong in (lambda x, t: x[..., :1], lambda x, t: jnp.concatenate([x, x])):
        with pytest.raises(ValueError, match=r"sample: the model returned shape .* combines its \[uncond, cond\]"):
            sample(wrong, latents(), euler, 3)
    # SD 1.5's DDIM ('leading', steps_offset 1) at 1000 steps reaches timestep 1000: diffusers' DDIM raises an
    # IndexError and its PNDM feeds the UNet t = 1000 (clipping its alphas); refused in one line.
    for kind in ("ddim", "pndm"):
        released = SchedulerConfig(kind=kind, timestep_spacing="leading", steps_offset=1)
        with pytest.raises(ValueError, match=f"reaches timestep 1000, past num_train_timesteps=1000 .{kind} indexes"):
            sample(jax_model, latents(), released, 1000)
    assert timesteps_for(SchedulerConfig(kind="euler", timestep_spacing="leading", steps_offset=1), 1000)[0] == 1000
