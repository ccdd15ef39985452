"""Convert speed against a plain copy, on a synthetic multi-GB safetensors file of SDXL-shaped stacks.

One run writes the file to a temporary directory, then times in fresh child
processes (each reports its own peak RSS):
  read      every byte of the file, sequentially (the floor of any reader)
  copy      read every byte and write it to where convert writes, 8 MB at a time: the
            floor of any converter on this disk (it reads the file and writes as many bytes)
  tensors   every tensor through safetensors.safe_open
  convert   `flax-sgm convert --all` to flat safetensors and to Orbax, as this tree does it
            (library-only: safe_open, numpy, safetensors.numpy.save_file, Orbax's
            Checkpointer with a CompositeCheckpointHandler)
  hand-written
            the same conversion by the hand-written I/O engine this tree replaced (its own
            safetensors parser, read-ahead threads, buffer pool, O_DIRECT writer), taken from
            git at --handwritten-ref and run from a temporary copy
each from a cold page cache (the file's pages dropped with posix_fadvise) and warm,
best of --repeat runs.
Nothing is fsynced (neither does `convert`); the time to flush what is left in
the page cache afterwards is reported separately ("+sync").

  python bench/convert_speed.py                 # 2.5 GB, float16
  python bench/convert_speed.py --size-gb 0.05  # smoke run
Results go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flax_sgm import models

REPO = Path(__file__).resolve().parents[1]
# The last commit with the hand-written engine (flax_sgm/checkpoints.py).
HANDWRITTEN_REF = "22e7606"
# SDXL's stacks: (in_channels, depth, context_dim); heads are 64 wide.
SDXL_LARGE = (1280, 10, 2048)
SDXL_SMALL = (640, 2, 2048)


def stack_shapes(prefix: str, channels: int, depth: int, context: int) -> dict[str, tuple[int, ...]]:
    """A use_linear SpatialTransformer's torch state dict shapes, from the conversion table."""
    from flax_sgm.checkpoints import convert
    from flax_sgm.attention.config import SpatialTransformerConfig

    config = SpatialTransformerConfig(channels, channels // 64, 64, depth=depth, context_dim=context, use_linear=True)
    return convert.torch_shapes(models.abstract(config), prefix=prefix)


def synthetic_layout(size_bytes: int, itemsize: int) -> dict[str, tuple[int, ...]]:
    """SDXL-shaped stacks until the file reaches about `size_bytes`."""
    large, small = stack_shapes("", *SDXL_LARGE), stack_shapes("", *SDXL_SMALL)
    nbytes = {t: sum(int(np.prod(s)) for s in shapes.values()) * itemsize for t, shapes in ((SDXL_LARGE, large), (SDXL_SMALL, small))}
    shapes, total, i = {}, 0, 0
    while total < size_bytes:
        template = SDXL_LARGE if nbytes[SDXL_LARGE] <= size_bytes - total else SDXL_SMALL
        shapes |= {f"model.diffusion_model.blocks.{i}.1.{k}": v for k, v in (large if template == SDXL_LARGE else small).items()}
        total, i = total + nbytes[template], i + 1
    return shapes


def write_file(path: Path, size_gb: float, dtype: str) -> int:
    from safetensors.numpy import save_file

    dtype = np.dtype(dtype)
    shapes = synthetic_layout(int(size_gb * 1e9), dtype.itemsize)
    pool = np.random.default_rng(0).standard_normal(48 << 20).astype(dtype)  # tensors are views into it
    tensors, offset = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        offset = 0 if offset + n > pool.size else offset
        tensors[key] = pool[offset : offset + n].reshape(shape)
        offset += n
    save_file(tensors, path)  # safetensors writes from the arrays' memory: no copy of the file is made
    return len(shapes)


def extract_handwritten(ref: str, into: Path) -> Path:
    """flax_sgm as of `ref` (git archive), to run the hand-written engine from."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "flax_sgm"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(args) -> dict:
    """One measurement, in this (fresh) process."""
    path = Path(args.file)
    if args.phase == "read":
        buf = memoryview(bytearray(64 << 20))
        start, cpu = time.perf_counter(), _cpu_seconds()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}
    if args.phase == "copy":  # the same bytes, to where convert writes
        buf = memoryview(bytearray(8 << 20))
        Path(args.out).mkdir()
        start, cpu = time.perf_counter(), _cpu_seconds()
        with open(path, "rb", buffering=0) as src, open(Path(args.out) / "bytes", "wb", buffering=0) as dst:
            while n := src.readinto(buf):
                dst.write(buf[:n])
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        sync_start = time.perf_counter()
        os.sync()
        return {"seconds": seconds, "cpu_seconds": cpu, "sync_seconds": time.perf_counter() - sync_start}
    import jax  # noqa: F401  (imported by every converter: not part of its time or growth)
    import orbax.checkpoint  # noqa: F401
    from safetensors import safe_open

    if args.phase.startswith("handwritten"):
        from flax_sgm import checkpoints  # from the hand-written tree, on PYTHONPATH

        convert_file = checkpoints.convert_file
    else:
        from flax_sgm.attention import load as pretrained

        convert_file = pretrained.convert_file
    base_rss, base_cpu = _peak_rss(), _cpu_seconds()
    start = time.perf_counter()
    if args.phase == "tensors":
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                f.get_tensor(key)
    else:
        convert_file(path, args.out, all_stacks=True, head_dim=64, weights=args.phase.split(":")[1])
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds()
    sync_start = time.perf_counter()
    os.sync()
    return {"seconds": seconds, "cpu_seconds": cpu - base_cpu, "sync_seconds": time.perf_counter() - sync_start,
            "rss_before": base_rss}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _peak_rss() -> int:
    """VmHWM: unlike ru_maxrss it does not inherit the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(phase: str, path: Path, out: Path, cold: bool, repeat: int, handwritten: Path) -> dict:
    """The fastest of `repeat` runs (the machine may be shared), each in a fresh process."""
    runs = []
    env = dict(os.environ)
    tree = handwritten if phase.startswith("handwritten") else REPO
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(REPO), env.get("PYTHONPATH", "")])
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        if cold:
            drop_cache(path)
        cmd = [sys.executable, __file__, "--phase", phase, "--file", str(path), "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{phase} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.5,
                        help="size of the synthetic file (default 2.5; 0.05 for a smoke run)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"],
                        help="dtype of every tensor")
    parser.add_argument("--dir", help="where to put the file (default: a temporary directory)")
    parser.add_argument("--out-dir",
                        help="where convert writes (default: beside the file); e.g. /dev/shm to leave the disk out")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts (default 3)")
    parser.add_argument("--handwritten-ref", default=HANDWRITTEN_REF,
                        help=f"git revision of the hand-written engine to compare with (default {HANDWRITTEN_REF})")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = child(args)
        result["peak_rss"] = _peak_rss()
        print(json.dumps(result))
        return

    if args.dtype == "bfloat16":
        import ml_dtypes  # noqa: F401  (registers the dtype with numpy)

        args.dtype = ml_dtypes.bfloat16
    with (
        tempfile.TemporaryDirectory(dir=args.dir) as tmp,
        tempfile.TemporaryDirectory(dir=args.out_dir) as out_tmp,
        tempfile.TemporaryDirectory() as code_tmp,
    ):
        path, out = Path(tmp) / "synthetic.safetensors", Path(out_tmp) / "converted"
        handwritten = extract_handwritten(args.handwritten_ref, Path(code_tmp))
        start = time.perf_counter()
        n_tensors = write_file(path, args.size_gb, args.dtype)
        os.sync()
        size = path.stat().st_size
        print(f"wrote {path.name}: {size / 1e9:.2f} GB, {n_tensors} tensors, {np.dtype(args.dtype).name}, "
              f"in {time.perf_counter() - start:.1f} s")
        from flax_sgm.checkpoints.sources import open_source
        from flax_sgm.attention.stacks import inspect_stacks

        with open_source(path) as source:
            stacks, _ = inspect_stacks(source)
        largest = max(s["bytes"] for s in stacks)
        print(f"{len(stacks)} stacks, largest {largest / 1e9:.2f} GB; output to {out.parent}; "
              f"hand-written engine from {args.handwritten_ref}")
        print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}")
        print()
        print(f"best of {args.repeat}; cpu = user + sys seconds of every thread; RSS = VmHWM; "
              "'grown' = peak minus RSS after imports")
        print(f"{'phase':26s} {'cache':5s} {'seconds':>7s} {'GB/s':>5s} {'vs copy':>7s} {'cpu s':>6s} {'+sync s':>7s} "
              f"{'peak RSS':>8s} {'grown':>6s}")
        phases = ("read", "copy", "tensors", "convert:safetensors", "handwritten:safetensors", "convert:orbax",
                  "handwritten:orbax")
        copies = {}
        for cold in (True, False):
            cache = "cold" if cold else "warm"
            for phase in phases:
                r = measure(phase, path, out, cold, args.repeat, handwritten)
                if phase == "copy":
                    copies[cache] = r["seconds"]
                vs_copy = f"{r['seconds'] / copies[cache]:6.2f}x" if cache in copies else f"{'':7s}"
                sync = f"{r['sync_seconds']:7.2f}" if "sync_seconds" in r else f"{'':7s}"
                grown = f"{(r['peak_rss'] - r['rss_before']) / 1e9:5.2f}G" if "rss_before" in r else f"{'':6s}"
                print(f"{phase:26s} {cache:5s} {r['seconds']:7.2f} {size / r['seconds'] / 1e9:5.2f} "
                      f"{vs_copy} {r['cpu_seconds']:6.2f} {sync} {r['peak_rss'] / 1e9:7.2f}G {grown}", flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
