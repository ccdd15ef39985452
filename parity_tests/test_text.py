"""The CLIP / OpenCLIP text encoders (flax_sgm.text) against transformers' CLIPTextModel(WithProjection).

Tiny random towers (2 layers of 32, vocabulary 1000, 77 positions), saved with transformers' save_pretrained and
read back with load_text_encoder, forward and gradients against the float64 referee (verify.compare: every
output at once, clip_text_outputs). Single-file fixtures are checked by diffusers' own converters
(convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), never by flax_sgm's mapping alone.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from flax import nnx
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import CLIPTextConfig as TransformersConfig
from transformers import CLIPTextModel as TransformersCLIPTextModel
from transformers import CLIPTextModelWithProjection

from conftest import assert_close, assert_parity, compare, randomize_
import flax_sgm
from flax_sgm import CheckpointError, CLIPTextConfig, CLIPTextModel, load_text_encoder
from flax_sgm.checkpoints import convert
from flax_sgm.verify import tiny
from flax_sgm.text.config import PRESETS
from flax_sgm.text.layout import KIND_NAMES, TRANSFORMERS, open_clip_layout

KIND_OPEN_CLIP = KIND_NAMES["open_clip"]
from flax_sgm.text.load import plan_text_encoder
from flax_sgm.text.transformers import DEFAULTS, HONOURED, IRRELEVANT
from flax_sgm.checkpoints.sources import open_source
from flax_sgm import models

VOCAB = tiny.VOCAB
END = VOCAB - 1  # CLIP's end token is the largest id of its vocabulary (49407): the legacy rule pools at the argmax
CONFIGS = tiny.TOWERS  # clip, openclip, and eos (a config that pools at its eos_token_id)


def token_ids(eos: int, rng, batch: int = 3, n: int = 77, pad: int | None = None) -> np.ndarray:
    """Prompts as a tokenizer makes them: bos, words, the end token at a varying place, then padding (the end
    token again, or `pad`). Words avoid the end token and include ids above it where it is not the largest."""
    ids = rng.integers(3, END, (batch, n))
    ids[ids == eos] = eos + 1
    ids[:, 0] = 0
    for i, end in enumerate(rng.choice(np.arange(3, n - 1), batch, replace=False)):
        ids[i, end] = eos
        ids[i, end + 1 :] = eos if pad is None else pad
    return ids


def eos_of(name: str) -> int:
    eos = CONFIGS[name][1]["eos_token_id"]
    return END if eos == 2 else eos


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tower saved by transformers' save_pretrained, and loaded back by load_text_encoder."""
    root = tmp_path_factory.mktemp("towers")
    towers = {}
    for name in CONFIGS:
        tower = tiny.tower(name)
        tower.save_pretrained(root / name)
        towers[name] = (tower, load_text_encoder(root / name), root / name)
    return towers


def layout_of(tower):
    """transformers 5 saves a CLIPTextModel under flax_sgm's own names, a CLIPTextModelWithProjection under `text_model.`."""
    return TRANSFORMERS if hasattr(tower, "text_model") else None


def assert_holds(flax, tower) -> None:
    """`flax` holds `tower`'s weights, bit for bit."""
    got = convert.to_torch_state_dict(flax, layout=layout_of(tower))
    want = tower.state_dict()
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k].numpy()) for k in want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_text_encoder_matches_transformers(saved, name, rng):
    """last_hidden_state, pooler_output, text_embeds and every hidden state, and the gradients of every
    parameter through all of them, against the float64 referee. The eos config's mask hides the padding."""
    tower, flax, _ = saved[name]
    assert flax.config.hidden_act == CONFIGS[name][1]["hidden_act"]
    ids = token_ids(eos_of(name), rng)
    inputs = {"x": ids}
    if name == "eos":
        inputs["attention_mask"] = (np.arange(77)[None] <= np.argmax(ids == 7, axis=1)[:, None]).astype(np.int64)
    assert_parity(compare(tower, flax, inputs), "CLIPTextModel")


def test_outputs_are_transformers_by_name(saved, rng):
    """Each output on its own, under transformers' names, against transformers' float32 run."""
    for name in ("clip", "eos"):
        tower, flax, _ = saved[name]
        ids = token_ids(eos_of(name), rng, pad=0)
        with torch.no_grad():
            want = tower(torch.from_numpy(ids), output_hidden_states=True)
        got = flax(ids, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == 3
        assert_close(got.hidden_states, [h.numpy() for h in want.hidden_states], what=f"{name} hidden_states")
        assert_close(got.last_hidden_state, want.last_hidden_state.numpy(), what=f"{name} last_hidden_state")
        if name == "clip":
            assert got.text_embeds is None
            assert_close(got.pooler_output, want.pooler_output.numpy(), what="pooler_output")
        else:
            assert_close(got.text_embeds, want.text_embeds.numpy(), what="text_embeds")
            assert flax(ids).hidden_states is None


def test_pooling_rules_differ_and_each_is_transformers(saved, rng):
    """The legacy rule (eos_token_id 2) pools at the largest id, any other at the first eos: on ids where the two
    places differ, each config pools where transformers does (a model pooling by the other rule fails)."""
    tower, flax, _ = saved["eos"]
    ids = token_ids(7, rng)
    assert (np.argmax(ids, axis=1) != np.argmax(ids == 7, axis=1)).all()
    legacy = CLIPTextModel(dataclasses.replace(flax.config, eos_token_id=2), rngs=nnx.Rngs(0))
    nnx.update(legacy, nnx.state(flax, nnx.Param))
    out = flax(ids)
    last = np.asarray(out.last_hidden_state)
    at_first_eos = last[np.arange(3), np.argmax(ids == 7, axis=1)]
    assert_close(out.pooler_output, at_first_eos, what="first-eos pooling")
    assert_close(legacy(ids).pooler_output, last[np.arange(3), np.argmax(ids, axis=1)], what="argmax pooling")


def test_prompt_tuning_gradients_match_transformers(saved, rng):
    """Gradients with respect to the token embeddings (inputs_embeds; transformers' through a hook), with the
    parameters', against the float64 referee."""
    tower, flax, _ = saved["openclip"]
    ids = token_ids(END, rng, batch=2)
    embeds = np.asarray(flax.embeddings.token_embedding.embedding[...])[ids] + 0.01 * rng.standard_normal((2, 77, 32))
    result = compare(tower, flax, {"x": ids, "inputs_embeds": embeds.astype(np.float32)})
    assert "input:inputs_embeds" in result.errors
    assert_parity(result, "CLIPTextModel")


def test_jit_grad_vmap(saved, rng):
    _, flax, _ = saved["openclip"]
    ids = token_ids(END, rng, batch=2)
    eager = flax(ids, output_hidden_states=True)
    graphdef, params = nnx.split(flax)

    @jax.jit
    def encode(params, ids):
        return nnx.merge(graphdef, params)(ids, output_hidden_states=True)

    assert_close(encode(params, ids), eager, what="jit")
    per_prompt = jax.vmap(lambda one: encode(params, one[None]).text_embeds[0])(jnp.asarray(ids))
    assert_close(per_prompt, eager.text_embeds, what="vmap")

    def loss(params, embeds):
        out = nnx.merge(graphdef, params)(ids, inputs_embeds=embeds)
        return (out.text_embeds**2).sum()

    embeds = flax.embeddings.token_embedding.embedding[...][ids]
    g_params, g_embeds = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, embeds)
    table = g_params["embeddings"]["token_embedding"]["embedding"][...]
    assert not np.asarray(table).any()  # the table is not looked up when inputs_embeds are given
    assert np.abs(np.asarray(g_embeds)).max() > 0
    # An id past the vocabulary under jit (where it cannot be checked) gives NaN, not a clamped row.
    bad = ids.copy()
    bad[0, 5] = VOCAB
    assert np.isnan(np.asarray(encode(params, bad).last_hidden_state[0])).any()


