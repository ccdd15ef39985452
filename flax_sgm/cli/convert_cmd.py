"""`flax-sgm convert` and `flax-sgm inspect`: checkpoints in, a converted directory or a listing out."""

from __future__ import annotations

import sys
import time

import click

from flax_sgm.checkpoints import converted as output

from flax_sgm.attention import load as pretrained
from flax_sgm.unet.config import UNetConfig
from flax_sgm.cli.common import as_flags, clean_errors, exclusive_heads, stack_options, to_json, variant_option


@click.command(
    short_help="Convert stacks, a UNet, a VAE or text encoders to Flax.",
    epilog="""\b
Examples:
  flax-sgm convert sd_xl_base_1.0.safetensors \\
      --prefix model.diffusion_model.input_blocks.4.1 --head-dim 64 -o xl-in4
  flax-sgm convert sd_xl_base_1.0.safetensors --all --head-dim 64 -o xl-attention
  flax-sgm convert stable-diffusion-xl-base-1.0/unet --all -o xl-attention
  flax-sgm convert stable-diffusion-xl-base-1.0/unet --variant fp16 --all -o xl-attention
  flax-sgm convert unet/diffusion_pytorch_model.safetensors.index.json \\
      --prefix down_blocks.1.attentions.0 --prefix mid_block.attentions.0 --heads 8 -o sd15
  flax-sgm convert v1-5-pruned.ckpt --all --heads 8 --format safetensors -o sd15-flat
  flax-sgm convert sd_xl_base_1.0.safetensors --unet -o sdxl-unet         # the whole UNet
  flax-sgm convert sd_xl_base_1.0.safetensors --text-encoder -o sdxl-text  # both text encoders
  flax-sgm convert sd_xl_base_1.0.safetensors --vae -o sdxl-vae           # the autoencoder
  flax-sgm convert sd_xl_base_1.0.safetensors --unet --lora style.safetensors --lora-scale 0.8 -o sdxl-style

\b
Then in Python:
  model = flax_sgm.load_pretrained("xl-in4")   # one stack; prefix=... picks among several
  unet = flax_sgm.load_unet("sdxl-unet")       # a --unet output
  clip = flax_sgm.load_text_encoder("sdxl-text", embedder=1)   # a --text-encoder output
  vae = flax_sgm.load_vae("sdxl-vae")          # a --vae output"""
)
@click.argument("checkpoint", type=click.Path())
@click.option("--prefix", multiple=True, help="Key prefix of a stack; repeat for several.")
@click.option("--all", "all_stacks", is_flag=True,
              help="Every SpatialTransformer stack in the checkpoint (see `flax-sgm inspect`).")
@click.option("--unet", "whole_unet", is_flag=True,
              help="The whole UNet (what flax_sgm.load_unet reads: an sgm/LDM file, a diffusers unet/ or pipeline "
                   "directory), its UNetConfig recorded.")
@click.option("--text-encoder", "text_encoder", is_flag=True,
              help="The text encoders (what flax_sgm.load_text_encoder reads: a diffusers text_encoder/ or pipeline "
                   "directory, an sgm/LDM file), each CLIPTextConfig recorded; --embedder picks one.")
@click.option("--embedder", type=int, help="With --text-encoder: sgm's embedder number of the one to convert.")
@click.option("--vae", "whole_vae", is_flag=True,
              help="The KL autoencoder (what flax_sgm.load_vae reads: an sgm/LDM file's first_stage_model., a diffusers "
                   "vae/ or pipeline directory), its AutoencoderConfig and scaling factor recorded.")
@click.option("--scaling-factor", type=float,
              help="With --vae: the latent scaling factor, for a single file of none of the released models.")
@click.option("--lora", "loras", multiple=True, type=click.Path(),
              help="With --unet: a LoRA file to fuse into the UNet (flax_sgm.load_lora); repeat for several.")
@click.option("--lora-scale", "lora_scales", multiple=True, type=float,
              help="Each --lora's scale (diffusers' adapter weight), in order; default 1.0 each.")
@click.option("--skip-unsupported", is_flag=True,
              help="With --all: leave out the stacks SpatialTransformer cannot build instead of refusing.")
