"""LoRA adapters on the project's Linear and Conv layers, kept apart from the base weights.

An adapted layer holds `layer.adapters` (nnx.Dict, adapter name -> Adapter); primitives.adapted adds each
adapter's output to the layer's. An Adapter is peft's LoRA layer: y += multiplier * up(down(x)), multiplier =
scale * alpha / rank (rsLoRA: alpha / sqrt(rank)); on a Conv, down is a convolution with the layer's kernel
size, strides and padding and up a 1x1 one, as peft's and kohya's conv LoRA. Its weights are LoRAParam, a
Variable that is not an nnx.Param: the conversion table, load_unet and to_torch_state_dict never see them, and
`nnx.Optimizer(model, tx, wrt=LoRAParam)` / `nnx.DiffState(0, LoRAParam)` train the adapters alone.

Kernel layouts are the project's: a Linear's down [in, r] and up [r, out]; a Conv's down [kh, kw, in, r]
(HWIO) and up [r, out] (a 1x1 conv's kernel as a matrix).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.nn.primitives import Conv, Linear


class LoRAParam(nnx.Variable):
    """A LoRA adapter's weight: trainable with `wrt=LoRAParam`, invisible to the base model's Param filters."""


class LoRAScale(nnx.Variable):
    """An adapter's weight (diffusers' adapter weight): state, not structure, so setting another (set_lora_scale)
    reuses every compiled program; neither a Param nor a LoRAParam, so nothing trains or converts it."""


class Adapter(nnx.Module):
    """One LoRA on one layer: `down` [in, r] or [kh, kw, in, r], `up` [r, out]; output scale*alpha/rank*up(down(x))."""

    def __init__(self, down, up, *, alpha: float, scale: float = 1.0, rslora: bool = False):
        self.down, self.up = LoRAParam(jnp.asarray(down)), LoRAParam(jnp.asarray(up))
        self.scale = LoRAScale(jnp.asarray(scale, jnp.float32))
        self.alpha, self.rslora = float(alpha), bool(rslora)

    @property
    def rank(self) -> int:
        return int(self.up.shape[0])

    @property
    def scaling(self) -> float:
        """peft's `scaling`: alpha / rank (rsLoRA: alpha / sqrt(rank))."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def multiplier(self) -> float:
        """What up(down(x)) is multiplied by: peft's `scaling` times the adapter weight (a concrete number)."""
        return float(self.scale[...]) * self.scaling

    def __call__(self, layer: nnx.Module, x: jax.Array) -> jax.Array:
        down, up = self.down[...], self.up[...]
        x, down, up = layer.promote_dtype((x, down, up), dtype=layer.dtype)
        if down.ndim == 4:  # [kh, kw, in, r]: the layer's convolution into r channels
            h = jax.lax.conv_general_dilated(x, down, layer.strides, layer.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=layer.precision)
        else:
            h = x @ down
        return (h @ up) * (self.scale[...] * self.scaling).astype(h.dtype)

    def delta(self) -> np.ndarray:
        """multiplier * up(down) as a change of the layer's kernel ([in, out] or [kh, kw, in, out]), float64."""
        down, up = np.asarray(self.down[...], np.float64), np.asarray(self.up[...], np.float64)
        return self.multiplier * np.einsum("...ir,ro->...io", down, up)


def layers(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
    """(path, layer) of every Linear and Conv of `model`: the layers a LoRA can adapt."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Linear, Conv)):
            yield tuple(path), node


def adapters_of(model: nnx.Module) -> dict[str, list[tuple[tuple, Adapter]]]:
    """Every unfused adapter of `model` by name: [(layer path, adapter)]."""
    found: dict[str, list] = {}
    for path, layer in layers(model):
        for name, adapter in getattr(layer, "adapters", {}).items():
            found.setdefault(name, []).append((path, adapter))
    return found


def attach(layer: nnx.Module, name: str, adapter: Adapter) -> None:
    if not hasattr(layer, "adapters"):
        layer.adapters = nnx.Dict()
    layer.adapters[name] = adapter


def fuse(layer: nnx.Module, adapter: Adapter) -> None:
    """Add the adapter into the layer's kernel (float64 sum, rounded once to the kernel's dtype)."""
    kernel = layer.kernel[...]
    delta = adapter.delta()
    if kernel.ndim == 4 and delta.ndim == 2:  # a LoRA of a Linear's shape on a 1x1 conv
        delta = delta[None, None]
    layer.kernel[...] = jnp.asarray((np.asarray(kernel, np.float64) + delta).astype(kernel.dtype))


def remove(model: nnx.Module, name: str | None = None) -> int:
    """Drop the unfused adapters called `name` (all when None); the base weights are as they were. Returns how
    many layers lost one."""
    count = 0
    for _, layer in layers(model):
        held = getattr(layer, "adapters", None)
        if held is None:
            continue
        for key in [k for k in held if name is None or k == name]:
            del held[key]
            count += 1
        if not len(held):
            del layer.adapters
    return count


def matches(name: str, targets: Sequence[str]) -> bool:
    """peft's target_modules rule: the module's name is a target or ends in '.' + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)
