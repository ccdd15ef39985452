"""Prompt to image with flax_sgm.load_pipeline: a diffusers pipeline directory, sampled in JAX.

    python examples/text_to_image.py                                   # a tiny random pipeline (CI)
    python examples/text_to_image.py stable-diffusion-v1-5 --prompt "a cat on a mat" -o cat.png

With no path, a tiny SD-style pipeline with random weights is made with diffusers and transformers (installed
with flax-sgm's test extra) and saved to a temporary directory: the program is the real one, the picture is
noise. The same lines run a released StableDiffusionPipeline or StableDiffusionXLPipeline directory.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import flax_sgm


def tiny_pipeline(directory: Path) -> Path:
    """A StableDiffusionPipeline of random tiny models (32 x 32 images, Euler), saved as diffusers saves one: the
    one the parity tests build (flax_sgm.verify.tiny)."""
    from flax_sgm.verify import tiny

    tiny.pipeline("sd", "euler").save_pretrained(directory)
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
