"""How often bf16 verification passes, over seeds: torch_ref's and diffusers' blocks against flax_sgm.

For each seed: random weights (verify.randomize_), random inputs, `verify_modules` in
bfloat16 (every submodule and the whole model, judged by flax_sgm.verify.criteria),
in two modes: bf16 parameters, and bf16 compute with float32 parameters. Prints the
pass rate, and per failing tensor its flax / torch error ratio; `--json` for the record.

    python bench/bf16_pass_rate.py --seeds 50
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import time

import jax.numpy as jnp
import numpy as np

import flax_sgm
import torch_ref
from flax_sgm.verify import criteria, flax_twin, randomize_, tiny, verify_modules
from flax_sgm.verify.seeded import unet_twin

BLOCKS = ("torch_ref BasicTransformerBlock", "diffusers BasicTransformerBlock")
MODES = {"bf16 params": jnp.bfloat16, "f32 params, bf16 compute": jnp.float32}


def modules():
    """name -> (torch module of a seed, its flax twin of a param dtype, inputs of a seed)."""
    from diffusers.models.attention import BasicTransformerBlock

    def tokens(seed):
        r = np.random.default_rng(seed)
        return {"x": r.standard_normal((2, 48, 64)).astype(np.float32),
                "context": r.standard_normal((2, 20, 48)).astype(np.float32)}

    def image(seed):
        r = np.random.default_rng(seed)
        return {"x": r.standard_normal((2, 64, 6, 7)).astype(np.float32),
                "context": r.standard_normal((2, 20, 48)).astype(np.float32)}

    def unet_inputs(seed):  # NCHW x, timesteps, context, SDXL's vector y
        r = np.random.default_rng(seed)
        return {"x": r.standard_normal((2, 4, 8, 8)).astype(np.float32), "timesteps": np.array([3, 917], np.int64),
                "context": r.standard_normal((2, 5, 24)).astype(np.float32),
                "y": r.standard_normal((2, tiny.UNETS["sdxl"]["projection_class_embeddings_input_dim"])).astype(np.float32)}

    return {
        "diffusers UNet2DConditionModel": (lambda s: tiny.unet("sdxl", seed=s),
                                           lambda t, p: unet_twin(t, dtype=jnp.bfloat16, param_dtype=p), unet_inputs),
        "torch_ref BasicTransformerBlock": (
            lambda s: torch_ref.BasicTransformerBlock(64, 4, 16, context_dim=48),
            lambda t, p: flax_twin(t, flax_sgm.BasicTransformerBlock, 64, 4, 16, context_dim=48, checkpoint=False,
                                   dtype=jnp.bfloat16, param_dtype=p), tokens),
        "torch_ref SpatialTransformer": (
            lambda s: torch_ref.SpatialTransformer(64, 4, 16, depth=2, context_dim=48, use_linear=True,
                                                   use_checkpoint=False),
            lambda t, p: flax_twin(t, flax_sgm.SpatialTransformer, 64, 4, 16, depth=2, context_dim=48,
                                   use_linear=True, use_checkpoint=False, dtype=jnp.bfloat16, param_dtype=p), image),
        "diffusers BasicTransformerBlock": (
            lambda s: BasicTransformerBlock(64, 4, 16, cross_attention_dim=48),
            lambda t, p: flax_twin(t, flax_sgm.BasicTransformerBlock, 64, 4, 16, context_dim=48, checkpoint=False,
                                   dtype=jnp.bfloat16, param_dtype=p), tokens),
    }


def measure(seeds: int, names: list[str]) -> dict:
    """Per module and mode: the pass rate and the flax / torch error ratios. Seeds outermost, so that a
    run stopped early has measured every mode on the same seeds."""
    table = modules()
    stats = {(n, m): {"failed": [], "ratios": [], "tensors": collections.Counter(), "seeds": 0} for n in names for m in MODES}
    start = time.perf_counter()
    for seed in range(seeds):
        for name in names:
            make_torch, make_flax, inputs = table[name]
            for mode, param_dtype in MODES.items():
                s = stats[name, mode]
                t = randomize_(make_torch(seed), seed).eval()
                report = verify_modules(t, make_flax(t, param_dtype), inputs(seed), dtype="bfloat16", seed=seed)
                for row in (report.model, *report.rows):
                    for tensor, (f, tt) in row.errors.items():
                        r = criteria.ratio(f, tt)
                        if math.isfinite(r):
                            s["ratios"].append(r)
                        if r > criteria.CRITERIA["bfloat16"].slack:
                            s["tensors"][f"{row.name or 'model'}:{tensor}"] += 1
                s["seeds"] += 1
                worst = max(criteria.ratio(f, tt) for row in (report.model, *report.rows) for f, tt in row.errors.values())
                if not report.passed:
                    s["failed"].append(seed)
                problems = [p for row in (report.model, *report.rows) for p in row.problems]
                print(f"  seed {seed} {name} / {mode}: {'pass' if report.passed else 'FAIL ' + '; '.join(problems)}",
                      f"worst ratio {worst:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    results = {}
    for (name, mode), s in stats.items():
        results[f"{name} / {mode}"] = {
            "seeds": s["seeds"], "passed": s["seeds"] - len(s["failed"]), "failed_seeds": s["failed"],
            "worst_ratio": round(max(s["ratios"]), 3), "median_ratio": round(statistics.median(s["ratios"]), 3),
            "p99_ratio": round(float(np.quantile(s["ratios"], 0.99)), 3),
            "tensors_over_slack": dict(s["tensors"].most_common(8)),
        }
        print(json.dumps({f"{name} / {mode}": results[f"{name} / {mode}"]}), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--only", action="append", help="a module name (repeat); default: the two blocks")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = measure(args.seeds, args.only or list(BLOCKS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
