#!/usr/bin/env bash
# Everything that needs the lent GPU, in ONE device call that stops by itself before DEADLINE seconds.
#
#   device run (timeout_s 480):  bash bench/gpu_all.sh
#   a rerun of some stages:      bash bench/gpu_all.sh module-long attention
#   a CPU smoke run:             ATTENTION_ARGS="--shapes 1,256,256,2,64 --iters 2" MODULE_ARGS="--no-compile" \
#                                    bash bench/gpu_all.sh lower tests attention module-default
#
# Stages, in this order (most important first), each under its own time cap:
#   lower        flax-sgm lower --backward on the GPU itself (the real cuDNN, no stand-in)
#   tests        parity_tests/test_gpu.py and the GPU test of test_lowering.py
#   attention    bench/attention.py: flax_sgm "auto" vs torch SDPA, fwd and fwd+bwd, the GPU.md shapes
#   module-sdxl  bench/module.py --config sdxl: jit vs torch_ref eager vs torch.compile, checkpoint off/on, memory
#   module-long  bench/module.py --config long: the same
#   unet-sdxl    bench/unet.py --config sdxl: the whole SDXL UNet, bf16, 128 x 128, batch 2, against diffusers
#                eager and torch.compile (needs diffusers, which the image lacks: put it on PYTHONPATH, e.g. a
#                carried `pip install --target gpu-deps diffusers`; without it the stage says so and stops)
#   vae-sdxl     bench/vae.py --config sdxl: SDXL's VAE decode, bf16, 1024 x 1024, against diffusers eager, time and
#                peak memory (needs diffusers, as unet-sdxl); VAE_ARGS="--config tiny --hw 64 --memory-hw 64" on CPU
#   pipeline-sdxl  bench/pipeline.py --config sdxl: prompt to image, 1024 x 1024, 30 steps, bf16, flax_sgm's Pipeline
#                against diffusers' StableDiffusionXLPipeline eager and with torch.compile(unet): images/s, peak
#                memory, compile apart (needs diffusers AND transformers on PYTHONPATH, as unet-sdxl). Not in the
#                default list (the 8-file limit): run it alone, `bash bench/gpu_all.sh pipeline-sdxl`.
#                CPU smoke: PIPELINE_ARGS="--tiny --steps 2 --iters 1 --dtype float32" bash bench/gpu_all.sh pipeline-sdxl
# Results under $OUT, at most 8 files, no folders (what the device tool brings back):
#   device.txt, lower.json, tests.log, attention.json, module_sdxl.json, module_long.json, unet_sdxl.json, run.log
#   (pipeline-sdxl alone: device.txt, pipeline_sdxl.json, run.log)
# Nothing is installed: the H200 image has jax 0.11.2 (CUDA 13), flax, torch 2.11, einops,
# click, tqdm, safetensors, orbax-checkpoint and pytest (the device tool's KINDS.md); the repo
# goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/bench:$PWD/gpu-deps" PYTHONUNBUFFERED=1
# jax and torch share the GPU: jax allocates as it goes instead of taking 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Compile caches on local disk: the AOT compile of bench/module.py's memory analysis and a
# rerun on the same (still warm) machine reuse them.
export JAX_COMPILATION_CACHE_DIR=/tmp/flax-sgm-jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export TORCHINDUCTOR_CACHE_DIR=/tmp/flax-sgm-inductor-cache
# A stage killed at its cap can leave an empty compiled kernel there, which the next torch.compile fails to load.
find "$TORCHINDUCTOR_CACHE_DIR" -name '*.so' -size 0 -delete 2>/dev/null
PY="${PYTHON:-python3}"  # the image's python3 holds jax and torch
OUT="${OUT:-/tmp/flax-sgm-gpu}"
DEADLINE="${DEADLINE:-420}"  # seconds for the whole script; stages that do not fit are skipped
mkdir -p "$OUT"
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(lower tests attention module-sdxl module-long unet-sdxl vae-sdxl)
log="$OUT/run.log"
declare -A status

