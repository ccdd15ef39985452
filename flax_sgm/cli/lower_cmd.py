"""`flax-sgm lower`: a SpatialTransformer or a whole UNet lowered for a platform without its hardware."""

from __future__ import annotations

import sys

import click

from flax_sgm.checkpoints import converted as output
from flax_sgm.cli.common import LOWERING_FAILED, UserError, clean_errors, to_json
from flax_sgm import models


class _OneLineUsageErrors(click.Command):
    """Flag errors as one line (click's own add the usage and a hint): exit 2."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise UserError(err.format_message()) from None


def _lower_config(name_or_path: str, prefix: str | None = None):
    """A preset of flax_sgm.attention.config.PRESETS, a SpatialTransformerConfig JSON file, or a `flax-sgm convert` output
    (its directory or its config.json; `prefix` picks a stack)."""
    import pathlib

    from flax_sgm.attention.config import PRESETS, SpatialTransformerConfig
    from flax_sgm.lowering import UNET_PRESETS, VAE_PRESETS

    whole = UNET_PRESETS | VAE_PRESETS
    if name_or_path in whole:
        if prefix is not None:
            raise UserError("--prefix picks a stack of a `flax-sgm convert` output, not of a preset")
        return whole[name_or_path]
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
            f"--config: {name_or_path!r} is neither a preset ({', '.join([*PRESETS, *whole])}), a JSON file nor a "
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


@click.command(
    short_help="Lower for a platform without its hardware; report the backends.",
    cls=_OneLineUsageErrors,
    epilog="""\b
Examples:
  flax-sgm lower                                  # SDXL-like, bf16, lowered for CUDA
  flax-sgm lower --backward --json > lowered.json
  flax-sgm lower --config long --backward
  flax-sgm lower --config sdxl --mesh 1,4,1 --backward
  flax-sgm lower --config sdxl-unet --backward         # SDXL base's whole UNet, 128 x 128 latent
  flax-sgm lower --config sdxl-vae --platform cpu --dtype float32   # SDXL's VAE decode, 128 x 128 latent
  flax-sgm lower --config my_config.json --hw 32 32 --context-tokens 226 --dtype float32
  flax-sgm lower --config sdxl-attention/config.json --prefix down_blocks.1.attentions.0""",
)
@click.option("--config", "config_name", default="sdxl", show_default=True,
              help="A SpatialTransformer preset (sdxl, long, sd15, default: flax_sgm.attention.config.PRESETS), a whole-UNet "
                   "preset (sd15-unet, sd21-unet, sdxl-unet, sdxl-refiner-unet: flax_sgm.lowering.UNET_PRESETS, "
                   "at the model's own latent size), an autoencoder decode preset (sd-vae, sdxl-vae: "
                   "flax_sgm.lowering.VAE_PRESETS), a SpatialTransformerConfig JSON file, or a `flax-sgm convert` "
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
@clean_errors
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
    from flax_sgm.autoencoder.config import AutoencoderConfig
    from flax_sgm.unet.config import UNetConfig

    preset = _lower_config(config_name, prefix)
    config = preset.config.replace(use_checkpoint=False) if no_checkpoint else preset.config
    inputs = lowering.Inputs(
        batch=batch or preset.batch,
        hw=tuple(hw) if hw else preset.hw,
        context_tokens=context_tokens or preset.context_tokens,
        dtype=jnp.dtype(dtype),
    )
    if isinstance(config, (UNetConfig, AutoencoderConfig)):
        if mesh_shape is not None:
            raise UserError("--mesh lowers a SpatialTransformer preset; a whole-model preset lowers on one device")
        whole = lowering.lower_unet if isinstance(config, UNetConfig) else lowering.lower_vae
        try:
            report = whole(config, inputs, platform=platform, backward=backward)
        except NotImplementedError as err:  # cuDNN's refusals at trace time
            click.echo(f"Error: does not lower for {platform}: {' '.join(str(err).split())}", err=True)
            sys.exit(LOWERING_FAILED)
        click.echo(to_json(report) if as_json else format_lowering(report))
        return
    try:
        device_mesh = lowering.lowering_mesh(*mesh_shape) if mesh_shape else None
        if device_mesh is not None:
            from flax_sgm import sharding

            sharding.shard_model(models.abstract(config), device_mesh)  # refuses a mesh the heads do not fit
    except ValueError as err:
        raise UserError(str(err).replace(":\n  ", ": ").replace("\n  ", "; ")) from None  # one line
    try:
        report = lowering.lower_spatial_transformer(
            config, inputs, platform=platform, backward=backward, mesh=device_mesh
        )
    except NotImplementedError as err:  # cuDNN's refusals at trace time
        click.echo(f"Error: does not lower for {platform}: {' '.join(str(err).split())}", err=True)
        sys.exit(LOWERING_FAILED)
    click.echo(to_json(report) if as_json else format_lowering(report))


def format_lowering(report: dict) -> str:
    c = report["config"]
    inputs = report["inputs"]
    cudnn = report["cudnn_version"]
    if "ch_mult" in c:
        head = (f"AutoencoderKL.decode({c['ch']} ch x {c['ch_mult']}, checkpoint {c['use_checkpoint']}), "
                f"z {inputs['z']}, {inputs['dtype']}")
    elif "model_channels" in c:
        head = (
            f"UNetModel({c['model_channels']} ch x {c['channel_mult']}, depth {c['transformer_depth']}, "
            f"context {c['context_dim']}, checkpoint {c['use_checkpoint']}), x {inputs['x']}, "
            f"context {inputs['context']}, {inputs['dtype']}"
        )
    else:
        head = (
            f"SpatialTransformer({c['in_channels']} ch, {c['heads']}x{c['head_dim']} heads, depth {c['depth']}, "
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
