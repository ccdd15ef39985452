"""Timing helpers shared by the benchmark scripts: medians, device-side clocks, versions.

JAX: whole jitted programs, warmed up, timed with block_until_ready over many
iterations (a host clock around one sub-millisecond call undercounts badly).
torch: CUDA events on GPU, perf_counter on CPU. Every figure is a median.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable

# diffusers UNet2DConditionModel fields of the released UNets that differ from its defaults (SDXL: the base).
DIFFUSERS_CONFIGS = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64),
    "sdxl": dict(
        block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, sample_size=128,
    ),
}


def median_ms(fn: Callable[[], object], sync: Callable[[object], None], *, warmup: int = 3, iters: int = 20, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls, in ms."""
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        sync(out)
        samples.append((time.perf_counter() - start) / iters * 1e3)
    return statistics.median(samples)


def jax_sync(out) -> None:
    import jax

    jax.block_until_ready(out)


def torch_median_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20, repeats: int = 5) -> float:
    """CUDA events on GPU (device time), perf_counter on CPU."""
    import torch

    if not torch.cuda.is_available():
        return median_ms(fn, lambda _: None, warmup=warmup, iters=iters, repeats=repeats)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def environment() -> dict:
    """Device, versions and date, kept with every figure."""
    import jax
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def jax_peak_bytes(jitted, *args) -> int:
    """Arguments + outputs + temporaries of the compiled program (what XLA's memory analysis reports)."""
    m = jitted.lower(*args).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def emit(rows: list[dict], env: dict, json_path: str | None) -> None:
    """Print a markdown table of `rows` and optionally write rows + env as JSON."""
    print(json.dumps(env))
    if rows:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    if json_path:
        write_json(rows, env, json_path)


def write_json(rows: list[dict], env: dict, json_path: str) -> None:
    with open(json_path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
