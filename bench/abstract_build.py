"""Building the abstract model a loader fills: flax_sgm.models.abstract (shape-only initializers, no tracing)
against nnx.eval_shape of the same build (what it replaced), alternating in one process.

    python bench/abstract_build.py [--preset sd15] [--pairs 3]
"""

import argparse
import time

from flax import nnx

import flax_sgm
from flax_sgm import models


def traced(config):
    def make():
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return models.build(config, rngs=rngs)

    return nnx.eval_shape(make)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    config = flax_sgm.UNetConfig.preset(args.preset)
    for _ in range(args.pairs):
        for name, build in (("nnx.eval_shape", traced), ("models.abstract", models.abstract)):
            start = time.perf_counter()
            build(config)
            print(f"{name:16s} {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
