"""The pieces of sgm's `sgm/util.py` and `sgm/modules/diffusionmodules/util.py` the vendored sampling
files import, copied unchanged (Stability AI, MIT; see LICENSE), plus two import shims:

- `ListConfig`, `OmegaConf`: sampling.py names them only in type hints; omegaconf is not installed.
- `get_obj_from_str` resolves sgm's `sgm.modules.diffusionmodules.<file>` targets to this folder's copies.
"""

import importlib
from inspect import isfunction

import torch

ListConfig = OmegaConf = dict  # type hints only (import shim)
_VENDORED = "sgm.modules.diffusionmodules."  # import shim: sgm's module path -> torch_ref.sgm


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if isfunction(d) else d


def instantiate_from_config(config):
    if not "target" in config:
        if config == "__is_first_stage__":
            return None
        elif config == "__is_unconditional__":
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def get_obj_from_str(string, reload=False, invalidate_cache=True):
    module, cls = string.rsplit(".", 1)
    if module.startswith(_VENDORED):  # import shim
        module = "torch_ref.sgm." + module[len(_VENDORED):]
    if invalidate_cache:
        importlib.invalidate_caches()
    if reload:
        module_imp = importlib.import_module(module)
        importlib.reload(module_imp)
    return getattr(importlib.import_module(module, package=None), cls)


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def append_dims(x, target_dims):
    """Appends dimensions to the end of a tensor until it has target_dims dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(
            f"input has {x.ndim} dims but target_dims is {target_dims}, which is less"
        )
    return x[(...,) + (None,) * dims_to_append]


def make_beta_schedule(
    schedule,
    n_timestep,
    linear_start=1e-4,
    linear_end=2e-2,
):
    if schedule == "linear":
        betas = (
            torch.linspace(
                linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64
            )
            ** 2
        )
    return betas.numpy()
