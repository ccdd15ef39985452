"""Prompt to image with flax_sgm.load_pipeline: a diffusers pipeline directory, sampled in JAX.

    python examples/text_to_image.py                                   # a tiny random pipeline (CI)
    python examples/text_to_image.py stable-diffusion-v1-5 --prompt "a cat on a mat" -o cat.png

With no path, a tiny SD-style pipeline with random weights is made with diffusers and transformers (installed
with flax-sgm's test extra) and saved to a temporary directory: the program is the real one, the picture is
noise. The same lines run a released StableDiffusionPipeline or StableDiffusionXLPipeline directory.
"""

from __future__ import annotations

import argparse
import string
import tempfile
from pathlib import Path

import flax_sgm


def tiny_pipeline(directory: Path) -> Path:
    """A StableDiffusionPipeline of random tiny models (32 x 32 images), saved as diffusers saves one."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                                bos_token_id=998, eos_token_id=999, pad_token_id=999))
    vocab = {}  # a BPE vocabulary of letters (CLIP's is 49408 tokens; its start and end tokens are last too)
    for ch in ["!", *string.ascii_lowercase]:
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1
    while len(vocab) < 998:
        vocab[f"q{len(vocab)}q</w>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 998, 999
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")], pad_token="<|endoftext|>", model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(directory)
    return directory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a diffusers pipeline directory (default: a tiny random one)")
    parser.add_argument("--prompt", default="a cat on a mat")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (the tiny pipeline: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=None, help="a PNG to write (default: none)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or tiny_pipeline(Path(tmp) / "tiny-sd")
        pipe = flax_sgm.load_pipeline(path)
        steps = args.steps or (30 if args.path else 4)
        out = pipe(args.prompt, num_inference_steps=steps, seed=args.seed, output="pil")
    image = out.images[0]
    t = out.timings
    print(f"{image.size[0]} x {image.size[1]} image in {steps} steps ({pipe.scheduler.kind}): "
          f"{t['denoise_s'] / steps:.3f} s/step, compile {t['compile_s']:.1f} s")
    if args.output:
        image.save(args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
