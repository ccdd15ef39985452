"""Checkpoints as users hold them: diffusers model directories written by diffusers itself (sharded, with
config.json), sharded indexes, SGM single files; loaded directly or converted, every stack equal to the
torch module it came from, and every bad input one line naming the file."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import flax_sgm
import torch_ref
from flax_sgm.checkpoints import convert
from flax_sgm.errors import CheckpointError
from conftest import REORDERED, assert_stack_matches_torch, cli_error, nchw_to_nhwc, randomize_, rel_err, run_cli

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 24
# Heads per down block (diffusers' legacy `attention_head_dim`): head widths 8 and 32.
UNET_HEADS = (4, 2)
UNET_STACK_HEADS = {  # the mid block takes the last; the up blocks them reversed
    "down_blocks.0.attentions.0.": 4, "down_blocks.1.attentions.0.": 2, "mid_block.attentions.0.": 2,
    "up_blocks.0.attentions.0.": 2, "up_blocks.0.attentions.1.": 2,
    "up_blocks.1.attentions.0.": 4, "up_blocks.1.attentions.1.": 4,
}
SGM = "model.diffusion_model.input_blocks.1.1."
SGM_CONFIG = dict(in_channels=32, n_heads=2, d_head=16, depth=2, context_dim=CONTEXT, use_linear=True)


def submodule(module, prefix):
    for part in prefix.rstrip(".").split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A tiny UNet2DConditionModel with different heads per block, saved sharded by diffusers."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=UNET_HEADS, layers_per_block=1,
        cross_attention_dim=CONTEXT, sample_size=8, in_channels=4, out_channels=4,
    )
    randomize_(model, seed=0).eval()
    path = tmp_path_factory.mktemp("diffusers") / "unet"
    model.save_pretrained(path, max_shard_size="200KB")
    assert (path / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded, as large models are
    return path, model


@pytest.fixture(scope="module")
def sgm(tmp_path_factory):
    """An SGM checkpoint holding one stack, as .safetensors and as .ckpt."""
    d = tmp_path_factory.mktemp("sgm")
    module = randomize_(torch_ref.SpatialTransformer(**SGM_CONFIG, use_checkpoint=False), seed=1).eval()
    tensors = {SGM + k: v.contiguous() for k, v in module.state_dict().items()}
    tensors["model.diffusion_model.out.0.weight"] = torch.ones(4)
    save_file(tensors, d / "sgm.safetensors")
    torch.save({"state_dict": tensors, "global_step": 3}, d / "sgm.ckpt")
    return d, module


# --- diffusers model directories ----------------------------------------------------------------


def test_a_diffusers_directory_loads_every_stack_with_its_own_heads(unet):
    path, model = unet
    loaded = flax_sgm.load_pretrained_all(path)
    assert {p + ".": m.transformer_blocks[0].attn1.heads for p, m in loaded.items()} == UNET_STACK_HEADS
    for prefix, flax_module in loaded.items():
        torch_module = model.get_submodule(prefix)  # the keys are submodule names
        assert_stack_matches_torch(flax_module, torch_module)


def test_one_stack_of_a_diffusers_directory_or_of_its_sharded_index(unet):
    path, model = unet
    prefix = "up_blocks.1.attentions.1"
    assert_stack_matches_torch(flax_sgm.load_pretrained(path, prefix), submodule(model, prefix))
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    # The index passed on its own takes the config.json beside it; an index elsewhere needs the heads.
    assert_stack_matches_torch(flax_sgm.load_pretrained(index, prefix), submodule(model, prefix))
    assert_stack_matches_torch(flax_sgm.load_pretrained(index, prefix, heads=4), submodule(model, prefix))


def answers_as_loaded(flax_module, torch_module, jit: bool = True) -> None:
    """Eager and under jax.jit, equal to the torch stack (in eval mode) and the same on every call."""
    import jax

    from flax_sgm.verify import seeded

    assert not torch_module.training
    assert_stack_matches_torch(flax_module, torch_module)
    inputs = seeded.sample_inputs(flax_module.config, seed=0, hw=(3, 5), context_tokens=6)
    x, context = nchw_to_nhwc(inputs["x"]), inputs["context"]
    eager = np.asarray(flax_module(x, context))
    assert np.array_equal(np.asarray(flax_module(x, context)), eager)
    if not jit:
        return
    jitted = np.asarray(jax.jit(lambda m, *a: m(*a))(flax_module, x, context))
    assert rel_err(jitted, eager) <= REORDERED


def test_loaders_return_inference_mode(tmp_path):
    """dropout 0.1 in config.json: load_pretrained and load_pretrained_all (a directory and a convert output)
    answer as diffusers' from_pretrained (eval mode) does; model.train() turns dropout on. Without model.eval()
    in the loaders the stacks dropped units: 2 calls differed, and differed from diffusers."""
    from diffusers import UNet2DConditionModel

    config = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, layers_per_block=1,
                  cross_attention_dim=CONTEXT, dropout=0.1)
    randomize_(UNet2DConditionModel(**config), seed=4).save_pretrained(tmp_path / "unet")
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "unet", low_cpu_mem_usage=False)
    prefix = "down_blocks.0.attentions.0"
    one = flax_sgm.load_pretrained(tmp_path / "unet", prefix)
    assert one.config.dropout == 0.1
    answers_as_loaded(one, reference.get_submodule(prefix))
    every = flax_sgm.load_pretrained_all(tmp_path / "unet", use_checkpoint=False)  # eager remat compiles: slow
    assert len(every) == 4
    for name, module in every.items():
        answers_as_loaded(module, reference.get_submodule(name))
    flax_sgm.convert_file(tmp_path / "unet", tmp_path / "out", all_stacks=True)
    for name, module in flax_sgm.load_pretrained_all(tmp_path / "out", use_checkpoint=False).items():
        answers_as_loaded(module, reference.get_submodule(name), jit=False)
    one.train()
    from flax_sgm.verify import seeded

    inputs = seeded.sample_inputs(one.config, seed=0, hw=(3, 5), context_tokens=6)
    x, context = nchw_to_nhwc(inputs["x"]), inputs["context"]
    assert not np.array_equal(np.asarray(one(x, context)), np.asarray(one(x, context)))  # dropout on


def test_heads_contradicting_config_json_are_refused(unet):
    path, _ = unet
    with pytest.raises(CheckpointError, match=r"heads=2 contradicts .*config.json, which gives 'down_blocks.0.attentions.0.' 4 heads of 8"):
        flax_sgm.load_pretrained(path, "down_blocks.0.attentions.0", heads=2)
    flax_sgm.load_pretrained(path, "down_blocks.0.attentions.0", head_dim=8)  # the same split, said the other way


def test_a_transformer2d_directory(tmp_path):
    from diffusers import Transformer2DModel

    model = randomize_(Transformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=32,
                                          cross_attention_dim=CONTEXT, num_layers=2), seed=2).eval()
    model.save_pretrained(tmp_path / "transformer")
    copy.deepcopy(model).half().save_pretrained(tmp_path / "transformer", variant="fp16")  # as repositories hold them
    torch.save(model.state_dict(), tmp_path / "transformer" / "diffusion_pytorch_model.bin")
    flax_module = flax_sgm.load_pretrained(tmp_path / "transformer")
    assert flax_module.proj_in.kernel.dtype == np.float32  # diffusers' own file, not a variant
    assert flax_module.transformer_blocks[1].attn2.heads == 4
    assert_stack_matches_torch(flax_module, model)
    config = tmp_path / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"attention_head_dim": 16}))
    with pytest.raises(CheckpointError, match="gives '' 4 heads of 16, but its weights have an inner dim of 32"):
        flax_sgm.load_pretrained(tmp_path / "transformer")


def test_cli_inspects_converts_and_verifies_a_diffusers_directory(unet, tmp_path):
    path, model = unet
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert {s["prefix"]: s["heads"] for s in info["stacks"]} == UNET_STACK_HEADS
    result = run_cli("convert", path, "--all", "--format", "safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for prefix, flax_module in flax_sgm.load_pretrained_all(tmp_path / "out").items():
        assert flax_module.transformer_blocks[0].attn1.heads == UNET_STACK_HEADS[prefix + "."]
        assert_stack_matches_torch(flax_module, submodule(model, prefix))
    # A real process: diffusers' logging writes to the stderr it found at import, which click's runner does not catch.
    done = subprocess.run([sys.executable, "-m", "flax_sgm", "verify", "--checkpoint", str(path), "--prefix",
                           "down_blocks.0.attentions.0", "--json"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("Loading checkpoint shards")]
    assert not noise, done.stderr  # diffusers' loading progress only: no warning (accelerate's was one)
    report = json.loads(done.stdout)
    assert report["passed"] and report["config"]["heads"] == 4
    line = cli_error("convert", path, "--prefix", "down_blocks.0.attentions.0", "--heads", 2, "-o", tmp_path / "x")
    assert "--heads 2 contradicts" in line and not (tmp_path / "x").exists()


def copy_unet(unet, tmp_path) -> Path:
    path = tmp_path / "unet"
    shutil.copytree(unet[0], path)
    return path


# --- variants, as diffusers writes them ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_unet(unet, tmp_path_factory):
    """The tiny UNet's fp16 variant alone, sharded: diffusion_pytorch_model.safetensors.index.fp16.json + shards."""
    path = tmp_path_factory.mktemp("variant") / "unet"
    half = copy.deepcopy(unet[1]).half()
    half.save_pretrained(path, variant="fp16", max_shard_size="100KB")
    assert (path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    return path, half.float()  # the reference: the weights as the variant holds them


def test_sharded_torch_pickles_load_as_the_safetensors_do(tmp_path):
    """diffusers' and transformers' save_pretrained(safe_serialization=False) with shards: `*.bin.index.json` and
    `-0000k-of-0000n.bin` files. The shards were taken for several checkpoints ("pass one of them")."""
    from flax_sgm.verify.tiny import tower, unet

    clip = tower("clip")
    clip.save_pretrained(tmp_path / "text_encoder")  # transformers 5 writes safetensors only: its 4.x layout by hand
    (tmp_path / "text_encoder" / "model.safetensors").unlink()
    state = clip.state_dict()
    weight_map = {k: f"pytorch_model-0000{i % 3 + 1}-of-00003.bin" for i, k in enumerate(state)}
    for shard in set(weight_map.values()):
        torch.save({k: v for k, v in state.items() if weight_map[k] == shard}, tmp_path / "text_encoder" / shard)
    (tmp_path / "text_encoder" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name, model, load in (("unet", unet("sd1"), flax_sgm.load_unet), ("text_encoder", clip, flax_sgm.load_text_encoder)):
        if name == "unet":
            model.save_pretrained(tmp_path / name, max_shard_size="100KB", safe_serialization=False)
        model.save_pretrained(tmp_path / (name + "_safetensors"))
        assert len(list((tmp_path / name).glob("*.bin.index.json"))) == 1 and len(list((tmp_path / name).glob("*.bin"))) > 2
        want = state_of(load(tmp_path / (name + "_safetensors")))
        got = state_of(load(tmp_path / name))
        assert got.keys() == want.keys() and all(np.array_equal(v, want[k]) for k, v in got.items())


def state_of(model) -> dict:
    return {k: np.asarray(v) for k, v in convert.to_torch_state_dict(model).items()}


def test_a_sharded_fp16_variant_loads_with_variant(fp16_unet, tmp_path):
    path, model = fp16_unet
    prefix = "down_blocks.1.attentions.0"
    flax_module = flax_sgm.load_pretrained(path, prefix, variant="fp16", param_dtype="float32")
    assert_stack_matches_torch(flax_module, model.get_submodule(prefix))
    assert flax_sgm.load_pretrained(path, prefix, variant="fp16").proj_in.kernel.dtype == np.float16
    # Its index passed on its own: never read as safetensors, and its heads from the config.json beside it.
    index = path / "diffusion_pytorch_model.safetensors.index.fp16.json"
    flax_module = flax_sgm.load_pretrained(index, prefix, param_dtype="float32")
    assert flax_module.transformer_blocks[0].attn1.heads == UNET_STACK_HEADS[prefix + "."]
    assert_stack_matches_torch(flax_module, model.get_submodule(prefix))
    assert "holds diffusers variants only (fp16); pass --variant" in cli_error("inspect", path)
    assert "has no 'ema' variant (its variants: fp16)" in cli_error("inspect", path, "--variant", "ema")
    result = run_cli("convert", path, "--variant", "fp16", "--all", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(flax_sgm.load_pretrained_all(tmp_path / "out")) == len(UNET_STACK_HEADS)


def test_any_variant_name_and_a_variant_file_on_its_own(tmp_path):
    from diffusers import Transformer2DModel

    def made(seed):
        return randomize_(Transformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=32,
                                             cross_attention_dim=CONTEXT), seed=seed).eval()

    path, plain, ema = tmp_path / "transformer", made(4), made(5)
    plain.save_pretrained(path)
    ema.save_pretrained(path, variant="ema")
    assert_stack_matches_torch(flax_sgm.load_pretrained(path), plain)
    assert_stack_matches_torch(flax_sgm.load_pretrained(path, variant="ema"), ema)
    alone = flax_sgm.load_pretrained(path / "diffusion_pytorch_model.ema.safetensors")
    assert alone.transformer_blocks[0].attn1.heads == 4  # from the config.json beside it
    assert_stack_matches_torch(alone, ema)
    with pytest.raises(CheckpointError, match="variant 'fp16' picks a diffusers directory's files; this file is the 'ema' variant"):
        flax_sgm.load_pretrained(path / "diffusion_pytorch_model.ema.safetensors", variant="fp16")


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("weights.safetensors.index.json", '{"metadata": {}}', "not a sharded checkpoint index (no weight_map object)"),
        ("notes.json", "[1]", "not a sharded checkpoint index"),
        ("config.json", "{}", "a model config, not weights; pass its directory"),
    ],
    ids=["no-weight-map", "other-json", "config"],
)
def test_a_json_file_is_never_read_as_safetensors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    line = cli_error("inspect", tmp_path / name)
    assert message in line and "safetensors file" not in line