@stack_options
@variant_option
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="Output directory (must not exist).")
@click.option("--format", "weights", type=click.Choice(output.WEIGHT_FORMATS), default="orbax", show_default=True,
              help="orbax: an Orbax checkpoint per stack; safetensors: a flat file of Flax paths per stack.")
@click.option("--param-dtype", type=click.Choice(pretrained.PARAM_DTYPES),
              help="Storage dtype of the parameters; default: the checkpoint's (a narrower one rounds).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@clean_errors
def convert(checkpoint, prefix, all_stacks, whole_unet, text_encoder, embedder, whole_vae, scaling_factor, loras,
            lora_scales, skip_unsupported, heads, head_dim, disable_self_attn, variant, out, weights, param_dtype, overwrite):
    """Convert SpatialTransformer stacks of CHECKPOINT to Flax: an Orbax checkpoint (or safetensors) plus config.json.

    CHECKPOINT is a file (.safetensors, or a torch pickle read with
    torch.load(weights_only=True)), a diffusers model directory (config.json and its
    weights, sharded or not) or a sharded *.safetensors.index.json. The config of each
    stack is read off its shapes; a diffusers config.json gives the heads, elsewhere
    --heads or --head-dim says how each inner dim splits. Stacks are converted one at
    a time, and the output appears only once complete. Load it with
    flax_sgm.load_pretrained(OUTPUT). With --unet: the whole UNet, as flax_sgm.load_unet
    reads it (--heads or --head-dim only for a single file of none of the released
    models); load it with flax_sgm.load_unet(OUTPUT).
    """
    exclusive_heads(heads, head_dim)
    if skip_unsupported and not all_stacks:
        raise click.UsageError("--skip-unsupported goes with --all")
    if (loras or lora_scales) and not whole_unet:
        raise click.UsageError("--lora fuses a LoRA into the whole UNet: it goes with --unet")
    if lora_scales and len(lora_scales) != len(loras):
        raise click.UsageError(f"--lora-scale: give one per --lora ({len(loras)}), or none; got {len(lora_scales)}")
    start = time.perf_counter()
    if embedder is not None and not text_encoder:
        raise click.UsageError("--embedder goes with --text-encoder")
    if text_encoder and whole_vae:
        raise click.UsageError("--text-encoder and --vae convert different models: give one")
    if text_encoder:
        if whole_unet or prefix or all_stacks or any(v is not None for v in (disable_self_attn, heads, head_dim)):
            raise click.UsageError("--text-encoder converts text encoders: leave out --unet, --prefix, --all, --heads, "
                                   "--head-dim and --disable-self-attn")
        from flax_sgm.text.load import convert_text_encoders

        written = convert_text_encoders(checkpoint, out, embedder=embedder, variant=variant, weights=weights,
                                        param_dtype=param_dtype, overwrite=overwrite)
        click.echo(f"wrote {out} ({weights}): {len(written)} text encoder(s) in {time.perf_counter() - start:.1f} s")
        for n, config in written:
            click.echo(f"  embedder {n}: {_text(config)}; load: flax_sgm.load_text_encoder({str(out)!r}, embedder={n})")
        return
    if scaling_factor is not None and not whole_vae:
        raise click.UsageError("--scaling-factor goes with --vae")
    if whole_vae:
        if whole_unet or prefix or all_stacks or disable_self_attn is not None or heads is not None or head_dim is not None:
            raise click.UsageError("--vae converts the autoencoder: leave out --unet, --prefix, --all and the heads options")
        from flax_sgm.autoencoder.load import convert_vae

        config = convert_vae(checkpoint, out, variant=variant, weights=weights, param_dtype=param_dtype,
                             scaling_factor=scaling_factor, overwrite=overwrite)
        click.echo(f"wrote {out} ({weights}): the autoencoder ({_vae(config)}) in {time.perf_counter() - start:.1f} s")
        click.echo(f"load: flax_sgm.load_vae({str(out)!r})")
        return
    if whole_unet:
        if prefix or all_stacks or disable_self_attn is not None:
            raise click.UsageError("--unet converts the whole UNet: leave out --prefix, --all and --disable-self-attn")
        from flax_sgm.lora.load import load_lora
        from flax_sgm.unet.load import convert_unet

        fused = list(zip(loras, lora_scales or [1.0] * len(loras)))

        def fuse(model):
            for lora, scale in fused:
                load_lora(model, lora, scale=scale)

        config = convert_unet(checkpoint, out, heads=heads, head_dim=head_dim, variant=variant, weights=weights,
                              param_dtype=param_dtype, overwrite=overwrite, prepare=fuse)
        with_lora = f", {len(fused)} LoRA(s) fused" if fused else ""
        click.echo(f"wrote {out} ({weights}): the whole UNet ({_unet(config)}){with_lora} in "
                   f"{time.perf_counter() - start:.1f} s")
        click.echo(f"load: flax_sgm.load_unet({str(out)!r})")
        return
    bar = None

    def plan(stacks, skipped):
        nonlocal bar
        from tqdm import tqdm

        for prefix, why in skipped.items():
            click.echo(f"skipping {prefix}: {why}", err=True)
        total = sum(s.nbytes for s in stacks)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {len(stacks)} stack(s)", file=sys.stderr,
                   disable=None, leave=False)

    try:
        written = pretrained.convert_file(
            checkpoint, out, prefix, all_stacks=all_stacks, skip_unsupported=skip_unsupported, heads=heads,
            head_dim=head_dim, weights=weights, param_dtype=param_dtype, disable_self_attn=disable_self_attn,
            variant=variant, overwrite=overwrite, progress=lambda n: bar.update(n), on_plan=plan,
        )
    finally:
        if bar is not None:
            bar.close()
    params = sum(s.params for s in written)
    click.echo(
        f"wrote {out} ({weights}): {len(written)} stack(s), {params / 1e6:.1f}M parameters, "
        f"in {time.perf_counter() - start:.1f} s"
    )
    for s in written:
        click.echo(f"  {s.prefix or '(root)'}  {_stack(s.config)}, {s.param_dtype}")
    if len(written) == 1:
        click.echo(f"load: flax_sgm.load_pretrained({str(out)!r})")
    else:
        click.echo(f"load: flax_sgm.load_pretrained({str(out)!r}, prefix={written[0].prefix!r}), "
                   f"or all: flax_sgm.load_pretrained_all({str(out)!r})")


