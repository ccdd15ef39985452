"""`flax-sgm sample`: prompt to PNG through load_pipeline (flax_sgm.pipeline does the work)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from flax_sgm.cli.common import UserError, clean_errors, to_json, variant_option
from flax_sgm.sampling import KINDS, SGM_KINDS


@click.command(
    short_help="Prompt to images with a diffusers directory or an sgm file.",
    epilog="""\b
Examples:
  flax-sgm sample stable-diffusion-v1-5 --prompt "a cat on a mat" -o cat.png
  flax-sgm sample stable-diffusion-xl-base-1.0 --prompt "a lighthouse" --steps 30 --sampler euler \\
      --batch 2 -o lighthouse.png          # lighthouse-0.png, lighthouse-1.png
  flax-sgm sample sd-dir --prompt "a cat" --json -o cat.png
  flax-sgm sample sd_xl_base_1.0.safetensors --tokenizer sdxl-dir --prompt "a cat" -o cat.png""",
)
@click.argument("path", type=click.Path())
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--negative-prompt", help="What not to draw (needs --guidance above 1).")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Sampler steps.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale (default: 7.5; SDXL 5.0).")
@click.option("--height", type=int, help="Image height (default: the UNet's sample size times the VAE's factor).")
@click.option("--width", type=int, help="Image width (the same default).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--sampler", type=click.Choice(sorted(set(KINDS) | set(SGM_KINDS))),
              help="Another sampler than the directory's scheduler, on its noise schedule (as diffusers' "
              f"OtherScheduler.from_config); for a single file one of sgm's ({', '.join(SGM_KINDS)}).")
@click.option("--tokenizer", "tokenizers", multiple=True, type=click.Path(),
              help="A single file's tokenizers: a pipeline directory with tokenizer/ (and tokenizer_2/), or one "
              "tokenizer folder per text encoder (repeat the option).")
@click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]),
              help="What a single file's UNet predicts (default: its ModelSpec metadata, else diffusers' rule: "
              "SD 2.x v_prediction at 768 x 768 unless its global_step is SD 2.x base's, the rest epsilon).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images for the prompt (OUT-0.png, OUT-1.png, ... when above 1).")
@variant_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Compute dtype of the models (default: bfloat16 on a GPU, else float32); latents stay float32.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The PNG to write.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written and the timings as JSON.")
@clean_errors
def sample(path, prompt, negative_prompt, steps, guidance, height, width, seed, sampler, tokenizers, prediction, batch,
           variant, dtype, out, as_json):
    """Sample --batch images for --prompt with the diffusers pipeline directory PATH (StableDiffusionPipeline or
    StableDiffusionXLPipeline: model_index.json, scheduler/, unet/, vae/, text encoders and tokenizers), or the
    sgm single file PATH with --tokenizer (sgm's demo sampler: EulerEDM, guidance 5.0), and write each as a PNG. A progress bar follows the steps of the compiled loop; the time per step (the compile
    apart) is printed at the end. Nothing is written unless the whole image is: each PNG goes to a temporary
    file renamed into place."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from flax_sgm.pipeline import load_pipeline, to_pil
    from flax_sgm.sampling import timesteps_for

    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: {out.parent}: no such directory")
    if out.is_dir():  # found before sampling, not when the PNG is renamed over it
        raise UserError(f"-o {out}: is a directory; give the PNG's file name")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"-o {out}: {out.parent} is not writable")
    if dtype is None:
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    tokenizer = None if not tokenizers else tokenizers[0] if len(tokenizers) == 1 else list(tokenizers)
    pipe = load_pipeline(path, variant=variant, dtype=None if dtype == "float32" else jnp.dtype(dtype), scheduler=sampler,
                         tokenizer=tokenizer, prediction=prediction)
    total = len(timesteps_for(pipe.scheduler, steps))
    with tqdm(total=total, desc="sampling", unit="step", disable=None, leave=False) as bar:
        result = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                      height=height, width=width, seed=seed, num_images_per_prompt=batch, output="np",
                      progress=lambda i: bar.update(1))
    names = [out] if batch == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(batch)]
    for image, name in zip(to_pil(result.images), names):
        write_png(image, name)
    t = result.timings
    per_step = t["denoise_s"] / steps
    record = {"images": [str(n) for n in names], "prompt": prompt, "steps": steps, "sampler": pipe.scheduler.kind,
              "seed": seed, "size": list(result.images.shape[1:3]), "dtype": dtype, "seconds_per_step": per_step,
              "timings": t, "device": str(jax.devices()[0])}
    if as_json:
        click.echo(to_json(record))
        return
    for name in names:
        click.echo(f"wrote {name}")
    click.echo(f"{steps} steps, {per_step:.3f} s/step for {batch} image(s) ({pipe.scheduler.kind}, {dtype}, "
               f"{record['device']}); compile {t['compile_s']:.1f} s, prompt {t['encode_s']:.2f} s, "
               f"decode {t['decode_s']:.2f} s")


def write_png(image, path: Path) -> None:
    """The PNG at `path`, or nothing there: written to a temporary file beside it, then renamed over."""
    from flax_sgm.checkpoints.converted import umask_modes

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        umask_modes(Path(tmp))  # as an open() would have made it, not mkstemp's 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