# Directories ------------------------------------------------------------------------------------------------

def hub_layout(directory) -> None:
    """A directory as transformers 4 wrote every released text_encoder/: `text_model.` before every name, and the
    position-id buffer. transformers 5 itself reads it (checked), as load_text_encoder must."""
    path = directory / "model.safetensors"
    tensors = {k if k.startswith("text_") else "text_model." + k: v for k, v in load_file(path).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    from safetensors.torch import save_file as save_torch

    save_torch(tensors, path)
    reread, info = TransformersCLIPTextModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_load_text_encoder_directories(saved, tmp_path):
    """text_encoder/ dirs as transformers 5 and 4 save them, and a pipeline's (embedder 0 and 1)."""
    for name in CONFIGS:
        assert_holds(saved[name][1], saved[name][0])
        assert saved[name][1].config.eos_token_id == CONFIGS[name][1]["eos_token_id"]
    clip, openclip = tiny.tower("clip", seed=3), tiny.tower("openclip", seed=4)
    pipe = tmp_path / "pipe"
    clip.save_pretrained(pipe / "text_encoder")
    openclip.save_pretrained(pipe / "text_encoder_2")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    hub_layout(pipe / "text_encoder")
    assert_holds(load_text_encoder(pipe / "text_encoder"), clip)
    assert_holds(load_text_encoder(pipe), clip)
    assert_holds(load_text_encoder(pipe, embedder=1), openclip)
    with open_source(pipe / "text_encoder") as source:
        ignored = plan_text_encoder(source).ignored
    assert [k for k, _ in ignored] == ["text_model.embeddings.position_ids"]
    with pytest.raises(CheckpointError, match=r"pipe: embedder=2, but the pipeline's text encoders are 0 \(text_encoder/\), "
                                              r"1 \(text_encoder_2/\)$"):
        load_text_encoder(pipe, embedder=2)
    # The refiner's pipeline has text_encoder_2 alone: sgm's embedder 0.
    refiner = tmp_path / "refiner"
    openclip.save_pretrained(refiner / "text_encoder_2")
    assert_holds(load_text_encoder(refiner), openclip)


def test_load_text_encoder_variants(tmp_path):
    """A text_encoder/ as a model repository holds it (model.safetensors, pytorch_model.bin, fp16 variants, one
    file and sharded): the float32 safetensors by default, variant= picks the others."""
    import copy

    tower = tiny.tower("openclip", seed=11)
    half = copy.deepcopy(tower).half()
    tower.save_pretrained(tmp_path / "te")
    torch.save(tower.state_dict(), tmp_path / "te" / "pytorch_model.bin")
    half.save_pretrained(tmp_path / "te", variant="fp16")
    half.save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size="20KB")
    assert list((tmp_path / "sharded").glob("model.safetensors.index.fp16.json"))
    assert_holds(load_text_encoder(tmp_path / "te"), tower)
    for path in (tmp_path / "te", tmp_path / "sharded"):
        model = load_text_encoder(path, variant="fp16")
        assert model.final_layer_norm.scale[...].dtype == jnp.float16
        assert_holds(model, half)
    with pytest.raises(CheckpointError, match=r"sharded: holds diffusers variants only \(fp16\); pass variant="):
        load_text_encoder(tmp_path / "sharded")


# Single files -----------------------------------------------------------------------------------------------

def flax_of(tower):
    config = CLIPTextConfig.from_transformers(tower.config.to_dict(), projection=hasattr(tower, "text_projection"))
    return convert.load_torch_state_dict(models.abstract(config), tower.state_dict(), layout=layout_of(tower))


def sgm_clip(tower, prefix: str) -> dict:
    """A CLIP tower as sgm's FrozenCLIPEmbedder holds it (transformers 4's names under `prefix`), checked by
    diffusers' convert_ldm_clip_checkpoint mapping it back onto the transformers model exactly."""
    tensors = convert.to_torch_state_dict(flax_of(tower), prefix=prefix, layout=TRANSFORMERS)
    tensors[prefix + "text_model.embeddings.position_ids"] = np.arange(77)[None]
    mapped = convert_ldm_clip_checkpoint({k: torch.from_numpy(v) for k, v in tensors.items()})
    mapped = {k.removeprefix("text_model."): v for k, v in mapped.items() if not k.endswith("position_ids")}
    want = tower.state_dict()
    assert mapped.keys() == want.keys() and all(torch.equal(mapped[k], want[k]) for k in want)
    return tensors


