"""Torch-vs-flax parity: the tolerances (set here, once) and the comparison harness.

`compare(...)` runs a torch module and its converted flax_sgm twin on the same
inputs and returns the relative error of the forward output, of the gradient of
every input and of every parameter (the flax gradient tree converted back to torch
names). Relative error is max |flax - torch| / max |torch|. Used by the parity
tests and by `flax-sgm verify`; needs torch (the `torch` extra).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from flax import nnx

from flax_sgm import convert


class Tolerance(NamedTuple):
    forward: float
    grad: float


# The one place tolerances are set. fp32 on CPU: max relative error of the forward
# output and of every gradient. Measured errors are far below (README parity table).
TOLERANCES = {
    "float32": Tolerance(forward=1e-5, grad=1e-4),
}


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    diff = np.abs(actual - expected).max()
    return float(diff / scale) if scale > 0 else float(diff)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (proj_out too, which the seed zeroes), in place.

    Weights ~ N(0, 1 / fan_in) so activations stay O(1); biases ~ N(0, 1/16);
    norm scales 1 + N(0, 0.01).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim > 1:  # Linear [out, in] or Conv2d [out, in, kh, kw]
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # LayerNorm / GroupNorm scale
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.25 * noise)
    return module


def flax_twin(torch_module: torch.nn.Module, flax_cls, *args, **kwargs):
    """The flax module of the same config, built abstractly and filled from torch's weights."""
    model = nnx.eval_shape(lambda: flax_cls(*args, rngs=nnx.Rngs(0), **kwargs))
    return convert.load_torch_state_dict(model, torch_module.state_dict())


def nchw_to_nhwc(a):
    # torch images are NCHW, flax_sgm's NHWC: the only transposes, at the boundary.
    return np.transpose(a, (0, 2, 3, 1))


def nhwc_to_nchw(a):
    return np.transpose(a, (0, 3, 1, 2))


class Result(NamedTuple):
    forward: float
    grads: dict[str, float]  # "input:<name>" and torch parameter names

    @property
    def max_grad(self) -> float:
        return max(self.grads.values(), default=0.0)


def compare(
    torch_module: torch.nn.Module,
    flax_module: nnx.Module,
    inputs: dict[str, np.ndarray],
    *,
    image_inputs: tuple[str, ...] = (),
    image_output: bool = False,
    static: dict[str, Any] | None = None,
    flax_static: dict[str, Any] | None = None,
    torch_call: Callable | None = None,
    zero_grads: tuple[str, ...] = (),
    seed: int = 0,
) -> Result:
    """Forward and gradients of torch_module(**inputs, **static) against flax_module's.

    Array inputs get gradients; `image_inputs` are NCHW for torch and NHWC for flax.
    `flax_static` overrides `static` for the flax call; `torch_call` replaces
    torch_module.__call__ (e.g. `_forward`). `zero_grads` names parameters whose
    gradient is zero analytically: for them the error is the larger of the two
    gradients relative to the largest gradient of the comparison.
    """
    static = static or {}
    flax_static = static if flax_static is None else flax_static
    torch_call = torch_call or torch_module

    def as_tensor(v):
        return [as_tensor(e) for e in v] if isinstance(v, list) else torch.tensor(v, requires_grad=v.dtype.kind == "f")

    t_inputs = {k: as_tensor(v) for k, v in inputs.items()}
    t_out = torch_call(**t_inputs, **static)
    # Its own stream: a cotangent equal to a (seed-0) input makes some gradients vanish.
    cot = np.random.default_rng([seed, 0xC07]).standard_normal(t_out.shape).astype(np.float32)
    (t_out * torch.from_numpy(cot)).sum().backward()
    t_out = t_out.detach().numpy()
    t_grads = {f"input:{k}": t.grad.numpy() for k, t in _flat_inputs(t_inputs).items() if t.grad is not None}
    t_grads |= {k: p.grad.numpy() for k, p in torch_module.named_parameters() if p.grad is not None}

    to_flax = {k: nchw_to_nhwc(v) if k in image_inputs else v for k, v in inputs.items()}
    f_cot = nchw_to_nhwc(cot) if image_output else cot
    is_float = lambda v: isinstance(v, list) or v.dtype.kind == "f"  # noqa: E731
    diff_inputs = {k: v for k, v in to_flax.items() if is_float(v)}
    const_inputs = {k: v for k, v in to_flax.items() if not is_float(v)}

    def loss(model, xs):
        out = model(**xs, **const_inputs, **flax_static)
        return (out * f_cot).sum(), out

    (_, f_out), (p_grads, x_grads) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(flax_module, diff_inputs)
    f_out = np.asarray(f_out)
    f_out = nhwc_to_nchw(f_out) if image_output else f_out
    f_grads = {f"input:{k}": np.asarray(g) for k, g in _flat_inputs(x_grads).items()}
    f_grads = {k: nhwc_to_nchw(g) if k.removeprefix("input:") in image_inputs else g for k, g in f_grads.items()}
    f_grads |= convert.to_torch_state_dict(flax_module, nnx.state(p_grads, nnx.Param) if hasattr(p_grads, "keys") else p_grads)

    assert f_out.shape == t_out.shape, (f_out.shape, t_out.shape)
    largest = max(np.abs(g).max() for g in t_grads.values())
    grads = {}
    for k, g in t_grads.items():
        assert k in f_grads, f"no flax gradient for {k}"
        assert f_grads[k].shape == g.shape, (k, f_grads[k].shape, g.shape)
        if k in zero_grads:
            # Zero analytically: both must be rounding noise next to the largest gradient.
            grads[k] = max(np.abs(f_grads[k]).max(), np.abs(g).max()) / largest
        else:
            grads[k] = rel_err(f_grads[k], g)
    return Result(rel_err(f_out, t_out), grads)


def _flat_inputs(inputs: dict) -> dict:
    """{"context": [a, b]} -> {"context.0": a, "context.1": b}; arrays pass through."""
    flat = {}
    for k, v in inputs.items():
        flat |= {f"{k}.{i}": e for i, e in enumerate(v)} if isinstance(v, list) else {k: v}
    return flat
