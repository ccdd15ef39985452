"""The command line on checkpoint files the tests write: verify, convert, inspect, and every bad input."""

import functools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flax_sgm
import torch_ref
from flax_sgm.attention import load as pretrained
from flax_sgm.errors import CheckpointError
from flax_sgm.attention.policy import BACKENDS
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.verify import CRITERIA, criteria, randomize_, seeded, tiny
from flax_sgm import models
from conftest import assert_stack_matches_torch, cli_error, run_cli

SGM = "model.diffusion_model."
STACKS = {  # prefix in the SGM file -> SpatialTransformer config
    SGM + "input_blocks.1.1.": dict(in_channels=32, n_heads=2, d_head=16, depth=1, context_dim=24),
    SGM + "middle_block.1.": dict(in_channels=64, n_heads=2, d_head=16, depth=2, context_dim=[24, 40], use_linear=True),
}
DIFFUSERS = "down_blocks.1.attentions.0."
SELF_ATTN = dict(in_channels=32, n_heads=2, d_head=16, depth=1, context_dim=24, disable_self_attn=True)


def torch_stack(config, seed):
    return randomize_(torch_ref.SpatialTransformer(**config, use_checkpoint=False), seed).eval()


def prefixed(module, prefix):
    return {prefix + k: v.contiguous() for k, v in module.state_dict().items()}


class Evil:
    """Unpickling it creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoint files in every layout, and the torch modules they hold."""
    d = tmp_path_factory.mktemp("checkpoints")
    modules = {p: torch_stack(c, seed=i) for i, (p, c) in enumerate(STACKS.items())}
    sgm = {k: v for p, m in modules.items() for k, v in prefixed(m, p).items()}
    sgm |= {SGM + "out.0.weight": torch.ones(4), "first_stage_model.decoder.conv_in.weight": torch.ones(4, 4, 3, 3)}
    save_file(sgm, d / "sgm.safetensors")
    torch.save({"state_dict": sgm, "global_step": 7}, d / "sgm.ckpt")
    first = modules[SGM + "input_blocks.1.1."]
    save_file(prefixed(first, DIFFUSERS) | {"conv_in.weight": torch.ones(4, 4, 3, 3)}, d / "diffusion_pytorch_model.safetensors")
    save_file(prefixed(first, ""), d / "bare.safetensors")
    torch.save({k: v.half() for k, v in prefixed(first, "").items()}, d / "bare_fp16.pt")
    self_attn = torch_stack(SELF_ATTN, seed=5)
    save_file(prefixed(self_attn, ""), d / "self_attn.safetensors")
    plain_ff = prefixed(first, "")  # a non-gated feed-forward, which SpatialTransformer cannot build
    plain_ff["transformer_blocks.0.ff.net.0.proj.weight"] = torch.zeros(128, 32)
    plain_ff["transformer_blocks.0.ff.net.0.proj.bias"] = torch.zeros(128)
    save_file(plain_ff, d / "plain_ff.safetensors")
    video = prefixed(first, "") | {"time_stack.0.attn1.to_q.weight": torch.ones(32, 32)}  # SpatialVideoTransformer-like
    save_file(video, d / "video.safetensors")
    modules |= {"": first, "self_attn": self_attn}
    return d, modules


# --- help --------------------------------------------------------------------------------------


def test_python_dash_m_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "flax_sgm", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage: flax-sgm" in out and all(c in out for c in ("verify", "convert", "inspect", "Examples"))


def test_top_level_help_describes_each_command_in_a_whole_sentence():
    commands = run_cli("--help").output.split("Commands:", 1)[1].split("Examples:", 1)[0]
    rows = [line.split(None, 1) for line in commands.strip().splitlines()]
    assert [name for name, _ in rows] == ["convert", "inspect", "lower", "sample", "verify"]
    assert all(text.endswith(".") and not text.endswith("...") for _, text in rows), rows


@pytest.mark.parametrize("command", ["verify", "convert", "inspect"])
def test_every_command_has_examples(command):
    out = run_cli(command, "--help").output
    assert "Examples:" in out and f"flax-sgm {command}" in out


# --- verify --------------------------------------------------------------------------------------


