"""Where every tolerance is set: what flax_sgm's errors are judged by, in `flax-sgm verify` and in the tests.

Errors are relative: max |got - reference| / max |reference| per tensor (the output,
the gradient of each input and of each parameter). The reference is a float64 run
of torch's module on the same weights (the referee), and flax_sgm is judged against
torch's own error in the run dtype, not against torch's numbers:

    a tensor passes when  flax_error <= max(slack * torch_error, floor)

so an input on which float32 itself is ill-conditioned (torch off the float64 result
too) does not fail flax_sgm, while a wrong weight, which torch does not have, does.
This module imports neither torch nor jax (numpy only).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from typing import NamedTuple


class Criterion(NamedTuple):
    slack: float  # flax_sgm's error may be this many times torch's own
    forward: float  # floor: an output error up to this passes whatever torch's
    grad: float  # floor: a gradient error up to this passes whatever torch's
    median: float = math.inf  # the median flax / torch ratio over a comparison's tensors, at most this


CRITERIA = {
    # fp32: floors at the old fp32 tolerances (measured errors are 10-100x below, docs/verification.md
    # parity table); above them flax_sgm may be up to 4x torch's own error from float64.
    "float32": Criterion(slack=4.0, forward=1e-5, grad=1e-4),
    # bf16: no floor. Two correct bf16 implementations scatter: measured on CPU (4 seeds,
    # BasicTransformerBlock and a depth-2 SpatialTransformer) the worst tensor was 2.1x in
    # torch's favour and 4.4x in flax_sgm's, the median ratio 0.82 to 1.00. So: no tensor
    # beyond 2.5x, and a median, which a systematic loss moves, of at most 1.1.
    "bfloat16": Criterion(slack=2.5, forward=0.0, grad=0.0, median=1.1),
}

# A gradient whose reference values all lie below this fraction of the largest
# gradient of the comparison is zero as far as fp32 can tell (q and k of an attention
# over a single key, a key bias that shifts a whole softmax row): its error is
# measured on the largest gradient's scale instead of its own.
NEGLIGIBLE_GRAD = 1e-5

# The same float32 arithmetic summed in another order (the chunked against the XLA
# attention, remat against none, torch_ref's SDPA against the seed's written-out
# softmax, one batch item against the batch): relative to the largest magnitude.
REORDERED = 2e-6
# The same for derivatives, whose parameter gradients sum over batch and tokens: measured
# up to 2.8e-6 (a SpatialTransformer's chunked-attention gradients against XLA's).
REORDERED_GRAD = 1e-5
# The same, in float64 (jax_enable_x64): what float64 statistics keep.
REORDERED_FLOAT64 = 1e-12

# A whole float32 sampling pipeline against diffusers' from the same initial latents (text encoders, every
# UNet call of the loop, the sampler's steps, the decoder): final latents and images, relative to the largest
# magnitude (issue 33's bound).
PIPELINE = 1e-4

# A bf16 run's largest error against float64 lies in this range: above it, bf16 really
# ran; below the top, it is not broken.
BF16_ERROR_RANGE = (1e-4, 0.1)


def criterion(dtype: str) -> Criterion:
    if dtype not in CRITERIA:
        raise ValueError(f"no parity criterion for dtype {dtype!r}; known: {list(CRITERIA)}")
    return CRITERIA[dtype]


def ratio(flax_error: float, torch_error: float) -> float:
    """flax_error / torch_error; 0 when both are 0, inf when only torch's is."""
    if flax_error == 0.0:
        return 0.0
    return flax_error / torch_error if torch_error > 0.0 else math.inf


def allowed(kind: str, torch_error: float, dtype: str) -> float:
    """The largest flax_sgm error that passes for a tensor of `kind` ("forward" or "grad")."""
    c = criterion(dtype)
    return max(c.slack * torch_error, c.forward if kind == "forward" else c.grad)


def tensor_kind(name: str) -> str:
    """'out' is the forward output; every other tensor of a comparison is a gradient."""
    return "forward" if name == "out" else "grad"


def problems(errors: dict[str, tuple[float, float]], dtype: str, *, median: bool = True) -> list[str]:
    """What fails in {tensor: (flax_sgm's error, torch's error)}; empty when everything passes.

    `median`: also judge the median ratio (meaningful over a whole comparison, not a few tensors).
    """
    c = criterion(dtype)
    found = []
    for name, (f, t) in errors.items():
        limit = allowed(tensor_kind(name), t, dtype)
        if not f <= limit:  # NaN fails too
            found.append(f"{name}: error {f:.3g} > {limit:.3g} (torch's {t:.3g}, {ratio(f, t):.2f}x)")
    if median and math.isfinite(c.median) and errors:
        m = statistics.median(ratio(f, t) for f, t in errors.values())
        if m > c.median:
            found.append(f"median ratio {m:.2f} > {c.median}")
    return found


def rel_err(actual, expected, scale: float | None = None) -> float:
    """max |actual - expected| / scale (default max |expected|); the absolute difference where the scale is 0."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {list(actual.shape)} against {list(expected.shape)}")
    if actual.size == 0:
        return 0.0
    diff = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max()) if scale is None else scale
    return diff / scale if scale > 0 else diff

# A sampler's final latents against diffusers' scheduler stepped by hand on the same model
# outputs, both float32: the tables agree to the last bits or nearly, the steps differ in
# the order of float32 operations.
SAMPLER = 1e-5
