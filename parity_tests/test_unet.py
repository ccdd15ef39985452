"""The whole UNet against diffusers' UNet2DConditionModel: forward and gradients, weights in both layouts, the config.

The reference is diffusers' torch UNet2DConditionModel built in-process at tiny sizes,
every weight random (zero-initialised conv_out and proj_out too), loaded into flax_sgm
through the conversion table under diffusers' names.
"""

import copy
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.numpy import save_file

from conftest import CRITERIA, assert_close, assert_parity, cli_error, compare, randomize_, rel_err
from flax_sgm import load_pretrained, load_unet
from flax_sgm.checkpoints import convert
from flax_sgm.errors import CheckpointError
from flax_sgm.unet.load import convert_unet
from flax_sgm.unet.model import guidance_scale_embedding, sdxl_vector
from flax_sgm.unet.config import PRESETS, UNetConfig
from flax_sgm.unet.diffusers import DEFAULTS, HONOURED, IRRELEVANT, vector_embedding
from flax_sgm.unet.layout import SGM_PREFIX, config_from_weights, diffusers_layout
from flax_sgm.verify import criteria, tiny, verify_modules
from flax_sgm import models

CONFIGS = tiny.UNETS


def diffusers_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    return tiny.unet(name, seed=seed)


def flax_unet(torch_unet: UNet2DConditionModel, **options):
    """flax_sgm's UNet of a diffusers model's config, its weights read under diffusers' names."""
    config = UNetConfig.from_diffusers(dict(torch_unet.config), **options)
    layout = diffusers_layout(config, vector_embedding(torch_unet.config))
    return convert.load_torch_state_dict(models.abstract(config), torch_unet.state_dict(), layout=layout)


def unet_inputs(config: UNetConfig, rng, batch: int = 2, hw=(8, 8)) -> dict:
    inputs = {
        "x": rng.standard_normal((batch, config.in_channels, *hw)).astype(np.float32),  # NCHW: torch's layout
        "timesteps": np.array([3, 917][:batch], np.int64),
        "context": rng.standard_normal((batch, 5, config.context_dim)).astype(np.float32),
    }
    if config.adm_in_channels:
        inputs["y"] = rng.standard_normal((batch, config.adm_in_channels)).astype(np.float32)
    return inputs