@pytest.fixture
def small_default(monkeypatch):
    # The embedded default at unit-test widths (the real one runs under -m slow).
    monkeypatch.setattr(seeded, "VERIFY_DEFAULT", SpatialTransformerConfig.from_seed_args(**STACKS[SGM + "input_blocks.1.1."], use_checkpoint=False))


PARTS = ["norm", "proj_in", *(f"transformer_blocks.0.{p}" for p in ("norm1", "attn1", "norm2", "attn2", "norm3", "ff")),
         "proj_out"]


def test_verify_default_reports_every_submodule_and_passes(small_default):
    out = run_cli("verify").output
    for part in [*PARTS, "whole model"]:
        assert f"\n{part} " in out, part
    attn_rows = [line for line in out.splitlines() if line.startswith("transformer_blocks.0.attn")]
    assert len(attn_rows) == 2 and all(line.split()[-2] in BACKENDS for line in attn_rows)
    assert out.rstrip().endswith("PASS")


def strict_json(text: str):
    """json.loads that refuses Infinity and NaN, as strict parsers (and other languages) do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_verify_json_and_parity_failure_exits_1(small_default, monkeypatch):
    report = strict_json(run_cli("verify", "--json", "--seed", "1").stdout)
    assert report["criterion"]["median"] is None  # no median limit in float32: null, not Infinity
    assert report["passed"] and report["seed"] == 1 and report["reference"] == "float64"
    assert report["config"] == seeded.VERIFY_DEFAULT.to_dict()
    rows = {r["name"]: r for r in report["submodules"]}
    assert list(rows) == PARTS
    assert rows["transformer_blocks.0.attn2"]["backend"] in BACKENDS and rows["transformer_blocks.0.ff"]["backend"] is None
    assert all(r["forward"][0] <= report["criterion"]["forward"] for r in rows.values())
    monkeypatch.setitem(criteria.CRITERIA, "float32", criteria.Criterion(slack=0.0, forward=0.0, grad=0.0))
    result = run_cli("verify", "--json", ok=False)
    assert result.exit_code == 1 and not json.loads(result.stdout)["passed"]


def test_verify_checkpoint_infers_the_config(files):
    d, modules = files
    prefix = SGM + "middle_block.1"
    report = json.loads(run_cli("verify", "--checkpoint", d / "sgm.ckpt", "--prefix", prefix, "--head-dim", 16, "--json").stdout)
    assert report["passed"] and report["source"]["prefix"] == prefix + "."
    assert report["source"]["reference"] == "torch_ref.SpatialTransformer of the config read off the weights (no diffusers config.json)"
    expected = SpatialTransformerConfig.from_seed_args(**STACKS[prefix + "."], use_checkpoint=False)  # use_linear is in STACKS
    assert report["config"] == expected.to_dict()
    assert [r["name"] for r in report["submodules"]][-3:] == ["transformer_blocks.1.norm3", "transformer_blocks.1.ff", "proj_out"]


def test_verify_bfloat16_against_float64(small_default, monkeypatch):
    out = run_cli("verify", "--dtype", "bfloat16").output
    assert "against float64 (bfloat16" in out and "median ratio" in out and out.rstrip().endswith("PASS")
    report = json.loads(run_cli("verify", "--dtype", "bfloat16", "--json").stdout)
    assert report["passed"] and report["dtype"] == "bfloat16"
    low, high = criteria.BF16_ERROR_RANGE
    assert all(low < r["forward"][1] < high and r["flax_dtype"] == "bfloat16" for r in report["submodules"])
    monkeypatch.setitem(criteria.CRITERIA, "bfloat16", CRITERIA["bfloat16"]._replace(slack=0.5))
    result = run_cli("verify", "--dtype", "bfloat16", "--json", ok=False)
    assert result.exit_code == 1 and json.loads(result.stdout)["model"]["problems"]


def test_verify_bfloat16_on_a_float32_checkpoint(files):
    d, _ = files
    prefix = SGM + "input_blocks.1.1"
    report = json.loads(
        run_cli("verify", "--checkpoint", d / "sgm.safetensors", "--prefix", prefix, "--heads", 2, "--dtype", "bfloat16",
            "--json").stdout
    )
    assert report["passed"] and report["source"]["dtype in file"] == "float32" and len(report["submodules"]) == len(PARTS)


def test_verify_a_diffusers_directory_against_diffusers_itself(tmp_path):
    """Only-cross attention with the context as wide as the inner dim: only config.json says it; the reference
    is diffusers' model built from that directory, so a wrong reading of the config fails."""
    from diffusers import Transformer2DModel

    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, cross_attention_dim=32,
                               only_cross_attention=True)
    randomize_(model, seed=6).save_pretrained(tmp_path / "t")
    report = json.loads(run_cli("verify", "--checkpoint", tmp_path / "t", "--json").stdout)
    assert report["passed"] and report["config"]["disable_self_attn"]
    assert report["source"]["reference"] == f"diffusers Transformer2DModel, built by diffusers from {tmp_path / 't'}"