def test_the_api_as_users_call_it(sgm):
    """bf16 compute gives a bf16 output; a torch tensor, a batch that differs, an option the weights fix: one line."""
    import jax.numpy as jnp

    d, module = sgm
    flax_module = flax_sgm.load_pretrained(d / "sgm.safetensors", heads=2, dtype=jnp.bfloat16)
    x, context = np.ones((2, 3, 5, 32), np.float32), np.ones((2, 4, CONTEXT), np.float32)
    assert flax_module(x, context).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"`x` is a torch.Tensor; pass a numpy or JAX array \(t.numpy\(\)"):
        flax_module(torch.from_numpy(x), context)
    with pytest.raises(ValueError, match=r"`context` must have shape \[2, m, 24\]; got shape \[1, 4, 24\] \(batch 1, expected 2\)"):
        flax_module(x, context[:1])
    with pytest.raises(CheckpointError, match=r"in_channels= cannot be set here \(the checkpoint says it\)"):
        flax_sgm.load_pretrained(d / "sgm.safetensors", heads=2, in_channels=64)


def test_a_missing_shard_is_named(unet, tmp_path):
    path = copy_unet(unet, tmp_path)
    shard = sorted(path.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    line = cli_error("inspect", path)
    assert f"lists shard {shard.name}, which does not exist" in line


@pytest.mark.parametrize(
    "config,message",
    [
        ("{not json", "config.json: not a readable JSON file"),
        ('{"_class_name": "AutoencoderKL"}', "an AutoencoderKL config, not a diffusers UNet2DConditionModel"),
        ('{"model_type": "clip_text_model"}', "a transformers clip_text_model config, not a diffusers UNet2DConditionModel"),
        ("[1, 2]", "not a model config"),
        (None, "attention_head_dim [4, 2, 1] is not one positive int or 2 of them (the heads per down block)"),
        ("heads", "config.json gives 'down_blocks.0.attentions.0.' 3 heads, which do not divide the inner dim 32"),
    ],
    ids=["not-json", "not-a-unet", "transformers-config", "not-an-object", "heads-per-block", "heads-do-not-divide"],
)
def test_a_bad_config_json_is_one_line_naming_it(unet, tmp_path, config, message):
    path = copy_unet(unet, tmp_path)
    document = json.loads((path / "config.json").read_text())
    if config is None:
        config = json.dumps(document | {"attention_head_dim": [4, 2, 1]})
    elif config == "heads":
        config = json.dumps(document | {"attention_head_dim": [3, 2]})
    (path / "config.json").write_text(config)
    line = cli_error("convert", path, "--all", "-o", tmp_path / "out")
    assert message in line and str(path / "config.json") in line
    assert not (tmp_path / "out").exists()


def test_a_pipeline_directory_names_its_models(unet, tmp_path):
    copy_unet(unet, tmp_path)
    assert "a pipeline? its models: unet/" in cli_error("inspect", tmp_path)


# --- SGM single files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgm.safetensors", "sgm.ckpt"])
def test_an_sgm_file_loads_directly(sgm, name):
    d, module = sgm
    flax_module = flax_sgm.load_pretrained(d / name, SGM, head_dim=16)
    assert_stack_matches_torch(flax_module, module)
    half = flax_sgm.load_pretrained(d / name, SGM, heads=2, param_dtype="bfloat16")
    assert half.proj_in.kernel.dtype == np.dtype("bfloat16")


def test_load_pretrained_param_dtype_on_a_converted_output(sgm, tmp_path):
    d, module = sgm
    flax_sgm.attention.load.convert_file(d / "sgm.safetensors", tmp_path / "out", heads=2)
    same = flax_sgm.load_pretrained(tmp_path / "out", param_dtype="float32")
    assert_stack_matches_torch(same, module)
    half = flax_sgm.load_pretrained(tmp_path / "out", param_dtype="bfloat16")
    assert half.proj_in.kernel.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(half.proj_in.kernel[...], same.proj_in.kernel[...].astype("bfloat16"))


def test_an_output_written_before_the_heads_rename_still_loads(sgm, tmp_path):
    """Format 2 recorded a stack's heads as n_heads / d_head; version 3 says heads / head_dim."""
    d, module = sgm
    flax_sgm.attention.load.convert_file(d / "sgm.safetensors", tmp_path / "out", heads=2, weights="safetensors")
    path = tmp_path / "out" / "config.json"
    document = json.loads(path.read_text())
    assert document["version"] == 3 and document["stacks"][0]["config"]["heads"] == 2
    config = document["stacks"][0]["config"]
    document["version"], document["stacks"][0]["config"] = 2, {
        {"heads": "n_heads", "head_dim": "d_head"}.get(k, k): v for k, v in config.items()
    }
    path.write_text(json.dumps(document))
    model = flax_sgm.load_pretrained(tmp_path / "out")
    assert model.config == flax_sgm.SpatialTransformerConfig.from_seed_args(**SGM_CONFIG)
    assert_stack_matches_torch(model, module)
    document["stacks"][0]["config"]["heads"] = 2  # a v2 record naming both is damaged, not guessed
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"damaged flax-sgm config \(a v2 record with the v3 keys \['heads'\]\)"):
        flax_sgm.load_pretrained(tmp_path / "out")


