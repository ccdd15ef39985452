"""Loading a whole model against safetensors' own loaders and a plain file copy, in one run.

The input (--model), random weights written once into --dir:
  sd15       a diffusers `unet/` directory: UNet2DConditionModel in SD1.5's config, save_pretrained in
             float16 (860M parameters, 1.7 GB)
  sdxl       the same of SDXL base's config (2.6B, 5.1 GB): the model is built on torch's meta device and
             its state dict written with safetensors (a real init would need 10 GB of float32)
  sdxl-text  SDXL's two text encoders as its sgm single file holds them (CLIP ViT-L under
             conditioner.embedders.0.transformer., OpenCLIP ViT-bigG under conditioner.embedders.1.model.
             in open_clip's layout; 818M parameters, float16, 1.6 GB)
Each case runs in a fresh child process, which imports jax and flax_sgm and starts jax's backend before its clock
starts and reports its wall and CPU seconds and its peak RSS growth (VmHWM minus the RSS
after imports):
  copy        read every byte of the weights file and write it beside it, 8 MB at a time
  np          safetensors.numpy.load_file
  flax        safetensors.flax.load_file (the library's load into JAX arrays, no layout work)
  load_unet   flax_sgm.load_unet on the directory, to ready arrays in the model's layout
  load_text_encoder
              flax_sgm.load_text_encoder(file, embedder=0) and (embedder=1), to ready arrays
  phases      the load's steps timed one by one (open + config, the abstract model, the
              checked plan, load_planned, models.ready; per encoder for sdxl-text), then for a
              UNet the naive path's three phases over the same tensors: read (safe_open
              copies), layout (numpy transposes), device_put
  convert:ARGS
              `flax-sgm convert DIR -o OUT ARGS` (default `--all --format safetensors`, the stack
              converter; pass --convert-args again for a whole-UNet convert), output beside the file
  before      the model's load from a git archive of --against (the code before), when given
  before-convert
              the convert case, run by the code of --against
Rounds interleave the cases (the machine may be shared); each line gives the load average
when the case started. Cold: the weights file's pages are dropped first (posix_fadvise
DONTNEED after fsync; `--drop-caches` writes 3 to /proc/sys/vm/drop_caches instead).

  python bench/load_speed.py --dir /tmp/loadspeed --rounds 3
  python bench/load_speed.py --dir /tmp/loadspeed --model sdxl --cases load_unet,copy --rounds 1
  python bench/load_speed.py --dir /tmp/loadspeed --model sdxl-text --rounds 5 --caches warm
Results go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from common import DIFFUSERS_CONFIGS as CONFIGS

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "sd_xl_text_encoders.safetensors"


class Model(NamedTuple):
    folder: str  # under --dir
    file: str  # the weights file in it
    load: str  # the case that loads it with flax_sgm
    cases: str  # the default cases


MODELS = {
    "sd15": Model("sd15-unet", WEIGHTS, "load_unet", "copy,np,flax,load_unet,phases,convert"),
    "sdxl": Model("sdxl-unet", WEIGHTS, "load_unet", "copy,np,flax,load_unet,phases,convert"),
    "sdxl-text": Model("sdxl-text", TEXT_WEIGHTS, "load_text_encoder", "copy,np,flax,load_text_encoder,phases"),
}
# sgm's two SDXL text embedders in its single file: (flax_sgm preset, the key prefix, open_clip's layout or not)
SDXL_TEXT = (("clip-vit-l-14", "conditioner.embedders.0.transformer.", False),
             ("openclip-vit-bigg-14", "conditioner.embedders.1.model.", True))


def write_weights(directory: Path, model: str) -> None:
    """--model's random float16 weights into `directory` (skipped when already there)."""
    if (directory / MODELS[model].file).is_file():
        return
    if model == "sdxl-text":
        from flax_sgm import models
        from flax_sgm.checkpoints import convert
        from flax_sgm.text.config import PRESETS
        from flax_sgm.text.layout import TRANSFORMERS, open_clip_layout

        shapes = {}
        for preset, prefix, open_clip in SDXL_TEXT:
            tower = models.abstract(PRESETS[preset])
            layout = open_clip_layout(tower.config) if open_clip else TRANSFORMERS
            shapes |= convert.torch_shapes(tower, prefix=prefix, layout=layout)
        _save_random(directory / TEXT_WEIGHTS, shapes)
        return
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        UNet2DConditionModel(**CONFIGS[model]).to(torch.float16).save_pretrained(directory)
        return
    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[model])
    _save_random(directory / WEIGHTS, {key: tuple(value.shape) for key, value in unet.state_dict().items()})
    unet.save_config(directory)