def test_verify_and_lower_take_a_convert_output(files, tmp_path):
    d, _ = files
    out, prefix = tmp_path / "out", SGM + "middle_block.1"
    run_cli("convert", d / "sgm.safetensors", "--all", "--heads", 2, "-o", out)
    report = json.loads(run_cli("verify", "--checkpoint", out, "--prefix", prefix, "--json").stdout)
    assert report["passed"] and report["config"]["context_dim"] == [24, 40]
    assert report["source"]["reference"] == "torch_ref.SpatialTransformer of the output's config and weights"
    lowered = json.loads(run_cli("lower", "--config", out / "config.json", "--prefix", prefix, "--platform", "cpu",
                             "--dtype", "float32", "--hw", 4, 4, "--context-tokens", 5, "--json").stdout)
    assert lowered["config"]["depth"] == 2 and lowered["config"]["in_channels"] == 64
    assert "pass --prefix" in run_cli("lower", "--config", out, "--platform", "cpu", ok=False).output


@pytest.mark.slow  # about 5 min on 2 cores; the pipeline-directory test runs the same command on a smaller UNet
def test_verify_model_unet_reports_each_diffusers_module(monkeypatch):
    # At 8 x 8 pixels (the real run, 16 x 16, takes about a minute on 2 cores).
    monkeypatch.setattr(seeded, "unet_pair", functools.partial(seeded.unet_pair, hw=(8, 8)))
    report = strict_json(run_cli("verify", "--model", "unet", "--json").stdout)
    assert report["passed"] and report["config"]["adm_in_channels"] == 80 and report["inputs"]["y"] == [2, 80]
    rows = {r["name"]: r for r in report["submodules"]}
    assert {"time_embedding", "add_embedding", "conv_in", "down_blocks.1.attentions.0", "up_blocks.0.upsamplers.0",
            "conv_out"} <= set(rows)
    assert rows["mid_block.attentions.0"]["backend"] in BACKENDS and rows["mid_block.resnets.0"]["backend"] is None


def test_verify_model_unet_refuses_stack_flags():
    refused = run_cli("verify", "--model", "unet", "--checkpoint", "x", "--heads", 2, ok=False)
    assert refused.exit_code == 2 and "--model unet verifies a whole UNet: leave out --prefix" in refused.output


def test_verify_model_unet_of_a_diffusers_pipeline_directory(tmp_path):
    """What a user holds: a pipeline directory, its unet/ saved by diffusers; the reference is built by diffusers."""
    tiny.unet("sdxl", seed=3).save_pretrained(tmp_path / "pipeline" / "unet")
    report = strict_json(run_cli("verify", "--model", "unet", "--checkpoint", tmp_path / "pipeline", "--json").stdout)
    assert report["passed"] and report["source"]["reference"].startswith("diffusers UNet2DConditionModel, built by diffusers")
    assert report["inputs"] == {"x": [2, 4, 8, 8], "timesteps": [2], "context": [2, 77, 24], "y": [2, 56]}
    assert {"conv_in", "add_embedding", "down_blocks.1.attentions.0", "conv_out"} <= {r["name"] for r in report["submodules"]}
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, tmp_path / "sgm.safetensors")
    line = cli_error("verify", "--model", "unet", "--checkpoint", tmp_path / "sgm.safetensors")
    assert line.endswith("sgm.safetensors: a whole UNet is verified from a diffusers unet/ or pipeline directory "
                         "(diffusers builds the reference from its config.json); this is not one")


