"""`add_adapters`: fresh LoRA adapters to train, on the layers diffusers' module names pick (peft's target_modules).

Initialised as peft's LoRA layers are: down uniform in +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5)), up
zero, so the adapted model starts equal to the base. Only the adapters are LoRAParam: train them with
`nnx.Optimizer(model, optax_tx, wrt=LoRAParam)` and `nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flax import nnx

from flax_sgm.lora import adapters as lora_adapters
from flax_sgm.lora.adapters import Adapter
from flax_sgm.lora.layout import diffusers_name_of
from flax_sgm.lora.load import _at

# peft's common UNet targets: every attention projection.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def add_adapters(model: nnx.Module, *, rank: int, alpha: float | None = None, targets: Sequence[str] = ATTENTION,
                 name: str = "default", seed: int = 0) -> list[str]:
    """Add a trainable LoRA of `rank` (multiplier alpha / rank; alpha defaults to rank) to every Linear and
    Conv of `model` whose diffusers module name is a target or ends in '.' + a target. Returns the names of
    the adapted modules (diffusers'); ValueError when none matches or `name` is taken."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"add_adapters: rank must be a positive int; got {rank!r}")
    if isinstance(targets, str):
        raise ValueError(f"add_adapters: targets must be a list of module names; got the string {targets!r}")
    if name in lora_adapters.adapters_of(model):
        raise ValueError(f"add_adapters: an adapter named {name!r} is on the model already")
    alpha = float(rank if alpha is None else alpha)
    chosen = sorted((n, p) for p, n in diffusers_name_of(model).items() if lora_adapters.matches(n, targets))
    if not chosen:
        raise ValueError(f"add_adapters: no Linear or Conv of the {type(model).__name__} is named {list(targets)} "
                         "(diffusers' module names, e.g. to_q, to_out.0, proj_in, ff.net.2, conv1)")
    rng = np.random.default_rng(seed)
    for module, path in chosen:
        layer = _at(model, path)
        kernel = layer.kernel[...]
        *window, fan_in, out = kernel.shape
        if window == [1, 1]:  # a 1x1 conv: its LoRA is a matrix pair
            window = []
        fan = fan_in * math.prod(window)
        bound = 1.0 / math.sqrt(fan)
        down = rng.uniform(-bound, bound, (*window, fan_in, rank)).astype(kernel.dtype)
        up = np.zeros((rank, out), kernel.dtype)
        lora_adapters.attach(layer, name, Adapter(down, up, alpha=alpha))
    return [module for module, _ in chosen]
