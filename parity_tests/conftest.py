"""Test configuration: full-precision matmuls, the measured-error summary, seeded fixtures.

Tolerances and the comparison harness live in flax_sgm/parity.py (shared with
`flax-sgm verify`).
"""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest
import torch

from flax_sgm.parity import (  # noqa: F401  (re-exported for the test modules)
    TOLERANCES,
    Result,
    compare,
    flax_twin,
    nchw_to_nhwc,
    nhwc_to_nchw,
    randomize_,
    rel_err,
)

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Errors measured in this run, by test-module label: printed in the terminal summary.
MEASURED: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"forward": 0.0, "grad": 0.0})


def assert_parity(result: Result, label: str, dtype: str = "float32") -> None:
    tol = TOLERANCES[dtype]
    seen = MEASURED[label]
    seen["forward"] = max(seen["forward"], result.forward)
    seen["grad"] = max(seen["grad"], result.max_grad)
    assert result.forward <= tol.forward, f"{label}: forward rel err {result.forward:.3g} > {tol.forward}"
    bad = {k: v for k, v in result.grads.items() if v > tol.grad}
    assert not bad, f"{label}: gradient rel err above {tol.grad}: {bad}"


def _merge(measured: dict) -> None:
    for label, errs in measured.items():
        seen = MEASURED[label]
        for kind, value in errs.items():
            seen[kind] = max(seen[kind], value)


def pytest_sessionfinish(session):
    # An xdist worker hands its measurements to the controller.
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity_measured"] = json.dumps(MEASURED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _merge(json.loads(getattr(node, "workeroutput", {}).get("parity_measured", "{}")))


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("parity: max relative error measured (fp32, this run)")
    for label in sorted(MEASURED):
        e = MEASURED[label]
        terminalreporter.write_line(f"{label:40s} forward {e['forward']:.2e}   gradients {e['grad']:.2e}")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
