"""Cross-framework verification: a torch module against its flax_sgm twin, forward and gradients. Needs torch.

  criteria     where every tolerance is set (the one place; the tests import it too)
  harness      `compare`: one run of both on the same inputs, errors against a float64 referee
  adapters     call conventions (torch_ref, the seed, diffusers; CallAdapter for others)
  modules      `verify_modules`: the per-submodule report `flax-sgm verify` prints
  seeded       seeded random twins and inputs
  tiny         the tiny diffusers models every test, benchmark and doc builds; randomize_
"""

import importlib

from flax_sgm.verify.criteria import CRITERIA, NEGLIGIBLE_GRAD, Criterion, rel_err

# The torch-backed names load on first use, so `from flax_sgm.verify import criteria` stays torch-free.
_LAZY = {
    "CallAdapter": "adapters",
    "adapter_for": "adapters",
    "Comparison": "harness",
    "compare": "harness",
    "nchw_to_nhwc": "harness",
    "nhwc_to_nchw": "harness",
    "Report": "modules",
    "Row": "modules",
    "submodule_names": "modules",
    "verify_modules": "modules",
    "flax_twin": "seeded",
    "randomize_": "tiny",
    "sample_inputs": "seeded",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"flax_sgm.verify.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flax_sgm.verify' has no attribute {name!r}")


__all__ = [
    "CRITERIA",
    "CallAdapter",
    "Comparison",
    "Criterion",
    "NEGLIGIBLE_GRAD",
    "Report",
    "Row",
    "adapter_for",
    "compare",
    "flax_twin",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "randomize_",
    "rel_err",
    "sample_inputs",
    "submodule_names",
    "verify_modules",
]