# run_stage NAME CAP COMMAND...: the command under `timeout`, never past the deadline.
run_stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 5))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        status[$name]="skipped (deadline: ${left}s left)"
        echo "== $name: skipped, ${left}s left before the deadline" | tee -a "$log"
        return
    fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    case $rc in
        0) status[$name]="ok in $((SECONDS - start))s" ;;
        124 | 137) status[$name]="TIMED OUT after ${limit}s (partial results kept)" ;;
        *) status[$name]="FAILED rc=$rc after $((SECONDS - start))s" ;;
    esac
    echo "== $name: ${status[$name]}" | tee -a "$log"
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import jax, flax, torch
print("python", __import__("sys").version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__,
      "| torch", torch.__version__, "| cuDNN (torch)", torch.backends.cudnn.version())
print("jax devices:", jax.devices())
EOF
} > "$OUT/device.txt"
cat "$OUT/device.txt" | tee -a "$log"

for stage in "${stages[@]}"; do
    case $stage in
        lower)
            run_stage lower 45 bash -o pipefail -c "$PY -m flax_sgm lower --config sdxl --backward --json > '$OUT/lower.json' \
                && $PY -m flax_sgm lower --config sdxl --backward --no-checkpoint | tee -a '$log'"
            ;;
        tests)
            run_stage tests 110 bash -o pipefail -c "$PY -m pytest -p no:cacheprovider -n 0 -m gpu -v -rA \
                parity_tests/test_gpu.py parity_tests/test_lowering.py > '$OUT/tests.log' 2>&1; rc=\$?; \
                tail -n 25 '$OUT/tests.log' | tee -a '$log'; exit \$rc"
            ;;
        attention)
            run_stage attention 75 bash -o pipefail -c "$PY bench/attention.py --iters 20 ${ATTENTION_ARGS:-} \
                --json '$OUT/attention.json' 2>&1 | tee -a '$log'"
            ;;
        module-*)
            config=${stage#module-}
            run_stage "$stage" 130 bash -o pipefail -c "$PY bench/module.py --config $config --iters 10 ${MODULE_ARGS:-} \
                --json '$OUT/module_$config.json' 2>&1 | tee -a '$log'"
            ;;
        unet-sdxl)
            run_stage unet-sdxl 200 bash -o pipefail -c "$PY -c 'import diffusers' && $PY bench/unet.py --config sdxl \
                --dtype bfloat16 --hw 128 --batch 2 --iters 5 --json '$OUT/unet_sdxl.json' 2>&1 | tee -a '$log'"
            ;;
        vae-sdxl)
            run_stage vae-sdxl 150 bash -o pipefail -c "$PY -c 'import diffusers' && $PY bench/vae.py --config sdxl \
                --dtype bfloat16 --hw 1024 --ops decode --memory-hw 1024 --no-compile --iters 3 ${VAE_ARGS:-} \
                2>&1 | tee -a '$log'"
            ;;
        pipeline-sdxl)
            run_stage pipeline-sdxl 400 bash -o pipefail -c "$PY -c 'import diffusers, transformers' && $PY bench/pipeline.py \
                --config sdxl --size 1024 --steps 30 --guidance 5.0 --dtype bfloat16 --torch-compile --iters 2 \
                ${PIPELINE_ARGS:-} --json '$OUT/pipeline_sdxl.json' 2>&1 | tee -a '$log'"
            ;;
        *)
            echo "unknown stage $stage (lower tests attention module-CONFIG unet-sdxl vae-sdxl pipeline-sdxl)" | tee -a "$log"
            ;;
    esac
done

echo "== summary after ${SECONDS}s (deadline ${DEADLINE}s)" | tee -a "$log"
for stage in "${stages[@]}"; do
    echo "  $stage: ${status[$stage]:-not run}" | tee -a "$log"
done
