"""flax_sgm.load_pipeline and `flax-sgm sample` against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.

Tiny random pipelines (a 2-level UNet of 32 and 64 channels, a 4-level VAE of 32 channels: 32 x 32 images from
4 x 4 latents, 2-layer text towers of 32, a 1000-token BPE tokenizer written here) are made in the test, saved
with save_pipeline's save_pretrained and read back by load_pipeline. Given the same initial latents (NCHW for
diffusers, NHWC here), the final latents and the decoded images equal diffusers' for each deterministic
sampler, with and without a negative prompt (SDXL without one: its zeroed unconditional embeddings); img2img
against the Img2Img pipelines (SD, SDXL, the SDXL refiner); Euler ancestral with diffusers' scheduler fed our
per-step noise; a batch over a mesh of virtual CPU devices (a subprocess); the CLI's PNGs, progress and failures.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, cli_error, randomize_, run_cli
from flax_sgm import CheckpointError, load_pipeline
from flax_sgm.verify import tiny
from flax_sgm.verify.criteria import PIPELINE

# The tiny pipelines live in flax_sgm.verify.tiny (the example and bench/pipeline.py --tiny build them too).
SIZE, UNETS, SCHEDULERS = tiny.PIPELINE_SIZE, tiny.PIPELINE_UNETS, tiny.SCHEDULERS
scheduler, torch_pipeline = tiny.scheduler, tiny.pipeline
STEPS = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's torch pipeline and its directory (DDIM's scheduler)."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for family in UNETS:
        pipe = torch_pipeline(family)
        pipe.save_pretrained(root / family)
        out[family] = (pipe, root / family)
    return out


def with_scheduler(directory: Path, sampler: str, out: Path) -> Path:
    """A copy of a saved pipeline (its model folders linked) whose scheduler is `sampler`'s."""
    out.mkdir()
    for item in directory.iterdir():
        if item.name not in ("scheduler", "model_index.json"):
            (out / item.name).symlink_to(item)
    index = json.loads((directory / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", SCHEDULERS[sampler][0]]
    (out / "model_index.json").write_text(json.dumps(index))
    scheduler(sampler).save_pretrained(out / "scheduler")
    return out


def initial_latents(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, SIZE // 8, SIZE // 8, 4)).astype(np.float32)  # NHWC


def diffusers_run(pipe, sampler: str, prompt, latents: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' final latents and images (output_type="np"), both NHWC, from `latents` (NHWC here)."""
    pipe.scheduler = scheduler(sampler)
    final = {}

    def keep(pipe, i, t, tensors):  # the latents after the last step: what output_type="latent" returns
        final["latents"] = tensors["latents"]
        return {}

    with torch.no_grad():
        images = pipe(prompt, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),  # NHWC -> diffusers' NCHW
                      num_inference_steps=STEPS, output_type="np", callback_on_step_end=keep, **kwargs).images
    return final["latents"].permute(0, 2, 3, 1).numpy(), np.asarray(images)


# Each family and sampler once with guidance: SD with a negative prompt, SDXL without (its zeroed
# unconditional embeddings) and with one; guidance off once.
CASES = {
    ("sd", "ddim"): dict(prompt="a cat", negative_prompt="blurry", guidance_scale=5.0),
    ("sd", "euler"): dict(prompt="a cat", guidance_scale=7.5),
    ("sdxl", "ddim"): dict(prompt="a cat", guidance_scale=5.0),
    ("sdxl", "euler"): dict(prompt="the dog", negative_prompt="cat cat", guidance_scale=4.0),
    ("sdxl", "ddim", "unguided"): dict(prompt="a cat", guidance_scale=1.0),
    ("sd", "pndm"): dict(prompt="a cat", guidance_scale=7.5),  # SD 1.5's released default
    ("sdxl", "dpmpp_2m"): dict(prompt="a cat", guidance_scale=5.0),  # Karras sigmas
    ("sd", "heun"): dict(prompt="a cat", guidance_scale=7.5),
    ("sd", "lms"): dict(prompt="a cat", guidance_scale=7.5),
}
SLOW_CASES = {("sd", "heun"), ("sd", "lms")}  # each sampler costs a compile; these two run with -m slow


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
                         ids=["-".join(c) for c in CASES])
def test_pipeline_equals_diffusers(saved, case, tmp_path):
    """Final latents and images as diffusers' pipeline gives them from the same initial latents (rel <= 1e-4):
    the prompt encoding, classifier-free guidance batched [uncond, cond], SDXL's size ids and zeroed empty
    negative prompt, the sampler's steps, the latents' unscaling and the decoder."""
    family, sampler = case[:2]
    torch_pipe, directory = saved[family]
    pipe = load_pipeline(with_scheduler(directory, sampler, tmp_path / "pipe"))
    kwargs = CASES[case]
    latents = initial_latents(1)
    want_latents, want_images = diffusers_run(torch_pipe, sampler, latents=latents, **kwargs)
    got = pipe(latents=latents, num_inference_steps=STEPS, output="latent", **kwargs)
    assert_close(got.images, want_latents, PIPELINE, what=f"{case}: final latents")
    got = pipe(latents=latents, num_inference_steps=STEPS, output="np", **kwargs)
    assert got.images.shape == want_images.shape == (1, SIZE, SIZE, 3)
    assert_close(got.images, want_images, PIPELINE, what=f"{case}: images")


def near_deterministic_vae(vae):
    """A copy of `vae` whose posterior variance is ~0 (logvar -30): its posterior sample is its mean whatever the
    generator draws, so diffusers' img2img and ours encode the same latents."""
    copy = type(vae).from_config(vae.config)
    copy.load_state_dict(vae.state_dict())
    with torch.no_grad():
        copy.quant_conv.weight[4:] = 0.0
        copy.quant_conv.bias[4:] = -30.0
    return copy.eval()


def img2img_run(reference, directory: Path, steps: int, strength: float, **kwargs):
    """diffusers' Img2Img pipeline `reference` and ours loaded from `directory` (where `reference` was saved) on
    one random image: (ours, diffusers') images and the step indices our loop reported. diffusers' generator
    draws the posterior sample, then the noise added; that noise is fed to ours as `latents`."""
    image = np.random.default_rng(5).uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    generator = torch.Generator().manual_seed(0)
    torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)  # what the posterior sample draws first
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)  # then the noise added
    with torch.no_grad():
        want = reference(image=image, strength=strength, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    heard = []
    got = load_pipeline(directory)(image=image, strength=strength, num_inference_steps=steps, progress=heard.append,
                                   latents=noise.numpy().transpose(0, 2, 3, 1), **kwargs)  # NCHW -> NHWC
    return got.images, want, heard


def test_img2img_equals_diffusers(saved, tmp_path):
    """image= and strength= as StableDiffusionImg2ImgPipeline: the image encoded and scaled, noised to the step
    strength reaches (add_noise), sampled from there."""
    from diffusers import StableDiffusionImg2ImgPipeline

    torch_pipe, _ = saved["sd"]
    components = dict(torch_pipe.components)
    reference = StableDiffusionImg2ImgPipeline(**components | dict(vae=near_deterministic_vae(components["vae"]),
                                                                   scheduler=scheduler("ddim")))
    reference.save_pretrained(tmp_path / "img2img")
    got, want, heard = img2img_run(reference, tmp_path / "img2img", 4, 0.5, prompt="a cat", guidance_scale=5.0)
    assert sorted(heard) == [2, 3]  # int(4 * 0.5) steps run: the last two
    assert_close(got, want, PIPELINE, what="img2img images")


def test_sdxl_img2img_equals_diffusers(saved, tmp_path):
    """StableDiffusionXLImg2ImgPipeline on the base's components: both towers, the size ids from the image, the
    scaling factor of SDXL's VAE, Euler (SDXL's released sampler) started at the strength's step."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    torch_pipe, _ = saved["sdxl"]
    components = dict(torch_pipe.components)
    reference = StableDiffusionXLImg2ImgPipeline(**components | dict(
        vae=near_deterministic_vae(components["vae"]), scheduler=scheduler("euler")), add_watermarker=False)
    reference.save_pretrained(tmp_path / "xl-img2img")
    got, want, heard = img2img_run(reference, tmp_path / "xl-img2img", 4, 0.75, prompt="a cat",
                                   negative_prompt="blurry", guidance_scale=5.0)
    assert sorted(heard) == [1, 2, 3]
    assert_close(got, want, PIPELINE, what="SDXL img2img images")


REFINER_UNET = dict(UNETS["sdxl"], cross_attention_dim=32, projection_class_embeddings_input_dim=24 + 5 * 8)


@pytest.mark.parametrize("scores", [{}, dict(aesthetic_score=7.0, negative_aesthetic_score=1.5)], ids=["default", "scores"])
def test_sdxl_refiner_equals_diffusers(saved, scores, tmp_path):
    """The refiner's pipeline as released: text_encoder_2 alone (its penultimate layer and pooled vector),
    requires_aesthetics_score (5 ids: size, crop, aesthetic score; the negative score for the unconditional
    half), force_zeros_for_empty_prompt off (the empty negative prompt encoded)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch_pipe, _ = saved["sdxl"]
    components = dict(torch_pipe.components)
    torch.manual_seed(0)
    unet = randomize_(UNet2DConditionModel(**REFINER_UNET).eval(), 6)
    reference = StableDiffusionXLImg2ImgPipeline(
        vae=near_deterministic_vae(components["vae"]), text_encoder=None, tokenizer=None,
        text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"], unet=unet,
        scheduler=scheduler("euler"), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False)
    reference.save_pretrained(tmp_path / "refiner")
    pipe = load_pipeline(tmp_path / "refiner")
    assert pipe.family == "sdxl-refiner" and len(pipe.text_encoders) == 1
    got, want, _ = img2img_run(reference, tmp_path / "refiner", 3, 1.0, prompt="a cat", guidance_scale=5.0, **scores)
    assert_close(got, want, PIPELINE, what=f"refiner images {scores}")


@pytest.mark.parametrize("family", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_euler_ancestral_equals_diffusers_fed_the_same_noise(saved, family, tmp_path, monkeypatch):
    """Euler ancestral in the pipeline: diffusers' scheduler is fed, at step i, the noise ours adds there
    (step_noise(sampler_key(seed), i, shape), NHWC -> NCHW), so the final latents must match; and the noise is
    the seed's: another seed, other latents from the same initial latents."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    from flax_sgm.pipeline.pipeline import sampler_key
    from flax_sgm.sampling import step_noise

    torch_pipe, directory = saved[family]
    pipe = load_pipeline(with_scheduler(directory, "euler_ancestral", tmp_path / "pipe"))
    calls = iter(range(STEPS))

    def fed_noise(shape, **kwargs):  # diffusers asks for NCHW
        b, c, h, w = shape
        return torch.from_numpy(np.array(step_noise(sampler_key(3), next(calls), (b, h, w, c))).transpose(0, 3, 1, 2))

    monkeypatch.setattr(module, "randn_tensor", fed_noise)
    latents = initial_latents(2)
    kwargs = dict(prompt=["a cat", "the dog"], negative_prompt=["blurry", "cat"], guidance_scale=5.0)
    want, _ = diffusers_run(torch_pipe, "euler_ancestral", latents=latents, **kwargs)
    got = pipe(latents=latents, num_inference_steps=STEPS, seed=3, output="latent", **kwargs).images
    assert_close(got, want, PIPELINE, what=f"{family} euler ancestral final latents")
    other = pipe(latents=latents, num_inference_steps=STEPS, seed=4, output="latent", **kwargs).images
    assert not np.allclose(got, other, rtol=1e-3, atol=1e-3)


def test_num_images_per_prompt_and_seed(saved):
    """num_images_per_prompt repeats each prompt's conditioning as diffusers (prompt 0's images first); the seed
    makes the noise: the same seed the same images, another seed others."""
    torch_pipe, directory = saved["sd"]
    pipe = load_pipeline(directory)
    latents = initial_latents(4)
    want, _ = diffusers_run(torch_pipe, "ddim", ["a cat", "the dog"], latents, num_images_per_prompt=2,
                            guidance_scale=1.0)
    got = pipe(["a cat", "the dog"], latents=latents, num_inference_steps=STEPS, num_images_per_prompt=2,
               guidance_scale=1.0, output="latent")
    assert_close(got.images, want, PIPELINE, what="num_images_per_prompt")
    a, b, c = (pipe("a cat", num_inference_steps=2, seed=s, output="latent").images for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_pil_output_and_progress(saved):
    """output="pil" rounds as diffusers' numpy_to_pil; the progress callback hears every step from the compiled
    loop, and a second call at the same shapes compiles nothing."""
    _, directory = saved["sd"]
    pipe = load_pipeline(directory)
    heard = []
    out = pipe("a cat", num_inference_steps=STEPS, output="pil", progress=heard.append)
    assert sorted(heard) == list(range(STEPS))
    assert out.images[0].size == (SIZE, SIZE) and out.images[0].mode == "RGB"
    again = pipe("a cat", num_inference_steps=STEPS, output="np")
    assert again.timings["compile_s"] == 0.0
    assert np.array_equal(np.asarray(out.images[0]), (again.images[0] * 255).round().astype(np.uint8))


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_directories_are_one_line(saved, tmp_path):
    _, directory = saved["sd"]
    no_scheduler = with_scheduler(directory, "ddim", tmp_path / "a")
    shutil.rmtree(no_scheduler / "scheduler")
    with pytest.raises(CheckpointError, match="no scheduler") as err:
        load_pipeline(no_scheduler)
    one_line(err)
    unsupported = with_scheduler(directory, "ddim", tmp_path / "b")
    config = json.loads((unsupported / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "KarrasVeScheduler"
    (unsupported / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="KarrasVeScheduler.*DDIMScheduler") as err:
        load_pipeline(unsupported)
    one_line(err)
    with pytest.raises(CheckpointError, match="no model_index.json") as err:
        load_pipeline(directory / "unet")
    one_line(err)
    with pytest.raises(CheckpointError, match="a single file holds no tokenizer; pass tokenizer=") as err:
        load_pipeline(directory / "unet" / "diffusion_pytorch_model.safetensors")
    one_line(err)


def test_bad_calls_are_one_line(saved):
    _, directory = saved["sd"]
    pipe = load_pipeline(directory)
    for kwargs, message in [
        (dict(height=36), "height = 36 is not divisible by 8"),
        (dict(width=0), "width: a positive int"),
        (dict(latents=np.zeros((1, 4, 4, 3), np.float32)), r"latents: shape \(1, 4, 4, 3\).*\(1, 4, 4, 4\)"),
        (dict(latents=np.zeros((1, 4, 4, 4), np.float32), num_images_per_prompt=2), r"latents: shape \(1, 4, 4, 4\)"),
        (dict(negative_prompt="blurry", guidance_scale=0.5), "negative_prompt is used only with classifier-free"),
        (dict(output="pt"), "output: one of np, latent, pil"),
        (dict(num_inference_steps=0), "num_inference_steps: a positive int"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), strength=0.0), r"strength: a number in \(0, 1\]"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), strength=1.5), r"strength: a number in \(0, 1\]"),
        (dict(image=np.zeros((SIZE, SIZE, 3)), strength=0.1, num_inference_steps=5), "runs no step"),
        (dict(image=np.zeros((SIZE, 36, 3))), "image width = 36 is not divisible by 8"),
        (dict(strength=0.5), "strength: goes with image="),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number; got nan"),  # once: no guidance
        (dict(seed=1.5), "seed must be an int; got 1.5"),  # JAX's TypeError before
        (dict(original_size=(64, 64)), "SDXL's conditions; an SD pipeline takes none"),  # ignored before
        (dict(aesthetic_score=7.0), "condition SDXL's refiner only; this is a sd pipeline"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            pipe("a cat", **kwargs)
        one_line(err)
    with pytest.raises(ValueError, match="prompt: a string or a non-empty list of strings; got 3") as err:
        pipe(3)  # 'int' object is not iterable
    one_line(err)
    with pytest.raises(ValueError, match=r"AutoencoderKL.encode: `x` must be floats in \[-1, 1\] .*got uint8") as err:
        pipe.vae.encode(np.zeros((1, SIZE, SIZE, 3), np.uint8))  # ran on the pixel values as they were
    one_line(err)


def test_an_sgm_sampler_config_says_the_steps_and_the_guidance(saved):
    """An sgm sampler over a directory's models: its num_steps is the default steps, and with no guider_config
    (sgm's IdentityGuider) there is no guidance; both were once ignored (50 steps, guidance 7.5)."""
    from flax_sgm.sampling import SgmSamplerConfig

    M = "sgm.modules.diffusionmodules."
    cfg = SgmSamplerConfig.from_sgm(
        {"target": M + "sampling.EulerEDMSampler",
         "params": {"num_steps": 3, "discretization_config": {"target": M + "discretizer.LegacyDDPMDiscretization"}}},
        {"target": M + "denoiser.DiscreteDenoiser",
         "params": {"num_idx": 1000, "scaling_config": {"target": M + "denoiser_scaling.EpsScaling"},
                    "discretization_config": {"target": M + "discretizer.LegacyDDPMDiscretization"}}})
    pipe = load_pipeline(saved["sd"][1], scheduler=cfg)
    latents = initial_latents(1)
    got = pipe("a cat", latents=latents, output="latent")
    want = pipe("a cat", latents=latents, output="latent", num_inference_steps=3, guidance_scale=1.0)
    assert got.steps == 3
    np.testing.assert_array_equal(np.asarray(got.images), np.asarray(want.images))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG whose every chunk's CRC is right."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size = 8, None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body, crc = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n], data[pos + 8 + n : pos + 12 + n]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body)
        size = struct.unpack(">II", body[:8]) if kind == b"IHDR" else size
        pos += 12 + n
    assert kind == b"IEND"
    return size


def run_process(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "flax_sgm", "sample", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_cli_sample_writes_pngs(saved, tmp_path):
    """`flax-sgm sample` in a real process: a valid PNG of the asked size per image, --json's record; bad input is
    one line and exit status 2, and no PNG (not even a partial one) is left behind."""
    _, directory = saved["sd"]
    done = run_process(directory, "--prompt", "a cat", "--steps", 2, "--batch", 2, "--width", 48, "-o", "out.png", "--json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert [Path(p).name for p in record["images"]] == ["out-0.png", "out-1.png"]
    assert all(png_size(tmp_path / f"out-{i}.png") == (48, SIZE) for i in range(2))
    assert record["steps"] == 2 and record["seconds_per_step"] > 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out-0.png").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes files, not 0o600
    (tmp_path / "a-directory").mkdir()
    assert "is a directory; give the PNG's file name" in cli_error("sample", directory, "--prompt", "a cat", "-o",
                                                                    tmp_path / "a-directory")
    no_scheduler = with_scheduler(directory, "ddim", tmp_path / "no-scheduler")
    shutil.rmtree(no_scheduler / "scheduler")
    for args, message in [((directory, "--height", 36), "height = 36 is not divisible by 8"),
                          ((no_scheduler,), "no scheduler")]:
        error = cli_error("sample", *args, "--prompt", "a cat", "-o", tmp_path / "bad.png")  # in-process: one line
        assert message in error
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["out-0.png", "out-1.png"]


MESH_WORKER = """
import json, sys
import jax, numpy as np
from flax_sgm import load_pipeline, sharding
from flax_sgm.pipeline import pipeline as module
from flax_sgm.verify.criteria import rel_err

pipe = load_pipeline(sys.argv[1])
latents = np.random.default_rng(0).standard_normal((4, 4, 4, 4)).astype(np.float32)
call = dict(prompt=["a cat", "the dog"], negative_prompt=["blurry", "cat"], num_images_per_prompt=2,
            num_inference_steps=2, guidance_scale=5.0, latents=latents)
one = pipe(output="np", **call).images
mesh = sharding.make_mesh(data=4)
heard = []
many = pipe(output="np", mesh=mesh, progress=heard.append, **call).images
image = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
img2img = dict(call, image=image, strength=0.5)
img2img_rel = float(rel_err(pipe(output="latent", mesh=mesh, **img2img).images, pipe(output="latent", **img2img).images))
shardings = [c.input_shardings[0] for k, c in module._COMPILED.items() if mesh in k]
noise = shardings[0][1]  # (state, noise, context, y, timestep_cond, guidance, key)
errors = []
for kwargs in (dict(mesh=sharding.make_mesh(data=3)), dict(mesh=sharding.make_mesh(data=2, model=2))):
    try:
        pipe(output="latent", **call | kwargs)
    except ValueError as err:
        errors.append(str(err))
print(json.dumps(dict(devices=jax.device_count(), rel=float(rel_err(many, one)), img2img_rel=img2img_rel, shape=list(many.shape),
                      noise_devices=len(noise.device_set), noise_spec=str(noise.spec), errors=errors,
                      heard=sorted(heard))))
"""


def test_mesh_data_parallel_equals_one_device(saved, tmp_path):
    """mesh=: a batch of 2 prompts x 2 images split over a data axis of 4 virtual CPU devices (a subprocess: the
    device count is fixed when jax starts) gives one device's images; the compiled loop takes the noise split
    over all 4; img2img (an image per prompt) too, and a one-device call after a mesh call (the VAE once came
    back replicated over the mesh from the decode); a batch the data axis does not divide, or a mesh with a model axis, is one line."""
    _, directory = saved["sd"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", MESH_WORKER, str(directory)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["shape"] == [4, SIZE, SIZE, 3]
    assert report["rel"] <= PIPELINE and report["img2img_rel"] <= PIPELINE, report
    assert report["noise_devices"] == 4 and "data" in report["noise_spec"], report
    assert report["heard"] == [0, 1], report  # the progress callback: each step once, not once per device
    assert len(report["errors"]) == 2 and all("\n" not in e for e in report["errors"]), report
    assert "does not split over 3 devices" in report["errors"][0]
    assert "data parallel only" in report["errors"][1]


def test_cli_sample_progress_time_per_step_and_no_partial_png(saved, tmp_path, monkeypatch):
    """`flax-sgm sample` in-process: its tqdm bar is advanced once per step by the compiled loop's callback and
    the time per step is printed at the end; a PNG whose writing fails (a full disk) leaves neither the PNG nor
    its temporary file, and an existing PNG of that name is kept whole; the failure is one line."""
    import PIL.Image
    import tqdm

    _, directory = saved["sd"]
    bars = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs | dict(disable=True))
            self.updates = []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    done = run_cli("sample", directory, "--prompt", "a cat", "--steps", 3, "-o", tmp_path / "cat.png")
    assert [(b.total, b.updates) for b in bars] == [(3, [1, 1, 1])]
    assert "3 steps" in done.stdout and " s/step" in done.stdout, done.stdout
    old = (tmp_path / "cat.png").read_bytes()

    def full_disk(self, fp, format=None, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", full_disk)
    error = cli_error("sample", directory, "--prompt", "a cat", "--steps", 3, "-o", tmp_path / "cat.png")
    assert "No space left on device" in error
    error = cli_error("sample", directory, "--prompt", "a cat", "--steps", 3, "-o", tmp_path / "new.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # no new.png, no temporary file
    assert (tmp_path / "cat.png").read_bytes() == old