# (config, remat): about 40 s each on a 2-core CPU, most of it compiling; one runs by default.
# The refiner-like runs at 16 x 16: at 8 x 8 its last level is 1 x 1 pixel, where GroupNorm sees
# 2 values per group and float32 itself is ill-conditioned (torch's own gradient error 1e-4).
PARITY = [
    pytest.param("sdxl", False, (8, 8), id="sdxl"),
    pytest.param("sdxl", True, (8, 8), id="sdxl-checkpoint", marks=pytest.mark.slow),
    pytest.param("sd1", False, (8, 8), id="sd1", marks=pytest.mark.slow),
    pytest.param("sd2", False, (8, 8), id="sd2", marks=pytest.mark.slow),
    pytest.param("refiner", False, (16, 16), id="refiner", marks=pytest.mark.slow),
    pytest.param("projection", False, (8, 8), id="projection", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,checkpoint,hw", PARITY)
def test_unet_matches_diffusers(name, checkpoint, hw, rng):
    torch_unet = diffusers_unet(name)
    flax = flax_unet(torch_unet, use_checkpoint=checkpoint)
    result = compare(torch_unet, flax, unet_inputs(flax.config, rng, hw=hw))
    assert_parity(result, "UNetModel")


def test_unet_bf16_error_no_worse_than_diffusers(rng):
    """bf16 weights and compute against the float64 referee: every module diffusers holds whole, and the whole
    model, no worse than diffusers' own bf16 error (verify.criteria). Caught: convolutions and linears rounding
    the product and then the bias (1.4x torch's error each), a ResBlock's embedding add and SiLU in bf16 (its
    time_emb_proj gradients 3-4x; this seed's median ratio was 1.32). Over 6 seeds (bench/bf16_pass_rate.py)
    4 passed with bf16 parameters, each failure one LayerNorm weight gradient at 2.57x and 2.65x against the
    2.5x slack, the median ratio 0.97; 6 of 6 with float32 parameters."""
    torch_unet = diffusers_unet("sdxl", seed=1)
    config = UNetConfig.from_diffusers(dict(torch_unet.config))
    bf16 = {k: v.to(torch.bfloat16) for k, v in torch_unet.state_dict().items()}  # as the harness rounds torch's
    flax = convert.load_torch_state_dict(models.abstract(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), bf16,
                                         layout=diffusers_layout(config, vector_embedding(torch_unet.config)))
    report = verify_modules(torch_unet, flax, unet_inputs(config, np.random.default_rng(1)), dtype="bfloat16")
    assert len(report.rows) == 19 and report.model.flax_dtype == "bfloat16"
    assert report.passed, report.format()


def test_verify_modules_reports_each_part_and_a_wrong_weight_fails_its_row_only(rng):
    """verify_modules on diffusers' UNet: a row per module diffusers holds whole (embeddings, conv_in, each
    resnet and attention stack, the samplers, the output norm and conv), named as diffusers names them."""
    torch_unet = diffusers_unet("sdxl")
    flax = flax_unet(torch_unet, use_checkpoint=False)
    kernel = flax.input_blocks[1][0].out_layers.conv.kernel  # diffusers' down_blocks.0.resnets.0.conv2
    kernel[...] = kernel[...] * 1.001
    report = verify_modules(torch_unet, flax, unet_inputs(flax.config, rng))
    names = [row.name for row in report.rows]
    for part in ("time_embedding", "add_embedding", "conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0",
                 "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.1",
                 "conv_norm_out", "conv_out"):
        assert part in names
    assert len(names) == len(set(names)) == 19
    assert [row.name for row in report.rows if not row.passed] == ["down_blocks.0.resnets.0"]
    assert not report.model.passed


def test_sdxl_vector_is_diffusers_added_cond(rng):
    """y from pooled text embeddings and size/crop ids: diffusers' added_cond_kwargs path, whole forward."""
    torch_unet = diffusers_unet("sdxl", seed=3)
    flax = flax_unet(torch_unet, use_checkpoint=False)
    inputs = unet_inputs(flax.config, rng)
    text_embeds = rng.standard_normal((2, 8)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 64, 0, 512, 512]], np.float32)
    with torch.no_grad():
        want = torch_unet(
            torch.from_numpy(inputs["x"]),
            torch.from_numpy(inputs["timesteps"]),
            torch.from_numpy(inputs["context"]),
            added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)},
        ).sample.numpy()
    y = sdxl_vector(jnp.asarray(text_embeds), jnp.asarray(time_ids), dim=torch_unet.config.addition_time_embed_dim)
    got = jax.jit(lambda m, *a: m(*a))(flax, inputs["x"].transpose(0, 2, 3, 1), inputs["timesteps"], inputs["context"], y)
    assert_close(np.asarray(got).transpose(0, 3, 1, 2), want, what="UNet output with y = sdxl_vector(...)")
    with torch.no_grad():
        ids = torch_unet.add_time_proj(torch.from_numpy(time_ids).flatten()).reshape(2, -1)
        want_y = torch.cat([torch.from_numpy(text_embeds), ids], dim=-1).numpy()
    assert_close(y, want_y, what="sdxl_vector")


