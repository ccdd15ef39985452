"""Input validation that fails before XLA does, naming module, argument and shapes."""

from collections.abc import Sequence

import numpy as np


def expect_shape(module: str, arg: str, x, expected: Sequence[int | str | None]) -> None:
    """Check `x.shape` against `expected`: ints must match, names and None match anything.

    The names only document the axes in the message, e.g. ("b", "n", 64).
    """
    shape = tuple(np.shape(x))
    pattern = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    if len(shape) != len(expected):
        raise ValueError(f"{module}: `{arg}` must have rank {len(expected)}, shape {pattern}; got shape {list(shape)}")
    for got, want in zip(shape, expected):
        if isinstance(want, int) and got != want:
            raise ValueError(f"{module}: `{arg}` must have shape {pattern}; got shape {list(shape)}")


def expect_equal(module: str, what: str, got, want) -> None:
    if got != want:
        raise ValueError(f"{module}: {what} must be {want}; got {got}")


def expect_broadcastable(module: str, arg: str, shape: Sequence[int], target: Sequence[int], target_desc: str) -> None:
    """Check that `shape` broadcasts to `target` by numpy (and torch SDPA) rules."""
    shape, target = tuple(shape), tuple(target)
    ok = len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(
            f"{module}: `{arg}` of shape {list(shape)} does not broadcast to {target_desc} {list(target)}"
        )