def sgm_open_clip(tower, prefix: str) -> dict:
    """An OpenCLIP tower as sgm's FrozenOpenCLIPEmbedder(2) holds it (open_clip's names under `prefix`, with
    logit_scale and attn_mask), checked by diffusers' convert_open_clip_checkpoint mapping it back exactly."""
    flax = flax_of(tower)
    tensors = convert.to_torch_state_dict(flax, prefix=prefix, layout=open_clip_layout(flax.config))
    assert tensors[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    tensors[prefix + "logit_scale"] = np.array(4.6, np.float32)
    tensors[prefix + "attn_mask"] = np.triu(np.full((77, 77), -np.inf, np.float32), 1)
    mapped = convert_open_clip_checkpoint(tower, {k: torch.from_numpy(v) for k, v in tensors.items()}, prefix=prefix)
    want = tower.state_dict()
    if prefix == "cond_stage_model.model.":  # diffusers' SD 2.x text encoder has no projection: it skips that key
        want = {k: v for k, v in want.items() if k != "text_projection.weight"}
        assert np.array_equal(tensors[prefix + "text_projection"], tower.text_projection.weight.detach().numpy().T)
    assert mapped.keys() == want.keys() and all(torch.equal(mapped[k], want[k]) for k in want)
    return tensors


UNET_KEY = {"model.diffusion_model.input_blocks.0.0.weight": np.ones((8, 4, 3, 3), np.float16)}


def tiny_config(tower) -> CLIPTextConfig:
    return CLIPTextConfig.from_transformers(tower.config.to_dict(), projection=hasattr(tower, "text_projection"))


def test_load_text_encoder_sgm_single_files(tmp_path):
    """SD 1.x, SD 2.x, SDXL (both embedders) and the refiner, each tower read back bit for bit."""
    clip, openclip = tiny.tower("clip", seed=5), tiny.tower("openclip", seed=6)
    files = {
        "sd1": sgm_clip(clip, "cond_stage_model.transformer."),
        "sd2": sgm_open_clip(openclip, "cond_stage_model.model."),
        "sdxl": sgm_clip(clip, "conditioner.embedders.0.transformer.")
        | sgm_open_clip(openclip, "conditioner.embedders.1.model."),
        "refiner": sgm_open_clip(openclip, "conditioner.embedders.0.model."),
    }
    for name, tensors in files.items():
        save_file(tensors | UNET_KEY, str(tmp_path / f"{name}.safetensors"))
    path = lambda name: tmp_path / f"{name}.safetensors"  # noqa: E731
    assert_holds(load_text_encoder(path("sd1"), config=tiny_config(clip)), clip)
    assert_holds(load_text_encoder(path("sd2"), config=tiny_config(openclip)), openclip)
    assert_holds(load_text_encoder(path("sdxl"), config=tiny_config(clip)), clip)
    assert_holds(load_text_encoder(path("sdxl"), embedder=1, config=tiny_config(openclip)), openclip)
    assert_holds(load_text_encoder(path("refiner"), config=tiny_config(openclip)), openclip)
    with open_source(path("sdxl")) as source:
        ignored = [k for k, _ in plan_text_encoder(source, embedder=1, config=tiny_config(openclip)).ignored]
    assert sorted(ignored) == ["conditioner.embedders.1.model.attn_mask", "conditioner.embedders.1.model.logit_scale"]

    # The weights do not say the heads or the activation: a tower of none of the released shapes needs config=.
    with pytest.raises(CheckpointError, match=r"sd1.safetensors: the text encoder under 'cond_stage_model.transformer.' is "
                                              r"none of clip-vit-l-14, .*: give config="):
        load_text_encoder(path("sd1"))
    with pytest.raises(CheckpointError, match=r"does not fit config=: num_hidden_layers 2 \(config= has 3\)$"):
        load_text_encoder(path("sd1"), config=tiny_config(clip).replace(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors: embedder=2 is no text encoder \(SDXL's embedders after the text "
                                              r"encoders are the size and crop embedders, which have no weights\); its text "
                                              r"encoders: 0 \(conditioner.embedders.0.transformer.: CLIP"):
        load_text_encoder(path("sdxl"), embedder=2)
    # A strict load: a key under the tower that is neither the model's nor named as ignored is an error.
    save_file(files["sd2"] | {"cond_stage_model.model.transformer.extra": np.ones(3, np.float32)}, str(path("extra")))
    with pytest.raises(convert.ConversionError, match="unexpected key: cond_stage_model.model.transformer.extra"):
        load_text_encoder(path("extra"), config=tiny_config(openclip))


def test_released_towers_are_recognised_by_their_shapes():
    """A single file's released tower needs no config: its shapes pick the preset (heads, activation)."""
    from flax_sgm.text.layout import Tower, config_from_weights

    for name, kind in (("clip-vit-l-14", "transformers"), ("openclip-vit-h-14", "open_clip"),
                       ("openclip-vit-bigg-14", "open_clip")):
        preset = PRESETS[name]
        layout = TRANSFORMERS if kind == "transformers" else open_clip_layout(preset)
        shapes = {k: jax.ShapeDtypeStruct(v, jnp.float16)
                  for k, v in convert.torch_shapes(models.abstract(preset), prefix="p.", layout=layout).items()}
        assert config_from_weights(shapes, Tower(0, "p.", kind)) == preset


def test_round_trip_bit_exact(saved):
    """transformers -> flax -> transformers, and flax -> open_clip -> flax, bit for bit."""
    tower, flax, _ = saved["openclip"]
    back = convert.to_torch_state_dict(flax, layout=TRANSFORMERS)
    assert back.keys() == tower.state_dict().keys()
    assert all(np.array_equal(back[k], v.numpy()) for k, v in tower.state_dict().items())
    layout = open_clip_layout(flax.config)
    tensors = convert.to_torch_state_dict(flax, layout=layout)
    again = convert.load_torch_state_dict(models.abstract(flax.config), tensors, layout=layout)
    first, second = (dict(jax.tree.leaves_with_path(nnx.state(m, nnx.Param))) for m in (flax, again))
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_presets_have_the_released_sizes():
    """Parameter counts of the released towers as diffusers holds them: SD's CLIP ViT-L text_encoder 123,060,480;
    SD 2.x's (OpenCLIP ViT-H, 23 of 24 layers, no projection) 340,387,840; SDXL's text_encoder_2 (ViT-bigG with
    its projection) 694,659,840."""
    def count(config):
        return sum(x.size for x in jax.tree.leaves(nnx.state(models.abstract(config), nnx.Param)))

    assert count(PRESETS["clip-vit-l-14"]) == 123_060_480
    assert count(PRESETS["openclip-vit-h-14"].replace(num_hidden_layers=23, projection_dim=None)) == 340_387_840
    assert count(PRESETS["openclip-vit-bigg-14"]) == 694_659_840


def test_config_json_round_trip():
    config = PRESETS["openclip-vit-bigg-14"].replace(sdp_backend="xla")
    assert CLIPTextConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"unknown CLIP text config keys \['heads'\]"):
        CLIPTextConfig.from_dict(dict(config.to_dict(), heads=3))


# Bad input --------------------------------------------------------------------------------------------------

def test_every_transformers_field_is_honoured_refused_or_irrelevant():
    tables = (set(HONOURED), set(DEFAULTS), set(IRRELEVANT))
    for field in TransformersConfig().to_dict():
        assert sum(field in t for t in tables) == 1, field


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu_new"}, "hidden_act = 'gelu_new' is not supported ('quick_gelu' or 'gelu')"),
    ({"attention_dropout": 0.1}, "attention_dropout = 0.1 is not supported (CLIPTextModel computes attention_dropout = 0.0)"),
    ({"eos_token_id": [2, 3]}, "eos_token_id = [2, 3] is not supported (one int"),
    ({"rope_theta": 10.0}, "field rope_theta = 10.0 is unknown to flax_sgm's CLIPTextModel"),
    ({"model_type": "clip_vision_model"}, "a CLIP vision tower, not a CLIP text tower"),
    ({"model_type": "clip"}, "a full CLIP model (CLIPModel: text and vision towers), not a CLIP text tower"),
    ({"architectures": ["CLIPModel"]}, "architectures ['CLIPModel'] is not one of"),
])
def test_refused_config_fields_are_one_line(saved, tmp_path, change, message):
    tower = tiny.tower("clip")
    tower.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_text_encoder(tmp_path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "config.json"))


