"""Test configuration: full-precision matmuls, the measured-error summary, seeded fixtures.

Tolerances live in flax_sgm/verify/criteria.py and the comparison in
flax_sgm/verify/harness.py, shared with `flax-sgm verify`; no test sets its own.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import tempfile

# One persistent compilation cache for the whole run, set before jax starts: the xdist workers and the CLI and
# example subprocesses (which inherit the environment) compile many of the same programs. A fresh directory per
# run (the controller makes it; workers inherit it), so nothing carries over between runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="flax-sgm-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax
import numpy as np
import pytest
import torch

from flax_sgm.verify import (  # noqa: F401  (re-exported for the test modules)
    CRITERIA,
    CallAdapter,
    Comparison,
    compare,
    flax_twin,
    nchw_to_nhwc,
    nhwc_to_nchw,
    randomize_,
    rel_err,
)
from flax_sgm.verify import criteria
from flax_sgm.verify.criteria import REORDERED  # noqa: F401

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Measured in this run, by test-module label: flax_sgm's largest error against float64
# (forward, gradients), the largest share of its allowance used (1.0 = at the limit), and
# the largest flax / torch error ratio of a tensor above the floor (where the ratio decides).
MEASURED: dict[str, dict[str, float]] = collections.defaultdict(
    lambda: {"forward": 0.0, "grad": 0.0, "used": 0.0, "ratio": 0.0}
)


def assert_parity(result: Comparison, label: str) -> None:
    seen = MEASURED[label]
    seen["forward"] = max(seen["forward"], result.forward)
    seen["grad"] = max(seen["grad"], result.max_grad)
    for name, (f, t) in result.errors.items():
        limit = criteria.allowed(criteria.tensor_kind(name), t, result.dtype)
        seen["used"] = max(seen["used"], criteria.ratio(f, limit))
        if limit > criteria.allowed(criteria.tensor_kind(name), 0.0, result.dtype) or f > limit:
            seen["ratio"] = max(seen["ratio"], criteria.ratio(f, t))
    problems = result.problems()
    assert not problems, f"{label}: " + "; ".join(problems)


def assert_close(got, want, tol: float = criteria.REORDERED, what: str = "") -> None:
    """Each array (of two matching pytrees) within `tol` of the largest magnitude of its reference.

    The default, criteria.REORDERED, is for the same math summed in another order.
    """
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), f"{what}: {len(got_leaves)} arrays, expected {len(want_leaves)}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        name = f"{what} [{i}]" if len(want_leaves) > 1 else what
        assert np.shape(g) == np.shape(w), f"{name}: shape {np.shape(g)}, expected {np.shape(w)}"
        err = rel_err(g, w)  # of the largest magnitude (the absolute difference where the reference is all zero)
        assert err <= tol, f"{name}: max diff {err:.3g} of the largest magnitude > {tol}"


def _merge(measured: dict) -> None:
    for label, errs in measured.items():
        seen = MEASURED[label]
        for kind, value in errs.items():
            seen[kind] = max(seen[kind], value)


# Each file's seconds in the default run (the junit times of a full run on the 2-core machine, 2026-12-06).
# `--dist loadfile` hands the two workers whole files in collection order: heaviest first, they finish together
# (alphabetical order left one worker 70 s of files alone at the end).
FILE_SECONDS = {
    "test_examples": 295, "test_transforms": 264, "test_hypothesis": 207, "test_distributed": 176, "test_unet": 132,
    "test_pipeline": 106, "test_cli": 106, "test_attention_backends": 93, "test_pretrained": 86,
    "test_autoencoder": 84, "test_text": 64, "test_attention": 60, "test_blocks": 55, "test_transformer": 53,
    "test_docs": 40, "test_sharding": 39, "test_sgm_pipeline": 36, "test_low_precision": 35, "test_verify": 35,
    "test_lora": 33, "test_lowering": 28, "test_primitives": 27, "test_seed_differences": 26, "test_remat": 21,
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test module may define `slow_case(item) -> bool` for the cases of a grid that run only under -m slow
    (the exhaustive corners of a parametrization; one rule per file, beside its grid). Files run heaviest first
    (FILE_SECONDS; a file's tests keep their order)."""
    for item in items:
        rule = getattr(item.module, "slow_case", None)
        if rule is not None and rule(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.stem, 0))


def pytest_sessionfinish(session):
    # An xdist worker hands its measurements to the controller.
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity_measured"] = json.dumps(MEASURED)
        # Once a worker reports "finished", execnet gives it 5 s to return before it sends the worker a
        # SIGINT. pytest's closing gc.collect() over jax's caches (1.4M objects: 6 s on the loaded 2-core
        # machine) ran past that, and the KeyboardInterrupt surfaced in a gc callback as an unraisable
        # warning. Collect here, before "finished" is sent, and freeze what survives so that last pass is short.
        gc.collect()
        gc.freeze()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _merge(json.loads(getattr(node, "workeroutput", {}).get("parity_measured", "{}")))


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("parity: max relative error against float64 measured (fp32, this run)")
    for label in sorted(MEASURED):
        e = MEASURED[label]
        terminalreporter.write_line(
            f"{label:40s} forward {e['forward']:.2e}   gradients {e['grad']:.2e}   allowance used {e['used']:.2f}"
            f"   ratio above the floor {e['ratio']:.2f}"
        )


def assert_stack_matches_torch(flax_module, torch_module, *, seed: int = 0) -> None:
    """A SpatialTransformer against the torch stack its weights came from (torch_ref's, the seed's, or diffusers'
    Transformer2DModel, each called its own way), on seeded inputs its config sizes: the float32 forward criterion."""
    from flax_sgm.verify import adapters, seeded

    inputs = seeded.sample_inputs(flax_module.config, seed=seed, hw=(3, 5), context_tokens=6)
    x, context = inputs["x"], inputs.get("context")
    as_torch = [torch.from_numpy(c) for c in context] if isinstance(context, list) else context
    as_torch = torch.from_numpy(as_torch) if isinstance(as_torch, np.ndarray) else as_torch
    with torch.no_grad():
        expected = adapters.adapter_for(torch_module).call_torch(torch_module, torch.from_numpy(x), {"context": as_torch})
    got = nhwc_to_nchw(np.asarray(flax_module(nchw_to_nhwc(x), context)))
    assert rel_err(got, expected.numpy()) <= CRITERIA["float32"].forward


def run_cli(*args, ok: bool = True):
    """`flax-sgm ARGS` in-process (click's runner; stdout and stderr apart); `ok`: it must exit 0."""
    from click.testing import CliRunner

    from flax_sgm.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def cli_error(*args, code: int = 2) -> str:
    """A refused command (exit `code`: 2 for bad input): one line on stderr, no traceback. Returns that line."""
    result = run_cli(*args, ok=False)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