def test_lcm_unet_matches_diffusers(tmp_path, rng):
    """time_cond_proj_dim: the guidance embedding w -> timestep_cond as diffusers' LCM pipeline computes it, and
    the UNet with it, forward and gradients (timestep_cond's too); its weights from a diffusers directory and
    an sgm single file (time_embed.cond_proj.weight)."""
    from diffusers import LatentConsistencyModelPipeline

    w = np.array([7.5 - 1, 3.0 - 1], np.float32)  # the pipeline embeds guidance_scale - 1
    embed = LatentConsistencyModelPipeline.get_guidance_scale_embedding  # uses no `self`
    for dim in (16, 9, 512):  # sin(6500 * f) in float32 is 1e-4 off either way: judged against float64, as compare does
        referee = embed(None, torch.from_numpy(w).double(), embedding_dim=dim, dtype=torch.float64).numpy()
        torch_error = rel_err(embed(None, torch.from_numpy(w), embedding_dim=dim).numpy(), referee)
        assert rel_err(guidance_scale_embedding(w, dim), referee) <= criteria.allowed("forward", torch_error, "float32")
    torch_unet = diffusers_unet("lcm", seed=2)
    flax = flax_unet(torch_unet, use_checkpoint=False)
    inputs = unet_inputs(flax.config, rng) | {"timestep_cond": np.asarray(guidance_scale_embedding(w, 16))}
    assert_parity(compare(torch_unet, flax, inputs), "UNetModel")
    torch_unet.save_pretrained(tmp_path / "unet")
    assert_holds(load_unet(tmp_path / "unet"), torch_unet)
    # diffusers' single-file converter knows no cond_proj (sgm has none): flax_sgm names it time_embed.cond_proj.
    save_file(convert.to_torch_state_dict(flax, prefix=SGM_PREFIX), str(tmp_path / "lcm.safetensors"))
    loaded = load_unet(tmp_path / "lcm.safetensors", heads=2)
    assert loaded.config.time_cond_proj_dim == 16 and loaded.time_embed.cond_proj.kernel.shape == (16, 32)
    assert_holds(loaded, torch_unet)
    with pytest.raises(ValueError, match=r"^UNetModel: `timestep_cond` must have shape \[2, 16\]; got shape \[2, 8\]"):
        flax(inputs["x"].transpose(0, 2, 3, 1), inputs["timesteps"], inputs["context"], timestep_cond=np.zeros((2, 8)))
    plain = flax_unet(diffusers_unet("sd1"))
    with pytest.raises(ValueError, match=r"^UNetModel: this model takes no `timestep_cond` \(no time_cond_proj_dim"):
        plain(inputs["x"].transpose(0, 2, 3, 1), inputs["timesteps"], inputs["context"], timestep_cond=inputs["timestep_cond"])


def test_per_layer_depths_match_diffusers(tmp_path, rng):
    """transformer_layers_per_block listing each layer's depth and reverse_transformer_layers_per_block (SSD-1B,
    Vega): UNetConfig's transformer_depth_input/_output, forward and gradients equal to diffusers; a single file
    of it reads its depths off the shapes (diffusers' own converter maps its keys back exactly)."""
    torch_unet = diffusers_unet("ssd1b", seed=4)
    flax = flax_unet(torch_unet, use_checkpoint=False)
    assert flax.config.transformer_depth_input == (1, 1, 2, 1)  # level 0 has no attention: its entries do not count
    assert flax.config.transformer_depth_output == (1, 3, 2, 1, 1, 1) and flax.config.transformer_depth_middle == 2
    assert [len(flax.output_blocks[n][1].transformer_blocks) for n in range(3)] == [1, 3, 2]
    assert_parity(compare(torch_unet, flax, unet_inputs(flax.config, rng)), "UNetModel")
    sgm_single_file(torch_unet, tmp_path / "ssd.safetensors")
    loaded = load_unet(tmp_path / "ssd.safetensors", head_dim=16)
    assert loaded.config.transformer_depth_output[:3] == (1, 3, 2)  # the up path's attention blocks
    assert (loaded.config.input_blocks, loaded.config.output_blocks) == (flax.config.input_blocks, flax.config.output_blocks)
    assert_holds(loaded, torch_unet)
    assert UNetConfig.from_json(flax.config.to_json()) == flax.config
    base = dict(torch_unet.config)
    for change, message in [
        (dict(reverse_transformer_layers_per_block=None), "transformer_layers_per_block lists layers but "
                                                          "reverse_transformer_layers_per_block is not set"),
        (dict(transformer_layers_per_block=[1, [2, 1, 1]]), r"transformer_layers_per_block \[2, 1, 1\] for down block 1 is "
                                                            r"not one int >= 0 or 2 of them \(one per layer\)"),
        (dict(reverse_transformer_layers_per_block=[[1, 3], 1]), r"reverse_transformer_layers_per_block \[1, 3\] for up "
                                                                 "block 0 is not one int >= 0 or 3 of them"),
        (dict(reverse_transformer_layers_per_block=[1]), r"reverse_transformer_layers_per_block \[1\] is not one entry per up block \(2\)"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            UNetConfig.from_diffusers(base | change)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_weights_round_trip_both_layouts(name):
    """diffusers -> flax -> diffusers and flax -> sgm -> flax bit for bit; sgm's names are what diffusers'
    own single-file converter (convert_ldm_unet_checkpoint) maps back onto the diffusers model."""
    torch_unet = diffusers_unet(name, seed=5)
    flax = flax_unet(torch_unet)
    want = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    layout = diffusers_layout(flax.config, vector_embedding(torch_unet.config))
    back = convert.to_torch_state_dict(flax, layout=layout)
    assert back.keys() == want.keys()
    assert all(np.array_equal(back[k], want[k]) for k in want)

    sgm = convert.to_torch_state_dict(flax, prefix=SGM_PREFIX)
    mapped = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in sgm.items()}, dict(torch_unet.config))
    assert mapped.keys() == want.keys()
    assert all(np.array_equal(mapped[k].numpy(), want[k]) for k in want)

    again = convert.load_torch_state_dict(models.abstract(flax.config), sgm, prefix=SGM_PREFIX)
    first, second = (dict(jax.tree.leaves_with_path(convert.nnx.state(m, convert.nnx.Param))) for m in (flax, again))
    assert all(np.array_equal(first[k], second[k]) for k in first)