def test_bad_files_are_one_line(tmp_path):
    save_file({"vision_model.embeddings.patch_embedding.weight": np.ones((2, 3, 2, 2), np.float32)},
              str(tmp_path / "vision.safetensors"))
    with pytest.raises(CheckpointError, match=r"vision.safetensors: no text encoder .*\(a CLIP vision tower\)$"):
        load_text_encoder(tmp_path / "vision.safetensors")
    save_file(UNET_KEY | {"first_stage_model.decoder.conv_in.weight": np.ones(3, np.float32)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match=r"unet.safetensors: no text encoder .* it holds first_stage_model., "
                                              r"model. \(a UNet and a VAE\)$"):
        load_text_encoder(tmp_path / "unet.safetensors")
    full = {"text_model.embeddings.token_embedding.weight": np.ones((4, 2), np.float32),
            "vision_model.embeddings.patch_embedding.weight": np.ones((2, 3, 2, 2), np.float32)}
    save_file(full, str(tmp_path / "clip.safetensors"))
    with pytest.raises(CheckpointError, match=r"clip.safetensors: a full CLIP model \(text and vision towers, CLIPModel\)"):
        load_text_encoder(tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match=r"embedder must be sgm's embedder number \(0, 1, ...\); got -1"):
        load_text_encoder(tmp_path / "clip.safetensors", embedder=-1)


def test_export_with_a_symbolic_token_count(saved):
    """jax.export of the text encoder over `b, n` tokens: without the constraint n <= 77 the length check's comparison
    was inconclusive deep inside; it says which constraint to add, and with it the exported program runs at every
    length as the model does."""
    from jax import export

    _, flax, _ = saved["clip"]
    b, n = export.symbolic_shape("b, n")
    with pytest.raises(ValueError, match=r"symbolic token count needs the constraint n <= 77 .*constraints=\['n <= 77'\]"):
        export.export(jax.jit(lambda ids: flax(ids).last_hidden_state))(jax.ShapeDtypeStruct((b, n), jnp.int32))
    b, n = export.symbolic_shape("b, n", constraints=["n <= 77"])
    exported = export.export(jax.jit(lambda ids: flax(ids).last_hidden_state))(jax.ShapeDtypeStruct((b, n), jnp.int32))
    rng = np.random.default_rng(0)
    for shape in ((1, 5), (3, 77)):
        ids = rng.integers(3, VOCAB - 1, shape).astype(np.int32)
        assert_close(exported.call(ids), flax(ids).last_hidden_state, what=f"exported at {shape}")


def test_bad_inputs_are_one_line(saved):
    _, flax, _ = saved["clip"]
    ids = np.zeros((2, 77), np.int32)
    for bad, message in [
        (ids + VOCAB, f"CLIPTextModel: `input_ids` holds {VOCAB}, outside the vocabulary 0..{VOCAB - 1}"),
        (ids - 1, "CLIPTextModel: `input_ids` holds -1, outside the vocabulary"),
        (np.zeros((2, 78), np.int32), "CLIPTextModel: `input_ids` has 78 tokens, more than the 77 positions"),
        (ids.astype(np.float32), "CLIPTextModel: `input_ids` must be integer token ids; got dtype float32"),
        (ids[0], r"CLIPTextModel: `input_ids` must have rank 2, shape \[b, n\]; got shape \[77\]"),
        (torch.zeros(2, 77, dtype=torch.long), "CLIPTextModel: `input_ids` is a torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            flax(bad)
        assert "\n" not in str(err.value)


# The conditioner and tokenization ---------------------------------------------------------------------------

tiny_tokenizer = tiny.tokenizer  # flax_sgm.verify.tiny: the tokenizer the tiny pipelines hold


def test_sdxl_conditioning_is_diffusers_encode_prompt(tmp_path):
    """A prompt through both tokenizers (read from a pipeline folder) and both encoders becomes diffusers'
    StableDiffusionXLPipeline.encode_prompt's prompt embeddings (the two penultimate layers, 32 + 32 wide) and
    pooled vector; `y` is the pooled vector beside the embedded size and crop ids (sdxl_vector)."""
    from diffusers import StableDiffusionXLPipeline

    from flax_sgm.text.conditioner import EMBEDDERS, condition
    from flax_sgm.text.tokenizer import load_tokenizer, tokenize

    clip, openclip = tiny.tower("clip", seed=12), tiny.tower("openclip", seed=13)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=clip, text_encoder_2=openclip, tokenizer=tiny_tokenizer("<|endoftext|>"),
                                     tokenizer_2=tiny_tokenizer("!"), unet=None, scheduler=None)
    pipe.save_pretrained(tmp_path)
    prompts = ["a cat", "the dog sits on a mat"]
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    tokenizers = [load_tokenizer(tmp_path, embedder=n) for n in (0, 1)]
    ids = [tokenize(t, prompts) for t in tokenizers]
    assert ids[0][0, -1] == END and ids[1][0, -1] == 0  # the second pads with "!", as open_clip
    models = [load_text_encoder(tmp_path, embedder=n) for n in (0, 1)]
    specs = EMBEDDERS["sdxl-base"]
    specs = (dataclasses.replace(specs[0], layer_idx=1),) + specs[1:]  # layer 11 of 12: here 1 of 2
    time_ids = np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32)
    context, y = condition(models, ids, specs, time_ids)
    assert_close(context, want.numpy(), what="context")
    assert_close(y[:, :24], want_pooled.numpy(), what="pooled")
    assert y.shape == (2, 24 + 6 * 256)
    with pytest.warns(UserWarning, match="the prompt was cut at 77 tokens"):
        assert tokenize(tokenizers[0], "a " * 100).shape == (1, 77)


# diffusers' encode_prompt ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """test_pipeline's tiny SD and SDXL pipelines (its builder, imported here: it imports this module), saved with
    save_pretrained; and an SD 2.x-style one: a 3-layer OpenCLIP-like tower (exact GELU, no projection) that
    sgm holds whole, which diffusers' text_encoder/ holds one layer short (as SD 2.x's is stored: 23 of 24)."""
    from diffusers import StableDiffusionPipeline
    from test_pipeline import torch_pipeline

    root = tmp_path_factory.mktemp("encode_prompt")
    out = {}
    for family in ("sd", "sdxl"):
        pipe = torch_pipeline(family)
        pipe.save_pretrained(root / family)
        out[family] = (pipe, root / family)
    sd = out["sd"][0]
    whole = randomize_(TransformersCLIPTextModel(TransformersConfig(**dict(
        CONFIGS["openclip"][1], num_hidden_layers=3, projection_dim=512))).eval(), 21)
    whole.save_pretrained(root / "sd2-whole")
    short = TransformersCLIPTextModel(TransformersConfig(**dict(CONFIGS["openclip"][1], num_hidden_layers=2))).eval()
    short.load_state_dict({k: v for k, v in whole.state_dict().items() if ".layers.2." not in k})
    out["sd2"] = (StableDiffusionPipeline(**(sd.components | {"text_encoder": short}), requires_safety_checker=False),
                  root / "sd2-whole", whole)
    return out


PROMPTS = ["a cat", "the dog sits on a mat"]


def clip_skip_shim(tower):
    """diffusers 0.42's StableDiffusionPipeline applies clip_skip's final norm through `text_encoder.text_model`,
    which transformers 5's CLIPTextModel no longer has (it is flat): the same norm, reachable by that name."""
    import types

    if not hasattr(tower, "text_model"):
        object.__setattr__(tower, "text_model", types.SimpleNamespace(final_layer_norm=tower.final_layer_norm))
    return tower