def _stack(c) -> str:
    return f"{c.in_channels} ch, {c.heads}x{c.head_dim} heads, depth {c.depth}, context {_context(c.context_dim)}"


def _unet(c) -> str:
    return f"{c.model_channels} ch x {list(c.channel_mult)}, context {c.context_dim}"


def _text(c) -> str:
    from flax_sgm.text.config import PRESETS

    preset = next((f" ({name})" for name, p in PRESETS.items() if p == c.replace(sdp_backend=None)), "")
    projection = f", projection {c.projection_dim}" if c.projection_dim else ""
    return f"CLIP text, {c.num_hidden_layers} layers of {c.hidden_size}, {c.hidden_act}{projection}{preset}"


def _vae(c) -> str:
    return (f"{c.ch} ch x {list(c.ch_mult)}, {c.num_res_blocks} blocks per level, latents of {c.embed_dim}, "
            f"attention {c.attn_type}, scaling factor {c.scaling_factor}")


def _context(context_dim) -> str:
    return str(list(context_dim)) if isinstance(context_dim, tuple) else str(context_dim)


@click.command(
    short_help="List the stacks, UNet and text encoders of a checkpoint or output.",
    epilog="""\b
Examples:
  flax-sgm inspect sd_xl_base_1.0.safetensors
  flax-sgm inspect stable-diffusion-xl-base-1.0/unet
  flax-sgm inspect stable-diffusion-xl-base-1.0/text_encoder_2
  flax-sgm inspect v1-5-pruned.ckpt --json
  flax-sgm inspect xl-attention                 # a `flax-sgm convert` output
  flax-sgm inspect my_lora.safetensors          # a LoRA: format, modules, rank, alpha"""
)
@click.argument("checkpoint", type=click.Path())
@variant_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@clean_errors
def inspect(checkpoint, variant, as_json):
    """List the SpatialTransformer stacks in CHECKPOINT (a file, a diffusers model directory or a sharded
    index) and what their shapes say about them, the whole UNet when it holds one, and its text encoders
    (a transformers text_encoder/ directory, or a single file's embedders). A `flax-sgm convert` output: what
    its config.json records. A LoRA file: its format, what it adapts, its rank and alpha."""
    if output.is_output(checkpoint):
        if variant is not None:
            raise click.UsageError("a converted output has no variants: leave out --variant")
        _inspect_output(checkpoint, as_json)
        return
    from flax_sgm.autoencoder.load import vae_summary
    from flax_sgm.unet.load import unet_summary
    from flax_sgm.checkpoints.sources import open_source
    from flax_sgm.attention.stacks import inspect_stacks
    from flax_sgm.text.load import text_encoder_summaries

    from flax_sgm.lora.layout import is_lora

    with open_source(checkpoint, variant) as source:
        lora = is_lora(source.infos)
    if lora:
        _inspect_lora(checkpoint, as_json)
        return
    with open_source(checkpoint, variant) as source:
        texts = text_encoder_summaries(source)
        is_text = source.config is not None and bool(texts)  # a transformers text_encoder/: no stacks to look for
        vae_only = source.config is not None and source.config.get("_class_name") == "AutoencoderKL"
        # a text encoder or a VAE holds no SpatialTransformer
        summaries, problems = ([], {}) if is_text or vae_only else inspect_stacks(source)
        unet = None if is_text else unet_summary(source)
        vae = None if is_text else vae_summary(source)
        info = {
            "file": str(checkpoint),
            "format": source.kind + ((", transformers config.json" if is_text else ", diffusers config.json")
                                     if source.config is not None else ""),
            "tensors": len(source.infos),
            "bytes": sum(i.nbytes for i in source.infos.values()),
            "top_level_prefixes": _top_level(source.infos),
            "stacks": summaries,
            "unsupported": problems,
            "unet": unet,
            "text_encoders": texts,
            "vae": vae,
        }
    if as_json:
        click.echo(to_json(info))
        return
    click.echo(f"{info['file']}: {info['format']}, {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB")
    click.echo(f"top-level prefixes: {', '.join(info['top_level_prefixes'])}")
    if unet is not None:
        from flax_sgm.unet.load import channel_notes

        what = f"the {unet['preset']} preset" if unet["preset"] else "none of the released models"
        click.echo(f"a whole UNet, {unet['parameters'] / 1e6:.1f}M parameters: {what}"
                   + (f" ({as_flags(unet['problem'])})" if unet["problem"] else "")
                   + "; load: flax_sgm.load_unet, convert: flax-sgm convert --unet")
        if unet["in_channels"] is not None and unet["out_channels"] is not None:
            click.echo("  " + ", ".join(channel_notes(unet["in_channels"], unet["out_channels"], unet["time_cond_proj_dim"])))
    for t in texts:
        what = f"the {t['preset']} preset" if t["preset"] else ("config= needed: " + t["problem"] if t["problem"]
                                                              else "none of the released towers")
        click.echo(f"text encoder, embedder {t['embedder']}: {t['prefix'] or '(root)'} ({t['layout']}), "
                   f"{t['parameters'] / 1e6:.1f}M parameters, {what}; load: flax_sgm.load_text_encoder"
                   f"(..., embedder={t['embedder']}), convert: flax-sgm convert --text-encoder")
    if is_text:
        return
    if vae is not None:
        click.echo(_vae_line(vae))
    if not summaries and not problems:
        if vae is None:
            click.echo("no SpatialTransformer stack found")
        return
    click.echo(f"{len(summaries)} SpatialTransformer stack(s):")
    for s in summaries:
        proj = "linear" if s["use_linear"] else "conv"
        extra = ", disable_self_attn" if s["disable_self_attn"] else ""
        heads = f", {s['heads']} heads" if s["heads"] else ""
        click.echo(f"  {s['prefix'] or '(root)':45s} {s['in_channels']:5d} ch, inner {s['inner_dim']}{heads}, "
                   f"depth {s['depth']}, context {_context(s['context_dim'])}, {proj} proj{extra}, {s['dtype']}, "
                   f"{s['bytes'] / 1e6:.1f} MB")
    for p, why in problems.items():
        click.echo(f"  {p:45s} not convertible: {why}")
    if any(s["heads"] is None for s in summaries):
        click.echo(_heads_hint(unet))


