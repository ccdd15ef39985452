"""flax_sgm.sampling's sgm samplers against sgm's own code (torch_ref/sgm, vendored unchanged but for imports).

Both sides read the same sgm config dicts. The network is a fixed elementwise function of (x, c_noise,
the conditioning), written once in torch and once in JAX, so every difference is the sampler's, the
denoiser's (quantization and scaling) or the guider's. sgm's torch.randn_like calls are fed the noise
our sampler draws (sampling.step_noise of the rows that draw), in order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref.sgm.sampling  # noqa: F401  (registers the vendored modules)
from conftest import assert_close
from flax_sgm.sampling import SgmSamplerConfig, sample, step_noise, vanilla_cfg
from flax_sgm.sampling.sample import make_plan
from flax_sgm.verify.criteria import SAMPLER
from torch_ref.sgm.util import instantiate_from_config

SHAPE = (2, 4, 4, 3)  # tiny NHWC latents; sgm's samplers are elementwise, so torch sees the same layout
STEPS = 6
M = "sgm.modules.diffusionmodules."
LEGACY = {"target": M + "discretizer.LegacyDDPMDiscretization"}
EDM_DEMO = {"target": M + "discretizer.EDMDiscretization", "params": {"sigma_min": 0.03, "sigma_max": 14.61, "rho": 3.0}}
CFG = {"target": M + "guiders.VanillaCFG", "params": {"scale": 5.0}}


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


def torch_net(x, c_noise, cond):
    u = torch.log1p(c_noise.to(torch.float32).abs())[:, None, None, None]
    return 0.7 * torch.tanh(x) + 0.3 * torch.sin(2.0 * x + u + cond["crossattn"]) - 0.1 * u


def jax_net(x, t, ctx):
    u = jnp.log1p(jnp.abs(t))[:, None, None, None]
    return 0.7 * jnp.tanh(x) + 0.3 * jnp.sin(2.0 * x + u + ctx) - 0.1 * u


COND = np.array([0.3, -0.5], np.float32).reshape(2, 1, 1, 1)
UNCOND = np.array([-0.2, 0.1], np.float32).reshape(2, 1, 1, 1)

CASES = {
    "euler_edm": (sampler("EulerEDMSampler"), discrete("EpsScaling")),
    "euler_edm-churn-cfg": (sampler("EulerEDMSampler", guider=CFG, s_churn=3.0, s_tmin=0.5, s_tmax=10.0, s_noise=1.003),
                            discrete("EpsScaling")),
    "heun_edm-churn-v": (sampler("HeunEDMSampler", s_churn=2.0), discrete("VScaling")),
    "heun_edm-edm-continuous": (sampler("HeunEDMSampler", EDM_DEMO, CFG), continuous("EDMScaling")),
    "euler_ancestral-cfg": (sampler("EulerAncestralSampler", guider=CFG), discrete("EpsScaling")),
    "euler_ancestral-eta-edm_scaling": (sampler("EulerAncestralSampler", eta=0.5, s_noise=0.9), discrete("EDMScaling")),
    "dpmpp_2s_ancestral-v": (sampler("DPMPP2SAncestralSampler", guider=CFG), discrete("VScaling")),
    "dpmpp_2s_ancestral-edm": (sampler("DPMPP2SAncestralSampler", EDM_DEMO, eta=0.7), continuous("EpsScaling")),
    "dpmpp_2m-cfg": (sampler("DPMPP2MSampler", guider=CFG), discrete("EpsScaling")),
    "dpmpp_2m-edm-discrete": (sampler("DPMPP2MSampler", EDM_DEMO), discrete("EpsScaling")),
    "lms": (sampler("LinearMultistepSampler", guider=CFG), discrete("EpsScaling")),
    "lms-order2-edm-vedm": (sampler("LinearMultistepSampler", EDM_DEMO, order=2),
                            continuous("VScalingWithEDMcNoise")),
}


def reference(sampler_config, denoiser_config, x, key, draws, monkeypatch):
    """sgm's DiffusionEngine.sample: the sampler called with the denoiser around the network."""
    smp = instantiate_from_config({**sampler_config, "params": {**sampler_config["params"], "device": "cpu"}})
    den = instantiate_from_config(denoiser_config)
    calls = iter(np.nonzero(draws)[0])

    def fed_noise(t):
        return torch.from_numpy(np.array(step_noise(key, int(next(calls)), tuple(t.shape))))

    monkeypatch.setattr(torch, "randn_like", fed_noise)
    cond, uc = {"crossattn": torch.from_numpy(COND)}, {"crossattn": torch.from_numpy(UNCOND)}
    with torch.no_grad():
        out = smp(lambda inp, sigma, c: den(torch_net, inp, sigma, c), torch.from_numpy(x.copy()), cond, uc)
    assert next(calls, None) is None, "sgm drew less noise than our rows say"
    return out.numpy()


def ours(cfg, x, key):
    if cfg.guidance_scale is None:
        def model(x_in, t):
            return jax_net(x_in, t, COND)
    else:
        def model(x_in, t):
            both = jax_net(jnp.concatenate([x_in, x_in]), jnp.concatenate([t, t]), np.concatenate([UNCOND, COND]))
            return vanilla_cfg(both, cfg.guidance_scale)
    return np.asarray(jax.jit(lambda n: sample(model, n, cfg, STEPS, key=key))(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_sgm_sampler_equals_sgm(name, monkeypatch):
    sampler_config, denoiser_config = CASES[name]
    cfg = SgmSamplerConfig.from_sgm(sampler_config, denoiser_config)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    key = jax.random.key(7) if cfg.stochastic else None
    want = reference(sampler_config, denoiser_config, x, key, make_plan(cfg, STEPS).rows["draws"], monkeypatch)
    assert_close(ours(cfg, x, key), want, SAMPLER, name)


def test_euler_ancestral_at_eta_0_is_euler(monkeypatch):
    """sgm's EulerAncestralSampler(eta=0) crashes (get_ancestral_step returns the float 0.0, which append_dims
    cannot take); its maths is then the Euler step to the next sigma, which ours equals: sgm's EulerEDMSampler."""
    ancestral = sampler("EulerAncestralSampler", eta=0.0)
    cfg = SgmSamplerConfig.from_sgm(ancestral, discrete("EpsScaling"))
    assert not cfg.stochastic
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with pytest.raises(AttributeError, match="'float' object has no attribute 'ndim'"):
        reference(ancestral, discrete("EpsScaling"), x, jax.random.key(0), np.ones(STEPS, bool), monkeypatch)
    want = reference(sampler("EulerEDMSampler"), discrete("EpsScaling"), x, None, np.zeros(STEPS, bool), monkeypatch)
    assert_close(ours(cfg, x, None), want, SAMPLER, "eta 0")


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
