"""Prompt to image: flax_sgm's Pipeline against diffusers' StableDiffusion(XL)Pipeline, side by side in one run.

A diffusers pipeline of a released size (random weights: SD 1.5's UNet of 860M, its VAE and CLIP ViT-L; SDXL's
UNet, VAE and both towers) is made here, saved with save_pretrained and read back by flax_sgm.load_pipeline, so
both run the same numbers from the same initial latents. Each side runs the whole call (prompt encoding,
classifier-free guidance, the sampler's steps, the VAE decoder). flax_sgm's first call compiles: its compile time
is reported apart (PipelineOutput.timings["compile_s"]) and the timed calls are the later ones. Figures are the
median seconds per image over --iters calls and images per second; peak memory on GPU (torch's
max_memory_allocated; jax's peak_bytes_in_use of the device).

    python bench/pipeline.py                      # CPU: SD 1.5 size, 256 x 256, 10 steps, fp32, diffusers eager
    python bench/pipeline.py --config sdxl --size 1024 --steps 30 --dtype bfloat16 --torch-compile   # GPU
    python bench/pipeline.py --tiny --iters 1     # a smoke run of the script itself (tiny models, seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import string
import tempfile
import time

import numpy as np

from common import emit, environment

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading")  # SDXL's released Euler; SD 1.5 runs the same here
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
              pad_token_id=49407)
OPENCLIP_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280, pad_token_id=0)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
def tokenizer(vocab_size: int, pad: str):
    """A CLIP BPE tokenizer of `vocab_size` ids (letters, filler words, the start and end tokens last, as CLIP's):
    the timing does not depend on which ids a prompt becomes, only on the 77 positions."""
    from transformers import CLIPTokenizer

    vocab = {}
    for ch in ["!", *string.ascii_lowercase]:
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    while len(vocab) < vocab_size - 2:
        vocab[f"q{len(vocab)}q</w>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab_size - 2, vocab_size - 1
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad, model_max_length=77)


def torch_pipeline(config: str, tiny: bool, dtype):
    """diffusers' pipeline of the released size (or the tests' tiny one), random weights, in `dtype`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common import DIFFUSERS_CONFIGS

    if tiny:  # the parity tests' tiny pipelines (flax_sgm.verify.tiny), to check the script runs
        from flax_sgm.verify import tiny as tiny_models

        pipe = tiny_models.pipeline({"sd15": "sd", "sdxl": "sdxl"}[config], "euler")
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dtype=dtype).to("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**DIFFUSERS_CONFIGS[config])
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    if config == "sd15":
        pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=clip, unet=unet,
                                       tokenizer=tokenizer(CLIP_L["vocab_size"], "<|endoftext|>"), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE, scaling_factor=0.13025, force_upcast=False), text_encoder=clip,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_G)), unet=unet, scheduler=scheduler,
            tokenizer=tokenizer(CLIP_L["vocab_size"], "<|endoftext|>"), tokenizer_2=tokenizer(OPENCLIP_G["vocab_size"], "!"),
            add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype).to("cuda" if torch.cuda.is_available() else "cpu")


def seconds(run, iters: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--iters", type=int, default=2, help="timed calls per side (after one warm-up call)")
    parser.add_argument("--torch-compile", action="store_true", help="also diffusers with torch.compile(unet)")
    parser.add_argument("--no-torch", action="store_true", help="flax_sgm only")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models (checks the script runs)")
    parser.add_argument("--json", help="write the rows and environment here")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from flax_sgm import load_pipeline

    gpu = torch.cuda.is_available()
    size = 32 if args.tiny else args.size
    env = environment() | {"config": args.config + (" (tiny)" if args.tiny else ""), "size": size, "steps": args.steps,
                           "dtype": args.dtype, "batch": args.batch, "guidance": args.guidance,
                           "load_average": os.getloadavg()[0], "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = time.perf_counter()
    reference = torch_pipeline(args.config, args.tiny, getattr(torch, args.dtype))
    latents = np.random.default_rng(0).standard_normal((args.batch, size // 8, size // 8, 4)).astype(np.float32)
    call = dict(prompt=[PROMPT] * args.batch, negative_prompt=[NEGATIVE] * args.batch, num_inference_steps=args.steps,
                guidance_scale=args.guidance, height=size, width=size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        env["build_and_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = load_pipeline(tmp, dtype=None if args.dtype == "float32" else jnp.dtype(args.dtype))
        env["load_pipeline_s"] = time.perf_counter() - t0

        first = pipe(latents=latents, output="np", **call)
        compile_s = first.timings["compile_s"]
        if gpu:
            stats = jax.devices()[0].memory_stats() or {}
        per_call, times = seconds(lambda: pipe(latents=latents, output="np", **call), args.iters)
        rows.append({"impl": "flax_sgm (jit)", "s_per_image": per_call / args.batch, "images_per_s": args.batch / per_call,
                     "compile_s": compile_s, "first_call_s": sum(first.timings.values()),
                     "peak_GiB": (stats.get("peak_bytes_in_use", 0) / 2**30) if gpu else None,
                     "calls_s": [round(t, 3) for t in times]})
        del pipe, first

    if not args.no_torch:
        device = "cuda" if gpu else "cpu"
        torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2)).to(device, getattr(torch, args.dtype))
        variants = [("diffusers eager", reference.unet)]
        if args.torch_compile:
            variants.append(("diffusers torch.compile", torch.compile(reference.unet)))
        for name, unet in variants:
            reference.unet = unet
            if gpu:
                torch.cuda.reset_peak_memory_stats()

            def run():
                with torch.inference_mode():
                    out = reference(latents=torch_latents, output_type="np", **call).images
                if gpu:
                    torch.cuda.synchronize()
                return out

            t0 = time.perf_counter()
            run()  # warm-up (torch.compile compiles here)
            first_s = time.perf_counter() - t0
            per_call, times = seconds(run, args.iters)
            rows.append({"impl": name, "s_per_image": per_call / args.batch, "images_per_s": args.batch / per_call,
                         "compile_s": first_s - per_call if "compile" in name else 0.0, "first_call_s": first_s,
                         "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
                         "calls_s": [round(t, 3) for t in times]})
    env["load_average_end"] = os.getloadavg()[0]
    emit(rows, env, args.json)


if __name__ == "__main__":
    main()
