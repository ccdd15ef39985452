"""load_pipeline of an sgm single file: the tiny pipelines of test_pipeline written as sgm single files.

The file's tensors are the diffusers models' under sgm's names, each part checked by diffusers' own single-file
converters (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint) mapping it back exactly. The reference is diffusers' own pipeline of those models
with the diffusers twin of sgm's demo sampler (EulerEDM over LegacyDDPM, DiscreteDenoiser, VanillaCFG 5.0):
EulerDiscreteScheduler stepped at sgm's timesteps (test_sgm_sampling checks the twin step by step); and the single
file's pipeline equals the directory's with the same sampler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.numpy import load_file as load_numpy, save_file

from conftest import assert_close, cli_error
from test_autoencoder import flax_vae
from test_pipeline import SIZE, initial_latents, torch_pipeline
from test_sgm_sampling import sgm_timesteps
from test_text import sgm_clip, sgm_open_clip, tiny_config
from test_unet import flax_unet
from flax_sgm import CheckpointError, load_pipeline
from flax_sgm.autoencoder.layout import SGM_PREFIX as VAE_PREFIX
from flax_sgm.checkpoints import convert
from flax_sgm.pipeline.sgm_file import DEMO_SAMPLER, sampler_config
from flax_sgm.sampling import SgmSamplerConfig
from flax_sgm.unet.layout import SGM_PREFIX as UNET_PREFIX
from flax_sgm.verify.criteria import PIPELINE

STEPS = 3
GUIDANCE = DEMO_SAMPLER["params"]["guider_config"]["params"]["scale"]  # 5.0
SCALING = {"sd": 0.18215, "sdxl": 0.13025}


def exact(mapped, model) -> None:
    want = model.state_dict()
    assert mapped.keys() == want.keys() and all(torch.equal(mapped[k], want[k]) for k in want)


def write_single_file(pipe, family: str, path) -> list:
    """The torch pipeline as an sgm single file; returns the text towers' configs (tiny: not released shapes)."""
    unet = convert.to_torch_state_dict(flax_unet(pipe.unet), prefix=UNET_PREFIX)
    exact(convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in unet.items()}, dict(pipe.unet.config)), pipe.unet)
    vae = convert.to_torch_state_dict(flax_vae(pipe.vae), prefix=VAE_PREFIX)
    exact(convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in vae.items()}, dict(pipe.vae.config)), pipe.vae)
    if family == "sd":
        text, towers = sgm_clip(pipe.text_encoder, "cond_stage_model.transformer."), [pipe.text_encoder]
    elif family == "sd2":  # sgm's FrozenOpenCLIPEmbedder
        text, towers = sgm_open_clip(pipe.text_encoder, "cond_stage_model.model."), [pipe.text_encoder]
    elif family == "refiner":  # sgm's FrozenOpenCLIPEmbedder2 alone
        text, towers = sgm_open_clip(pipe.text_encoder_2, "conditioner.embedders.0.model."), [pipe.text_encoder_2]
    else:
        text = (sgm_clip(pipe.text_encoder, "conditioner.embedders.0.transformer.")
                | sgm_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
        towers = [pipe.text_encoder, pipe.text_encoder_2]
    save_file(unet | vae | text, str(path))
    return [tiny_config(t) for t in towers]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each family's torch pipeline, its directory (for the tokenizers) and its sgm single file."""
    root = tmp_path_factory.mktemp("sgm_files")
    out = {}
    for family in ("sd", "sdxl"):
        pipe = torch_pipeline(family)
        pipe.save_pretrained(root / family)
        configs = write_single_file(pipe, family, root / f"{family}.safetensors")
        out[family] = (pipe, root / family, root / f"{family}.safetensors", configs)
    return out


def load(files, family, **kwargs):
    pipe, directory, path, configs = files[family]
    return load_pipeline(path, tokenizer=directory, unet_config=flax_unet(pipe.unet).config, text_configs=configs,
                         scaling_factor=SCALING[family], **kwargs)


def euler_scheduler(prediction_type: str = "epsilon"):
    """sgm's demo sampler's diffusers twin (test_sgm_sampling): EulerDiscrete on sgm's LegacyDDPM betas, stepped at
    sgm's timesteps (`timesteps=sgm_timesteps(n)`); "leading" spacing makes its initial noise sqrt(1 + sigma_0^2)."""
    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing="leading", prediction_type=prediction_type)