def test_sd_conditioning_is_diffusers_encode_prompt(pipelines):
    """SD 1.x: the last layer (sgm's FrozenCLIPEmbedder) is encode_prompt's, and the negative "" (diffusers
    encodes it, as sgm does); clip_skip=1 is the penultimate layer with the final layer norm. diffusers 0.42
    encodes the negative prompt by the last layer whatever clip_skip says (sgm takes one layer for both)."""
    from flax_sgm.text import EMBEDDERS, EmbedderSpec, condition, load_tokenizer, tokenize

    pipe, path = pipelines["sd"]
    tok, model = load_tokenizer(path), load_text_encoder(path)
    clip_skip_shim(pipe.text_encoder)
    for prompts, spec, clip_skip in ((PROMPTS, EMBEDDERS["sd15"][0], None),
                                     (PROMPTS, EmbedderSpec("penultimate", final_norm=True), 1)):
        with torch.no_grad():
            want, want_neg = pipe.encode_prompt(prompts, "cpu", 1, True, clip_skip=clip_skip)
        got, y = condition([model], [tokenize(tok, prompts)], [spec])
        assert y is None
        assert_close(got, want.numpy(), what=f"prompt embeds (clip_skip {clip_skip})")
        neg, _ = condition([model], [tokenize(tok, [""] * 2)], [EMBEDDERS["sd15"][0]])
        assert_close(neg, want_neg.numpy(), what=f"negative embeds (clip_skip {clip_skip})")


def test_sd2_conditioning_is_diffusers_encode_prompt(pipelines):
    """SD 2.x: sgm's FrozenOpenCLIPEmbedder (the penultimate layer, then ln_final) on the whole tower is
    diffusers' encode_prompt on its one-layer-short text_encoder/, and clip_skip=1 on the whole tower."""
    from flax_sgm.text import EMBEDDERS, condition, tokenize

    pipe, path, whole = pipelines["sd2"]
    model = load_text_encoder(path)
    ids = tokenize(pipe.tokenizer, PROMPTS)
    got, _ = condition([model], [ids], EMBEDDERS["sd21"])
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        pipe.text_encoder = clip_skip_shim(whole)
        skip, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=1)
    assert_close(got, want.numpy(), what="SD 2.x prompt embeds")
    assert_close(got, skip.numpy(), what="SD 2.x prompt embeds, clip_skip=1")
    assert np.abs(got - condition([model], [ids], [EMBEDDERS["sd15"][0]])[0]).max() > 0.1  # the last layer differs


def diffusers_y(pipe, pooled, original=(64, 48), crop=(4, 8), target=(32, 40)) -> np.ndarray:
    """diffusers' `y`: add_time_ids from _get_add_time_ids, embedded by the UNet's add_time_proj beside the pooled
    vector, as UNet2DConditionModel.get_aug_embed concatenates them before add_embedding."""
    time_ids = pipe._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = time_ids.repeat(pooled.shape[0], 1)
    with torch.no_grad():
        embedded = pipe.unet.add_time_proj(time_ids.flatten()).reshape(pooled.shape[0], -1)
    return torch.cat([pooled, embedded], dim=-1).numpy(), time_ids.numpy()


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_conditioning_with_negatives_is_diffusers_encode_prompt(pipelines, force_zeros):
    """SDXL: prompt and negative embeddings, pooled vectors and add_time_ids' `y` of encode_prompt with
    force_zeros_for_empty_prompt on (no negative prompt: zeros, which condition(force_zeros=True) gives beside
    the embedded sizes) and off (the negative "" encoded)."""
    from flax_sgm.text import EMBEDDERS, condition, load_tokenizer, tokenize

    pipe, path = pipelines["sdxl"]
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        with torch.no_grad():
            want, want_neg, want_pooled, want_neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    time_dim = pipe.unet.config.addition_time_embed_dim
    y_want, time_ids = diffusers_y(pipe, want_pooled)
    y_neg_want, _ = diffusers_y(pipe, want_neg_pooled)
    tokenizers = [load_tokenizer(path, embedder=n) for n in (0, 1)]
    models = [load_text_encoder(path, embedder=n) for n in (0, 1)]
    specs = (dataclasses.replace(EMBEDDERS["sdxl-base"][0], layer_idx=-2),) + EMBEDDERS["sdxl-base"][1:]
    context, y = condition(models, [tokenize(t, PROMPTS) for t in tokenizers], specs, time_ids, time_dim=time_dim)
    negatives = [tokenize(t, [""] * 2) for t in tokenizers]
    neg, y_neg = condition(models, negatives, specs, time_ids, time_dim=time_dim, force_zeros=force_zeros)
    assert_close(context, want.numpy(), what="prompt embeds")
    assert_close(y, y_want, what="y")
    assert_close(neg, want_neg.numpy(), what="negative embeds")
    assert_close(y_neg, y_neg_want, what="negative y")
    assert (np.asarray(y_neg[:, :24]) == 0).all() == force_zeros


