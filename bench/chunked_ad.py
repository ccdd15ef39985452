"""The chunked (memory-bounded) attention path under autodiff on CPU: time and compiled memory.

Forward, reverse mode (jax.grad of a sum) and forward mode (jax.jvp), jitted, fp32.
With `--against REV`, the chunked path of flax_sgm/attention/chunked.py (attention_backends.py before it) at git
revision REV runs interleaved with the working tree's, same process, same inputs:
how the forward-mode rule was checked not to slow reverse mode (BENCHMARKS.md).

    python bench/chunked_ad.py --against 22e7606 --json chunked_ad.json
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import emit, environment, jax_sync, median_ms
from flax_sgm.attention import chunked as chunked_attention

SHAPES = ["1,1024,1024,4,32", "1,4096,77,5,64", "1,2048,2048,2,64"]


def module_at(rev: str):
    """The module holding chunked_attention as it was at git revision `rev`."""
    root = Path(__file__).resolve().parent.parent
    for name in ("chunked_attention", "attention_backends"):  # the kernel moved out of attention_backends
        shown = subprocess.run(["git", "show", f"{rev}:flax_sgm/{name}.py"], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0 and "def chunked_attention" in shown.stdout:
            break
    else:
        raise SystemExit(f"no chunked_attention at {rev}")
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / f"{name}_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def programs(impl, d: int) -> dict:
    def attend(q, k, v):
        return impl.chunked_attention(q, k, v, scale=d**-0.5)

    return {
        "fwd": jax.jit(attend),
        "grad": jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2))),
        "jvp": jax.jit(lambda q, k, v: jax.jvp(lambda q: attend(q, k, v), (q,), (q,))),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="b,n,m,heads,d")
    parser.add_argument("--against", help="git revision whose chunked path runs alongside")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    impls = {"now": chunked_attention}
    if args.against:
        impls[args.against] = module_at(args.against)
    rows = []
    for shape in args.shapes:
        b, n, m, heads, d = map(int, shape.split(","))
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((b, n, heads, d)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((b, m, heads, d)), jnp.float32) for _ in range(2))
        runs = {}
        for name, impl in impls.items():
            for mode, fn in programs(impl, d).items():
                try:
                    temp = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
                except TypeError:  # a custom_vjp has no forward mode
                    continue
                runs[name, mode] = (fn, temp, [])
        for _ in range(args.repeat):  # interleaved, so load on the machine hits every variant alike
            for fn, _, samples in runs.values():
                samples.append(median_ms(lambda: fn(q, k, v), jax_sync, warmup=1, iters=3, repeats=1))
        for name in impls:
            row = {"shape": shape, "code": name}
            for mode in ("fwd", "grad", "jvp"):
                if (name, mode) in runs:
                    _, temp, samples = runs[name, mode]
                    row[f"{mode} ms"], row[f"{mode} temp MiB"] = float(np.median(samples)), temp
                else:
                    row[f"{mode} ms"] = row[f"{mode} temp MiB"] = "unsupported"
            row["logits MiB"] = b * heads * n * m * 4 / 2**20
            rows.append(row)
    emit(rows, environment(), args.json)


if __name__ == "__main__":
    main()