def _vae_line(vae: dict) -> str:
    where = f" under {vae['prefix']}" if vae["prefix"] else ""
    if vae["config"] is None:
        return f"a KL autoencoder{where}, not readable: {vae['problem']}"
    from flax_sgm.autoencoder.config import AutoencoderConfig

    config = AutoencoderConfig.from_dict(vae["config"])
    what = f"the {vae['preset']} preset" if vae["preset"] else "none of the presets"
    scale = "" if config.scaling_factor is not None else "; no released UNet beside it: load_vae needs scaling_factor="
    return (f"a KL autoencoder{where}, {vae['parameters'] / 1e6:.1f}M parameters: {what} ({_vae(config)}){scale}; "
            "load: flax_sgm.load_vae, convert: flax-sgm convert --vae")


def _heads_hint(unet: dict | None) -> str:
    """Where the stacks' heads come from: the released model the file is, else where it was trained (a value
    guessed from another model loads it wrong, silently: the weights cannot say the split)."""
    if unet is not None and unet["preset"]:
        preset = UNetConfig.preset(unet["preset"])
        flag = f"--heads {preset.num_heads}" if preset.num_heads != -1 else f"--head-dim {preset.num_head_channels}"
        return f"heads are not in the weights: as {unet['preset']}, pass {flag} to convert/verify the stacks"
    what = "" if unet is None else ", and this UNet is none of the released models"
    return (f"heads are not in the weights{what}: take --heads N or --head-dim D from where the model was trained "
            "(its training config); another model's value loads it wrong without an error")