def assert_holds(flax, torch_unet) -> None:
    """`flax` holds `torch_unet`'s weights, bit for bit."""
    layout = diffusers_layout(flax.config, vector_embedding(torch_unet.config))
    got = convert.to_torch_state_dict(flax, layout=layout)
    want = torch_unet.state_dict()
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k].numpy()) for k in want)


def test_load_unet_diffusers_directories(tmp_path):
    """A unet/ directory, a whole pipeline directory (its unet/), and a sharded one."""
    torch_unet = diffusers_unet("sdxl", seed=7)
    torch_unet.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "vae").mkdir()
    (tmp_path / "pipe" / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    torch_unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    for path in (tmp_path / "pipe" / "unet", tmp_path / "pipe", tmp_path / "sharded"):
        assert_holds(load_unet(path), torch_unet)
    with pytest.raises(CheckpointError, match="config.json says the config; leave out heads="):
        load_unet(tmp_path / "pipe", heads=2)


def test_load_unet_fp16_variants(tmp_path):
    """diffusers' fp16 variant files, one file and sharded, beside the float32 ones: variant= picks them."""
    torch_unet = diffusers_unet("sdxl", seed=9)
    half = copy.deepcopy(torch_unet).half()
    torch_unet.save_pretrained(tmp_path / "unet")
    half.save_pretrained(tmp_path / "unet", variant="fp16")
    half.save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size="200KB")
    assert list((tmp_path / "sharded").glob("*.index.fp16.json"))
    assert_holds(load_unet(tmp_path / "unet"), torch_unet)
    for path in (tmp_path / "unet", tmp_path / "sharded"):
        unet = load_unet(path, variant="fp16")
        assert unet.input_blocks[0][0].kernel[...].dtype == jnp.float16
        assert_holds(unet, half)
    with pytest.raises(CheckpointError, match=r"sharded: holds diffusers variants only \(fp16\); pass variant="):
        load_unet(tmp_path / "sharded")


