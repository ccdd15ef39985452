"""Input validation that fails before XLA does, naming module, argument and shapes."""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


# What each axis is, by rank: tokens [b, n, features], images channels-last [b, h, w, c].
AXIS_NAMES = {3: ("batch", "tokens", "features"), 4: ("batch", "height", "width", "channels")}


def expect_array(module: str, arg: str, x) -> None:
    """A torch tensor is refused in one line (JAX would fail deep inside on its dtype)."""
    if type(x).__module__.startswith("torch"):
        raise ValueError(
            f"{module}: `{arg}` is a {type(x).__module__}.{type(x).__name__}; pass a numpy or JAX array "
            "(t.numpy(); a torch NCHW image is t.permute(0, 2, 3, 1).numpy() here, channels-last)"
        )


def expect_numbers(module: str, arg: str, x):
    """`x` as an array of integers or floats (a list or scalar converted); anything else (a string, None, an
    object, complex or bool array) refused in one line, before JAX's own message."""
    expect_array(module, arg, x)
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError):
            raise ValueError(f"{module}: `{arg}` must be an array of numbers; got {type(x).__name__}") from None
    if not (jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)):  # bfloat16 too
        got = f"{x.item()!r}" if isinstance(x, np.ndarray) and x.dtype.kind in "OUS" and x.ndim == 0 else f"dtype {x.dtype}"
        raise ValueError(f"{module}: `{arg}` must be integers or floats; got {got}")
    return x


def expect_shape(module: str, arg: str, x, expected: Sequence[int | str | None]) -> None:
    """Check `x.shape` against `expected`: ints must match, names and None match anything.

    The names only document the axes in the message, e.g. ("b", "n", 64); a mismatch
    says which axis differs ("batch 1, expected 2").
    """
    expect_array(module, arg, x)
    shape = tuple(np.shape(x))
    pattern = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    if len(shape) != len(expected):
        raise ValueError(f"{module}: `{arg}` must have rank {len(expected)}, shape {pattern}; got shape {list(shape)}")
    names = AXIS_NAMES.get(len(shape), tuple(f"axis {i}" for i in range(len(shape))))
    wrong = [f"{name} {got}, expected {want}" for name, got, want in zip(names, shape, expected)
             if isinstance(want, int) and got != want]
    if wrong:
        raise ValueError(f"{module}: `{arg}` must have shape {pattern}; got shape {list(shape)} ({'; '.join(wrong)})")


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