def _inspect_lora(path, as_json: bool) -> None:
    from flax_sgm.lora import lora_summary

    info = lora_summary(path)
    if as_json:
        click.echo(to_json({"file": str(path), "lora": info}))
        return
    if info.get("problem"):
        click.echo(f"{path}: a {info['format']} file, {info['problem']}; flax_sgm.load_lora refuses it")
        return
    alpha = ", ".join(f"{a:g}" for a in info["alpha"]) if isinstance(info["alpha"], list) else info["alpha"]
    click.echo(f"{path}: a LoRA ({info['format']} format), {info['modules']} modules ({info['unet_modules']} UNet, "
               f"{info['text_encoder_modules']} text encoder), rank {', '.join(map(str, info['rank']))}, alpha {alpha}")
    click.echo(f"  adapts: {', '.join(info['layers'])}")
    parts = [n for n, k in (("unet", "unet_modules"), ("text_encoder", "text_encoder_modules")) if info[k]]
    target = "pipeline" if len(parts) > 1 else ("text_encoder" if parts == ["text_encoder"] else "unet")
    click.echo(f"  apply: flax_sgm.load_lora({target}, {str(path)!r}, scale=1.0)")


def _inspect_output(path, as_json: bool) -> None:
    weights, records = output.read_output(path)
    if as_json:
        click.echo(to_json({"file": str(path), "format": f"flax-sgm convert output ({weights})",
                            "stacks": [{"model": output.STACK_RECORD} | r.to_dict() for r in records]}))
        return
    click.echo(f"{path}: a flax-sgm convert output ({weights}), {len(records)} record(s)")
    from flax_sgm.text.config import CLIPTextConfig
    from flax_sgm.autoencoder.config import AutoencoderConfig

    for r in records:
        if isinstance(r.config, UNetConfig):
            click.echo(f"  the whole UNet ({_unet(r.config)}), {r.param_dtype}; load: flax_sgm.load_unet({str(path)!r})")
        elif isinstance(r.config, CLIPTextConfig):
            n = int(r.prefix.rstrip(".").rsplit(".", 1)[-1])
            click.echo(f"  text encoder {n}: {_text(r.config)}, {r.param_dtype}; "
                       f"load: flax_sgm.load_text_encoder({str(path)!r}, embedder={n})")
        elif isinstance(r.config, AutoencoderConfig):
            click.echo(f"  the autoencoder ({_vae(r.config)}), {r.param_dtype}; load: flax_sgm.load_vae({str(path)!r})")
        else:
            click.echo(f"  {r.prefix or '(root)'}  {_stack(r.config)}, {r.param_dtype}")
    if not any(isinstance(r.config, (UNetConfig, CLIPTextConfig, AutoencoderConfig)) for r in records):
        click.echo(f"load: flax_sgm.load_pretrained({str(path)!r}"
                   + (")" if len(records) == 1 else f", prefix=...) or flax_sgm.load_pretrained_all({str(path)!r})"))


def _top_level(keys) -> list[str]:
    from flax_sgm.attention.layout import top_level_prefixes

    return top_level_prefixes(keys)
