"""`verify_modules`: a torch module against its flax_sgm twin, whole and submodule by submodule.

One torch run records each submodule's inputs, output and output cotangent (forward
hooks, a tensor hook on the output). Each flax submodule then runs on those inputs and
pulls back that cotangent by its own VJP (harness.compare on the pair), so a wrong
weight fails its own row only: not the rows after it in the forward, nor the rows
before it in the backward. The whole model is compared too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import torch
from flax import nnx

from flax_sgm.checkpoints import convert
from flax_sgm.verify import criteria, harness
from flax_sgm.verify.adapters import CallAdapter, adapter_for

# The submodules reported: attentions and feed-forwards whole (torch_ref, the seed,
# diffusers' `Attention`), and the layers outside them.
PART_CLASSES = ("CrossAttention", "MemoryEfficientCrossAttention", "Attention", "FeedForward")
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)


@dataclasses.dataclass(frozen=True)
class Row:
    """One submodule: its name in the torch module ("" the whole model), errors against the reference."""

    name: str
    forward: tuple[float, float]  # (flax_sgm's, torch's) relative error of the output
    grad: tuple[float, float]  # the same for the gradient that used most of its allowance
    grad_tensor: str  # which: "input:x", or a parameter name relative to the submodule
    backend: str | None  # the attention backend flax_sgm ran (recorded by the attention function)
    flax_dtype: str
    problems: tuple[str, ...]
    errors: dict[str, tuple[float, float]]  # every tensor: "out", "input:<name>", parameter names

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"passed": self.passed}


@dataclasses.dataclass(frozen=True)
class Report:
    model: Row  # the whole model
    rows: tuple[Row, ...]  # the submodules, in the order torch called them
    dtype: str
    reference: str
    platform: str
    seed: int
    inputs: dict[str, list]  # shapes, torch layout

    @property
    def passed(self) -> bool:
        return self.model.passed and all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "reference": self.reference,
            "platform": self.platform,
            "seed": self.seed,
            "criterion": criteria.criterion(self.dtype)._asdict(),
            "inputs": self.inputs,
            "model": self.model.to_dict(),
            "submodules": [r.to_dict() for r in self.rows],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def format(self) -> str:
        """The table `flax-sgm verify` prints."""
        c = criteria.criterion(self.dtype)
        lines = [
            f"relative error against {self.reference} ({self.dtype} on {self.platform}); flax_sgm | torch",
            f"{'submodule':32s} {'forward':>19s} {'gradient':>19s}  {'backend':8s} result",
        ]
        for row in (*self.rows, dataclasses.replace(self.model, name="whole model")):
            (ff, ft), (gf, gt) = row.forward, row.grad
            lines.append(
                f"{row.name:32s} {ff:9.2e} {ft:9.2e} {gf:9.2e} {gt:9.2e}  {row.backend or '-':8s} "
                f"{'ok' if row.passed else 'FAIL'}"
            )
        lines += ["", f"worst gradient of the whole model: {self.model.grad_tensor}"]
        lines += [f"{r.name or 'whole model'}: {p}" for r in (*self.rows, self.model) for p in r.problems]
        floors = f"floors {c.forward:g} forward, {c.grad:g} gradients"
        median = f", median ratio <= {c.median:g}" if c.median != float("inf") else ""
        lines += [
            f"criterion ({self.dtype}): error <= max({c.slack:g} x torch's, {floors}){median} "
            "(flax_sgm.verify.criteria)",
            "PASS" if self.passed else "FAIL",
        ]
        return "\n".join(lines)


def _row(name: str, comparison: harness.Comparison, *, median: bool) -> Row:
    grads = {k: e for k, e in comparison.errors.items() if k != "out"}

    def used(item):
        k, (f, t) = item
        return criteria.ratio(f, criteria.allowed("grad", t, comparison.dtype))

    grad_tensor, grad = max(grads.items(), key=used) if grads else ("-", (0.0, 0.0))
    return Row(
        name=name,
        forward=comparison.errors["out"],
        grad=grad,
        grad_tensor=grad_tensor,
        backend=", ".join(comparison.backends) or None,
        flax_dtype=comparison.flax_dtype,
        problems=tuple(comparison.problems(median=median)),
        errors=dict(comparison.errors),
    )


def submodule_names(torch_module: torch.nn.Module) -> list[str]:
    """The reported submodules: the outermost attentions, feed-forwards and layers holding parameters."""
    names = []

    def walk(module, prefix):
        for name, child in module.named_children():
            is_part = isinstance(child, LAYER_TYPES) or type(child).__name__ in PART_CLASSES
            if is_part and any(True for _ in child.parameters()):
                names.append(prefix + name)
            else:
                walk(child, f"{prefix}{name}.")

    walk(torch_module, "")
    return names


class _Call:
    """One recorded submodule call: inputs and output as given, then the output's cotangent."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs, self.cotangent = args, kwargs, None


