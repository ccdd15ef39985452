"""What every command shares: exit statuses, one-line errors, JSON output, the stack and variant options."""

from __future__ import annotations

import functools
import json
import math
import re

import click

from flax_sgm.errors import CheckpointError, ConversionError


# Exit statuses.
PARITY_FAILED = 1
LOWERING_FAILED = 1  # `lower`: the program does not lower for the platform
BAD_INPUT = 2  # the user's input: a file, an argument, a checkpoint that does not fit
UNEXPECTED = 3  # anything else: flax-sgm's bug or the environment's, its traceback with --debug


class UserError(click.ClickException):
    """One line on stderr, exit status 2; the traceback only with --debug."""

    exit_code = BAD_INPUT


class UnexpectedError(click.ClickException):
    """One line on stderr, exit status 3: not the input's fault; the traceback only with --debug."""

    exit_code = UNEXPECTED


def finite(value):
    """`value` with every non-finite float as None: JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(value) -> str:
    """Strict JSON (no Infinity, no NaN), as every --json prints it."""
    return json.dumps(finite(value), indent=2, allow_nan=False)


def debug_option(f):
    return click.option("--debug", is_flag=True, help="Show the full traceback on an error.")(f)


def clean_errors(f):
    """Turn any exception into a one-line error unless --debug (here or before the command) is given: exit 2 for
    bad input (CheckpointError, ConversionError and the ValueErrors flax_sgm raises on arguments, unreadable
    files), 3 for anything else."""

    @functools.wraps(f)
    def wrapper(*args, debug: bool = False, **kwargs):
        debug = debug or click.get_current_context().find_root().params.get("debug", False)
        try:
            return f(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if debug:
                raise
            if isinstance(err, ConversionError):  # every key it lists is under --debug
                raise UserError(err.one_line() + " (--debug lists them all)") from None
            if isinstance(err, (CheckpointError, ValueError)):
                raise UserError(as_flags(str(err))) from None  # ours: already say what is wrong
            if isinstance(err, OSError):
                raise UserError(f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")) from None
            raise UnexpectedError(f"{type(err).__name__}: {err} (not the input's fault; run with --debug for the "
                                  "traceback)") from None

    return debug_option(wrapper)


# The library's argument names in its errors (`heads=8`), as the flags that set them here (`--heads 8`).
_ARGUMENT = re.compile(r"\b(heads|head_dim|variant|prefix|param_dtype|disable_self_attn)=([\w.'\"-]*)")


def as_flags(message: str) -> str:
    return _ARGUMENT.sub(lambda m: f"--{m[1].replace('_', '-')}" + (f" {m[2]}" if m[2] else ""), message)


def stack_options(f):
    """--prefix, --heads/--head-dim, --disable-self-attn."""
    f = click.option(
        "--disable-self-attn",
        is_flag=True,
        default=None,
        help="Force disable_self_attn (attn1 attends to the context). The weights show it only when the "
        "context width differs from the inner dim.",
    )(f)
    f = click.option("--head-dim", type=click.IntRange(min=1), help="Width of one head; the heads are inner dim / D.")(f)
    f = click.option("--heads", type=click.IntRange(min=1), help="Number of attention heads (must divide the inner dim).")(f)
    return f


def variant_option(f):
    return click.option(
        "--variant", help="A diffusers directory's variant files (fp16, or any name it was saved with), as "
        "diffusers' from_pretrained(variant=...) reads them.",
    )(f)


def exclusive_heads(heads, head_dim):
    if heads is not None and head_dim is not None:
        raise click.UsageError("give --heads or --head-dim, not both")