def diffusers_output(torch_unet, inputs: dict, **extra) -> np.ndarray:
    """diffusers' UNet on `unet_inputs` (NCHW), as NHWC."""
    with torch.no_grad():
        out = torch_unet(*(torch.from_numpy(inputs[k]) for k in ("x", "timesteps", "context")),
                         **{k: torch.from_numpy(v) for k, v in extra.items()}).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_load_unet_returns_inference_mode_as_diffusers_does(tmp_path, rng):
    """dropout 0.1 in config.json: load_unet's model answers as diffusers' from_pretrained (eval mode) does, eager
    and under jax.jit, the same every call; model.train() turns dropout on. A convert output loads the same way.
    Without model.eval() in the loaders the eager output was 0.59 off (relative) and two calls differed."""
    randomize_(UNet2DConditionModel(**CONFIGS["sd1"], dropout=0.1), 13).save_pretrained(tmp_path / "unet")
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "unet", low_cpu_mem_usage=False)
    assert not reference.training
    unet = load_unet(tmp_path / "unet")
    inputs = unet_inputs(unet.config, rng)
    args = (inputs["x"].transpose(0, 2, 3, 1), inputs["timesteps"], inputs["context"])
    want = diffusers_output(reference, inputs)
    tol = CRITERIA["float32"].forward
    eager = np.asarray(unet(*args))
    assert_close(eager, want, tol, what="eager, as loaded")
    assert_close(np.asarray(unet(*args)), eager, 0.0, what="a second eager call")
    assert_close(np.asarray(jax.jit(lambda m, *a: m(*a))(unet, *args)), want, tol, what="under jax.jit")
    unet.train()
    dropped = np.asarray(unet(*args))
    assert rel_err(dropped, want) > 1e-2 and rel_err(np.asarray(unet(*args)), dropped) > 1e-2  # dropout on, fresh keys
    # `seed` seeds the dropout keys: the same seed drops the same units, another seed others (it was ignored once).
    seeded = [load_unet(tmp_path / "unet", seed=s) for s in (5, 5, 6)]
    masks = [np.asarray(u.train() or u(*args)) for u in seeded]
    assert rel_err(masks[0], masks[1]) == 0 and rel_err(masks[0], masks[2]) > 1e-2
    unet.eval()
    assert_close(np.asarray(unet(*args)), want, tol, what="eager after model.eval()")
    convert_unet(tmp_path / "unet", tmp_path / "out")
    assert_close(np.asarray(load_unet(tmp_path / "out")(*args)), want, tol, what="a convert output, loaded")


def sgm_single_file(torch_unet, path) -> None:
    """An sgm/LDM single file of `torch_unet` beside a VAE and a text encoder. Its UNet keys are checked by
    diffusers' own converter: convert_ldm_unet_checkpoint maps them back onto the diffusers model exactly."""
    unet = convert.to_torch_state_dict(flax_unet(torch_unet), prefix=SGM_PREFIX)
    mapped = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in unet.items()}, dict(torch_unet.config))
    want = torch_unet.state_dict()
    assert mapped.keys() == want.keys() and all(torch.equal(mapped[k], want[k]) for k in want)
    others = {
        "first_stage_model.decoder.conv_in.weight": np.ones((8, 4, 3, 3), np.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(16, np.float32),
    }
    if path.suffix == ".ckpt":  # a torch.save pickle as LDM wrote them, read with weights_only
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in (unet | others).items()}}, path)
    else:
        save_file(unet | others, str(path))


def test_load_unet_sgm_single_file(tmp_path):
    torch_unet = diffusers_unet("sd1", seed=8)
    sgm_single_file(torch_unet, tmp_path / "model.safetensors")
    sgm_single_file(torch_unet, tmp_path / "model.ckpt")
    assert_holds(load_unet(tmp_path / "model.safetensors", heads=2), torch_unet)
    assert_holds(load_unet(tmp_path / "model.ckpt", heads=2), torch_unet)
    # A UNet of none of the released shapes needs its heads, said in one line; or its whole config, checked.
    with pytest.raises(CheckpointError, match=r"model.safetensors: a UNet that is none of sd15, .* give heads= or head_dim="):
        load_unet(tmp_path / "model.safetensors")
    config = UNetConfig.from_diffusers(dict(torch_unet.config))
    assert_holds(load_unet(tmp_path / "model.safetensors", config=config), torch_unet)
    with pytest.raises(CheckpointError, match=r"model.safetensors: the weights do not fit config=: context_dim 24 \(config= has 32\)$"):
        load_unet(tmp_path / "model.safetensors", config=config.replace(context_dim=32))


