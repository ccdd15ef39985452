"""flax_sgm.sampling's sgm samplers against diffusers' schedulers configured to sgm's semantics.

sgm is not installed here, so each sgm piece is checked against its diffusers twin, stepped by hand as
test_sampling does, on the same elementwise network and the same noise:
  EulerEDM / HeunEDM / LinearMultistep / EulerAncestral (eta 1) / DPMPP2M over LegacyDDPM with a
  DiscreteDenoiser and EpsScaling or VScaling: EulerDiscrete / HeunDiscrete / LMSDiscrete /
  EulerAncestralDiscrete / DPMSolverMultistep (dpmsolver++, order 2, final step first order), given sgm's
  timesteps (LegacyDDPM's `linspace(T - 1, 0, n, endpoint=False)`; each is a table index, so the DiscreteDenoiser's
  quantization is exact and its c_noise is diffusers' timestep);
  EDMDiscretization with a Denoiser and EDMScaling: EDMEulerScheduler (its Karras sigmas, c_in, c_noise, c_out), and
  EDMDPMSolverMultistepScheduler for DPMPP2M; VScalingWithEDMcNoise: EulerDiscrete's continuous v timesteps;
  VanillaCFG: diffusers' `uncond + scale * (text - uncond)` on the network outputs;
  EulerEDM's churn: EulerDiscrete's / EDMEuler's `step(s_churn, s_tmin, s_tmax, s_noise)` on a network whose output
  does not depend on where it is evaluated (diffusers evaluates the network before the churn, sgm after it);
  DPMPP2SAncestral at eta 0: DPMSolverSinglestep (dpmsolver++, order 2) over the schedule with sgm's log-sigma
  midpoints between the steps. Its noise (eta > 0) has no twin: a statistic of the exact denoiser checks it.
"""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import assert_close
from flax_sgm.sampling import SgmSamplerConfig, sample, step_noise, timesteps_for, vanilla_cfg
from flax_sgm.sampling.sample import make_plan
from flax_sgm.verify.criteria import SAMPLER

SHAPE = (2, 4, 4, 3)  # tiny NHWC latents; the samplers are elementwise, so torch sees the same layout
STEPS = 6
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading")
M = "sgm.modules.diffusionmodules."
LEGACY = {"target": M + "discretizer.LegacyDDPMDiscretization"}
EDM_DEMO = {"target": M + "discretizer.EDMDiscretization", "params": {"sigma_min": 0.03, "sigma_max": 14.61, "rho": 3.0}}
GUIDANCE = 5.0
CFG = {"target": M + "guiders.VanillaCFG", "params": {"scale": GUIDANCE}}


def discrete(scaling):
    return {"target": M + "denoiser.DiscreteDenoiser",
            "params": {"num_idx": 1000, "scaling_config": {"target": M + "denoiser_scaling." + scaling},
                       "discretization_config": LEGACY}}


def continuous(scaling):
    return {"target": M + "denoiser.Denoiser", "params": {"scaling_config": {"target": M + "denoiser_scaling." + scaling}}}


def sampler(name, discretization=LEGACY, guider=None, **params):
    p = {"num_steps": STEPS, "discretization_config": discretization, **params}
    if guider is not None:
        p["guider_config"] = guider
    return {"target": M + "sampling." + name, "params": p}


COND = np.array([0.3, -0.5], np.float32).reshape(2, 1, 1, 1)
UNCOND = np.array([-0.2, 0.1], np.float32).reshape(2, 1, 1, 1)


def torch_net(x, t, ctx):
    u = torch.log1p(torch.as_tensor(t, dtype=torch.float32).abs())
    return 0.7 * torch.tanh(x) + 0.3 * torch.sin(2.0 * x + u + ctx) - 0.1 * u


def jax_net(x, t, ctx):
    u = jnp.log1p(jnp.abs(t))[:, None, None, None]
    return 0.7 * jnp.tanh(x) + 0.3 * jnp.sin(2.0 * x + u + ctx) - 0.1 * u


def torch_model(x, t, guidance):
    """The network, and (guidance) diffusers' classifier-free guidance on its [uncond, text] outputs."""
    if guidance is None:
        return torch_net(x, t, torch.from_numpy(COND))
    uncond, text = torch_net(torch.cat([x, x]), t, torch.from_numpy(np.concatenate([UNCOND, COND]))).chunk(2)
    return uncond + guidance * (text - uncond)