def diffusers_reference(pipe, latents: np.ndarray, steps: int, prompt=None, prediction_type="epsilon", **kwargs) -> np.ndarray:
    """diffusers' own pipeline (the one the single file was written from) with sgm's demo sampler's twin,
    guidance 5.0, from the same initial latents; final latents NHWC. SDXL's unconditional embeddings are zeros
    (force_zeros_for_empty_prompt), as sgm's demo's force_uc_zero_embeddings=["txt"]."""
    ref = type(pipe)(**{**pipe.components, "scheduler": euler_scheduler(prediction_type)})
    x = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = ref(prompt, timesteps=sgm_timesteps(steps).tolist(), guidance_scale=GUIDANCE, latents=x, height=SIZE,
                  width=SIZE, output_type="latent", **kwargs).images
    return out.permute(0, 2, 3, 1).numpy()


def refiner_reference(pipe, prompt: str, latents: np.ndarray, steps: int) -> np.ndarray:
    """The refiner's text-to-image as sgm runs it (diffusers' refiner pipeline is img2img only): diffusers'
    EulerDiscrete loop over diffusers' UNet, fed sgm's refiner conditioning (the penultimate layer, the projected
    pooled vector, the size and aesthetic score; "" encoded for the unconditional) and diffusers' guidance formula."""
    def embed(text, score):
        ids = pipe.tokenizer_2(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = pipe.text_encoder_2(ids.input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds, torch.tensor([[SIZE, SIZE, 0, 0, score]], dtype=torch.float32)

    parts = [torch.cat(both) for both in zip(embed([""], 2.5), embed([prompt], 6.0))]  # [uncond, cond]
    sched = euler_scheduler()
    sched.set_timesteps(timesteps=sgm_timesteps(steps).tolist())
    x = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            out = pipe.unet(inp, t, encoder_hidden_states=parts[0],
                            added_cond_kwargs={"text_embeds": parts[1], "time_ids": parts[2]}).sample
            uncond, text = out.chunk(2)
            x = sched.step(uncond + GUIDANCE * (text - uncond), t, x).prev_sample
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_equals_diffusers_pipeline(files, family):
    """The single file's pipeline, with sgm's demo sampler by default, equals diffusers' pipeline of the same
    models with that sampler's twin; (SD) the directory's pipeline with the same sampler gives the same images."""
    pipe = load(files, family)
    assert isinstance(pipe.scheduler, SgmSamplerConfig) and pipe.scheduler.kind == "euler_edm"
    assert pipe.scheduler.guidance_scale == 5.0 and pipe.describe()["family"] == family
    latents = initial_latents(1)
    got = pipe("a cat", num_inference_steps=STEPS, latents=latents, height=SIZE, width=SIZE, output="latent").images
    assert_close(got, diffusers_reference(files[family][0], latents, STEPS, "a cat"), PIPELINE, f"{family} latents")

    if family != "sd":  # the decoder path once is enough in the default run
        return
    with pytest.raises(ValueError, match="add_noise: sgm samplers have no img2img start"):
        pipe("a cat", num_inference_steps=2, image=np.zeros((1, SIZE, SIZE, 3), np.float32))
    directory = load_pipeline(files[family][1], scheduler=pipe.scheduler)
    images = pipe("a cat", num_inference_steps=STEPS, latents=latents, height=SIZE, width=SIZE).images
    want = directory("a cat", num_inference_steps=STEPS, latents=latents, height=SIZE, width=SIZE).images
    assert_close(images, want, PIPELINE, f"{family} images, file against directory")


def test_single_file_samplers_and_bad_input(files, tmp_path):
    pipe, directory, path, configs = files["sd"]
    assert sampler_config("dpmpp_2m").kind == "dpmpp_2m"
    sampler = {"target": "sgm.modules.diffusionmodules.sampling.HeunEDMSampler",
               "params": {"discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.EDMDiscretization"}}}
    heun = sampler_config(sampler)
    assert (heun.kind, heun.discretization, heun.guidance_scale) == ("heun_edm", "edm", None)

    def one_line(call, match):
        with pytest.raises(CheckpointError, match=match) as err:
            call()
        assert "\n" not in str(err.value)

    one_line(lambda: load_pipeline(path), r"sd.safetensors: a single file holds no tokenizer; pass tokenizer=")
    one_line(lambda: load(files, "sd", scheduler="pndm"), r"scheduler='pndm': a single file runs sgm's samplers")
    one_line(lambda: load(files, "sd", scheduler={"target": "x.Foo"}), r"scheduler=: sampler 'Foo' is not supported")
    one_line(lambda: load_pipeline(directory, scaling_factor=0.2), r"scaling_factor= is for a single file")
    one_line(lambda: load_pipeline(directory, prediction="epsilon"), r"prediction= is for a single file")
    one_line(lambda: load(files, "sd", prediction="v"), r"prediction='v': one of epsilon, v_prediction")
    one_line(lambda: load(files, "sd", prediction="epsilon", scheduler=sampler_config(None)),
             r"prediction=: the SgmSamplerConfig given as scheduler= says it")
    # A tiny UNet is no released one: load_unet's hint (heads=) is no argument of load_pipeline or the CLI.
    one_line(lambda: load_pipeline(path, tokenizer=directory), r"sd.safetensors: its UNet is none of the released "
             r"models by its shapes: give unet_config=")
    assert load(files, "sd").scheduler.scaling == "eps"  # SD 1.x: epsilon, as diffusers reads it
    save_file({"first_stage_model.decoder.conv_in.weight": np.ones((8, 4, 3, 3), np.float32)}, str(tmp_path / "vae.safetensors"))
    one_line(lambda: load_pipeline(tmp_path / "vae.safetensors", tokenizer=directory),
             r"vae.safetensors: its text encoders \(none\) are none of SD 1.x's")


def test_cli_sample_single_file_needs_its_tokenizers(files, tmp_path):
    path = files["sd"][2]
    line = cli_error("sample", str(path), "--prompt", "a cat", "-o", str(tmp_path / "cat.png"))
    assert "a single file holds no tokenizer; pass tokenizer=" in line
    assert not (tmp_path / "cat.png").exists()
    line = cli_error("sample", str(files["sd"][1]), "--prediction", "epsilon", "--prompt", "a cat", "-o", str(tmp_path / "cat.png"))
    assert "prediction= is for a single file" in line


def test_the_family_is_read_off_the_text_towers():
    from flax_sgm.pipeline.sgm_file import family_of
    from flax_sgm.text.layout import find_towers

    clip, openclip = "text_model.embeddings.token_embedding.weight", "token_embedding.weight"
    files = {
        ("sd", ("text_encoder",), ("last",)): ["cond_stage_model.transformer." + clip],
        ("sd", ("text_encoder",), ("penultimate",)): ["cond_stage_model.model." + openclip],
        ("sdxl", ("text_encoder", "text_encoder_2"), ("penultimate", "penultimate")): [
            "conditioner.embedders.0.transformer." + clip, "conditioner.embedders.1.model." + openclip],
        ("sdxl-refiner", ("text_encoder_2",), ("penultimate",)): ["conditioner.embedders.0.model." + openclip],
    }
    for (family, encoders, layers), keys in files.items():
        got, names, specs = family_of(find_towers(keys), "f")
        assert (got, tuple(names), tuple(s.layer for s in specs)) == (family, encoders, layers)
    # sgm's SD 2.x embedder applies the final norm to the penultimate layer; SDXL's embedders do not.
    assert family_of(find_towers(files[("sd", ("text_encoder",), ("penultimate",))]), "f")[2][0].final_norm
    assert not any(s.final_norm for s in family_of(find_towers(files[next(k for k in files if k[0] == "sdxl")]), "f")[2])


def test_sd2_single_file_equals_diffusers_pipeline(tmp_path):
    """An SD 2.x single file (one OpenCLIP tower under cond_stage_model.model.) against diffusers' pipeline fed the
    embeddings sgm's SD 2.x embedder makes (the penultimate layer with the final norm, "" for the unconditional).
    What it predicts, by diffusers' single-file rule: v-prediction at 768 x 768 (SD 2.1's released file) unless its
    global_step is SD 2.x base's; its ModelSpec metadata or prediction= say otherwise. (It ran epsilon at 512 once:
    SD 2.1-768 silently wrong.)"""
    from diffusers import StableDiffusionPipeline

    sd, sdxl = torch_pipeline("sd"), torch_pipeline("sdxl")
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sdxl.text_encoder_2, tokenizer=sdxl.tokenizer_2, unet=sd.unet,
                                   scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd2")
    configs = write_single_file(pipe, "sd2", tmp_path / "sd2.safetensors")

    def ours(path=tmp_path / "sd2.safetensors", **kwargs):
        return load_pipeline(path, tokenizer=tmp_path / "sd2", unet_config=flax_unet(pipe.unet).config,
                             text_configs=configs, scaling_factor=SCALING["sd"], **kwargs)

    def embed(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        hidden = pipe.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        return pipe.text_encoder.text_model.final_layer_norm(hidden)

    with torch.no_grad():
        embeds = dict(prompt_embeds=embed(["a cat"]), negative_prompt_embeds=embed([""]))
    latents = initial_latents(1)
    for prediction, scaling in (("v_prediction", "v"), ("epsilon", "eps")):
        pipeline = ours() if prediction == "v_prediction" else ours(prediction=prediction)
        assert pipeline.scheduler.scaling == scaling
        got = pipeline("a cat", num_inference_steps=STEPS, latents=latents, height=SIZE, width=SIZE, output="latent")
        want = diffusers_reference(pipe, latents, STEPS, prediction_type=prediction, **embeds)
        assert_close(got.images, want, PIPELINE, f"sd2 latents, {prediction}")
    assert ours().sample_size * 8 == 768 and ours(prediction="epsilon").sample_size * 8 == 512
    # SD 2.x base's .ckpt says its global_step: epsilon at 512, as diffusers reads it.
    state = {k: torch.from_numpy(v.copy()) for k, v in load_numpy(str(tmp_path / "sd2.safetensors")).items()}
    torch.save({"state_dict": state, "global_step": 875000}, tmp_path / "sd2-base.ckpt")
    base = ours(tmp_path / "sd2-base.ckpt")
    assert (base.scheduler.scaling, base.sample_size) == ("eps", 64)
    assert ours(tmp_path / "sd2-base.ckpt", prediction="v_prediction").scheduler.scaling == "v"
    # An SgmSamplerConfig says the prediction by its scaling, and the default size follows it.
    eps_config, v_config = sampler_config(None).replace(scaling="eps"), sampler_config(None).replace(scaling="v")
    assert ours(scheduler=eps_config).sample_size == 64 and ours(tmp_path / "sd2-base.ckpt", scheduler=v_config).sample_size == 96
    # A file whose metadata says it: as it says (a safetensors header holds strings).
    for metadata, scaling in (({"global_step": "875000"}, "eps"), ({"modelspec.prediction_type": "epsilon"}, "eps"),
                              ({"modelspec.architecture": "stable-diffusion-v2-512"}, "eps"),
                              ({"modelspec.prediction_type": "v", "modelspec.architecture": "stable-diffusion-v2-512"}, "v")):
        save_file({k: v.numpy() for k, v in state.items()}, str(tmp_path / "said.safetensors"), metadata=metadata)
        assert ours(tmp_path / "said.safetensors").scheduler.scaling == scaling, metadata
    save_file({k: v.numpy() for k, v in state.items()}, str(tmp_path / "x0.safetensors"),
              metadata={"modelspec.prediction_type": "x0"})
    with pytest.raises(CheckpointError, match=r"x0.safetensors: its metadata says modelspec.prediction_type 'x0'"):
        ours(tmp_path / "x0.safetensors")
    assert ours(tmp_path / "x0.safetensors", prediction="epsilon").scheduler.scaling == "eps"
    assert ours(tmp_path / "x0.safetensors", scheduler=v_config).scheduler.scaling == "v"  # the config decides


@pytest.mark.slow
def test_refiner_single_file_equals_diffusers_euler(tmp_path):
    """An SDXL refiner single file (OpenCLIP alone under conditioner.embedders.0.model.; the aesthetic score in
    the vector) against diffusers' Euler over diffusers' UNet fed sgm's refiner conditioning."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from conftest import randomize_
    from test_pipeline import UNETS

    sdxl = torch_pipeline("sdxl")
    unet = randomize_(UNet2DConditionModel(**UNETS["sdxl"] | dict(cross_attention_dim=32,
                                                                 projection_class_embeddings_input_dim=24 + 5 * 8)).eval(), 5)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=sdxl.vae, text_encoder=None, text_encoder_2=sdxl.text_encoder_2,
                                            tokenizer=None, tokenizer_2=sdxl.tokenizer_2, unet=unet,
                                            scheduler=sdxl.scheduler, requires_aesthetics_score=True)
    pipe.save_pretrained(tmp_path / "refiner")
    configs = write_single_file(pipe, "refiner", tmp_path / "refiner.safetensors")
    ours = load_pipeline(tmp_path / "refiner.safetensors", tokenizer=tmp_path / "refiner",
                         unet_config=flax_unet(unet).config, text_configs=configs, scaling_factor=SCALING["sdxl"])
    assert ours.family == "sdxl-refiner"
    latents = initial_latents(1)
    got = ours("a cat", num_inference_steps=STEPS, latents=latents, height=SIZE, width=SIZE, output="latent").images
    assert_close(got, refiner_reference(pipe, "a cat", latents, STEPS), PIPELINE, "refiner latents")
