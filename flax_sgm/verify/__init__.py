"""Cross-framework verification: a torch module against its flax_sgm twin, forward and gradients. Needs torch.

  criteria     where every tolerance is set (the one place; the tests import it too)
  harness      `compare`: one run of both on the same inputs, errors against a float64 referee
  adapters     call conventions (torch_ref, the seed, diffusers; CallAdapter for others)
  modules      `verify_modules`: the per-submodule report `flax-sgm verify` prints
  seeded       seeded random weights and inputs
"""

from flax_sgm.verify.adapters import CallAdapter, adapter_for
from flax_sgm.verify.criteria import CRITERIA, NEGLIGIBLE_GRAD, Criterion
from flax_sgm.verify.harness import Comparison, compare, nchw_to_nhwc, nhwc_to_nchw, rel_err
from flax_sgm.verify.modules import Report, Row, submodule_names, verify_modules
from flax_sgm.verify.seeded import flax_twin, randomize_, sample_inputs

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
