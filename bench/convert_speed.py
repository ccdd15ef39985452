"""Convert speed against plain reading, on a synthetic multi-GB safetensors file of SDXL-shaped stacks.

One run writes the file to a temporary directory, then times in fresh child
processes (each reports its own peak RSS):
  read      every byte of the file, sequentially (the floor for any reader)
  write     as many bytes, sequentially, to where convert writes, through the page cache
  write:direct  the same through checkpoints.StreamWriter (O_DIRECT where allowed:
            the flat safetensors writer's floor)
  copy      read every byte and write it through StreamWriter as it comes: the I/O a
            flat safetensors convert cannot avoid (reads and writes share the disk)
  tensors   every tensor through flax_sgm's safetensors reader
  convert   `flax-sgm convert --all` to Orbax and to flat safetensors
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

# SDXL's stacks: (in_channels, depth, context_dim); heads are 64 wide.
SDXL_LARGE = (1280, 10, 2048)
SDXL_SMALL = (640, 2, 2048)


def stack_tensors(prefix: str, channels: int, depth: int, context: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a use_linear SpatialTransformer's state dict, seed key names."""
    c = channels
    shapes = {"norm.weight": (c,), "norm.bias": (c,), "proj_in.weight": (c, c), "proj_in.bias": (c,)}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for attn, width in (("attn1", c), ("attn2", context)):
            a = b + attn
            shapes |= {f"{a}.to_q.weight": (c, c), f"{a}.to_k.weight": (c, width), f"{a}.to_v.weight": (c, width),
                       f"{a}.to_out.0.weight": (c, c), f"{a}.to_out.0.bias": (c,)}
        shapes |= {f"{b}ff.net.0.proj.weight": (8 * c, c), f"{b}ff.net.0.proj.bias": (8 * c,),
                   f"{b}ff.net.2.weight": (c, 4 * c), f"{b}ff.net.2.bias": (c,)}
        shapes |= {f"{b}norm{j}.{p}": (c,) for j in (1, 2, 3) for p in ("weight", "bias")}
    shapes |= {"proj_out.weight": (c, c), "proj_out.bias": (c,)}
    return {prefix + k: v for k, v in shapes.items()}


def synthetic_layout(size_bytes: int, itemsize: int) -> dict[str, tuple[int, ...]]:
    """SDXL-shaped stacks until the file reaches about `size_bytes`."""
    shapes, i = {}, 0
    while sum(np.prod(s) for s in shapes.values()) * itemsize < size_bytes:
        left = size_bytes - sum(np.prod(s) for s in shapes.values()) * itemsize
        big = stack_tensors("", *SDXL_LARGE)
        template = SDXL_LARGE if sum(np.prod(s) for s in big.values()) * itemsize <= left else SDXL_SMALL
        shapes |= stack_tensors(f"model.diffusion_model.blocks.{i}.1.", *template)
        i += 1
    return shapes