def ours(cfg, x, key=None, net=None):
    net = net or jax_net
    if cfg.guidance_scale is None:
        def model(x_in, t):
            return net(x_in, t, COND)
    else:
        def model(x_in, t):
            both = net(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), np.concatenate([UNCOND, COND]))
            return vanilla_cfg(both, cfg.guidance_scale)
    return np.asarray(jax.jit(lambda n: sample(model, n, cfg, STEPS, key=key))(x))


def latents(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def sgm_timesteps(n, T=1000):
    """LegacyDDPMDiscretization's table indices for n steps, descending (sgm's generate_roughly_equally_spaced_steps)."""
    return np.linspace(T - 1, 0, n, endpoint=False).astype(int)


def legacy_sigmas(n):
    """diffusers' sigmas at sgm's timesteps, then 0."""
    sched = diffusers.EulerDiscreteScheduler.from_config(SD)
    sched.set_timesteps(timesteps=sgm_timesteps(n).tolist())
    return sched.sigmas.numpy()


def feed_noise(sched, key, monkeypatch, index=None):
    """diffusers' randn_tensor calls get step_noise of the step diffusers is at (or of index(step))."""
    import inspect

    def fed(shape, **kwargs):
        i = sched.step_index if index is None else index(sched.step_index)
        return torch.from_numpy(np.array(step_noise(key, int(i), tuple(shape))))

    monkeypatch.setattr(inspect.getmodule(type(sched)), "randn_tensor", fed)


def run(sched, x, guidance=None, model=None, **step_kwargs):
    """diffusers' pipeline loop over sched's timesteps: scale_model_input, the model, step."""
    model = model or (lambda inp, t: torch_model(inp, float(t), guidance))
    sample_ = torch.from_numpy(x) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(sample_, t), t)
        sample_ = sched.step(out, t, sample_, **step_kwargs).prev_sample
    return sample_.numpy()


def schedule(class_name, fields, n):
    """class_name set to sgm's LegacyDDPM timesteps: through set_timesteps(timesteps=) where diffusers takes
    them, else by setting the timesteps and diffusers' own sigmas at them after set_timesteps(n)."""
    sched = getattr(diffusers, class_name).from_config({**SD, **fields})
    if class_name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"):
        sched.set_timesteps(timesteps=sgm_timesteps(n).tolist())
    else:
        sched.set_timesteps(n)
        sched.timesteps = torch.from_numpy(sgm_timesteps(n).astype(np.float32))
        sched.sigmas = torch.from_numpy(legacy_sigmas(n))
    return sched