def _save_random(file: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Random float16 tensors of these shapes, written with safetensors (views of one pool: no 10 GB of init)."""
    import numpy as np
    from safetensors.numpy import save_file

    pool = np.random.default_rng(0).standard_normal(64 << 20).astype(np.float16)
    tensors, offset = {}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        offset = 0 if offset + n > pool.size else offset
        tensors[key] = pool[offset:offset + n].reshape(shape)
        offset += n
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata={"format": "pt"})


def extract(ref: str, into: Path) -> Path:
    """flax_sgm as of `ref` (git archive), to run the code before from."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "flax_sgm"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# The child ----------------------------------------------------------------------------------------------


def child(case: str, model: str, directory: Path, out: Path, convert_args: str) -> dict:
    """One measurement in this fresh process: seconds, CPU seconds, RSS after imports."""
    file = directory / MODELS[model].file
    if case == "copy":
        buf = memoryview(bytearray(8 << 20))
        out.mkdir()
        start, cpu = time.perf_counter(), _cpu_seconds()
        with open(file, "rb", buffering=0) as src, open(out / file.name, "wb", buffering=0) as dst:
            while n := src.readinto(buf):
                dst.write(buf[:n])
        return {"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu}
    import jax
    from flax import nnx

    import flax_sgm  # noqa: F401
    from flax_sgm.attention import load as pretrained  # noqa: F401
    from safetensors import flax as st_flax, numpy as st_numpy

    jax.devices()  # the backend's start-up is no load's
    base, cpu, start = _rss(), _cpu_seconds(), time.perf_counter()
    result = {}
    if case == "np":
        st_numpy.load_file(file)
    elif case == "flax":
        jax.block_until_ready(st_flax.load_file(file))
    elif (MODELS[model].load if case == "before" else case) == "load_unet":
        jax.block_until_ready(nnx.state(flax_sgm.load_unet(directory)))
    elif (MODELS[model].load if case == "before" else case) == "load_text_encoder":
        jax.block_until_ready([nnx.state(flax_sgm.load_text_encoder(file, embedder=n)) for n in range(len(SDXL_TEXT))])
    elif case == "phases":
        result["phases"] = text_phases(file) if model == "sdxl-text" else phases(directory)
    elif case.startswith("convert") or case == "before-convert":
        from click.testing import CliRunner

        from flax_sgm.cli import cli

        done = CliRunner().invoke(cli, ["convert", str(directory), "-o", str(out), *convert_args.split()])
        if done.exit_code:
            raise SystemExit(f"convert failed: {done.output[-2000:]}")
    else:
        raise SystemExit(f"unknown case {case}")
    return result | {"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu, "rss_before": base}


def phases(directory: Path) -> dict[str, tuple[float, float]]:
    """load_unet's steps one at a time, then the naive path's read / layout / device_put over the same plan:
    {step: (wall, CPU seconds)}."""
    import jax
    import numpy as np

    from flax_sgm import models
    from flax_sgm.checkpoints import convert
    from flax_sgm.checkpoints.sources import open_source
    from flax_sgm.unet.config import UNetConfig
    from flax_sgm.unet.diffusers import vector_embedding
    from flax_sgm.unet.layout import diffusers_layout

    clock, times = (time.perf_counter(), _cpu_seconds()), {}

    def lap(name):  # wall and CPU seconds since the last lap
        nonlocal clock
        now = (time.perf_counter(), _cpu_seconds())
        times[name], clock = (now[0] - clock[0], now[1] - clock[1]), now

    with open_source(directory) as source:
        config = UNetConfig.from_diffusers(source.config)
        layout = diffusers_layout(config, vector_embedding(source.config))
        stored = max({i.dtype for i in source.infos.values()}, key=lambda d: d.itemsize)
        lap("open")
        model = models.abstract(config, param_dtype=stored)
        lap("abstract model")
        plan = convert.conversion_plan(model, source.infos, layout=layout)
        lap("plan")
        convert.load_planned(model, plan, source)
        jax.block_until_ready(nnx_state(model))
        lap("load_planned")
        models.ready(model)
        lap("ready (eval mode)")
        values = [source.read(step.key) for step in plan]  # safe_open: a copy per tensor
        lap("naive read")
        values = [np.ascontiguousarray(step.row.transform.to_flax(v)) for step, v in zip(plan, values)]
        lap("naive layout")
        jax.block_until_ready([jax.device_put(v) for v in values])
        lap("naive device_put")
    return times


def text_phases(file: Path) -> dict[str, tuple[float, float]]:
    """load_text_encoder's steps one at a time for each of the file's two encoders: {step: (wall, CPU seconds)}."""
    import jax

    from flax_sgm import models
    from flax_sgm.checkpoints import convert
    from flax_sgm.checkpoints.sources import open_source
    from flax_sgm.text.load import plan_text_encoder

    clock, times = (time.perf_counter(), _cpu_seconds()), {}

    def lap(name):
        nonlocal clock
        now = (time.perf_counter(), _cpu_seconds())
        times[name], clock = (now[0] - clock[0], now[1] - clock[1]), now

    for n in range(len(SDXL_TEXT)):
        with open_source(file) as source:
            text = plan_text_encoder(source, embedder=n)
            infos = {k: source.infos[k] for k in text.keys}
            source.prefetch(infos)
            lap(f"{n}: open + config")
            model = models.abstract(text.config, param_dtype=max({i.dtype for i in infos.values()}, key=lambda d: d.itemsize))
            lap(f"{n}: abstract model")
            plan = convert.conversion_plan(model, infos, prefix=text.prefix, layout=text.layout)
            lap(f"{n}: plan")
            convert.load_planned(model, plan, source)
            jax.block_until_ready(nnx_state(model))
            lap(f"{n}: load_planned")
            models.ready(model)
            lap(f"{n}: ready")
    return times


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss() -> int:
    return _status("VmRSS")


# The parent ---------------------------------------------------------------------------------------------


def drop_cache(file: Path, everything: bool) -> None:
    os.sync()
    if everything:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_case(case: str, directory: Path, out: Path, args, before: Path | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    tree = before if case.startswith("before") else REPO
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(tree), str(REPO), env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, __file__, "--child", case, "--dir", args.dir, "--model", args.model,
           "--out", str(out), "--convert-args", args.convert_args]
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result | {"load": load}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the model directory is kept (default: /tmp)")
    parser.add_argument("--model", choices=list(MODELS), default="sd15")
    parser.add_argument("--cases", help="comma-separated (default: the model's, e.g. "
                        f"{MODELS['sd15'].cases}; also before, before-convert)")
    parser.add_argument("--convert-args", default="--all --format safetensors",
                        help="the arguments of the convert case after CHECKPOINT -o OUT")
    parser.add_argument("--against", help="git revision of the code before: adds the `before` case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cache state (default 3)")
    parser.add_argument("--caches", default="warm,cold", help="warm, cold or both (default warm,cold)")
    parser.add_argument("--drop-caches", action="store_true", help="cold: drop every page cache (root), not the file's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir) / MODELS[args.model].folder
    if args.child:
        result = child(args.child, args.model, directory, Path(args.out), args.convert_args)
        result["peak_rss"] = _status("VmHWM")
        print(json.dumps(result))
        return

    start = time.perf_counter()
    write_weights(directory, args.model)
    file = directory / MODELS[args.model].file
    size = file.stat().st_size
    print(f"{directory}: {size / 1e9:.2f} GB ({time.perf_counter() - start:.0f} s to make)")
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    cases = list(dict.fromkeys((args.cases or MODELS[args.model].cases).split(",") + (["before"] if args.against else [])))
    unet = MODELS[args.model].load == "load_unet"
    known = {"copy", "np", "flax", MODELS[args.model].load, "phases", "before"} | ({"convert", "before-convert"} if unet else set())
    unknown = [c for c in cases if c not in known and not (unet and c.startswith("convert:"))]
    if unknown:
        parser.error(f"--cases {','.join(unknown)}: not a case of --model {args.model} (its cases: {', '.join(sorted(known))})")
    if "convert" in cases:
        from flax_sgm.checkpoints.sources import open_source
        from flax_sgm.attention.stacks import inspect_stacks

        with open_source(directory) as source:
            stacks, _ = inspect_stacks(source)
        print(f"convert {args.convert_args}: the stack converter reads {len(stacks)} stacks, "
              f"{sum(s['bytes'] for s in stacks) / 1e9:.2f} GB of the file's {size / 1e9:.2f} GB")
    print(f"load average at the start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=directory.parent) as out_tmp, tempfile.TemporaryDirectory() as code_tmp:
        before = extract(args.against, Path(code_tmp)) if args.against else None
        out = Path(out_tmp) / "out"
        results: dict[tuple[str, str], list[dict]] = {}
        for cache in args.caches.split(","):
            for _ in range(args.rounds):
                for case in cases:
                    if cache == "warm":
                        _warm(file)
                    else:
                        drop_cache(file, args.drop_caches)
                    r = run_case(case, directory, out, args, before)
                    results.setdefault((cache, case), []).append(r)
                    _print_line(cache, case, r, size)
        print("\nmedians; x = the case's time over the medians of flax (load) and copy (convert), and per round")
        for cache in args.caches.split(","):
            med = {case: statistics.median(r["seconds"] for r in results[(cache, case)]) for case in cases}
            for case in cases:
                runs = results[(cache, case)]
                grown = statistics.median((r["peak_rss"] - r.get("rss_before", r["peak_rss"])) for r in runs)
                ratios = " ".join(
                    f"{med[case] / med[b]:.2f}x {b} (rounds {[round(r['seconds'] / o['seconds'], 2) for r, o in zip(runs, results[(cache, b)])]})"
                    for b in ("flax", "copy") if b in med and case != b
                )
                cpu = statistics.median(r["cpu"] for r in runs)
                print(f"{cache:5s} {case:12s} {med[case]:7.2f} s  cpu {cpu:6.2f}  grown {grown / 1e9:5.2f} GB "
                      f"({grown / size:4.2f}x the weights)  {ratios}  load {[round(r['load'], 1) for r in runs]}")
            for r in results.get((cache, "phases"), [])[:1]:
                print(f"{cache:5s} phases (first round; wall/CPU s): " + _phases(r["phases"]))


def _warm(file: Path) -> None:
    with open(file, "rb", buffering=0) as f:
        buf = memoryview(bytearray(8 << 20))
        while f.readinto(buf):
            pass


def _phases(times: dict) -> str:
    return ", ".join(f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in times.items())


def _print_line(cache: str, case: str, r: dict, size: int) -> None:
    grown = r["peak_rss"] - r.get("rss_before", r["peak_rss"])
    extra = "\n      " + _phases(r["phases"]) if "phases" in r else ""
    print(f"{cache:5s} {case:12s} {r['seconds']:7.2f} s  cpu {r['cpu']:6.2f}  {size / r['seconds'] / 1e9:5.2f} GB/s  "
          f"grown {grown / 1e9:5.2f} GB  load {r['load']:.1f}{extra}", flush=True)


if __name__ == "__main__":
    main()
