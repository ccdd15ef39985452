"""The one harness: a torch module and its flax_sgm twin on the same inputs, forward and gradients.

`compare` runs torch in the run dtype, flax_sgm in its own, and a reference, and
returns per tensor (the output, the gradient of each input and of each parameter
under torch's name) both frameworks' relative errors against the reference:
  "float64"  torch's module in float64 on the same (dtype-rounded) weights and inputs;
  "torch"    torch's own run in the run dtype (then torch's error is 0).
criteria.problems judges the result. Both sides pull back the same cotangent.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_sgm.checkpoints import convert
from flax_sgm.attention.backends import record_attention_calls
from flax_sgm.verify import criteria
from flax_sgm.verify.adapters import CallAdapter, adapter_for
from flax_sgm.verify.criteria import rel_err

REFERENCES = ("float64", "torch")
# Inputs that never get a gradient although they may be float: an additive mask is a constant.
CONSTANT_INPUTS = ("mask",)


class Comparison(NamedTuple):
    errors: dict[str, tuple[float, float]]  # tensor -> (flax_sgm's, torch's) relative error against the reference
    dtype: str  # the run dtype
    reference: str
    flax_dtype: str  # the dtype flax_sgm's output came in
    backends: tuple[str, ...]  # the attention backends flax_sgm ran, as recorded by the attention function

    @property
    def forward(self) -> float:
        return self.errors["out"][0]

    @property
    def max_grad(self) -> float:
        return max((f for k, (f, _) in self.errors.items() if k != "out"), default=0.0)

    def problems(self, *, median: bool = True) -> list[str]:
        found = criteria.problems(self.errors, self.dtype, median=median)
        if self.flax_dtype != self.dtype:
            found.append(f"flax_sgm computed in {self.flax_dtype}, not {self.dtype}")
        return found

    @property
    def passed(self) -> bool:
        return not self.problems()


def nchw_to_nhwc(a):
    # torch images are NCHW, flax_sgm's NHWC: the only transposes, at the boundary.
    return np.transpose(a, (0, 2, 3, 1))


def nhwc_to_nchw(a):
    return np.transpose(a, (0, 3, 1, 2))


class Run(NamedTuple):
    out: np.ndarray  # float64, torch layout
    grads: dict[str, np.ndarray]  # "input:<name>" and torch parameter names


def _is_differentiable(name: str, value) -> bool:
    if isinstance(value, list):
        return True
    return name not in CONSTANT_INPUTS and isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _flat(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """{"context": [a, b]} -> {"context.0": a, "context.1": b}; others pass through."""
    flat = {}
    for k, v in inputs.items():
        flat |= {f"{k}.{i}": e for i, e in enumerate(v)} if isinstance(v, list) else {k: v}
    return flat


def run_torch(module, inputs, adapter: CallAdapter, cotangent, dtype: torch.dtype, device: str) -> tuple[Run, np.ndarray]:
    """torch's output and gradients; `cotangent` is an array or a function of the output's shape."""

    def tensor(name, v):
        if isinstance(v, list):
            return [tensor(name, e) for e in v]
        if not isinstance(v, np.ndarray):
            return v
        t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        if _is_differentiable(name, v):
            return t.to(dtype).requires_grad_()
        return t.to(dtype) if v.dtype.kind == "f" else t

    ts = {k: tensor(k, v) for k, v in inputs.items()}
    out = adapter.call_torch(module, ts["x"], {k: v for k, v in ts.items() if k != "x"})
    if callable(cotangent):
        cotangent = cotangent(tuple(out.shape))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    (out.to(acc) * torch.from_numpy(cotangent).to(device, acc)).sum().backward()
    grads = {f"input:{k}": t.grad for k, t in _flat(ts).items() if isinstance(t, torch.Tensor) and t.grad is not None}
    grads |= {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
    as_f64 = {k: g.detach().cpu().to(torch.float64).numpy() for k, g in grads.items()}
    return Run(out.detach().cpu().to(torch.float64).numpy(), as_f64), cotangent


def _run_flax(module, inputs, cotangent, dtype, layout=None, adapter: CallAdapter | None = None) -> tuple[Run, str, tuple[str, ...]]:
    """flax_sgm's output and gradients (torch layout and names), its output dtype, the attention backends it ran."""
    image = np.ndim(inputs["x"]) == 4

    def array(name, v):
        if isinstance(v, list):
            return [array(name, e) for e in v]
        if not isinstance(v, np.ndarray):
            return v
        if name == "x" and image:
            v = nchw_to_nhwc(v)
        return jnp.asarray(v, dtype) if _is_differentiable(name, v) else jnp.asarray(v)

    xs = {k: array(k, v) for k, v in inputs.items()}
    diff = {k: v for k, v in xs.items() if _is_differentiable(k, inputs[k])}
    const = {k: v for k, v in xs.items() if k not in diff}
    f_cot = jnp.asarray(nchw_to_nhwc(cotangent) if image else cotangent, jnp.float32)

    def loss(model, diff):
        args = diff | const
        x = args.pop("x")
        out = adapter.call_flax(model, x, args) if adapter is not None else model(x, **args)
        return (out.astype(jnp.float32) * f_cot).sum(), out

    with record_attention_calls() as calls:
        (_, out), (p_grads, x_grads) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(module, diff)
    out_dtype = jnp.dtype(out.dtype).name
    out = np.asarray(out.astype(jnp.float32), np.float64)
    grads = {f"input:{k}": np.asarray(g.astype(jnp.float32), np.float64) for k, g in _flat(x_grads).items()}
    if image:
        out, grads["input:x"] = nhwc_to_nchw(out), nhwc_to_nchw(grads["input:x"])
    p_grads = nnx.state(p_grads, nnx.Param)
    named = convert.to_torch_state_dict(module, p_grads, layout=layout)
    grads |= {k: np.asarray(v, np.float32).astype(np.float64) for k, v in named.items()}
    backends = tuple(dict.fromkeys(c.backend for c in calls))
    return Run(out, grads), out_dtype, backends