def test_convert_all_names_prefix_when_a_stack_cannot_be_converted(sgm, tmp_path):
    d, module = sgm
    tensors = {SGM + k: v.contiguous() for k, v in module.state_dict().items()}
    plain = "model.diffusion_model.input_blocks.2.1."
    tensors |= {plain + k: v.clone() for k, v in module.state_dict().items()}
    for i in range(2):  # a non-gated feed-forward: SpatialTransformer cannot build it
        tensors[f"{plain}transformer_blocks.{i}.ff.net.0.proj.weight"] = torch.zeros(128, 32)
        tensors[f"{plain}transformer_blocks.{i}.ff.net.0.proj.bias"] = torch.zeros(128)
    save_file(tensors, tmp_path / "mixed.safetensors")
    line = cli_error("convert", tmp_path / "mixed.safetensors", "--all", "--heads", 2, "-o", tmp_path / "out")
    assert "gated_ff=False" in line and "--prefix" in line and "--skip-unsupported" in line
    result = run_cli("convert", tmp_path / "mixed.safetensors", "--all", "--skip-unsupported", "--heads", 2,
                 "-o", tmp_path / "out")
    assert result.exit_code == 0 and f"skipping {plain}" in result.stderr
    assert list(flax_sgm.load_pretrained_all(tmp_path / "out")) == [SGM.removesuffix(".")]