def write_file(path: Path, size_gb: float, dtype: str) -> int:
    from flax_sgm.checkpoints import TensorInfo, write_safetensors

    dtype = np.dtype(dtype)
    shapes = synthetic_layout(int(size_gb * 1e9), dtype.itemsize)
    pool = np.random.default_rng(0).standard_normal(48 << 20).astype(dtype)  # tensors are views into it
    tensors, offset = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        offset = 0 if offset + n > pool.size else offset
        tensors[key] = pool[offset : offset + n].reshape(shape)
        offset += n
    write_safetensors(path, {k: TensorInfo(v.shape, v.dtype) for k, v in tensors.items()}, tensors.values())
    return len(shapes)


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
    if args.phase.startswith("write") or args.phase == "copy":  # the same number of bytes, to where convert writes
        from flax_sgm.checkpoints import StreamWriter

        buf, left = np.ones(64 << 20, np.uint8), path.stat().st_size
        Path(args.out).mkdir()
        start, cpu = time.perf_counter(), _cpu_seconds()
        if args.phase == "copy":
            with open(path, "rb", buffering=0) as src, StreamWriter(Path(args.out) / "bytes") as f:
                while n := src.readinto(buf):
                    f.write(buf[:n])
        elif args.phase == "write:direct":
            with StreamWriter(Path(args.out) / "bytes") as f:
                while left > 0:
                    f.write(buf[: min(left, buf.size)])
                    left -= min(left, buf.size)
        else:
            with open(Path(args.out) / "bytes", "wb", buffering=0) as f:
                while left > 0:
                    left -= f.write(buf[: min(left, buf.size)])
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        sync_start = time.perf_counter()
        os.sync()
        return {"seconds": seconds, "cpu_seconds": cpu, "sync_seconds": time.perf_counter() - sync_start}
    from flax_sgm import checkpoints

    base_rss, base_cpu = _peak_rss(), _cpu_seconds()
    start = time.perf_counter()
    if args.phase == "tensors":
        reader = checkpoints.open_checkpoint(path)
        for key in reader.infos:
            reader.read(key)
        reader.close()
    else:
        checkpoints.convert_file(path, args.out, all_stacks=True, head_dim=64, weights=args.phase.split(":")[1])
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


def measure(phase: str, path: Path, out: Path, cold: bool, repeat: int) -> dict:
    """The fastest of `repeat` runs (the machine may be shared), each in a fresh process."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        if cold:
            drop_cache(path)
        cmd = [sys.executable, __file__, "--phase", phase, "--file", str(path), "--out", str(out)]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
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
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, tempfile.TemporaryDirectory(dir=args.out_dir) as out_tmp:
        path, out = Path(tmp) / "synthetic.safetensors", Path(out_tmp) / "converted"
        start = time.perf_counter()
        n_tensors = write_file(path, args.size_gb, args.dtype)
        os.sync()
        size = path.stat().st_size
        print(f"wrote {path.name}: {size / 1e9:.2f} GB, {n_tensors} tensors, {np.dtype(args.dtype).name}, "
              f"in {time.perf_counter() - start:.1f} s")
        from flax_sgm import checkpoints

        reader = checkpoints.open_checkpoint(path)
        stacks = [checkpoints.infer_stack(reader.infos, p) for p in checkpoints.find_stacks(reader.infos)]
        reader.close()
        largest = max(s.nbytes for s in stacks)
        print(f"{len(stacks)} stacks, largest {largest / 1e9:.2f} GB; output to {out.parent}")
        print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}")
        print()
        print(f"best of {args.repeat}; cpu = user + sys seconds of every thread; RSS = VmHWM; 'grown' = peak minus RSS after imports")
        print(f"{'phase':20s} {'cache':5s} {'seconds':>7s} {'GB/s':>5s} {'vs read':>7s} {'cpu s':>6s} {'+sync s':>7s} "
              f"{'peak RSS':>8s} {'grown':>6s}")
        reads = {}
        for cold in (True, False):
            cache = "cold" if cold else "warm"
            for phase in ("read", "write", "write:direct", "copy", "tensors", "convert:orbax", "convert:safetensors"):
                r = measure(phase, path, out, cold, args.repeat)
                if phase == "read":
                    reads[cache] = r["seconds"]
                sync = f"{r['sync_seconds']:7.2f}" if "sync_seconds" in r else f"{'':7s}"
                grown = f"{(r['peak_rss'] - r['rss_before']) / 1e9:5.2f}G" if "rss_before" in r else f"{'':6s}"
                print(f"{phase:20s} {cache:5s} {r['seconds']:7.2f} {size / r['seconds'] / 1e9:5.2f} "
                      f"{reads[cache] / r['seconds']:7.0%} {r['cpu_seconds']:6.2f} {sync} {r['peak_rss'] / 1e9:7.2f}G {grown}",
                      flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