def test_a_released_single_file_forced_into_another_preset_is_refused():
    """An SD 1.5 file read with config=UNetConfig.preset("sdxl-base"): one line naming what differs and what it is."""
    sd15 = convert.torch_shapes(models.abstract(PRESETS["sd15"]), prefix=SGM_PREFIX)
    shapes = {k: jax.ShapeDtypeStruct(v, jnp.float16) for k, v in sd15.items()}
    with pytest.raises(CheckpointError) as err:
        config_from_weights(shapes, config=PRESETS["sdxl-base"], source="v1-5-pruned.safetensors")
    text = str(err.value)
    assert text.startswith("v1-5-pruned.safetensors: the weights do not fit config=: channel_mult (1, 2, 4, 4) (config= has (1, 2, 4))")
    assert text.endswith("; they are sd15's shapes") and "\n" not in text
    assert config_from_weights(shapes, config=PRESETS["sd15"]) == PRESETS["sd15"]


@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_convert_unet_and_load_it_back_bit_exact(tmp_path, weights):
    """`flax-sgm convert --unet` of a diffusers directory and of an sgm single file; load_unet(out) needs no arguments."""
    from click.testing import CliRunner

    from flax_sgm.cli import cli

    torch_unet = diffusers_unet("sdxl", seed=11)
    torch_unet.save_pretrained(tmp_path / "unet")
    sgm_single_file(torch_unet, tmp_path / "model.safetensors")
    for source, extra in ((tmp_path / "unet", {}), (tmp_path / "model.safetensors", {"head_dim": 16})):
        out = tmp_path / f"{source.stem}-{weights}"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
        result = CliRunner().invoke(cli, ["convert", str(source), "--unet", "--format", weights, "-o", str(out), *flags])
        assert result.exit_code == 0, result.output
        assert f"load: flax_sgm.load_unet({str(out)!r})" in result.output
        unet = load_unet(out)
        assert unet.config == load_unet(source, **extra).config  # as recorded: no arguments needed
        assert_holds(unet, torch_unet)
    inspected = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(tmp_path / "unet")]).stdout)["unet"]
    assert inspected["config"] == load_unet(tmp_path / "unet").config.to_dict() and inspected["preset"] is None
    assert inspected["parameters"] == sum(p.numel() for p in torch_unet.parameters())
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "model.safetensors")]).output
    assert "a whole UNet" in text and "none of the released models" in text and "give --heads or --head-dim" in text
    text = CliRunner().invoke(cli, ["inspect", str(out)]).output  # what the converted directory records
    assert "a flax-sgm convert output" in text and f"the whole UNet (32 ch x [1, 2], context 24)" in text, text
    recorded = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(out)]).stdout)["stacks"]
    assert [(r["model"], r["config"]) for r in recorded] == [("UNetModel", unet.config.to_dict())]
    with pytest.raises(CheckpointError, match="holds a whole UNet, not SpatialTransformer stacks; load it with load_unet"):
        load_pretrained(out)
    with pytest.raises(CheckpointError, match="records its config; leave out heads="):
        load_unet(out, heads=2)
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "unet"), "--unet", "--all", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--unet converts the whole UNet" in result.output


NOT_UNETS = {
    "vae": ({"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}, r"first_stage_model\. \(a VAE, not a UNet\)"),
    "text-encoders": ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 8)},
                      r"conditioner\. \(text encoders, not a UNet\)"),
    "controlnet": ({"control_model.input_blocks.0.0.weight": (32, 4, 3, 3), "control_model.zero_convs.0.0.weight": (32, 32, 1, 1)},
                   r"control_model\. \(a ControlNet, not a UNet\)"),
}


@pytest.mark.parametrize("name", list(NOT_UNETS))
def test_load_unet_names_what_a_file_holds_instead(tmp_path, name):
    keys, message = NOT_UNETS[name]
    save_file({k: np.ones(shape, np.float32) for k, shape in keys.items()}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}.safetensors: no UNet under 'model.diffusion_model.'.*{message}"):
        load_unet(tmp_path / f"{name}.safetensors")


def test_load_unet_refuses_a_diffusers_controlnet(tmp_path):
    ControlNetModel(**{k: v for k, v in CONFIGS["sd1"].items() if k not in ("up_block_types", "sample_size")},
                    conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "controlnet")
    with pytest.raises(CheckpointError, match=r"controlnet/config.json: a ControlNetModel config, not a diffusers UNet2DConditionModel"):
        load_unet(tmp_path / "controlnet")


