"""A diffusers AutoencoderKL config.json as an AutoencoderConfig: each field honoured, refused, or irrelevant.

Every parameter of diffusers' AutoencoderKL.__init__ is in exactly one of HONOURED (mapped onto sgm's
arguments), DEFAULTS (refused, in one line naming the field and its value, unless it holds the value sgm's
autoencoder computes with) and IRRELEVANT (does not change the output). A field in none of them is refused
too, so a field diffusers adds later is noticed (parity_tests/test_autoencoder.py walks the signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_sgm.errors import CheckpointError

CLASS_NAME = "AutoencoderKL"

HONOURED = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "sample_size",
)

# Refused unless they hold these values (what sgm's Encoder/Decoder compute).
DEFAULTS: dict[str, Any] = {
    "act_fn": "silu",
}

IRRELEVANT: dict[str, str] = {}

DOWN_TYPE = "DownEncoderBlock2D"
UP_TYPE = "UpDecoderBlock2D"

# diffusers' AutoencoderKL defaults, where a config.json leaves a field out.
_DEFAULT = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1, latent_channels=4,
                norm_num_groups=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
                force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                sample_size=32)

# The autoencoders diffusers saves beside AutoencoderKL, which this family does not build.
OTHER_AUTOENCODERS = {
    "VQModel": "a VQ autoencoder",
    "AutoencoderKLTemporalDecoder": "a video autoencoder (SVD's temporal decoder)",
    "AutoencoderTiny": "TAESD, a tiny autoencoder",
    "AsymmetricAutoencoderKL": "an asymmetric autoencoder",
    "ConsistencyDecoderVAE": "a consistency decoder",
}


def config_fields(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """AutoencoderConfig's fields from a diffusers AutoencoderKL config; one-line CheckpointError otherwise."""
    kind = config.get("_class_name", CLASS_NAME)
    if kind != CLASS_NAME:
        what = OTHER_AUTOENCODERS.get(kind)
        said = f"{what} ({kind})" if what else f"a {kind} config"
        raise CheckpointError(f"{source}: {said}, not a diffusers {CLASS_NAME}")
    known = set(HONOURED) | set(DEFAULTS) | set(IRRELEVANT)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise CheckpointError(f"{source}: field {unknown[0]} = {config[unknown[0]]!r} is unknown to flax_sgm's autoencoder")
    for name, default in DEFAULTS.items():
        if name in config and config[name] != default:
            raise CheckpointError(f"{source}: {name} = {config[name]!r} is not supported (sgm's autoencoder computes {name} = {default!r})")
    get = lambda name: config.get(name, _DEFAULT[name])  # noqa: E731

    channels = get("block_out_channels")
    if not (isinstance(channels, (list, tuple)) and channels and all(isinstance(c, int) and c > 0 for c in channels)):
        raise CheckpointError(f"{source}: block_out_channels must be a list of positive ints; got {channels!r}")
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(f"{source}: block_out_channels {list(channels)} are not multiples of the first (sgm's ch_mult)")
    n = len(channels)
    for name, want in (("down_block_types", DOWN_TYPE), ("up_block_types", UP_TYPE)):
        types = config.get(name, [want] * n)
        if not isinstance(types, (list, tuple)) or list(types) != [want] * n:
            raise CheckpointError(f"{source}: {name} {types!r} is not supported (sgm's autoencoder is {n} x {want})")
    layers = get("layers_per_block")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
        raise CheckpointError(f"{source}: layers_per_block must be a positive int; got {layers!r}")
    groups = get("norm_num_groups")
    bad = [c for c in channels if not isinstance(groups, int) or groups <= 0 or c % groups]
    if bad:
        raise CheckpointError(f"{source}: norm_num_groups {groups!r} does not divide block_out_channels {list(channels)}")
    for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(get(name), bool):
            raise CheckpointError(f"{source}: {name} must be true or false; got {get(name)!r}")
    for name in ("scaling_factor", "shift_factor"):
        value = get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise CheckpointError(f"{source}: {name} must be a number; got {value!r}")
    size = get("sample_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise CheckpointError(f"{source}: sample_size (the tile size of tiled encode/decode) must be a positive int; got {size!r}")
    latent = get("latent_channels")
    for name in ("latents_mean", "latents_std"):
        value = get(name)
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != latent):
            raise CheckpointError(f"{source}: {name} must list one number per latent channel ({latent}); got {value!r}")
    return dict(
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        ch=base,
        ch_mult=tuple(c // base for c in channels),
        num_res_blocks=layers,
        z_channels=latent,
        embed_dim=latent,
        num_groups=groups,
        attn_type="vanilla" if get("mid_block_add_attention") else "none",
        use_quant_conv=get("use_quant_conv"),
        use_post_quant_conv=get("use_post_quant_conv"),
        scaling_factor=float(get("scaling_factor")),
        shift_factor=None if get("shift_factor") is None else float(get("shift_factor")),
        latents_mean=get("latents_mean"),
        latents_std=get("latents_std"),
        force_upcast=get("force_upcast"),
        tile_sample_size=size,
    )
