#!/usr/bin/env bash
# Everything that needs the lent GPU, in one device call per stage; results under $OUT.
#   device run: bash bench/gpu_all.sh tests      (GPU tests, ~2 min)
#   device run: bash bench/gpu_all.sh attention  (attention table)
#   device run: bash bench/gpu_all.sh module     (SpatialTransformer tables, memory)
# The device machine has jax/flax/torch preinstalled and no registry: nothing is
# installed, the repo is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/bench" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/flax-sgm-gpu}"
mkdir -p "$OUT"
stage="${1:-all}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())" >> "$OUT/device.txt" 2>&1

if [[ $stage == tests || $stage == all ]]; then
    python3 -m pytest parity_tests/test_gpu.py -v -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [[ $stage == attention || $stage == all ]]; then
    python3 bench/attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.md"
fi
if [[ $stage == module || $stage == all ]]; then
    for config in sdxl long; do
        python3 bench/module.py --config "$config" --json "$OUT/module_$config.json" 2>&1 | tee "$OUT/module_$config.md"
    done
fi