def test_missing_and_extra_keys_are_listed_at_once():
    torch_unet = diffusers_unet("sd1")
    config = UNetConfig.from_diffusers(dict(torch_unet.config))
    state = dict(torch_unet.state_dict())
    del state["conv_in.weight"]
    state["mid_block.attentions.0.extra.weight"] = torch.zeros(1)
    state["up_blocks.0.resnets.0.conv1.weight"] = torch.zeros(3, 3)
    with pytest.raises(convert.ConversionError) as err:
        convert.load_torch_state_dict(models.abstract(config), state, layout=diffusers_layout(config, None))
    text = str(err.value)
    assert "missing key: conv_in.weight" in text
    assert "unexpected key: mid_block.attentions.0.extra.weight" in text
    assert "shape mismatch: up_blocks.0.resnets.0.conv1.weight has shape [3, 3]" in text


def test_a_directory_whose_weights_do_not_fit_its_config_is_named_in_one_line(tmp_path):
    """SD 2.x's config.json beside SD 1.x's weights: load_unet's error named no file, and the command line printed
    one line per key (109 here)."""
    tiny.unet("sd1").save_pretrained(tmp_path / "mixed")
    tiny.unet("sd2").save_pretrained(tmp_path / "sd2")
    (tmp_path / "mixed" / "config.json").write_text((tmp_path / "sd2" / "config.json").read_text())
    with pytest.raises(convert.ConversionError, match=rf"^weight conversion failed for UNetModel from {tmp_path / 'mixed'}:"):
        load_unet(tmp_path / "mixed")
    line = cli_error("convert", tmp_path / "mixed", "--unet", "-o", tmp_path / "out")
    assert line.startswith(f"Error: weight conversion failed for UNetModel from {tmp_path / 'mixed'}: ")
    assert " missing: " in line and "in all)" in line and line.endswith("(--debug lists them all)")


# The config --------------------------------------------------------------------------------


def test_every_diffusers_field_is_honoured_refused_or_irrelevant():
    """A field diffusers adds to UNet2DConditionModel later fails here until it is placed."""
    params = [p for p in inspect.signature(UNet2DConditionModel.__init__).parameters if p != "self"]
    lists = [set(HONOURED), set(DEFAULTS), set(IRRELEVANT)]
    assert sorted(params) == sorted(p for group in lists for p in group)
    assert sum(len(g) for g in lists) == len(params)  # each field in one list only


def test_refused_fields_name_field_and_value():
    base = dict(UNet2DConditionModel(**CONFIGS["sd1"]).config)
    for field, default in DEFAULTS.items():
        other = not default if isinstance(default, bool) else "something-else" if isinstance(default, str) else 7
        with pytest.raises(CheckpointError, match=f"{field} = {other!r} is not supported"):
            UNetConfig.from_diffusers(base | {field: other})
    with pytest.raises(CheckpointError, match="field brand_new_option = 1 is unknown"):
        UNetConfig.from_diffusers(base | {"brand_new_option": 1})
    for field, value in [
        ("addition_embed_type", "text"),
        ("class_embed_type", "timestep"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "spatial"),
    ]:
        with pytest.raises(CheckpointError, match=f"{field} = {value!r} is not supported"):
            UNetConfig.from_diffusers(base | {field: value})
    for eps in ("1e-2", -1, 0, True):  # went through float(): a string, a negative and zero loaded
        with pytest.raises(CheckpointError, match=f"config.json: norm_eps must be a positive number; got {eps!r}"):
            UNetConfig.from_diffusers(base | {"norm_eps": eps})