@pytest.mark.slow
def test_verify_real_default():
    report = json.loads(run_cli("verify", "--json").stdout)
    assert report["passed"] and report["inputs"]["x"] == [2, 640, 16, 16]


def test_verify_needs_heads_or_head_dim(files):
    d, _ = files
    line = cli_error("verify", "--checkpoint", d / "bare.safetensors")
    assert "--heads" in line and "--head-dim" in line and "inner dim" in line
    assert "need --checkpoint" in run_cli("verify", "--heads", 2, ok=False).output


# --- inspect --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgm.safetensors", "sgm.ckpt"])
def test_inspect_lists_every_stack(files, name):
    d, _ = files
    info = json.loads(run_cli("inspect", d / name, "--json").stdout)
    assert [s["prefix"] for s in info["stacks"]] == list(STACKS)
    assert info["stacks"][1]["context_dim"] == [24, 40] and info["stacks"][1]["use_linear"]
    assert info["top_level_prefixes"] == ["first_stage_model.", "model."]
    text = run_cli("inspect", d / name).output
    assert "2 SpatialTransformer stack(s)" in text and "middle_block.1." in text


def test_inspect_names_an_unsupported_stack(files):
    d, _ = files
    assert "gated_ff=False" in run_cli("inspect", d / "plain_ff.safetensors").output


# --- convert -> load_pretrained -> same outputs as torch -------------------------------------------------


@pytest.mark.parametrize(
    "name,args,key,weights",
    [
        ("sgm.safetensors", ["--prefix", SGM + "input_blocks.1.1", "--heads", 2], SGM + "input_blocks.1.1.", "orbax"),
        ("sgm.ckpt", ["--prefix", SGM + "middle_block.1.", "--head-dim", 16], SGM + "middle_block.1.", "safetensors"),
        ("diffusion_pytorch_model.safetensors", ["--heads", 2], "", "orbax"),
        ("bare.safetensors", ["--head-dim", 16], "", "safetensors"),
    ],
    ids=["sgm-safetensors-orbax", "sgm-ckpt-flat", "diffusers-orbax", "no-prefix-flat"],
)
def test_convert_then_load_pretrained_matches_torch(files, tmp_path, name, args, key, weights):
    d, modules = files
    out = tmp_path / "out"
    printed = run_cli("convert", d / name, *args, "-o", out, "--format", weights).output
    assert "load: flax_sgm.load_pretrained" in printed
    model = flax_sgm.load_pretrained(out)
    assert model.config == SpatialTransformerConfig.from_seed_args(**STACKS.get(key, STACKS[SGM + "input_blocks.1.1."]))
    assert_stack_matches_torch(model, modules[key])
    document = json.loads((out / "config.json").read_text())
    assert document["weights"] == weights and document["stacks"][0]["config"]["heads"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left


def test_convert_all_and_repeated_prefix(files, tmp_path):
    d, modules = files
    run_cli("convert", d / "sgm.safetensors", "--all", "--heads", 2, "-o", tmp_path / "all")
    loaded = flax_sgm.load_pretrained_all(tmp_path / "all")
    assert list(loaded) == [p.removesuffix(".") for p in STACKS]  # as torch's get_submodule takes them
    for prefix, model in zip(STACKS, loaded.values()):
        assert_stack_matches_torch(model, modules[prefix])
    with pytest.raises(CheckpointError, match="holds 2 stacks"):
        flax_sgm.load_pretrained(tmp_path / "all")
    text = run_cli("inspect", tmp_path / "all").output  # what the converted directory records
    assert "a flax-sgm convert output (orbax), 2 record(s)" in text
    assert f"{SGM}middle_block.1.  64 ch, 2x16 heads, depth 2, context [24, 40], float32" in text, text
    recorded = json.loads(run_cli("inspect", "--json", tmp_path / "all").stdout)["stacks"]
    assert [r["config"] for r in recorded] == [m.config.to_dict() for m in loaded.values()]
    prefixes = [a for p in STACKS for a in ("--prefix", p)]
    run_cli("convert", d / "sgm.ckpt", *prefixes, "--heads", 2, "-o", tmp_path / "two", "--format", "safetensors")
    model = flax_sgm.load_pretrained(tmp_path / "two", prefix=SGM + "middle_block.1")
    assert_stack_matches_torch(model, modules[SGM + "middle_block.1."])


def test_flat_safetensors_output_is_keyed_by_flax_paths(files, tmp_path):
    d, _ = files
    run_cli("convert", d / "bare.safetensors", "--heads", 2, "--format", "safetensors", "-o", tmp_path / "flat")
    with safe_open(tmp_path / "flat" / "spatial_transformer.safetensors", framework="numpy") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["flax_sgm_config"])["config"]["head_dim"] == 16
        assert f.get_tensor("transformer_blocks.0.attn1.to_q.kernel").shape == (32, 32)  # [in, out]
    assert {"norm.scale", "proj_in.kernel", "transformer_blocks.0.ff.project_in.proj.kernel", "proj_out.bias"} <= keys