# sgm (sampler, denoiser) -> its diffusers twin (class, fields)
TWINS = {
    "euler_edm": (sampler("EulerEDMSampler"), discrete("EpsScaling"), "EulerDiscreteScheduler", {}),
    "euler_edm-cfg-v": (sampler("EulerEDMSampler", guider=CFG), discrete("VScaling"), "EulerDiscreteScheduler",
                        dict(prediction_type="v_prediction")),
    "heun_edm": (sampler("HeunEDMSampler"), discrete("EpsScaling"), "HeunDiscreteScheduler", {}),
    "heun_edm-cfg-v": (sampler("HeunEDMSampler", guider=CFG), discrete("VScaling"), "HeunDiscreteScheduler",
                       dict(prediction_type="v_prediction")),
    "dpmpp_2m-cfg": (sampler("DPMPP2MSampler", guider=CFG), discrete("EpsScaling"), "DPMSolverMultistepScheduler",
                     dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero")),
    "dpmpp_2m-v": (sampler("DPMPP2MSampler"), discrete("VScaling"), "DPMSolverMultistepScheduler",
                   dict(prediction_type="v_prediction", final_sigmas_type="zero")),
    # sgm's own EulerAncestralSampler(eta=0) crashes (get_ancestral_step returns a float); ours takes the Euler step
    "euler_ancestral-eta0": (sampler("EulerAncestralSampler", eta=0.0), discrete("EpsScaling"), "EulerDiscreteScheduler",
                             {}),
    "lms-cfg": (sampler("LinearMultistepSampler", guider=CFG), discrete("EpsScaling"), "LMSDiscreteScheduler", {}),
    "lms-v": (sampler("LinearMultistepSampler"), discrete("VScaling"), "LMSDiscreteScheduler",
              dict(prediction_type="v_prediction")),
}


@pytest.mark.parametrize("name", list(TWINS))
def test_sgm_sampler_equals_its_diffusers_twin(name):
    sampler_config, denoiser_config, class_name, fields = TWINS[name]
    cfg = SgmSamplerConfig.from_sgm(sampler_config, denoiser_config)
    sched = schedule(class_name, fields, STEPS)
    np.testing.assert_array_equal(timesteps_for(cfg, STEPS), sched.timesteps.numpy())
    x = latents()
    want = run(sched, x, cfg.guidance_scale)
    assert_close(ours(cfg, x), want, SAMPLER, name)


@pytest.mark.parametrize("name, guider, fields", [("eps-cfg", CFG, {}),
                                                  ("v", None, dict(prediction_type="v_prediction"))])
def test_euler_ancestral_equals_diffusers_fed_the_same_noise(name, guider, fields, monkeypatch):
    cfg = SgmSamplerConfig.from_sgm(sampler("EulerAncestralSampler", guider=guider),
                                    discrete("VScaling" if fields else "EpsScaling"))
    sched = schedule("EulerAncestralDiscreteScheduler", fields, STEPS)
    key = jax.random.key(3)
    feed_noise(sched, key, monkeypatch)
    x = latents()
    assert_close(ours(cfg, x, key), run(sched, x, cfg.guidance_scale), SAMPLER, name)


def test_edm_discretization_and_scaling_equal_edm_euler():
    """EulerEDM over EDMDiscretization with a Denoiser and EDMScaling: EDMEulerScheduler's sigmas, c_in, c_noise
    (its timesteps) and c_skip/c_out."""
    p = EDM_DEMO["params"]
    cfg = SgmSamplerConfig.from_sgm(sampler("EulerEDMSampler", EDM_DEMO, CFG), continuous("EDMScaling"))
    sched = diffusers.EDMEulerScheduler(sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"], sigma_data=0.5)
    sched.set_timesteps(STEPS)
    assert_close(timesteps_for(cfg, STEPS), sched.timesteps.numpy(), SAMPLER, "c_noise")
    x = latents()
    assert_close(ours(cfg, x), run(sched, x, GUIDANCE), SAMPLER, "edm euler")


def edm_sigmas(n):
    """EDMEulerScheduler's Karras sigmas for sgm's demo EDMDiscretization, then 0."""
    p = EDM_DEMO["params"]
    sched = diffusers.EDMEulerScheduler(sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"])
    sched.set_timesteps(n)
    return sched.sigmas.numpy()


def test_edm_discretization_dpmpp_2m_equals_edm_dpm_solver():
    """DPMPP2M over EDMDiscretization with EDMScaling: EDMDPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint,
    first order into sigma 0)."""
    p = EDM_DEMO["params"]
    cfg = SgmSamplerConfig.from_sgm(sampler("DPMPP2MSampler", EDM_DEMO, CFG), continuous("EDMScaling"))
    sched = diffusers.EDMDPMSolverMultistepScheduler(sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"],
                                                     solver_order=2, final_sigmas_type="zero")
    sched.set_timesteps(STEPS)
    assert_close(timesteps_for(cfg, STEPS), sched.timesteps.numpy(), SAMPLER, "c_noise")
    x = latents()
    assert_close(ours(cfg, x), run(sched, x, GUIDANCE), SAMPLER, "edm dpm++ 2m")


def test_v_scaling_with_edm_c_noise_equals_euler_continuous_v():
    """VScalingWithEDMcNoise (a Denoiser) over EDMDiscretization: EulerDiscrete with timestep_type "continuous" and
    v_prediction (its timesteps are log(sigma) / 4), given the EDM sigmas."""
    cfg = SgmSamplerConfig.from_sgm(sampler("EulerEDMSampler", EDM_DEMO), continuous("VScalingWithEDMcNoise"))
    sched = diffusers.EulerDiscreteScheduler.from_config({**SD, "timestep_type": "continuous",
                                                          "prediction_type": "v_prediction"})
    sched.set_timesteps(sigmas=edm_sigmas(STEPS).tolist())
    assert_close(timesteps_for(cfg, STEPS), sched.timesteps.numpy(), SAMPLER, "c_noise")
    x = latents()
    assert_close(ours(cfg, x), run(sched, x), SAMPLER, "v with edm c_noise")


def test_lms_order_2_equals_diffusers():
    cfg = SgmSamplerConfig.from_sgm(sampler("LinearMultistepSampler", order=2), discrete("EpsScaling"))
    x = latents()
    assert_close(ours(cfg, x), run(schedule("LMSDiscreteScheduler", {}, STEPS), x, order=2), SAMPLER, "lms order 2")


K = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)


def const_net(x, t, ctx):
    return jnp.asarray(K)


@pytest.mark.parametrize("name", ["legacy-eps", "edm"])
def test_euler_edm_churn_equals_diffusers_step(name, monkeypatch):
    """EulerEDM's churn (gamma, the s_tmin/s_tmax window, s_noise, the step from sigma_hat) against diffusers' step
    with the same churn fed the same noise. The network's output is a constant: diffusers evaluates the network
    before the churn and sgm after it, which only a network independent of its input leaves equal."""
    churn = dict(s_churn=1.5, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)
    key = jax.random.key(5)
    if name == "edm":
        p = EDM_DEMO["params"]
        cfg = SgmSamplerConfig.from_sgm(sampler("EulerEDMSampler", EDM_DEMO, **churn), continuous("EDMScaling"))
        sched = diffusers.EDMEulerScheduler(sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"])
        sched.set_timesteps(STEPS)
    else:
        cfg = SgmSamplerConfig.from_sgm(sampler("EulerEDMSampler", **churn), continuous("EpsScaling"))
        sched = diffusers.EulerDiscreteScheduler.from_config(SD)
        sched.set_timesteps(sigmas=legacy_sigmas(STEPS).tolist())
    assert cfg.stochastic
    draws = make_plan(cfg, STEPS).rows["draws"]
    assert 0 < draws.sum() < STEPS, "the window should leave some steps without churn"
    feed_noise(sched, key, monkeypatch)
    x = latents()
    want = run(sched, x, model=lambda inp, t: torch.from_numpy(K), **churn)
    assert_close(ours(cfg, x, key, net=const_net), want, SAMPLER, name)


def test_dpmpp_2s_at_eta_0_equals_dpm_solver_singlestep():
    """DPMPP2SAncestral(eta=0) is DPM-Solver++(2S) with its intermediate point at the log-sigma midpoint:
    diffusers' DPMSolverSinglestep (order 2; orders [1, 2] * (n - 1) + [1]) over the schedule s_0, mid_0, s_1, ...,
    s_(n-1), 0, with mid_i = sqrt(s_i * s_(i+1)). A Denoiser (no quantization of the midpoint) with EpsScaling."""
    cfg = SgmSamplerConfig.from_sgm(sampler("DPMPP2SAncestralSampler", guider=CFG, eta=0.0), continuous("EpsScaling"))
    assert not cfg.stochastic
    s = legacy_sigmas(STEPS).astype(np.float64)
    inter = [v for i in range(STEPS - 1) for v in (s[i], math.sqrt(s[i] * s[i + 1]))] + [s[-2], 0.0]
    sigmas = torch.tensor(inter, dtype=torch.float32)
    sched = diffusers.DPMSolverSinglestepScheduler.from_config(
        {**SD, "solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"})
    sched.set_timesteps(len(inter) - 1)
    assert sched.order_list == [1, 2] * (STEPS - 1) + [1]
    sched.sigmas, sched.timesteps = sigmas, sigmas[:-1].clone()  # a continuous EpsScaling's c_noise is sigma
    np.testing.assert_allclose(timesteps_for(cfg, STEPS), sched.timesteps.numpy(), rtol=SAMPLER)
    x = latents()
    # diffusers steps x / sqrt(1 + sigma^2) (its init_noise_sigma is 1), sgm x itself: equal at sigma 0
    assert_close(ours(cfg, x), run(sched, x, GUIDANCE), SAMPLER, "2s eta 0")


@pytest.mark.parametrize("kind", ["EulerAncestralSampler", "DPMPP2SAncestralSampler"])
def test_ancestral_noise_keeps_the_marginal(kind):
    """With the exact denoiser of data at 0 (denoised = 0) and x_0 ~ N(0, sigma_0^2), an ancestral step to sigma_(i+1)
    keeps x ~ N(0, sigma_(i+1)^2) for any eta: the deterministic part and the fresh noise must add up (eta's split
    between them is not seen here; at eta 1, Euler ancestral's is diffusers'). Each evaluation's input (x * c_in,
    with EDMScaling's c_in and c_noise = log(sigma) / 4) is recorded, so x at every step is seen."""
    cfg = SgmSamplerConfig.from_sgm(sampler(kind, EDM_DEMO, eta=0.6, s_noise=1.0), continuous("EDMScaling"))
    sd = cfg.sigma_data
    seen = []

    def model(x_in, t):  # denoised = c_skip * x + c_out * out = 0
        sigma = jnp.exp(4 * t)[:, None, None, None]
        x = x_in * (sigma**2 + sd**2) ** 0.5
        jax.debug.callback(lambda s, v: seen.append((float(s[0, 0, 0, 0]), np.asarray(v))), sigma, x, ordered=True)
        return -(sd**2 / (sigma**2 + sd**2)) * x / (sigma * sd / (sigma**2 + sd**2) ** 0.5)

    s0 = EDM_DEMO["params"]["sigma_max"]
    noise = jax.random.normal(jax.random.key(1), (256, 8, 8, 4)) * (s0 / math.sqrt(1 + s0**2))
    jax.block_until_ready(sample(model, noise, cfg, STEPS, key=jax.random.key(2)))
    assert len(seen) == (STEPS if kind == "EulerAncestralSampler" else 2 * STEPS - 1)
    n = noise.size
    for sigma, x in seen:  # 2S's midpoints too: with denoised = 0 its step to the midpoint is exact
        assert abs(x.mean()) < 5 * sigma / math.sqrt(n), (kind, sigma)
        assert abs(x.std() / sigma - 1) < 5 / math.sqrt(2 * n), (kind, sigma, x.std())


# --- the config as a spec ---

def test_from_sgm_reads_the_demo_config_and_round_trips():
    cfg = SgmSamplerConfig.from_sgm(sampler("EulerEDMSampler", guider=CFG, s_churn=0.0, s_tmax=999.0, verbose=True),
                                    discrete("EpsScaling"))
    assert (cfg.kind, cfg.num_steps, cfg.discretization, cfg.guidance_scale, cfg.scaling) == (
        "euler_edm", STEPS, "legacy_ddpm", 5.0, "eps")
    assert not cfg.stochastic and cfg.replace(s_churn=1.0).stochastic
    assert SgmSamplerConfig.from_dict(cfg.to_dict()) == cfg
    edm = SgmSamplerConfig.from_sgm(sampler("DPMPP2MSampler", EDM_DEMO), continuous("EDMScaling"))
    assert (edm.discretization, edm.sigma_min, edm.sigma_max, edm.rho, edm.discrete) == ("edm", 0.03, 14.61, 3.0, False)
    assert SgmSamplerConfig.from_sgm(sampler("LinearMultistepSampler", order=3)).lms_order == 3
    assert make_plan(cfg.replace(kind="heun_edm"), STEPS).timesteps.shape == (2 * STEPS - 1,)  # no corrector to sigma 0


@pytest.mark.parametrize("sampler_config, denoiser_config, match", [
    ({"target": M + "sampling.DDIMSampler", "params": {}}, None,
     r"sampler 'DDIMSampler' is not supported; supported: \['DPMPP2MSampler'"),
    (sampler("EulerEDMSampler", eta=1.0), None, r"EulerEDMSampler param 'eta' is not known"),
    ({"target": M + "sampling.EulerEDMSampler", "params": {"num_steps": 4}}, None, r"needs params.discretization_config"),
    (sampler("EulerEDMSampler", {"target": M + "discretizer.EDMDiscretization", "params": {"sigma": 1}}), None,
     r"EDMDiscretization param 'sigma' is not known"),
    (sampler("EulerEDMSampler", guider={"target": M + "guiders.LinearPredictionGuider", "params": {}}), None,
     r"guider 'LinearPredictionGuider' is not supported"),
    (sampler("EulerEDMSampler"), continuous("FancyScaling"), r"scaling 'FancyScaling' is not supported"),
    (sampler("EulerEDMSampler"), {**discrete("EpsScaling"), "params": {**discrete("EpsScaling")["params"], "flip": False}},
     r"DiscreteDenoiser param flip=False is not supported \(only True\)"),
    (sampler("EulerEDMSampler"), {**discrete("EpsScaling"), "params": {**discrete("EpsScaling")["params"],
                                                                         "discretization_config": EDM_DEMO}},
     r"a DiscreteDenoiser over EDMDiscretization is not supported"),
])
def test_from_sgm_refuses_in_one_line(sampler_config, denoiser_config, match):
    with pytest.raises(ValueError, match=match) as err:
        SgmSamplerConfig.from_sgm(sampler_config, denoiser_config)
    assert "\n" not in str(err.value)


def test_sample_refuses_img2img_and_a_missing_key():
    cfg = SgmSamplerConfig.from_sgm(sampler("EulerAncestralSampler"))
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="stochastic and needs key="):
        sample(lambda x, t: x, x, cfg, STEPS)
    with pytest.raises(ValueError, match="sgm samplers start at the first step"):
        sample(lambda x, t: x, x, cfg, STEPS, key=jax.random.key(0), start_step=1)
