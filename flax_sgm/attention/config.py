"""SpatialTransformerConfig: the typed, frozen config every part of flax_sgm passes around.

It holds SpatialTransformer's architecture (the seed's defaults; the heads as
`heads` of `head_dim` each, where the seed says n_heads and d_head), derives the
per-block context dims once, goes to and from JSON, is read off a checkpoint's
shapes (`from_weights`). `flax_sgm.models.build(config)` / `abstract(config)` make its module.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


from flax_sgm.attention import layout
from flax_sgm.attention.remat import DEFAULT_CHECKPOINT_POLICY
from flax_sgm.config_io import ConfigIO

Dtype = Any

# The seed's names for two fields (SpatialTransformer(in_channels, n_heads, d_head, ...)).
SEED_NAMES = {"n_heads": "heads", "d_head": "head_dim"}


@dataclasses.dataclass(frozen=True)
class SpatialTransformerConfig(ConfigIO):
    """SpatialTransformer's architecture. `context_dim` is None, an int, or a tuple (one per block, or one for all)."""

    NAME = "SpatialTransformer"
    # flax_sgm's own fields, which a loader may set: how it runs, not what it computes (dropout: in training)
    OPTIONS = ("use_checkpoint", "sdp_backend", "checkpoint_policy", "attn_type", "dropout")

    in_channels: int
    heads: int
    head_dim: int
    depth: int = 1
    dropout: float = 0.0
    context_dim: int | tuple[int, ...] | None = None
    disable_self_attn: bool = False
    use_linear: bool = False
    attn_type: str = "softmax"
    use_checkpoint: bool = True
    sdp_backend: str | None = None
    checkpoint_policy: str = DEFAULT_CHECKPOINT_POLICY

    def __post_init__(self):
        for name in ("in_channels", "heads", "head_dim", "depth"):
            value = getattr(self, name)
            try:
                number = operator.index(value)  # a numpy integer too
            except TypeError:
                number = None
            if number is None or isinstance(value, bool) or number <= 0:
                raise ValueError(f"SpatialTransformerConfig: `{name}` must be a positive int; got {value!r}")
            object.__setattr__(self, name, number)
        if _is_list_like(self.context_dim):
            object.__setattr__(self, "context_dim", tuple(self.context_dim))
        _per_block_context_dims(self.context_dim, self.depth)  # a list that does not fit the depth raises here

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def context_dims(self) -> tuple[int | None, ...]:
        """Each block's context dim (None: self-attention only), as the seed stretches `context_dim`."""
        return _per_block_context_dims(self.context_dim, self.depth)

    @classmethod
    def from_seed_args(cls, **kwargs) -> SpatialTransformerConfig:
        """The config of the seed's `SpatialTransformer(**kwargs)`: its keyword names (n_heads, d_head) accepted."""
        return cls(**{SEED_NAMES.get(k, k): v for k, v in kwargs.items()})

    def seed_args(self) -> dict:
        """The seed's `SpatialTransformer(**args)` of this config (its names; less flax_sgm's checkpoint_policy)."""
        names = {v: k for k, v in SEED_NAMES.items()}
        return {names.get(k, k): v for k, v in self.to_dict().items() if k != "checkpoint_policy"}

    @classmethod
    def unknown_keys_hint(cls, unknown: list[str]) -> str:
        return "".join(f"; {k} is the seed's name for {SEED_NAMES[k]}" for k in unknown if k in SEED_NAMES)

    @classmethod
    def from_weights(
        cls,
        shapes: Mapping[str, Any],
        prefix: str = "",
        *,
        heads: int | None = None,
        head_dim: int | None = None,
        disable_self_attn: bool | None = None,
        **options,
    ) -> SpatialTransformerConfig:
        """The config of the stack at `prefix` of a checkpoint, read off its shapes (anything with `.shape`, by key).

        The shapes show every architecture argument except how the inner dim splits
        into heads: give `heads` or `head_dim`. `disable_self_attn=True` forces what the
        shapes cannot show (layout.read_stack). `options` sets the other fields
        (use_checkpoint, sdp_backend, ...). A CheckpointError says what does not fit.
        """
        stack = layout.read_stack(shapes, prefix, disable_self_attn=disable_self_attn)
        heads, head_dim = layout.resolve_heads(stack.inner_dim, heads, head_dim, prefix)
        return cls(
            in_channels=stack.in_channels,
            heads=heads,
            head_dim=head_dim,
            depth=stack.depth,
            context_dim=stack.context_dim,
            disable_self_attn=stack.disable_self_attn,
            use_linear=stack.use_linear,
            **options,
        )


def _is_list_like(value) -> bool:
    """list, tuple, omegaconf.ListConfig: what the seed accepts as a per-block list."""
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))) or type(value).__name__ == "ListConfig"


def _per_block_context_dims(context_dim, depth: int) -> tuple[int | None, ...]:
    """The seed's rule: one value, or a list of `depth` (a list of another length is stretched if homogeneous)."""
    if context_dim is None:
        return (None,) * depth
    dims = tuple(context_dim) if isinstance(context_dim, tuple) else (context_dim,)
    if len(dims) != depth and (not dims or any(d != dims[0] for d in dims)):
        raise ValueError(
            f"SpatialTransformer: `context_dim` {list(dims)} has {len(dims)} entries for depth {depth}; "
            "a list of another length must be homogeneous and not empty"
        )
    return dims if len(dims) == depth else depth * dims[:1]


class Preset(NamedTuple):
    """A named config with the input sizes it is run at: x [batch, *hw, in_channels], context [batch, context_tokens, .]."""

    config: SpatialTransformerConfig
    batch: int
    hw: tuple[int, int]
    context_tokens: int


# The sizes the GPU tables and `flax-sgm lower` use (BENCHMARKS.md).
PRESETS = {
    # SDXL's first transformer level (input_blocks.4.1): 2 x 4096 tokens, context 77 x 2048.
    "sdxl": Preset(SpatialTransformerConfig(640, 10, 64, depth=2, context_dim=2048, use_linear=True), 2, (64, 64), 77),
    # A long sequence: 1 x 16,384 tokens, context 226 x 4096.
    "long": Preset(SpatialTransformerConfig(640, 10, 64, depth=1, context_dim=4096, use_linear=True), 1, (128, 128), 226),
    # SD 1.5's first level: 320 ch, 8 x 40 heads, 32 x 32 latent, context 77 x 768, conv projections.
    "sd15": Preset(SpatialTransformerConfig(320, 8, 40, depth=1, context_dim=768), 2, (32, 32), 77),
    # Tiny: tests and quick runs.
    "default": Preset(SpatialTransformerConfig(64, 2, 32, depth=1, context_dim=48, use_linear=True), 2, (8, 8), 77),
}