def test_convert_infers_disable_self_attn_and_keeps_the_file_dtype(files, tmp_path):
    d, modules = files
    run_cli("convert", d / "self_attn.safetensors", "--heads", 2, "-o", tmp_path / "sa")
    assert_stack_matches_torch(flax_sgm.load_pretrained(tmp_path / "sa"), modules["self_attn"])
    run_cli("convert", d / "bare_fp16.pt", "--heads", 2, "-o", tmp_path / "fp16")
    model = flax_sgm.load_pretrained(tmp_path / "fp16")
    assert model.proj_in.kernel.dtype == np.float16
    run_cli("convert", d / "bare_fp16.pt", "--heads", 2, "-o", tmp_path / "fp32", "--param-dtype", "float32")
    assert flax_sgm.load_pretrained(tmp_path / "fp32").proj_in.kernel.dtype == np.float32


def test_convert_reads_only_the_selected_keys(files, tmp_path):
    d, modules = files
    read = []
    pretrained.convert_file(d / "sgm.safetensors", tmp_path / "o", [SGM + "input_blocks.1.1."], heads=2, progress=read.append)
    assert sum(read) == sum(v.numel() * v.element_size() for v in modules[SGM + "input_blocks.1.1."].state_dict().values())


@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_a_bad_tensor_in_a_later_stack_names_every_problem_and_writes_nothing(files, tmp_path, weights):
    from safetensors.torch import load_file

    d, _ = files
    tensors = load_file(d / "sgm.safetensors")
    late = SGM + "middle_block.1.transformer_blocks.1."
    tensors[late + "attn1.to_out.0.weight"] = tensors[late + "attn1.to_out.0.weight"][:, :-1].contiguous()
    tensors[late + "norm1.bias"] = tensors[late + "norm1.bias"].to(torch.int32)
    save_file(tensors, tmp_path / "bad.safetensors")
    out = tmp_path / "out"
    result = run_cli("convert", tmp_path / "bad.safetensors", "--all", "--heads", 2, "--format", weights, "-o", out, ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"shape mismatch: {late}attn1.to_out.0.weight has shape [32, 31], the model needs [32, 32]" in result.stderr
    assert f"dtype mismatch: {late}norm1.bias is int32" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]  # no output, no staging directory