# The four released models' diffusers config.json files (the fields that differ from diffusers' defaults).
RELEASED = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=96),
    "sdxl-base": dict(
        block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        upcast_attention=None,
        sample_size=128,
    ),
    "sdxl-refiner": dict(
        block_out_channels=[384, 768, 1536, 1536],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[6, 12, 24, 24],
        transformer_layers_per_block=4,
        cross_attention_dim=1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
        sample_size=128,
    ),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_presets_are_the_released_models(name):
    """Each preset is its model's diffusers config, and has every tensor of diffusers' model, shape for shape."""
    config = dict(RELEASED[name], _class_name="UNet2DConditionModel")
    assert UNetConfig.from_diffusers(config) == PRESETS[name]
    with torch.device("meta"):
        torch_unet = UNet2DConditionModel(**RELEASED[name])
    want = {k: tuple(v.shape) for k, v in torch_unet.state_dict().items()}
    model = models.abstract(PRESETS[name])
    layout = diffusers_layout(PRESETS[name], vector_embedding(torch_unet.config))
    assert convert.torch_shapes(model, layout=layout) == want
    # A single file of it is recognised by its shapes (no heads needed), an inpainting one (9 channels) too.
    sgm = {k: jax.ShapeDtypeStruct(v, jnp.float16) for k, v in convert.torch_shapes(model, prefix=SGM_PREFIX).items()}
    assert config_from_weights(sgm) == PRESETS[name]
    sgm[SGM_PREFIX + "input_blocks.0.0.weight"] = jax.ShapeDtypeStruct((PRESETS[name].model_channels, 9, 3, 3), jnp.float16)
    assert config_from_weights(sgm) == PRESETS[name].replace(in_channels=9)


def test_config_json_round_trip():
    for config in PRESETS.values():
        assert UNetConfig.from_json(config.to_json()) == config


# Bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl():
    return flax_unet(diffusers_unet("sdxl"))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(y=None), r"UNetModel: this model takes `y` \[b, 56\]"),
        (dict(y=np.zeros((2, 57), np.float32)), r"UNetModel: `y` must have shape \[2, 56\]; got shape \[2, 57\]"),
        (dict(context=np.zeros((2, 5, 25), np.float32)), r"`context` must have shape \[2, m, 24\]; got shape \[2, 5, 25\]"),
        (dict(context=None), r"UNetModel: this model has cross-attention: `context` \[b, m, 24\] is required"),
        (dict(x=np.zeros((2, 9, 8, 4), np.float32)), r"multiples of 2 \(2 \*\* \(levels - 1\)\); got 9 x 8"),
        (dict(timesteps="10"), r"^UNetModel: `timesteps` must be integers or floats; got '10'$"),
        (dict(timesteps=None), r"^UNetModel: `timesteps` must be integers or floats; got None$"),
        (dict(timesteps=["1", "2"]), r"^UNetModel: `timesteps` must be integers or floats; got dtype <U1$"),
        (dict(timesteps=np.array([1j, 2j])), r"^UNetModel: `timesteps` must be integers or floats; got dtype complex128$"),
        (dict(x=None), r"^UNetModel: `x` must be integers or floats; got None$"),
        (dict(x=np.zeros((2, 8, 8, 4), bool)), r"^UNetModel: `x` must be integers or floats; got dtype bool$"),
        (dict(context="a cat"), r"^UNetModel: `context` must be integers or floats; got 'a cat'$"),
        (dict(y="pooled"), r"^UNetModel: `y` must be integers or floats; got 'pooled'$"),
    ],
    ids=["no-y", "y-width", "context-width", "no-context", "odd-size", "timesteps-str", "timesteps-none",
         "timesteps-strs", "timesteps-complex", "x-none", "x-bool", "context-str", "y-str"],
)
def test_bad_inputs_are_one_line(tiny_sdxl, change, message):
    args = dict(
        x=np.zeros((2, 8, 8, 4), np.float32),
        timesteps=np.array([1, 2]),
        context=np.zeros((2, 5, 24), np.float32),
        y=np.zeros((2, 56), np.float32),
    )
    with pytest.raises(ValueError, match=message):
        tiny_sdxl(**(args | change))


@pytest.mark.parametrize(
    "pooled,time_ids,message",
    [
        ("text", np.zeros((2, 3)), r"^sdxl_vector: `pooled` must be integers or floats; got 'text'$"),
        (np.zeros((2, 16)), np.zeros(3), r"^sdxl_vector: `time_ids` must have rank 2, shape \[b, k\]; got shape \[3\]$"),
        (np.zeros((3, 16)), np.zeros((2, 3)), r"^sdxl_vector: `pooled` must have shape \[2, p\]; got shape \[3, 16\]"),
    ],
)
def test_sdxl_vector_bad_inputs_are_one_line(pooled, time_ids, message):
    with pytest.raises(ValueError, match=message):
        sdxl_vector(pooled, time_ids)