def cast_module(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    # torch.nn.Module.to itself: diffusers' override warns on every cast.
    return torch.nn.Module.to(module, device, dtype)


def seeded_cotangent(seed: int):
    """A standard-normal cotangent of a given shape, from its own stream (one equal to an input makes gradients vanish)."""
    return lambda shape: np.random.default_rng([seed, 0xC07]).standard_normal(shape).astype(np.float32)


def prepare_inputs(inputs: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """Arrays and tensors as numpy, float ones as float32 holding values of `dtype` (what every run starts from)."""
    return _rounded(_as_float32(inputs), dtype)


def _as_float32(inputs):
    def one(v):
        if isinstance(v, list):
            return [one(e) for e in v]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = (v.float() if v.is_floating_point() else v).numpy()
        if isinstance(v, np.ndarray) and jnp.issubdtype(v.dtype, jnp.floating):
            return v.astype(np.float32)  # bfloat16 too (ml_dtypes)
        return v

    return {k: one(v) for k, v in inputs.items()}


def _rounded(inputs, dtype):
    """Float inputs rounded to the run dtype (exact in float32): all three runs start from the same values."""
    t_dtype = getattr(torch, dtype)

    def one(v):
        if isinstance(v, list):
            return [one(e) for e in v]
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            return torch.from_numpy(v).to(t_dtype).float().numpy()
        return v

    return {k: one(v) for k, v in inputs.items()}


def compare(
    torch_module: torch.nn.Module,
    flax_module: nnx.Module,
    inputs: Mapping[str, Any],
    *,
    dtype: str = "float32",
    reference: str = "float64",
    adapter: CallAdapter | None = None,
    cotangent: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Comparison:
    """Forward and gradients of `torch_module` and `flax_module` on `inputs`, against `reference`.

    `inputs`: flax_sgm argument names -> arrays in torch layout (`x` first; NCHW when of
    rank 4), lists of arrays, or constants (bool masks, ints). Float arrays other than
    `mask` get gradients. torch runs in `dtype` on `device` (a copy: the module is left
    as it was); flax_sgm runs as built. `cotangent` (torch layout) is pulled back by both;
    default: seeded by `seed`. `adapter`: torch's call convention (default: adapter_for).
    """
    criteria.criterion(dtype)
    if reference not in REFERENCES:
        raise ValueError(f"compare: `reference` must be one of {REFERENCES}; got {reference!r}")
    if reference == "torch" and dtype != "float32":
        raise ValueError(f"compare: {dtype} is judged against float64 (reference='float64'), not against torch")
    if "x" not in inputs:
        raise ValueError(f"compare: `inputs` must hold `x`, the first argument; got {sorted(inputs)}")
    adapter = adapter or adapter_for(torch_module)
    inputs = prepare_inputs(inputs, dtype)
    cotangent = seeded_cotangent(seed) if cotangent is None else np.asarray(cotangent, np.float32)

    layout = adapter.key_layout(flax_module) if adapter.key_layout else None
    low = cast_module(copy.deepcopy(torch_module), device, getattr(torch, dtype))
    torch_run, cotangent = run_torch(low, inputs, adapter, cotangent, getattr(torch, dtype), device)
    if reference == "float64":
        ref = _referee(low, flax_module, layout)
        expected, _ = run_torch(ref, inputs, adapter, cotangent, torch.float64, "cpu")
    else:
        expected = torch_run
    with jax.default_matmul_precision("highest"):
        flax_run, flax_dtype, backends = _run_flax(flax_module, inputs, cotangent, jnp.dtype(dtype), layout, adapter)
    return Comparison(_errors(flax_run, torch_run, expected), dtype, reference, flax_dtype, backends)


def _referee(low: torch.nn.Module, flax_module: nnx.Module, layout=None) -> torch.nn.Module:
    """torch's module in float64 on the weights torch's run holds (rounded to the run dtype), except where
    flax_sgm keeps a parameter wider (float32 parameters, bfloat16 compute) that rounds to the same value:
    there, the value flax_sgm holds. Judged against the rounded one instead, flax_sgm's float32 norm
    scales, which it applies in float32 as torch applies its own, counted their rounding as error (2.5x
    torch's on a LayerNorm's output, bench/bf16_pass_rate.py). A weight that does not round to torch's
    is not taken: it is judged against torch's, and fails."""
    ref = cast_module(copy.deepcopy(low), "cpu", torch.float64)
    run_dtype = next(low.parameters()).dtype if any(True for _ in low.parameters()) else torch.float32
    names = dict(low.named_parameters())
    held = {k: v for k, v in convert.to_torch_state_dict(flax_module, layout=layout).items() if k in names}
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name not in held:
                continue
            value = torch.from_numpy(np.asarray(held[name], np.float64))
            if value.shape == param.shape and torch.equal(value.to(run_dtype), names[name].detach().cpu()):
                param.copy_(value)
    return ref


def _errors(flax_run: Run, torch_run: Run, expected: Run) -> dict[str, tuple[float, float]]:
    """Per tensor of `expected`: (flax's, torch's) relative error. Negligible gradients: criteria.NEGLIGIBLE_GRAD."""
    missing = sorted(set(expected.grads) - set(flax_run.grads))
    if missing:
        raise ValueError(f"compare: flax_sgm has no gradient for {missing}")
    if flax_run.out.shape != expected.out.shape:
        raise ValueError(f"compare: flax_sgm's output has shape {list(flax_run.out.shape)}, torch's {list(expected.out.shape)}")
    errors = {"out": (rel_err(flax_run.out, expected.out), rel_err(torch_run.out, expected.out))}
    largest = max((float(np.abs(g).max()) for g in expected.grads.values() if g.size), default=0.0)
    for k, g in expected.grads.items():
        own = float(np.abs(g).max()) if g.size else 0.0
        scale = own if own > criteria.NEGLIGIBLE_GRAD * largest else largest
        try:
            errors[k] = (rel_err(flax_run.grads[k], g, scale), rel_err(torch_run.grads[k], g, scale))
        except ValueError as err:
            raise ValueError(f"compare: gradient of {k}: {err}") from None
    return errors