def test_verify_offers_no_all(sgm, tmp_path):
    d, module = sgm
    tensors = {p + k: v.clone() for p in (SGM, "b.") for k, v in module.state_dict().items()}
    save_file(tensors, tmp_path / "two.safetensors")
    line = cli_error("verify", "--checkpoint", tmp_path / "two.safetensors", "--heads", 2)
    assert "choose one with --prefix" in line and "--all" not in line


# --- the format is what the library accepts -----------------------------------------------------


def safetensors_with_header_start(path: Path, tensors: dict, first_bytes: bytes) -> None:
    """A valid safetensors file whose 8-byte header length starts with `first_bytes` (padded by metadata)."""
    want = int.from_bytes(first_bytes, "little")
    modulus = 1 << (8 * len(first_bytes))
    save_file(tensors, path)
    base = int.from_bytes(path.read_bytes()[:8], "little")
    for extra in range(modulus + 8):
        save_file(tensors, path, metadata={"pad": "x" * extra})
        if int.from_bytes(path.read_bytes()[:8], "little") % modulus == want:
            return
    raise AssertionError(f"no padding gives a header length starting {first_bytes!r} (from {base})")


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"], ids=["pickle-byte", "zip-magic"])
def test_safetensors_that_look_like_a_pickle_or_a_zip_need_no_torch(sgm, tmp_path, first_bytes):
    d, module = sgm
    path = tmp_path / "model.safetensors"
    safetensors_with_header_start(path, {k: v.contiguous() for k, v in module.state_dict().items()}, first_bytes)
    assert path.read_bytes()[: len(first_bytes)] == first_bytes
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` fails
        "import flax_sgm\n"
        f"model = flax_sgm.load_pretrained({str(path)!r}, heads=2)\n"
        "print(model.transformer_blocks[1].attn2.heads)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-2000:]


# --- damaged outputs ------------------------------------------------------------------------------


def load_in_a_fresh_process(path) -> subprocess.CompletedProcess:
    code = (
        "import flax_sgm\n"
        "from flax_sgm.attention.layout import CheckpointError\n"
        "try:\n"
        f"    flax_sgm.load_pretrained({str(path)!r})\n"
        "except CheckpointError as err:\n"
        "    print(err)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def damage(out: Path, how: str) -> Path:
    arrays = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "config.json" and p.stat().st_size > 1000)
    if how == "truncated, sizes unrecorded":  # no reader is handed files it cannot check: config.json is named
        config = json.loads((out / "config.json").read_text())
        for stack in config["stacks"]:
            del stack["files"]
        (out / "config.json").write_text(json.dumps(config))
        damage(out, "truncated")
        return out / "config.json"
    if how == "other shapes":  # config.json and the arrays disagree: checked on the stored metadata before reading
        config = json.loads((out / "config.json").read_text())
        config["stacks"][0]["config"]["context_dim"] += 8
        (out / "config.json").write_text(json.dumps(config))
        return out / config["stacks"][0]["path"]
    if how == "truncated":
        victim = max(arrays, key=lambda p: p.stat().st_size)  # the weights themselves, not spare bytes
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif how == "missing":
        for p in arrays:
            p.unlink()
        victim = arrays[0]
    else:
        victim = out / "config.json"
        victim.write_text(victim.read_text()[:-40])
    return victim


@pytest.mark.parametrize("how", ["truncated", "missing", "config", "truncated, sizes unrecorded", "other shapes"])
@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_a_damaged_output_is_one_line_and_nothing_else(sgm, tmp_path, weights, how):
    d, _ = sgm
    flax_sgm.attention.load.convert_file(d / "sgm.safetensors", tmp_path / "out", heads=2, weights=weights)
    victim = damage(tmp_path / "out", how)
    done = load_in_a_fresh_process(tmp_path / "out")
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and str(victim) in lines[0], done.stdout[-3000:]
    assert "/.out." not in lines[0] and ("unrecorded" not in how or "missing 'files'" in lines[0])
    assert how != "other shapes" or "does not match its config at transformer_blocks.0.attn2.to_k.kernel" in lines[0]


# --- a disk that fills up ------------------------------------------------------------------------

DISK_FULL = """
import resource, signal, sys
from flax_sgm.cli import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
cli(sys.argv[1:], prog_name="flax-sgm")
"""


@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_a_write_that_fails_is_one_line_and_leaves_nothing(sgm, tmp_path, weights):
    d, _ = sgm
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL, "convert", str(d / "sgm.safetensors"), "--heads", "2",
         "--format", weights, "-o", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode != 0 and done.stdout == "", done.stdout[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out}: could not write" in lines[0], done.stderr[-3000:]
    assert "/.out." not in lines[0]  # the staging directory beside it is never named
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory


def test_prefetch_asks_the_kernel_for_the_loaded_tensors_only(tmp_path, monkeypatch):
    """Source.prefetch: one WILLNEED request per run of adjacent tensors it is given, none for the others (a
    single file's UNet is prefetched without its VAE and text encoders)."""
    from safetensors.numpy import save_file as save_numpy

    from flax_sgm.checkpoints import sources

    path = tmp_path / "w.safetensors"
    save_numpy({"a.x": np.ones(100, np.float32), "a.y": np.ones(50, np.float32), "b.z": np.ones(10, np.float32)}, path)
    asked = []
    monkeypatch.setattr(sources.os, "posix_fadvise", lambda fd, offset, size, advice: asked.append((offset, size, advice)),
                        raising=False)
    monkeypatch.setattr(sources.threading, "Thread", lambda target, args, daemon: type("T", (), {"start": lambda s: target(*args)})())
    with sources.open_source(path) as source:
        source.prefetch(k for k in source.infos if k.startswith("a."))
        start = min(source._places[k].offset for k in ("a.x", "a.y"))
    assert asked == [(start, 600, sources.os.POSIX_FADV_WILLNEED)]


def test_load_planned_reads_a_source_in_file_order(tmp_path, monkeypatch):
    """A cold file's pages come as one stream, in the order prefetch asked for them, only if the copies read the
    tensors front to back; the model's own order (sgm's names) is not diffusers' file order."""
    from flax_sgm import load_unet
    from flax_sgm.checkpoints import convert, sources
    from flax_sgm.verify.tiny import unet

    unet("sd1").save_pretrained(tmp_path)  # a unet/ directory
    read = []
    getitem = sources.Source.__getitem__
    monkeypatch.setattr(sources.Source, "__getitem__", lambda self, key: read.append(self.file_position(key)) or getitem(self, key))
    monkeypatch.setattr(convert.os, "cpu_count", lambda: 1)  # one copying thread: reads in submission order
    load_unet(tmp_path)
    assert len(read) > 10 and read == sorted(read)


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_a_dtype_that_is_no_float_is_refused(tmp_path, kind):
    """load_unet / load_vae took param_dtype="int8" (every weight cast to 0), "bool", and dtype="int8"."""
    from flax_sgm.verify import tiny

    model, load = (tiny.unet("sd1"), flax_sgm.load_unet) if kind == "unet" else (tiny.vae("tiny"), flax_sgm.load_vae)
    model.save_pretrained(tmp_path)
    for options, name in ((dict(param_dtype="int8"), "param_dtype"), (dict(param_dtype="bool"), "param_dtype"),
                          (dict(dtype="int8"), "dtype"), (dict(param_dtype="float"), None)):
        if name is None:
            load(tmp_path, **options)  # numpy's "float" is float64: a float
            continue
        with pytest.raises(ValueError, match=rf"{name} must be a floating dtype .*; got '{options[name]}'"):
            load(tmp_path, **options)
    # A field the checkpoint fixes, or none at all, as an option: a raw TypeError before ("got multiple values").
    with pytest.raises(CheckpointError, match=r"in_channels= cannot be set here \(the checkpoint says it\); a loader sets "
                                              r"only use_checkpoint, checkpoint_policy, sdp_backend"):
        load(tmp_path, in_channels=9)
    with pytest.raises(CheckpointError, match="bogus= cannot be set here .not a (UNetConfig|AutoencoderConfig) field"):
        load(tmp_path, bogus=1)
    load(tmp_path, use_checkpoint=True)