def test_sdxl_clip_skip_is_layer_hidden(pipelines):
    """encode_prompt's clip_skip=1 on SDXL reads hidden_states[-3] of both towers: layer="hidden", layer_idx=-3
    (here the embeddings), with the pooled vector unchanged."""
    from flax_sgm.text import EmbedderSpec, condition, load_tokenizer, tokenize

    pipe, path = pipelines["sdxl"]
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                     clip_skip=1)
    specs = (EmbedderSpec("hidden", layer_idx=-3, final_norm=False),
             EmbedderSpec("hidden", layer_idx=-3, final_norm=False, pooled=True))
    ids = [tokenize(load_tokenizer(path, embedder=n), PROMPTS) for n in (0, 1)]
    models = [load_text_encoder(path, embedder=n) for n in (0, 1)]
    context, y = condition(models, ids, specs, np.zeros((2, 6), np.float32), time_dim=8)
    assert_close(context, want.numpy(), what="clip_skip=1 prompt embeds")
    assert_close(y[:, :24], want_pooled.numpy(), what="pooled")
    # Batches that differ: the pooled vector was blamed for time_ids' rows; towers' rows failed in concatenate.
    with pytest.raises(ValueError, match=r"^condition: `time_ids` has 1 rows for 2 prompts; one per prompt$"):
        condition(models, ids, specs, np.zeros((1, 6), np.float32), time_dim=8)
    with pytest.raises(ValueError, match=r"^condition: the id arrays have 2, 1 rows; one per prompt in each$"):
        condition(models, [ids[0], ids[1][:1]], specs, np.zeros((2, 6), np.float32), time_dim=8)