def test_convert_safetensors_without_torch(files, tmp_path):
    d, _ = files
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` fails
        "from flax_sgm.cli import main\n"
        f"main(['convert', {str(d / 'bare.safetensors')!r}, '--heads', '2', '-o', {str(tmp_path / 'o')!r}])"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "o" / "config.json").exists()


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in cli_error("convert", tmp_path / "nope.safetensors", "--heads", 2, "-o", tmp_path / "o")
    assert "no checkpoint file or sharded index" in cli_error("convert", tmp_path, "--heads", 2, "-o", tmp_path / "o")
    assert "no such file" in cli_error("inspect", tmp_path / "nope.ckpt")


def test_truncated_and_corrupt_safetensors(files, tmp_path):
    d, _ = files
    data = (d / "bare.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) - 100])
    assert "truncated" in cli_error("convert", tmp_path / "short.safetensors", "--heads", 2, "-o", tmp_path / "o")
    (tmp_path / "head.safetensors").write_bytes(data[:200])
    assert "truncated" in cli_error("inspect", tmp_path / "head.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    assert "corrupt" in cli_error("inspect", tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a readable torch checkpoint" in cli_error("inspect", tmp_path / "junk.ckpt")


@pytest.mark.parametrize("layout", ["bare-pickle", "torch-zip"])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    if layout == "bare-pickle":
        path.write_bytes(pickle.dumps({"state_dict": {"w": Evil(marker)}}, protocol=2))
        pickle.loads(path.read_bytes())  # the file is live: plain unpickling runs it
        assert marker.exists()
        marker.unlink()
    else:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hook": Evil(marker)}, path)
    line = cli_error("convert", path, "--heads", 2, "-o", tmp_path / "o")
    assert "refused" in line and "nothing in it was run" in line
    cli_error("verify", "--checkpoint", path, "--heads", 2)
    assert not marker.exists()


def test_prefix_matching_nothing_lists_what_is_there(files, tmp_path):
    d, _ = files
    line = cli_error("convert", d / "sgm.safetensors", "--prefix", SGM + "input_blocks.44.1", "--heads", 2, "-o", tmp_path / "o")
    assert "top-level prefixes: first_stage_model., model." in line
    assert f"under '{SGM}input_blocks.' there are: 1." in line


def test_several_stacks_need_a_choice_and_a_non_stack_prefix_is_named(files, tmp_path):
    d, _ = files
    assert "holds 2 SpatialTransformer stacks" in cli_error("convert", d / "sgm.safetensors", "--heads", 2, "-o", tmp_path / "o")
    line = cli_error("convert", d / "sgm.safetensors", "--prefix", "first_stage_model", "--heads", 2, "-o", tmp_path / "o")
    assert "not a SpatialTransformer stack" in line
    line = cli_error("convert", d / "sgm.safetensors", "--prefix", "model.diffusion_model", "--heads", 2, "-o", tmp_path / "o")
    assert f"the stacks under it: {SGM}input_blocks.1.1., {SGM}middle_block.1." in line
    assert "gated_ff=False" in cli_error("convert", d / "plain_ff.safetensors", "--heads", 2, "-o", tmp_path / "o")
    assert "more than a SpatialTransformer: time_stack.*" in cli_error("convert", d / "video.safetensors", "--heads", 2, "-o", tmp_path / "o")


def test_heads_must_divide_the_inner_dim(files, tmp_path):
    d, _ = files
    assert "--heads 3 does not divide the inner dim 32" in cli_error("convert", d / "bare.safetensors", "--heads", 3, "-o", tmp_path / "o")
    assert "--head-dim 5 does not divide" in cli_error("verify", "--checkpoint", d / "bare.safetensors", "--head-dim", 5)
    assert "not both" in run_cli("convert", d / "bare.safetensors", "--heads", 2, "--head-dim", 16, "-o", tmp_path / "o", ok=False).output


def test_existing_output_is_refused_unless_overwrite(files, tmp_path):
    d, modules = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "already exists (pass --overwrite" in cli_error("convert", d / "bare.safetensors", "--heads", 2, "-o", out)
    # --overwrite replaces an earlier output only: it deleted any directory, the checkpoint read included.
    assert "is not a flax-sgm convert output; --overwrite replaces only those" in cli_error(
        "convert", d / "bare.safetensors", "--heads", 2, "-o", out, "--overwrite")
    assert (out / "mine.txt").exists()
    for inside in (d / "bare.safetensors", d):
        assert "is the checkpoint being converted" in cli_error("convert", d / "bare.safetensors", "--heads", 2, "-o",
                                                                inside, "--overwrite")
    assert (d / "bare.safetensors").is_file()
    out = tmp_path / "converted"
    run_cli("convert", d / "bare.safetensors", "--heads", 1, "-o", out)
    umask = os.umask(0)
    os.umask(umask)  # the output's modes are an open()'s and a mkdir()'s, not mkdtemp's private 0o700
    assert {p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]} == {0o777 & ~umask, 0o666 & ~umask}
    run_cli("convert", d / "bare.safetensors", "--heads", 2, "-o", out, "--overwrite")
    assert_stack_matches_torch(flax_sgm.load_pretrained(out), modules[""])


@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_an_interrupted_convert_leaves_no_output(files, tmp_path, weights):
    d, modules = files
    first = sum(v.numel() * v.element_size() for v in modules[SGM + "input_blocks.1.1."].state_dict().values())
    read = []

    def interrupt_in_the_second_stack(n):
        read.append(n)
        if sum(read) > first:
            raise KeyboardInterrupt

    def convert(**kw):
        pretrained.convert_file(d / "sgm.safetensors", tmp_path / "out", all_stacks=True, heads=2, weights=weights,
                                progress=interrupt_in_the_second_stack, **kw)

    with pytest.raises(KeyboardInterrupt):
        convert()
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging directory
    pretrained.convert_file(d / "sgm.safetensors", tmp_path / "out", prefixes=[SGM + "input_blocks.1.1."], heads=2,
                            weights=weights)  # an older output survives an interrupted --overwrite
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    read.clear()
    with pytest.raises(KeyboardInterrupt):
        convert(overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_load_pretrained_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file or sharded index"):
        flax_sgm.load_pretrained(tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path / "nope.safetensors", ok=False)
    assert isinstance(result.exception, CheckpointError)
    result = run_cli("inspect", tmp_path / "nope.safetensors", "--debug", ok=False)
    assert isinstance(result.exception, CheckpointError)


def test_an_unexpected_error_is_not_called_bad_input(files, monkeypatch):
    """Exit 2 is the user's input; a failure inside flax-sgm (here: a TypeError) exits 3, still in one line."""
    from flax_sgm.checkpoints import sources

    d, _ = files

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(sources, "open_source", broken)
    line = cli_error("inspect", d / "sgm.safetensors", code=3)
    assert line == "Error: TypeError: unsupported operand (not the input's fault; run with --debug for the traceback)"


def inspect_in_a_process(path, *flags) -> str:
    """`python -m flax_sgm inspect PATH` as a user runs it: its stdout (it must exit 0)."""
    done = subprocess.run([sys.executable, "-m", "flax_sgm", "inspect", str(path), *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_inspect_says_a_unets_channels_and_where_heads_come_from(tmp_path):
    """inspect names what in/out channels other than 4 mean (inpainting 9, InstructPix2Pix 8, depth 5, learned
    sigma 8 out) and an LCM's timestep_cond; for a UNet that is no released model it sends the user to where the
    model was trained for its heads, and gives no example value (SD 1.x's 8 would load this one wrong, silently)."""
    from flax_sgm.checkpoints import convert
    from flax_sgm.cli.convert_cmd import _heads_hint
    from flax_sgm.unet.load import channel_notes
    from flax_sgm.unet.config import UNetConfig

    config = UNetConfig(in_channels=9, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                        num_heads=2, context_dim=24)
    save_file({k: torch.from_numpy(v) for k, v in convert.to_torch_state_dict(models.build(config), prefix=SGM).items()},
              tmp_path / "inpaint.safetensors")
    text = inspect_in_a_process(tmp_path / "inpaint.safetensors")
    assert "none of the released models" in text
    assert "in 9 channels (inpainting: latents, mask, masked-image latents), out 4" in text
    assert "take --heads N or --head-dim D from where the model was trained" in text
    assert "--heads 8" not in text and "SD 1.x" not in text and "--head-dim 64" not in text

    tiny.unet("lcm", in_channels=8, out_channels=8).save_pretrained(tmp_path / "unet")
    text = inspect_in_a_process(tmp_path / "unet")
    assert ("in 8 channels (InstructPix2Pix: latents, image latents), out 8 (learned sigma: the prediction and the "
            "variance), LCM: timestep_cond of 16 (flax_sgm.guidance_scale_embedding)") in text
    info = json.loads(inspect_in_a_process(tmp_path / "unet", "--json"))["unet"]
    assert (info["in_channels"], info["out_channels"], info["time_cond_proj_dim"]) == (8, 8, 16)
    assert channel_notes(5, 4) == ["in 5 channels (depth: latents, depth map)", "out 4"]
    # A released model's file: its own heads (the preset's), said as the flag.
    assert _heads_hint({"preset": "sd15"}).endswith("as sd15, pass --heads 8 to convert/verify the stacks")
    assert _heads_hint({"preset": "sdxl-base"}).endswith("as sdxl-base, pass --head-dim 64 to convert/verify the stacks")