@contextlib.contextmanager
def _recording(torch_module: torch.nn.Module, names: list[str]):
    """{name: _Call} of each named submodule's first call (a checkpointed block runs again in backward)."""
    calls: dict[str, _Call] = {}
    modules = dict(torch_module.named_modules())

    def detached(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, (list, tuple)):
            return type(v)(detached(e) for e in v)
        return v

    def hook_for(name):
        def hook(_, args, kwargs, output):
            output = output[0] if isinstance(output, (tuple, list)) and output else output  # (sample,) of diffusers
            if name in calls or not isinstance(output, torch.Tensor):
                return
            call = calls[name] = _Call(detached(args), {k: detached(v) for k, v in kwargs.items()})
            if output.requires_grad:
                output.register_hook(lambda g: setattr(call, "cotangent", g.detach().clone()))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def verify_modules(
    torch_module: torch.nn.Module,
    flax_module: nnx.Module,
    inputs: Mapping[str, Any],
    *,
    dtype: str = "float32",
    seed: int = 0,
    adapter: CallAdapter | None = None,
    reference: str = "float64",
) -> Report:
    """The parity report of `flax_module` against `torch_module` on `inputs`, whole and per submodule.

    `inputs`: flax_sgm argument names -> arrays in torch layout (`x` NCHW for image
    modules, `context`, `mask`, ...). torch_ref's, the seed's and diffusers'
    (Transformer2DModel, BasicTransformerBlock) modules are called by their own
    conventions; pass `adapter` for another. Both run in `dtype` ("float32",
    "bfloat16"; torch on a copy whose weights are rounded to it), judged against a
    float64 run of torch's module by flax_sgm.verify.criteria. `seed` draws the
    whole model's output cotangent. The torch module is left as it was.
    """
    criteria.criterion(dtype)
    adapter = adapter or adapter_for(torch_module)
    prepared = harness.prepare_inputs(inputs, dtype)
    whole = harness.compare(torch_module, flax_module, prepared, dtype=dtype, reference=reference, adapter=adapter, seed=seed)

    # A model whose layout renames modules (a diffusers UNet) is reported by those modules, under its own names.
    layout = adapter.key_layout(flax_module) if adapter.key_layout else None
    names = [theirs[:-1] for _, theirs in layout.modules] if layout and layout.modules else submodule_names(torch_module)
    low = harness.cast_module(copy.deepcopy(torch_module), "cpu", getattr(torch, dtype))
    with _recording(low, names) as calls:
        harness.run_torch(low, prepared, adapter, harness.seeded_cotangent(seed), getattr(torch, dtype), "cpu")
    rows = []
    for name, call in calls.items():  # in call order
        part = torch_module.get_submodule(name)
        part_adapter = adapter_for(part)
        if layout is not None:
            part_adapter = dataclasses.replace(part_adapter, key_layout=lambda _, sub=layout.part(name): sub)
        if call.cotangent is None:
            raise ValueError(f"verify_modules: no gradient reached {name}'s output in torch's backward pass")
        part_inputs = part_adapter.flax_names(part, call.args, call.kwargs)
        comparison = harness.compare(
            part,
            convert.flax_submodule(flax_module, layout.module_name(name) if layout is not None else name),
            part_inputs,
            dtype=dtype,
            reference=reference,
            adapter=part_adapter,
            cotangent=convert.to_numpy(call.cotangent.float()),
        )
        rows.append(_row(name, comparison, median=False))
    return Report(
        model=_row("", whole, median=True),
        rows=tuple(rows),
        dtype=dtype,
        reference=reference,
        platform=jax.default_backend(),
        seed=seed,
        inputs={k: _shape(v) for k, v in inputs.items()},
    )


def _shape(value):
    return [_shape(v) for v in value] if isinstance(value, list) else list(np.shape(value))