def test_refiner_conditioning_is_diffusers_encode_prompt(pipelines):
    """The refiner (text_encoder_2 alone, sgm's embedder 0): encode_prompt's embeddings and pooled vector, and
    `y` 24 + 5 * 8 wide with the aesthetic score embedded last (the refiner's 1280 + 5 * 256 = 2560)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.models.embeddings import Timesteps

    from flax_sgm.text import EMBEDDERS, condition, load_tokenizer, tokenize

    sdxl, path = pipelines["sdxl"]
    pipe = StableDiffusionXLImg2ImgPipeline(**(sdxl.components | {"text_encoder": None, "tokenizer": None}),
                                            requires_aesthetics_score=True)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    ids = tokenize(load_tokenizer(path, embedder=1), PROMPTS)
    time_ids = np.array([[64, 48, 0, 0, 6.0]] * 2, np.float32)  # original size, crop, aesthetic score
    context, y = condition([load_text_encoder(path, embedder=1)], [ids], EMBEDDERS["sdxl-refiner"], time_ids, time_dim=8)
    assert_close(context, want.numpy(), what="refiner prompt embeds")
    assert_close(y[:, :24], want_pooled.numpy(), what="refiner pooled")
    with torch.no_grad():
        score = Timesteps(8, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.tensor([6.0])).numpy()
    assert y.shape == (2, 24 + 5 * 8)
    assert_close(y[:, -8:], np.repeat(score, 2, 0), what="aesthetic score")
    assert condition([load_text_encoder(path, embedder=1)], [ids], EMBEDDERS["sdxl-refiner"],
                     time_ids)[1].shape == (2, 24 + 5 * 256)


# sgm's GeneralConditioner ---------------------------------------------------------------------------------

def test_embedder_layers_are_sgms(saved, rng):
    """Each layer choice against transformers' outputs as sgm's embedders read them: FrozenCLIPEmbedder's "last"
    (last_hidden_state), "pooled" (pooler_output as one token) and "hidden" (hidden_states[layer_idx], no final
    norm); FrozenOpenCLIPEmbedder2's "last" and "penultimate" (no ln_final) and the legacy FrozenOpenCLIPEmbedder's
    penultimate with ln_final."""
    from flax_sgm.text import EmbedderSpec, embed

    tower, flax, _ = saved["openclip"]
    ids = token_ids(END, rng, batch=2)
    with torch.no_grad():
        out = tower(torch.from_numpy(ids), output_hidden_states=True)
        hidden = [h.numpy() for h in out.hidden_states]
        normed = tower.text_model.final_layer_norm(out.hidden_states[-2]).numpy()
    cases = [
        (EmbedderSpec("last"), out.last_hidden_state.numpy()),
        (EmbedderSpec("last", final_norm=False), hidden[-1]),
        (EmbedderSpec("penultimate", final_norm=False), hidden[-2]),
        (EmbedderSpec("penultimate"), normed),
        (EmbedderSpec("hidden", layer_idx=1, final_norm=False), hidden[1]),
        (EmbedderSpec("hidden", layer_idx=0, final_norm=False), hidden[0]),
        (EmbedderSpec("pooled"), out.last_hidden_state.numpy()[np.arange(2), ids.argmax(1)][:, None]),  # the end token
    ]
    for spec, want in cases:
        context, pooled = embed(flax, ids, spec)
        assert_close(context, want, what=f"{spec.layer} (final_norm {spec.final_norm}, layer_idx {spec.layer_idx})")
        assert pooled is None
    _, pooled = embed(flax, ids, EmbedderSpec("penultimate", final_norm=False, pooled=True))
    assert_close(pooled, out.text_embeds.numpy(), what="pooled: text_embeds (open_clip's pool @ text_projection)")
    with pytest.raises(ValueError, match="layer_idx 3 is past the 3 hidden states"):
        embed(flax, ids, EmbedderSpec("hidden", layer_idx=3))
    for bad, message in [(dict(layer="middle"), "`layer` must be one of"), (dict(layer="hidden"), "`layer_idx` goes with"),
                         (dict(layer="last", layer_idx=2), "`layer_idx` goes with"),
                         (dict(ucg_rate=1.5), r"`ucg_rate` must be a probability in \[0, 1\]; got 1.5")]:
        with pytest.raises(ValueError, match=message):
            EmbedderSpec(**bad)


def test_ucg_dropout_is_sgms(saved, rng):
    """ucg_rate: with a key, each prompt's output of each embedder is either kept exactly or zeroed, each output
    (both contexts and the pooled vector) drawn on its own as sgm's GeneralConditioner does; the sizes' part of y
    is never dropped. The same key gives the same drops (under jit, the key traced); no key (inference) drops
    nothing; rate 1 all."""
    from flax_sgm.text import EmbedderSpec, condition

    models = [saved["clip"][1], saved["openclip"][1]]
    ids = [token_ids(END, rng, batch=16, n=24)] * 2
    time_ids = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (16, 1))

    def specs(rate):
        return (EmbedderSpec("hidden", layer_idx=1, final_norm=False, ucg_rate=rate),
                EmbedderSpec("penultimate", final_norm=False, pooled=True, ucg_rate=rate))

    full_context, full_y = map(np.asarray, condition(models, ids, specs(0.0), time_ids))
    dropped = jax.jit(lambda key, rate: condition(models, ids, specs(rate), time_ids, key=key), static_argnums=1)
    key = jax.random.key(3)
    context, y = map(np.asarray, dropped(key, 0.5))
    parts = [(context[..., :32], full_context[..., :32]), (context[..., 32:], full_context[..., 32:]),
             (y[:, :24], full_y[:, :24])]
    kept = []
    for got, want in parts:
        rows = np.array([np.allclose(g, w, rtol=0, atol=1e-6 * np.abs(w).max()) for g, w in zip(got, want)])
        zero = np.array([not g.any() for g in got])
        assert (rows ^ zero).all()  # each row kept (to jit's reordering) or zeroed
        assert 0 < rows.sum() < 16
        kept.append(rows)
    assert not (np.array_equal(kept[0], kept[1]) and np.array_equal(kept[1], kept[2]))  # drawn on their own
    assert_close(y[:, 24:], full_y[:, 24:], what="the sizes' part of y")
    again = dropped(key, 0.5)
    assert np.array_equal(again[0], context) and np.array_equal(again[1], y)
    assert not np.array_equal(dropped(jax.random.key(4), 0.5)[0], context)
    none = dropped(key, 1.0)
    assert not np.asarray(none[0]).any() and not np.asarray(none[1][:, :24]).any()
    unkeyed = condition(models, ids, specs(0.5), time_ids)  # inference: no key, no dropout
    assert np.array_equal(unkeyed[0], full_context) and np.array_equal(unkeyed[1], full_y)


# The command line: verify, inspect, convert --text-encoder --------------------------------------------------

@pytest.mark.slow
def test_cli_verify_seeded_text_encoder():
    """`flax-sgm verify --model text-encoder` without a checkpoint: the seeded OpenCLIP-like tower passes."""
    from conftest import run_cli

    report = json.loads(run_cli("verify", "--model", "text-encoder", "--json").output)
    assert report["passed"] and report["config"]["hidden_act"] == "gelu"


def test_cli_verify_text_encoder(saved, tmp_path):
    """`flax-sgm verify --model text-encoder --checkpoint` a saved text_encoder/ (transformers builds the reference
    from its config.json), per layer and whole, passes; a single file is refused in one line."""
    from conftest import cli_error, run_cli

    _, _, path = saved["clip"]
    result = run_cli("verify", "--model", "text-encoder", "--checkpoint", path)
    assert "transformers CLIPTextModel, built by transformers from" in result.output and "PASS" in result.output
    assert "encoder.layers.1.mlp.fc2" in result.output
    save_file(UNET_KEY, str(tmp_path / "unet.safetensors"))
    assert "a text encoder is verified from a transformers text_encoder/ directory" in cli_error(
        "verify", "--model", "text-encoder", "--checkpoint", tmp_path / "unet.safetensors")


def params_of(model) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_cli_convert_and_inspect_text_encoders(tmp_path, weights):
    """`flax-sgm convert --text-encoder` writes a pipeline's two text encoders, which load_text_encoder reads back
    bit for bit by sgm's embedder number; `inspect` lists the output, a text_encoder/ directory and an SDXL
    single file's embedders."""
    from conftest import cli_error, run_cli

    clip, openclip = tiny.tower("clip", seed=31), tiny.tower("openclip", seed=32)
    pipe = tmp_path / "pipe"
    clip.save_pretrained(pipe / "text_encoder")
    openclip.save_pretrained(pipe / "text_encoder_2")
    out = tmp_path / "out"
    result = run_cli("convert", pipe, "--text-encoder", "-o", out, "--format", weights)
    assert "2 text encoder(s)" in result.output and "embedder=1)" in result.output
    for n in (0, 1):
        want, got = params_of(load_text_encoder(pipe, embedder=n)), params_of(load_text_encoder(out, embedder=n))
        assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) and want[k].dtype == got[k].dtype
                                                  for k in want)
        assert load_text_encoder(out, embedder=n).config == load_text_encoder(pipe, embedder=n).config
    listing = run_cli("inspect", out).output
    assert "text encoder 1: CLIP text, 2 layers of 32, gelu, projection 24, float32" in listing
    with pytest.raises(CheckpointError, match=r"out: embedder=2 is not in this output; it holds conditioner.embedders.0., "):
        load_text_encoder(out, embedder=2)
    with pytest.raises(CheckpointError, match=r"out: holds text encoders, not a whole UNet; load it with load_text_encoder$"):
        flax_sgm.load_unet(out)
    for prefix in (None, "conditioner.embedders.0"):  # said so, not "holds 2 stacks; pass prefix="
        with pytest.raises(CheckpointError, match=r"out: holds text encoders, not SpatialTransformer stacks; load it with load_text_encoder$"):
            flax_sgm.load_pretrained(out, prefix=prefix)
    one = tmp_path / "one"
    run_cli("convert", pipe, "--text-encoder", "--embedder", "1", "-o", one, "--format", weights, "--param-dtype", "bfloat16")
    assert load_text_encoder(one, embedder=1).final_layer_norm.scale[...].dtype == jnp.bfloat16
    refused = run_cli("convert", pipe, "--embedder", "1", "-o", tmp_path / "x", ok=False)
    assert refused.exit_code == 2 and "Error: --embedder goes with --text-encoder" in refused.output

    if weights == "orbax":
        listing = run_cli("inspect", pipe / "text_encoder_2").output
        assert "text encoder, embedder 0: (root) (transformers), 0.1M parameters, none of the released towers" in listing
        assert "SpatialTransformer" not in listing
        sdxl = tmp_path / "sdxl.safetensors"
        save_file(sgm_clip(clip, "conditioner.embedders.0.transformer.")
                  | sgm_open_clip(openclip, "conditioner.embedders.1.model.") | UNET_KEY, str(sdxl))
        info = json.loads(run_cli("inspect", sdxl, "--json").output)
        texts = info["text_encoders"]
        assert [t["embedder"] for t in texts] == [0, 1]
        assert texts[1]["prefix"] == "conditioner.embedders.1.model." and texts[1]["layout"] == KIND_OPEN_CLIP
        assert texts[1]["preset"] is None and "give config=" in texts[1]["problem"]
        assert texts[0]["parameters"] == sum(p.numel() for p in clip.parameters())


