"""The `flax-sgm` command line: verify, convert, inspect.

Commands only: the work is in pretrained.py (checkpoints in, modules or a converted
directory out), flax_sgm.verify (torch vs flax) and lowering.py. torch is imported
only by `verify` and by reading torch pickles.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time

import click

from flax_sgm import output, pretrained
from flax_sgm.layout import CheckpointError

# Exit statuses.
PARITY_FAILED = 1
LOWERING_FAILED = 1  # `lower`: the program does not lower for the platform
BAD_INPUT = 2


class UserError(click.ClickException):
    """One line on stderr, exit status 2; the traceback only with --debug."""

    exit_code = BAD_INPUT


def _finite(value):
    """`value` with every non-finite float as None: JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value) -> str:
    """Strict JSON (no Infinity, no NaN), as every --json prints it."""
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def _debug_option(f):
    return click.option("--debug", is_flag=True, help="Show the full traceback on an error.")(f)


def _clean_errors(f):
    """Turn any exception into a one-line error unless --debug (here or before the command) is given."""

    @functools.wraps(f)
    def wrapper(*args, debug: bool = False, **kwargs):
        debug = debug or click.get_current_context().find_root().params.get("debug", False)
        try:
            return f(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if debug:
                raise
            if isinstance(err, (CheckpointError, ValueError)):
                message = str(err)  # ours and ConversionError: already say what is wrong
            elif isinstance(err, OSError):
                message = f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")
            else:
                message = f"{type(err).__name__}: {err} (run with --debug for the traceback)"
            raise UserError(message) from None

    return _debug_option(wrapper)


def _stack_options(f):
    """--prefix, --heads/--head-dim, --disable-self-attn."""
    f = click.option(
        "--disable-self-attn",
        is_flag=True,
        default=None,
        help="Force disable_self_attn (attn1 attends to the context). The weights show it only when the "
        "context width differs from the inner dim.",
    )(f)
    f = click.option("--head-dim", type=click.IntRange(min=1), help="Width of one head; the heads are inner dim / D.")(f)
    f = click.option("--heads", type=click.IntRange(min=1), help="Number of attention heads (must divide the inner dim).")(f)
    return f


def _variant_option(f):
    return click.option(
        "--variant", help="A diffusers directory's variant files (fp16, or any name it was saved with), as "
        "diffusers' from_pretrained(variant=...) reads them.",
    )(f)


def _exclusive_heads(heads, head_dim):
    if heads is not None and head_dim is not None:
        raise click.UsageError("give --heads or --head-dim, not both")


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  flax-sgm verify                      # parity report of the embedded default
  flax-sgm inspect sd_xl_base_1.0.safetensors
  flax-sgm convert sd_xl_base_1.0.safetensors --prefix model.diffusion_model.input_blocks.4.1 \\
      --head-dim 64 -o input_blocks.4.1
  flax-sgm convert v1-5-pruned.ckpt --all --heads 8 -o sd15-attention
  flax-sgm convert stable-diffusion-xl-base-1.0/unet --all -o sdxl-attention

Exit status: 0 ok, 1 parity failed (verify), 2 bad input.""",
)
@click.version_option(package_name="flax-sgm")
@click.option("--debug", is_flag=True, help="Show the full traceback on an error.")
def cli(debug):
    """Stable Diffusion's sgm SpatialTransformer in Flax NNX: check parity with torch, convert checkpoints."""


@cli.command(
    short_help="Check Flax against torch, submodule by submodule.",
    epilog="""\b
Examples:
  flax-sgm verify
  flax-sgm verify --json > report.json
  flax-sgm verify --dtype bfloat16
  flax-sgm verify --model unet
  flax-sgm verify --checkpoint sd_xl_base_1.0.safetensors \\
      --prefix model.diffusion_model.input_blocks.4.1 --head-dim 64
  flax-sgm verify --checkpoint stable-diffusion-v1-5/unet --prefix down_blocks.1.attentions.0

\b
In Python, any torch module (torch_ref, the seed, diffusers) and its twin:
  flax_sgm.verify.verify_modules(torch_module, flax_module, {"x": x, "context": c})"""
)
@click.option("--model", type=click.Choice(["stack", "unet"]), default="stack", show_default=True,
              help="What runs without --checkpoint: a SpatialTransformer stack, or a whole SDXL-style UNet "
                   "(diffusers' UNet2DConditionModel made in-process, random weights) reported per diffusers module.")
@click.option("--checkpoint", type=click.Path(),
              help="A checkpoint file (.safetensors, .ckpt, .pt, .pth, .bin), a diffusers model directory, a "
                   "sharded *.safetensors.index.json or a `flax-sgm convert` output; default: seeded random weights.")
@click.option("--prefix", help="Key prefix of the stack in the file (e.g. model.diffusion_model.input_blocks.4.1).")
@_stack_options
@_variant_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Dtype both sides run in; both are judged against float64 by flax_sgm.verify.criteria.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs (and of the default's weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_clean_errors
def verify(model, checkpoint, prefix, heads, head_dim, disable_self_attn, variant, dtype, seed, as_json):
    """Run torch's SpatialTransformer and its Flax conversion on the same input; report parity.

    Without --checkpoint: an embedded default (SDXL's input_blocks.4.1 widths: 640
    channels, 10 heads of 64, depth 2, context 2048, linear projections) with seeded
    random weights. With --checkpoint: the stack at --prefix, its config read off the
    shapes; its heads from a diffusers config.json, or else --heads or --head-dim; or
    a `flax-sgm convert` output. The reference (printed) is diffusers' own model built
    from a diffusers directory when diffusers is installed, else torch_ref's
    SpatialTransformer of the config read. With --model unet: a whole SDXL-style UNet
    (64 and 128 channels, depth 1 and 2, 16 x 16 latent) against diffusers'
    UNet2DConditionModel, a row per module diffusers holds whole.

    Reported per submodule (norm, proj_in, each block's norms, attn1, attn2, ff,
    proj_out) and for the whole model: flax_sgm's and torch's relative error against
    a float64 run of torch's module, of the output (the Flax submodule on torch's
    recorded inputs) and of the worst gradient (its VJP of torch's recorded output
    cotangent), the attention backend that ran, and pass/fail by
    flax_sgm.verify.criteria: an error fails when above both a floor and a few times
    torch's own (bfloat16: no floor, and a bound on the median ratio).
    """
    _exclusive_heads(heads, head_dim)
    from flax_sgm.verify import seeded, verify_modules  # needs torch

    if checkpoint is None and any(v is not None for v in (prefix, heads, head_dim, disable_self_attn, variant)):
        raise click.UsageError("--prefix, --heads, --head-dim, --disable-self-attn and --variant need --checkpoint")
    if model == "unet":
        if checkpoint is not None:
            raise click.UsageError("--model unet runs an in-process random UNet; --checkpoint verifies a stack")
        config, torch_module, flax_module, inputs = seeded.unet_pair(dtype=dtype, seed=seed)
        source = {"weights": f"diffusers UNet2DConditionModel made in-process, seeded random (seed {seed})"}
    elif checkpoint is None:
        config, source = seeded.VERIFY_DEFAULT, {"weights": f"embedded default, seeded random (seed {seed})"}
        torch_module, flax_module, inputs = seeded.spatial_transformer_pair(config, dtype=dtype, seed=seed)
    else:
        from flax_sgm.verify.references import checkpoint_pair

        config, torch_module, flax_module, inputs, source = checkpoint_pair(
            checkpoint, prefix, heads=heads, head_dim=head_dim, disable_self_attn=disable_self_attn, variant=variant,
            dtype=dtype, seed=seed,
        )
    report = verify_modules(torch_module, flax_module, inputs, dtype=dtype, seed=seed)
    if as_json:
        click.echo(_json({"config": config.to_dict(), "source": source, **report.to_dict()}))
    else:
        click.echo("\n".join([*_report_head(type(flax_module).__name__, config, source, report), report.format()]))
    sys.exit(0 if report.passed else PARITY_FAILED)


def _report_head(model: str, config, source: dict, report) -> list[str]:
    args = ", ".join(f"{k}={v}" for k, v in config.to_dict().items())
    inputs = ", ".join(f"{k} {v}" for k, v in report.inputs.items())
    source = ", ".join(f"{k} {v}" if k != "weights" else v for k, v in source.items())
    return [
        f"{model}({args})",
        f"weights: {source}",
        f"input: {inputs} (x NCHW for torch, NHWC for flax)",
        "",
    ]


@cli.command(
    short_help="Convert SpatialTransformer stacks, or a whole UNet, to Flax (Orbax or safetensors).",
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

\b
Then in Python:
  model = flax_sgm.load_pretrained("xl-in4")   # one stack; prefix=... picks among several
  unet = flax_sgm.load_unet("sdxl-unet")       # a --unet output"""
)
@click.argument("checkpoint", type=click.Path())
@click.option("--prefix", multiple=True, help="Key prefix of a stack; repeat for several.")
@click.option("--all", "all_stacks", is_flag=True,
              help="Every SpatialTransformer stack in the checkpoint (see `flax-sgm inspect`).")
@click.option("--unet", "whole_unet", is_flag=True,
              help="The whole UNet (what flax_sgm.load_unet reads: an sgm/LDM file, a diffusers unet/ or pipeline "
                   "directory), its UNetConfig recorded.")
@click.option("--skip-unsupported", is_flag=True,
              help="With --all: leave out the stacks SpatialTransformer cannot build instead of refusing.")
@_stack_options
@_variant_option
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="Output directory (must not exist).")
@click.option("--format", "weights", type=click.Choice(output.WEIGHT_FORMATS), default="orbax", show_default=True,
              help="orbax: an Orbax checkpoint per stack; safetensors: a flat file of Flax paths per stack.")
@click.option("--param-dtype", type=click.Choice(pretrained.PARAM_DTYPES),
              help="Storage dtype of the parameters; default: the checkpoint's (a narrower one rounds).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@_clean_errors
def convert(checkpoint, prefix, all_stacks, whole_unet, skip_unsupported, heads, head_dim, disable_self_attn, variant,
            out, weights, param_dtype, overwrite):
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
    _exclusive_heads(heads, head_dim)
    if skip_unsupported and not all_stacks:
        raise click.UsageError("--skip-unsupported goes with --all")
    start = time.perf_counter()
    if whole_unet:
        if prefix or all_stacks or disable_self_attn is not None:
            raise click.UsageError("--unet converts the whole UNet: leave out --prefix, --all and --disable-self-attn")
        from flax_sgm.pretrained_unet import convert_unet

        config = convert_unet(checkpoint, out, heads=heads, head_dim=head_dim, variant=variant, weights=weights,
                              param_dtype=param_dtype, overwrite=overwrite)
        click.echo(f"wrote {out} ({weights}): the whole UNet ({config.model_channels} ch x {list(config.channel_mult)}, "
                   f"context {config.context_dim}) in {time.perf_counter() - start:.1f} s")
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
        c = s.config
        click.echo(f"  {s.prefix or '(root)'}  {c.in_channels} ch, {c.n_heads}x{c.d_head} heads, "
                   f"depth {c.depth}, context {_context(c.context_dim)}, {s.param_dtype}")
    if len(written) == 1:
        click.echo(f"load: flax_sgm.load_pretrained({str(out)!r})")
    else:
        click.echo(f"load: flax_sgm.load_pretrained({str(out)!r}, prefix={written[0].prefix!r}), "
                   f"or all: flax_sgm.load_pretrained_all({str(out)!r})")


def _context(context_dim) -> str:
    return str(list(context_dim)) if isinstance(context_dim, tuple) else str(context_dim)


@cli.command(
    short_help="List the SpatialTransformer stacks in a checkpoint.",
    epilog="""\b
Examples:
  flax-sgm inspect sd_xl_base_1.0.safetensors
  flax-sgm inspect stable-diffusion-xl-base-1.0/unet
  flax-sgm inspect v1-5-pruned.ckpt --json"""
)
@click.argument("checkpoint", type=click.Path())
@_variant_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_clean_errors
def inspect(checkpoint, variant, as_json):
    """List the SpatialTransformer stacks in CHECKPOINT (a file, a diffusers model directory or a sharded
    index) and what their shapes say about them, and the whole UNet when it holds one."""
    from flax_sgm.pretrained_unet import unet_summary
    from flax_sgm.sources import open_source

    with open_source(checkpoint, variant) as source:
        summaries, problems = pretrained.inspect_stacks(source)
        unet = unet_summary(source)
        info = {
            "file": str(checkpoint),
            "format": source.kind + (", diffusers config.json" if source.config is not None else ""),
            "tensors": len(source.infos),
            "bytes": sum(i.nbytes for i in source.infos.values()),
            "top_level_prefixes": _top_level(source.infos),
            "stacks": summaries,
            "unsupported": problems,
            "unet": unet,
        }
    if as_json:
        click.echo(_json(info))
        return
    click.echo(f"{info['file']}: {info['format']}, {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB")
    click.echo(f"top-level prefixes: {', '.join(info['top_level_prefixes'])}")
    if unet is not None:
        what = f"the {unet['preset']} preset" if unet["preset"] else "none of the released models"
        click.echo(f"a whole UNet, {unet['parameters'] / 1e6:.1f}M parameters: {what}"
                   + (f" ({unet['problem']})" if unet["problem"] else "")
                   + f"; load: flax_sgm.load_unet, convert: flax-sgm convert --unet")
    if not summaries and not problems:
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
        click.echo("heads are not in the weights: pass --heads N or --head-dim D to convert/verify "
                   "(SD 1.x: --heads 8; SD 2.x, SDXL: --head-dim 64)")


def _top_level(keys) -> list[str]:
    from flax_sgm.layout import top_level_prefixes

    return top_level_prefixes(keys)


def main(argv=None):
    cli.main(args=argv, prog_name="flax-sgm")


# --- lower ------------------------------------------------------------------------------------


class _OneLineUsageErrors(click.Command):
    """Flag errors as one line (click's own add the usage and a hint): exit 2."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise UserError(err.format_message()) from None


def _lower_config(name_or_path: str, prefix: str | None = None):
    """A preset of flax_sgm.config.PRESETS, a SpatialTransformerConfig JSON file, or a `flax-sgm convert` output
    (its directory or its config.json; `prefix` picks a stack)."""
    import pathlib

    from flax_sgm.config import PRESETS, SpatialTransformerConfig
    from flax_sgm.lowering import UNET_PRESETS

    if name_or_path in UNET_PRESETS:
        if prefix is not None:
            raise UserError("--prefix picks a stack of a `flax-sgm convert` output, not of a preset")
        return UNET_PRESETS[name_or_path]
    if name_or_path in PRESETS:
        if prefix is not None:
            raise UserError("--prefix picks a stack of a `flax-sgm convert` output, not of a preset")
        return PRESETS[name_or_path]
    path = pathlib.Path(name_or_path)
    directory = path if path.is_dir() else path.parent
    if output.is_output(directory) and (path.is_dir() or path.name == output.CONFIG_FILE):
        _, records = output.read_output(directory)
        config = output.select_record(directory, records, prefix).config
    elif not path.is_file():
        raise UserError(
            f"--config: {name_or_path!r} is neither a preset ({', '.join([*PRESETS, *UNET_PRESETS])}), a JSON file nor a "
            "`flax-sgm convert` output"
        )
    elif prefix is not None:
        raise UserError("--prefix picks a stack of a `flax-sgm convert` output; this is a config file")
    else:
        config = SpatialTransformerConfig.from_json(path.read_text(), source=str(path))
    return PRESETS["sdxl"]._replace(config=config)  # the SDXL-like input sizes unless given


def _parse_mesh(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--mesh: expected three positive integers DATA,SEQ,MODEL (e.g. 1,4,1); got {text!r}")
    return tuple(int(p) for p in parts)


@cli.command(
    short_help="Lower for a platform without its hardware; report the backends.",
    cls=_OneLineUsageErrors,
    epilog="""\b
Examples:
  flax-sgm lower                                  # SDXL-like, bf16, lowered for CUDA
  flax-sgm lower --backward --json > lowered.json
  flax-sgm lower --config long --backward
  flax-sgm lower --config sdxl --mesh 1,4,1 --backward
  flax-sgm lower --config sdxl-unet --backward         # SDXL base's whole UNet, 128 x 128 latent
  flax-sgm lower --config my_config.json --hw 32 32 --context-tokens 226 --dtype float32
  flax-sgm lower --config sdxl-attention/config.json --prefix down_blocks.1.attentions.0""",
)
@click.option("--config", "config_name", default="sdxl", show_default=True,
              help="A SpatialTransformer preset (sdxl, long, sd15, default: flax_sgm.config.PRESETS), a whole-UNet "
                   "preset (sd15-unet, sd21-unet, sdxl-unet, sdxl-refiner-unet: flax_sgm.lowering.UNET_PRESETS, "
                   "at the model's own latent size), a SpatialTransformerConfig JSON file, or a `flax-sgm convert` "
                   "output (its directory or config.json); run at the sdxl preset's sizes unless given.")
@click.option("--prefix", help="With a `flax-sgm convert` output of several stacks: the stack to lower.")
@click.option("--platform", type=click.Choice(["cuda", "tpu", "cpu"]), default="cuda", show_default=True,
              help="The platform to lower for; it need not be this machine's.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Compute and parameter dtype.")
@click.option("--batch", type=click.IntRange(min=1), help="Batch size (default: the preset's).")
@click.option("--hw", type=click.IntRange(min=1), nargs=2, help="Latent height and width (default: the preset's).")
@click.option("--context-tokens", type=click.IntRange(min=1), help="Context length M (default: the preset's).")
@click.option("--backward", is_flag=True, help="Also lower forward + backward (gradients of every parameter and input).")
@click.option("--no-checkpoint", is_flag=True, help="Turn gradient checkpointing off (the presets have it on).")
@click.option("--mesh", help="DATA,SEQ,MODEL: lower under a mesh of that many devices (CPU devices where there "
                             "are too few), e.g. 1,4,1 for sequence parallelism.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_clean_errors
def lower(config_name, prefix, platform, dtype, batch, hw, context_tokens, backward, no_checkpoint, mesh, as_json):
    """Lower a SpatialTransformer for a platform (default CUDA) without its hardware; report what was chosen.

    The weights are abstract (nothing is allocated). Reported: for each attention call,
    the backend chosen and why and the lengths padded for cuDNN; the custom calls of the
    lowered forward program and, with --backward, of the forward + backward program
    (cuDNN's fused attention: __cudnn$fmha...). Lowering for CUDA on a machine without
    cuDNN answers JAX's cuDNN version query with a stand-in (flax_sgm.lowering). This
    checks what is decided at trace time, not XLA's compilation, speed or numerics on
    the device. Exit 0 when it lowers, 1 when the program does not lower, 2 on bad input.
    """
    mesh_shape = _parse_mesh(mesh) if mesh else None
    if mesh_shape is not None and mesh_shape[0] * mesh_shape[1] * mesh_shape[2] > 1:
        import jax

        try:  # virtual CPU devices to place the shards on; only possible before JAX starts
            jax.config.update("jax_num_cpu_devices", mesh_shape[0] * mesh_shape[1] * mesh_shape[2])
        except RuntimeError:
            pass  # JAX has started: the mesh must fit the devices it has
    import jax.numpy as jnp

    from flax_sgm import lowering
    from flax_sgm.unet_config import UNetConfig

    preset = _lower_config(config_name, prefix)
    config = preset.config.replace(use_checkpoint=False) if no_checkpoint else preset.config
    inputs = lowering.Inputs(
        batch=batch or preset.batch,
        hw=tuple(hw) if hw else preset.hw,
        context_tokens=context_tokens or preset.context_tokens,
        dtype=jnp.dtype(dtype),
    )
    if isinstance(config, UNetConfig):
        if mesh_shape is not None:
            raise UserError("--mesh lowers a SpatialTransformer preset; a whole-UNet preset lowers on one device")
        try:
            report = lowering.lower_unet(config, inputs, platform=platform, backward=backward)
        except NotImplementedError as err:  # cuDNN's refusals at trace time
            click.echo(f"Error: does not lower for {platform}: {' '.join(str(err).split())}", err=True)
            sys.exit(LOWERING_FAILED)
        click.echo(_json(report) if as_json else format_lowering(report))
        return
    try:
        device_mesh = lowering.lowering_mesh(*mesh_shape) if mesh_shape else None
        if device_mesh is not None:
            from flax_sgm import sharding

            sharding.shard_model(config.make_abstract(), device_mesh)  # refuses a mesh the heads do not fit
    except ValueError as err:
        raise UserError(str(err).replace(":\n  ", ": ").replace("\n  ", "; ")) from None  # one line
    try:
        report = lowering.lower_spatial_transformer(
            config, inputs, platform=platform, backward=backward, mesh=device_mesh
        )
    except NotImplementedError as err:  # cuDNN's refusals at trace time
        click.echo(f"Error: does not lower for {platform}: {' '.join(str(err).split())}", err=True)
        sys.exit(LOWERING_FAILED)
    click.echo(_json(report) if as_json else format_lowering(report))


def format_lowering(report: dict) -> str:
    c = report["config"]
    inputs = report["inputs"]
    cudnn = report["cudnn_version"]
    if "model_channels" in c:
        head = (
            f"UNetModel({c['model_channels']} ch x {c['channel_mult']}, depth {c['transformer_depth']}, "
            f"context {c['context_dim']}, checkpoint {c['use_checkpoint']}), x {inputs['x']}, "
            f"context {inputs['context']}, {inputs['dtype']}"
        )
    else:
        head = (
            f"SpatialTransformer({c['in_channels']} ch, {c['n_heads']}x{c['d_head']} heads, depth {c['depth']}, "
            f"context {c['context_dim']}, checkpoint {c['use_checkpoint']}), x {inputs['x']}, "
            f"context {inputs['context']}, {inputs['dtype']}"
        )
    where = f"lowered for {report['platform']} (attention chosen for {report['attention_platform']}"
    if cudnn["version"] is not None:
        where += f"; cuDNN {cudnn['version']}" + (", a stand-in: no cuDNN on this machine" if cudnn["stand_in"] else "")
    where += ")"
    if report["mesh"]:
        where += f", mesh {report['mesh']}"
    width = max([28, *(len(a["module"]) for a in report["attention"])])
    lines = [head, where, "", f"{'attention':{width}s} {'backend':8s} {'n x m':>13s} {'padded':>7s}  reason"]
    for a in report["attention"]:
        pad = f"+{a['padded']['n']},+{a['padded']['m']}" if a["padded"]["n"] or a["padded"]["m"] else "-"
        lines.append(f"{a['module']:{width}s} {a['backend']:8s} {a['n']:>6d} x {a['m']:<4d} {pad:>7s}  {a['reason']}")
    for program, label in (("forward", "forward"), ("backward", "forward+backward")):
        calls = report["custom_calls"][program]
        if calls is None:
            continue
        listed = ", ".join(f"{t} x{n}" for t, n in calls.items()) or "none"
        lines.append(f"custom calls, {label}: {listed}")
        if report.get("custom_calls_per_shard"):
            shard = report["custom_calls_per_shard"][program]
            lines.append(f"  inside the per-shard program: {', '.join(f'{t} x{n}' for t, n in shard.items()) or 'none'}")
    return "\n".join(lines)