# Low precision ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param("clip", marks=pytest.mark.slow), "openclip"])
def test_bf16_error_no_worse_than_torch(name, rng):
    """bf16 weights and compute: flax_sgm's error against the float64 referee, forward and every gradient, within
    torch's own bf16 error (verify.criteria), and bf16-sized (it really ran in bf16)."""
    from flax_sgm.verify import criteria
    from flax_sgm.verify.seeded import text_encoder_twin

    tower = tiny.tower(name, seed=41)
    flax = text_encoder_twin(tower, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert flax.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
    result = compare(tower, flax, {"x": token_ids(END, rng, batch=2)}, dtype="bfloat16", seed=1)
    flax_worst = max(e[0] for e in result.errors.values())
    low, high = criteria.BF16_ERROR_RANGE
    assert low < flax_worst < high
    assert_parity(result, "CLIPTextModel bf16")


def test_more_bad_input_is_one_line(tmp_path, saved):
    """A full open_clip model as a text encoder; a tokenizer asked of a single file, of a folder without one, or
    past a pipeline's tokenizers; the conditioner given mismatched embedders or no single pooled vector for y."""
    from flax_sgm.text import EmbedderSpec, condition, load_tokenizer

    flax = saved["openclip"][1]
    tensors = convert.to_torch_state_dict(flax, layout=open_clip_layout(flax.config))
    save_file(tensors | {"visual.conv1.weight": np.ones((4, 3, 2, 2), np.float32)}, str(tmp_path / "open_clip.safetensors"))
    with pytest.raises(CheckpointError, match=r"open_clip.safetensors: a full open_clip CLIP model \(text and image "
                                              r"towers at the root\), not a text encoder"):
        load_text_encoder(tmp_path / "open_clip.safetensors")
    with pytest.raises(CheckpointError, match=r"open_clip.safetensors: not a tokenizer folder \(a single-file checkpoint "
                                              r"holds none: pass a pipeline's tokenizer/ folder\)$"):
        load_tokenizer(tmp_path / "open_clip.safetensors")
    # transformers 5 reads a folder without a tokenizer's files as an empty tokenizer: refused before it.
    with pytest.raises(CheckpointError, match=r"clip: not a CLIP tokenizer folder \(no tokenizer.json, nor vocab.json "
                                              r"and merges.txt\)$"):
        load_tokenizer(saved["clip"][2])
    pipe = tmp_path / "pipe"
    tiny_tokenizer("!").save_pretrained(pipe / "tokenizer")
    with pytest.raises(CheckpointError, match=r"pipe: embedder=1, but the pipeline's tokenizers are 0 \(tokenizer/\)$"):
        load_tokenizer(pipe, embedder=1)
    ids = token_ids(END, np.random.default_rng(0), batch=2, n=8)
    with pytest.raises(ValueError, match=r"condition: 1 models, 2 id arrays, 1 specs; one each"):
        condition([flax], [ids, ids], [EmbedderSpec()])
    with pytest.raises(ValueError, match=r"condition: `y` takes one pooled vector; the specs give 0"):
        condition([flax], [ids], [EmbedderSpec()], np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"condition: `time_ids` has 3 rows for 2 prompts; one per prompt"):
        condition([flax], [ids], [EmbedderSpec(pooled=True)], np.zeros((3, 6), np.float32))


def test_legacy_ucg_replaces_prompts():
    """sgm's legacy_ucg_value: prompts replaced by the value with the given probability, keyed; 0 and 1 exact."""
    from flax_sgm.text.conditioner import legacy_ucg

    prompts = [f"prompt {i}" for i in range(32)]
    key = jax.random.key(0)
    got = legacy_ucg(key, prompts, 0.5)
    assert got == legacy_ucg(key, prompts, 0.5) and 0 < got.count("") < 32
    assert all(g in ("", p) for g, p in zip(got, prompts))
    assert legacy_ucg(key, prompts, 0.0) == prompts and legacy_ucg(key, prompts, 1.0, "-") == ["-"] * 32
    with pytest.raises(ValueError, match=r"legacy_ucg: `rate` must be a probability in \[0, 1\]; got 2"):
        legacy_ucg(key, prompts, 2)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["clip-vit-l-14", "openclip-vit-h-14", "openclip-vit-bigg-14"])
def test_released_sizes_match_transformers(preset):
    """Each released tower at full size (random weights): transformers' model of the preset's sizes, read by
    flax_sgm, gives the same outputs on 2 prompts (float32 against float32: the same maths reordered)."""
    from flax_sgm.verify.seeded import text_encoder_twin, text_inputs

    c = PRESETS[preset]
    cls = CLIPTextModelWithProjection if c.projection_dim else TransformersCLIPTextModel
    config = TransformersConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                max_position_embeddings=77, hidden_act=c.hidden_act, projection_dim=c.projection_dim or 768,
                                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    tower = cls(config).eval()
    flax = text_encoder_twin(tower)
    assert flax.config == c
    ids = text_inputs(c, seed=0)["x"]
    with torch.no_grad():
        want = tower(torch.from_numpy(ids), output_hidden_states=True)
    got = flax(ids, output_hidden_states=True)
    assert_close(got.hidden_states[-2], want.hidden_states[-2].numpy(), what=f"{preset} penultimate")
    assert_close(got.last_hidden_state, want.last_hidden_state.numpy(), what=f"{preset} last")
    if c.projection_dim:
        assert_close(got.text_embeds, want.text_embeds.numpy(), what=f"{preset} text_embeds")
