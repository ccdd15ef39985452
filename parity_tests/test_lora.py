"""LoRA on the Flax UNet against the truth: a tiny diffusers UNet2DConditionModel adapted by peft with random A
and B (not a loader). Its adapter is written by diffusers' own writers in each format (peft names with peft's
config in the metadata, convert_state_dict_to_diffusers' `lora.down` names, convert_state_dict_to_kohya's), and
the Flax UNet of the saved base with load_lora(file) answers as the peft model does, at scale 1 and another.
Adapters trained here (add_adapters) and written by save_lora load into diffusers with the same output. Every
bad input is one line and leaves the model as it was."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import flax_sgm
from conftest import CRITERIA, assert_close, cli_error, randomize_, run_cli
from flax_sgm.checkpoints import convert
from flax_sgm.errors import CheckpointError
from flax_sgm.lora import LoRAParam, add_adapters, load_lora, lora_summary, save_lora, unload_lora
from flax_sgm.lora.layout import module_index

pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from diffusers.utils.peft_utils import scale_lora_layers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TOL = CRITERIA["float32"].forward
SD1 = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           attention_head_dim=2)
# The 48 modules of this UNet: 4 stacks x (2 attentions x 4 projections + proj_in, proj_out, 2 feed-forward).
STACK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# ResBlocks too: 3x3 convs, 1x1 shortcuts, the embedding Linear.
TARGETS = STACK_TARGETS + ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]
RANK, ALPHA, SCALE = 4, 6.0, 0.6


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([3, 917]),
            rng.standard_normal((2, 5, 32)).astype(np.float32))


def torch_out(unet) -> np.ndarray:
    x, t, c = inputs()
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).sample.numpy().transpose(0, 2, 3, 1)


FORWARD = jax.jit(lambda m, x, t, c: m(x, t, c))


def flax_out(unet) -> np.ndarray:
    x, t, c = inputs()
    return np.asarray(FORWARD(unet, x.transpose(0, 2, 3, 1), t, c))  # NCHW -> NHWC at the torch boundary


def peft_unet(base_dir, config: LoraConfig, seed: int, adapter_name: str = "default"):
    """The base UNet with a peft LoRA of random A and B (init_lora_weights=False), every other weight as saved."""
    unet = UNet2DConditionModel.from_pretrained(base_dir).eval()
    torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """The base saved by diffusers; a peft-adapted copy, its outputs at scale 1 and SCALE; its adapter as files."""
    d = tmp_path_factory.mktemp("lora")
    randomize_(UNet2DConditionModel(**SD1), seed=0).save_pretrained(d / "base")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    unet = peft_unet(d / "base", config, seed=1)
    out = {1.0: torch_out(unet)}
    scale_lora_layers(unet, SCALE)
    out[SCALE] = torch_out(unet)
    peft = get_peft_model_state_dict(unet)
    metadata = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(d / "peft", unet_lora_layers=peft, unet_lora_adapter_metadata=metadata)
    old = convert_state_dict_to_diffusers(peft)
    assert any(k.endswith("to_q.lora.down.weight") for k in old)
    StableDiffusionPipeline.save_lora_weights(d / "old", unet_lora_layers=old, unet_lora_adapter_metadata=metadata)
    kohya = convert_state_dict_to_kohya({"unet." + k: v for k, v in peft.items()})
    # diffusers' converter writes alpha = rank (dropping lora_alpha); kohya's trainers write the network alpha.
    kohya = {k: torch.tensor(ALPHA) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    files = {"peft": d / "peft" / "pytorch_lora_weights.safetensors", "old": d / "old" / "pytorch_lora_weights.safetensors",
             "kohya": d / "kohya.safetensors", "kohya-sgm": d / "kohya_sgm.safetensors"}
    save_file({k: v.numpy() for k, v in kohya.items()}, str(files["kohya"]))
    files["kohya-sgm"] = sgm_kohya(kohya, d / "base", files["kohya-sgm"])
    return d, out, files


def sgm_kohya(kohya: dict, base, path):
    """The kohya file under sgm's module names (`lora_unet_input_blocks_1_1_...`, as kohya writes SDXL's).
    Checked by diffusers' own kohya reader (lora_state_dict with the UNet's config): it reads the same tensors
    under the same diffusers names from it as from the diffusers-named file."""
    _, sgm_of = module_index(flax_sgm.load_unet(base))
    under = {d.replace(".", "_"): s.replace(".", "_") for d, s in sgm_of.items()}
    renamed = {}
    for key, value in kohya.items():
        stem, suffix = key.split(".", 1)
        renamed["lora_unet_" + under[stem[len("lora_unet_"):]] + "." + suffix] = value
    save_file({k: v.numpy() for k, v in renamed.items()}, str(path))
    config = UNet2DConditionModel.from_pretrained(base).config
    got = StableDiffusionPipeline.lora_state_dict(str(path), unet_config=config)
    want = StableDiffusionPipeline.lora_state_dict(str(path.parent / "kohya.safetensors"), unet_config=config)
    assert sorted(got[0]) == sorted(want[0]) and all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    return path


@pytest.fixture(scope="module")
def base_unet(truth):
    return flax_sgm.load_unet(truth[0] / "base", use_checkpoint=False)


def state(unet) -> dict:
    return {k: np.asarray(v) for k, v in convert.to_torch_state_dict(unet).items()}


def assert_same_state(unet, before: dict) -> None:
    after = state(unet)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert not flax_sgm.lora.adapters.adapters_of(unet)


@pytest.mark.parametrize("fmt", ["peft", "old", "kohya", "kohya-sgm"])
def test_each_file_format_equals_the_peft_model(truth, base_unet, fmt):
    """Fused at scale 1 and SCALE: every format of diffusers' writers answers as the peft-adapted torch UNet."""
    _, out, files = truth
    for scale in (1.0, SCALE):
        unet = nnx.clone(base_unet)
        load_lora(unet, files[fmt], scale=scale)
        assert_close(flax_out(unet), out[scale], TOL, what=f"{fmt} at scale {scale}")


def test_unfused_adapters_equal_the_peft_model_and_unload_restores_the_base_bit_exactly(truth, base_unet):
    _, out, files = truth
    unet = nnx.clone(base_unet)
    before, base = state(unet), flax_out(unet)
    load_lora(unet, files["peft"], scale=SCALE, fuse=False)
    assert state(unet).keys() == before.keys()  # the base weights are as they were; A and B are beside them
    assert_close(flax_out(unet), out[SCALE], TOL, what="unfused")
    # Another weight (diffusers' set_adapters) is state: the same compiled program answers at scale 1.
    traces = []
    forward = jax.jit(lambda m, x, t, c: traces.append(1) or m(x, t, c))
    x, t, c = inputs()
    assert_close(np.asarray(forward(unet, x.transpose(0, 2, 3, 1), t, c)), out[SCALE], TOL, what="jitted, SCALE")
    flax_sgm.set_lora_scale(unet, 1.0)
    assert_close(np.asarray(forward(unet, x.transpose(0, 2, 3, 1), t, c)), out[1.0], TOL, what="set_lora_scale(1.0)")
    assert len(traces) == 1, "a new scale compiled the model again"
    flax_sgm.set_lora_scale(unet, jnp.float32(1.0))  # a concrete 0-d array is a number too
    with pytest.raises(CheckpointError, match=r"^set_lora_scale: scale must be a finite number"):
        flax_sgm.set_lora_scale(unet, "x")
    with pytest.raises(CheckpointError, match=r"set_lora_scale: no unfused adapter 'other' on the model \(it holds \['pytorch_lora_weights'\]"):
        flax_sgm.set_lora_scale(unet, 0.5, name="other")
    unload_lora(unet)
    assert_same_state(unet, before)
    assert np.array_equal(flax_out(unet), base)


def test_lora_down_names_load_all_48_modules(truth, base_unet):
    """convert_state_dict_to_diffusers' `to_q.lora.down` file of the stacks' 48 modules: every module placed
    (diffusers' own loader takes 16 of them, issue 34), and the model changes in exactly those 48 layers."""
    d, _, files = truth
    old = load_file(str(files["old"]))
    stacks = {k: v for k, v in old.items() if any(f".{t}." in k for t in STACK_TARGETS) and "resnets" not in k}
    assert len({k.rsplit(".", 3)[0] if ".lora." in k else k.rsplit(".", 2)[0] for k in stacks}) == 48
    assert sum(k.endswith("lora.down.weight") for k in stacks) == 32  # the attentions' projections
    path = d / "stacks48.safetensors"
    save_file(stacks, str(path))
    unet = nnx.clone(base_unet)
    before = state(unet)
    load_lora(unet, path)
    after = state(unet)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) == 48 and all(k.endswith(".weight") for k in changed)


PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def test_attention_processor_names_load_as_diffusers_reads_them(truth, base_unet):
    """diffusers <= 0.20's LoRA files (save_attn_procs: `<attention>.processor.to_q_lora.down.weight`, `to_out_lora`
    for to_out.0), with `unet.` and bare: each answers as diffusers' own loader of the prefixed file (it no longer
    reads the bare one). They were refused before ("holds no LoRA keys")."""
    d, _, files = truth
    peft = load_file(str(files["peft"]))
    tensors = {}
    for key, value in peft.items():
        module, _, tail = key.rpartition(".lora_")
        attention, _, projection = module.rpartition(".")
        if module.endswith(".to_out.0"):
            attention, projection = module[: -len(".to_out.0")], "to_out.0"
        if projection in PROCESSOR_NAMES and ".attn" in attention:
            role = {"A.weight": "down", "B.weight": "up"}[tail]
            tensors[f"{attention}.processor.{PROCESSOR_NAMES[projection]}_lora.{role}.weight"] = value
    assert len(tensors) == 8 * 4 * 2  # 4 transformer blocks' attn1 and attn2, 4 projections, down and up
    prefixed, bare = d / "processors.safetensors", d / "processors_bare.safetensors"
    save_file(tensors, str(prefixed))
    save_file({k[len("unet."):]: v for k, v in tensors.items()}, str(bare))
    reference = UNet2DConditionModel.from_pretrained(d / "base").eval()
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(prefixed))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reference)
    want = torch_out(reference)
    assert not np.allclose(want, torch_out(UNet2DConditionModel.from_pretrained(d / "base").eval()))  # it took
    for path in (prefixed, bare):
        unet = load_lora(nnx.clone(base_unet), path)
        assert_close(flax_out(unet), want, TOL, what=path.name)
    assert lora_summary(prefixed)["format"] == "diffusers (attention processor names)"
    # One module under two spellings: which the file means is not said (it took the last key silently).
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    twice = d / "twice.safetensors"
    save_file(tensors | {f"{stem}.to_q.lora.down.weight": tensors[f"{stem}.processor.to_q_lora.down.weight"]}, str(twice))
    with pytest.raises(CheckpointError, match=rf"1 LoRA modules do not fit .*{stem}.to_q is named twice"):
        load_lora(nnx.clone(base_unet), twice)


@pytest.fixture(scope="module")
def two_adapters(truth, tmp_path_factory):
    """The fixture's adapter and a second one (rank 2, other targets) on the torch UNet, weighted 1.0 and 0.5
    (set_adapters): its output, and the second adapter's file."""
    d, _, _ = truth
    first = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    second = LoraConfig(r=2, lora_alpha=3.0, target_modules=["to_k", "proj_out", "conv2"], init_lora_weights=False)
    unet = peft_unet(d / "base", first, seed=1)  # the fixture's adapter again (same seed)
    torch.manual_seed(2)
    unet.add_adapter(second, adapter_name="second")
    out = tmp_path_factory.mktemp("second")
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="second"),
                                              unet_lora_adapter_metadata=second.to_dict())
    unet.set_adapters(["default", "second"], weights=[1.0, 0.5])
    return torch_out(unet), out / "pytorch_lora_weights.safetensors"


def test_several_loras_each_with_its_own_scale(truth, base_unet, two_adapters):
    want, second = two_adapters
    fused = nnx.clone(base_unet)
    load_lora(fused, truth[2]["peft"])
    load_lora(fused, second, scale=0.5)
    assert_close(flax_out(fused), want, TOL, what="two fused")


@pytest.mark.slow
def test_several_unfused_loras_each_with_its_own_scale(truth, base_unet, two_adapters):
    """Unfused (another program to compile): two adapters beside the layers; one unloaded leaves the other."""
    want, second = two_adapters
    unet = nnx.clone(base_unet)
    load_lora(unet, truth[2]["kohya"], fuse=False)
    load_lora(unet, second, scale=0.5, fuse=False, name="second")
    assert_close(flax_out(unet), want, TOL, what="two unfused")
    unload_lora(unet, "second")
    assert_close(flax_out(unet), truth[1][1.0], TOL, what="the first left")


@pytest.fixture(scope="module")
def trained(base_unet):
    """The base with adapters from add_adapters, B set off zero (as training leaves it; the optax step itself is
    examples/lora.py's and test_adapter_gradients_equal_peft's)."""
    unet = nnx.clone(base_unet)
    adapted = add_adapters(unet, rank=RANK, alpha=ALPHA, targets=["to_q", "to_out.0", "proj_in", "conv1", "time_emb_proj"])
    rng = np.random.default_rng(5)
    for _, adapter in flax_sgm.lora.adapters.adapters_of(unet)["default"]:
        adapter.up[...] = jnp.asarray(rng.standard_normal(adapter.up.shape).astype(np.float32) * 0.1)
    return unet, adapted


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_adapters_saved_load_into_diffusers_with_the_same_output(truth, base_unet, trained, tmp_path, fmt):
    """save_lora: diffusers' lora_state_dict + load_lora_into_unet (what load_lora_weights runs) give the torch
    UNet the Flax UNet's output, every adapter taken."""
    unet, adapted = trained
    assert len(adapted) == 4 * 2 * 2 + 4 + 8 + 8  # 4 stacks' attn1/attn2 to_q, to_out.0 and proj_in; 8 ResBlocks'
    assert state(unet).keys() == state(base_unet).keys()  # the adapters are no Params of the base
    path = save_lora(unet, tmp_path / f"{fmt}.safetensors", format=fmt)
    torch_unet = UNet2DConditionModel.from_pretrained(truth[0] / "base").eval()
    sd, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, torch_unet, metadata=metadata)
    assert sum(n.endswith("lora_A.default_0.weight") for n, _ in torch_unet.named_parameters()) == len(adapted)
    assert_close(flax_out(unet), torch_out(torch_unet), TOL, what=f"saved as {fmt}, loaded by diffusers")
    reloaded = nnx.clone(base_unet)
    load_lora(reloaded, path)  # and back: the file is one load_lora reads
    assert_close(flax_out(reloaded), flax_out(unet), TOL, what=f"saved as {fmt}, fused back")
    fused = flax_sgm.lora.fuse_lora(nnx.clone(unet))  # the adapters fused in place: the same kernels
    assert not flax_sgm.lora.adapters.adapters_of(fused)
    want = state(reloaded)
    assert all(np.array_equal(v, want[k]) for k, v in state(fused).items())


def test_an_sdxl_unets_kohya_file_has_sgm_names_that_diffusers_reads(tmp_path):
    """kohya's sd-scripts name an SDXL UNet's modules as sgm does (`lora_unet_input_blocks_4_1_...`): save_lora writes
    those for a UNet with a vector y (it wrote diffusers' names), and diffusers' SDXL reader (lora_state_dict with
    the UNet's config, what load_lora_weights runs) gives the torch UNet the Flax UNet's output."""
    from diffusers import StableDiffusionXLPipeline

    from flax_sgm.verify import tiny
    from flax_sgm.verify.adapters import adapter_for
    from flax_sgm.verify.seeded import unet_inputs

    tiny.unet("sdxl").save_pretrained(tmp_path / "base")
    unet = flax_sgm.load_unet(tmp_path / "base", use_checkpoint=False)
    adapted = add_adapters(unet, rank=2, targets=["to_q", "to_out.0", "proj_in", "conv1", "time_emb_proj"])
    rng = np.random.default_rng(5)
    for _, adapter in flax_sgm.lora.adapters.adapters_of(unet)["default"]:
        adapter.up[...] = jnp.asarray(rng.standard_normal(adapter.up.shape).astype(np.float32) * 0.1)
    path = save_lora(unet, tmp_path / "kohya.safetensors", format="kohya")
    stems = {k.split(".")[0] for k in load_file(str(path))}
    assert len(stems) == len(adapted) and all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                                            "lora_unet_output_blocks_", "lora_unet_time_embed_"))
                                              for s in stems), sorted(stems)[:3]
    torch_unet = UNet2DConditionModel.from_pretrained(tmp_path / "base").eval()
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=torch_unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, torch_unet)
    assert sum(n.endswith("lora_A.default_0.weight") for n, _ in torch_unet.named_parameters()) == len(adapted)
    inputs = unet_inputs(unet.config, seed=0, hw=(8, 8), context_tokens=5)
    x = inputs.pop("x")
    with torch.no_grad():
        want = adapter_for(torch_unet).call_torch(torch_unet, torch.from_numpy(x),
                                                  {k: torch.from_numpy(v) for k, v in inputs.items()})
    got = unet(x.transpose(0, 2, 3, 1), **inputs)  # NCHW -> NHWC at the torch boundary
    assert_close(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), TOL, what="an SDXL kohya file, loaded by diffusers")


@pytest.mark.parametrize("kind", ["linear", "conv3x3", pytest.param("conv1x1", marks=pytest.mark.slow)])
def test_adapter_gradients_equal_peft(kind):
    """One adapted layer against peft's: forward, and the gradients of the adapter alone (nnx.DiffState(0,
    LoRAParam)); an optax step through nnx.Optimizer(wrt=LoRAParam) moves the adapter and leaves the kernel."""
    import peft

    from flax_sgm.nn.primitives import Conv, Linear

    torch.manual_seed(0)
    if kind == "linear":
        layer = torch.nn.Linear(12, 10)
        x = torch.randn(3, 7, 12)
        flax = Linear(12, 10, axes=(None, None), rngs=nnx.Rngs(0))
    else:
        k = 3 if kind == "conv3x3" else 1
        layer = torch.nn.Conv2d(12, 10, k, padding=k // 2)
        x = torch.randn(2, 12, 5, 6)
        flax = Conv(12, 10, kernel_size=k, axes=(None, None), rngs=nnx.Rngs(0))
    wrapped = peft.inject_adapter_in_model(LoraConfig(r=3, lora_alpha=5.0, target_modules=["m"], init_lora_weights=False),
                                           torch.nn.ModuleDict({"m": layer}))["m"]
    convert.load_torch_state_dict(flax, {"weight": layer.weight, "bias": layer.bias})
    a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    with torch.no_grad():
        b.normal_()
    (wrapped(x) ** 2).mean().backward()
    down = a.detach().numpy().T if a.ndim == 2 else a.detach().numpy().transpose(2, 3, 1, 0)
    if kind == "conv1x1":
        down = down[0, 0]
    flax_sgm.lora.adapters.attach(flax, "default", flax_sgm.lora.Adapter(down, b.detach().numpy()[..., 0, 0].T
                                                                          if b.ndim == 4 else b.detach().numpy().T, alpha=5.0))
    xj = x.numpy() if kind == "linear" else x.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC at the torch boundary
    kernel = np.asarray(flax.kernel[...])
    want = wrapped(x).detach().numpy()
    assert_close(np.asarray(flax(xj)), want if kind == "linear" else want.transpose(0, 2, 3, 1), TOL, what=f"{kind} forward")

    def loss(m):
        return jnp.mean(m(xj) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(flax)
    adapter = grads["adapters"]["default"]
    got_a = np.asarray(adapter["down"][...])
    got_a = got_a.T if got_a.ndim == 2 else got_a.transpose(3, 2, 0, 1)
    want_a = a.grad.numpy().reshape(got_a.shape)
    assert_close(got_a, want_a, CRITERIA["float32"].grad, what=f"{kind} down gradient")
    assert_close(np.asarray(adapter["up"][...]).T, b.grad.numpy().reshape(b.shape[:2]), CRITERIA["float32"].grad,
                 what=f"{kind} up gradient")
    optimizer = nnx.Optimizer(flax, optax.sgd(0.1), wrt=LoRAParam)
    up = np.asarray(flax.adapters["default"].up[...])
    optimizer.update(flax, grads)
    assert not np.array_equal(np.asarray(flax.adapters["default"].up[...]), up)
    assert np.array_equal(np.asarray(flax.kernel[...]), kernel)


def test_inspect_names_format_modules_rank_alpha(truth):
    """77 modules: the stacks' 48 and the ResBlocks' conv1, conv2, time_emb_proj (8 each) and 5 conv_shortcuts."""
    _, _, files = truth
    peft = lora_summary(files["peft"])
    assert (peft["format"], peft["modules"], peft["rank"], peft["alpha"]) == ("diffusers", 77, [RANK], [ALPHA])
    kohya = lora_summary(files["kohya"])
    assert (kohya["format"], kohya["modules"], kohya["rank"], kohya["alpha"]) == ("kohya", 77, [RANK], [ALPHA])
    lines = run_cli("inspect", files["kohya"]).output.splitlines()
    assert lines[0] == f"{files['kohya']}: a LoRA (kohya format), 77 modules (77 UNet, 0 text encoder), rank 4, alpha 6"
    assert lines[1] == ("  adapts: attn1_to_k, attn1_to_out_0, attn1_to_q, attn1_to_v, attn2_to_k, attn2_to_out_0, attn2_to_q, "
                        "attn2_to_v, conv1, conv2, conv_shortcut, ff_net_0_proj, ff_net_2, proj_in, proj_out, time_emb_proj")
    assert "adapts: attn1.to_k, attn1.to_out.0," in run_cli("inspect", files["old"]).output
    assert json.loads(run_cli("inspect", files["peft"], "--json").output)["lora"]["modules"] == 77


def test_convert_fuses_loras_into_a_converted_unet(truth, base_unet, tmp_path):
    """`flax-sgm convert BASE --unet --lora FILE --lora-scale S`: the output holds load_lora's fused weights, bit for bit."""
    d, out, files = truth
    result = run_cli("convert", d / "base", "--unet", "--lora", files["kohya"], "--lora-scale", SCALE, "-o", tmp_path / "out")
    assert ", 1 LoRA(s) fused in " in result.output
    fused = load_lora(nnx.clone(base_unet), files["kohya"], scale=SCALE)  # equal to the peft model: the format test
    want, got = state(fused), state(flax_sgm.load_unet(tmp_path / "out"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    for args, message in [(["--all"], "Error: --lora fuses a LoRA into the whole UNet: it goes with --unet"),
                          (["--unet", "--lora-scale", 1, "--lora-scale", 2],
                           "Error: --lora-scale: give one per --lora (1), or none; got 2")]:
        refused = run_cli("convert", d / "base", "--lora", files["kohya"], *args, "-o", tmp_path / "x", ok=False)
        assert refused.exit_code == 2 and message in refused.output  # click's usage errors
    weights = d / "base" / "diffusion_pytorch_model.safetensors"  # not a LoRA
    assert cli_error("convert", d / "base", "--unet", "--lora", weights, "-o", tmp_path / "y").startswith(
        f"Error: {weights}: holds no LoRA keys (.lora_A/.lora_B, .lora.down/.lora.up, .lora_down/.lora_up, ")
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_verify_a_lora_against_diffusers(truth):
    """`flax-sgm verify --model unet --checkpoint BASE --lora FILE`: diffusers' loader and fuse_lora against
    load_lora, module by module, forward and gradients (exit 0: parity). About 40 s of CPU."""
    d, _, files = truth
    result = run_cli("verify", "--model", "unet", "--checkpoint", d / "base", "--lora", files["kohya"], "--lora-scale", SCALE)
    assert f"{files['kohya']} at scale {SCALE:g}: 77 modules (flax_sgm.load_lora), 77 taken by diffusers" in result.output


def test_verify_lora_needs_a_unet_checkpoint(truth):
    files = truth[2]
    refused = run_cli("verify", "--model", "vae", "--lora", files["kohya"], ok=False)
    assert refused.exit_code == 2 and "--lora verifies a LoRA on a UNet checkpoint" in refused.output


# --- bad input: one line, the model untouched ----------------------------------------------------------------


def refused(unet, path, match, **kwargs):
    before = state(unet)
    with pytest.raises(CheckpointError, match=match) as err:
        load_lora(unet, path, **kwargs)
    assert "\n" not in str(err.value)
    assert_same_state(unet, before)


def test_a_module_the_model_lacks_is_named(truth, base_unet, tmp_path):
    """Strict: a key no layer holds is named, nothing applied (the rest of the file is fine)."""
    tensors = load_file(str(truth[2]["kohya"]))
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight"] = np.ones((4, 32), np.float32)
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight"] = np.ones((32, 4), np.float32)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    refused(nnx.clone(base_unet), tmp_path / "extra.safetensors",
            r"1 of 78 LoRA modules name no layer of this UNetModel: lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q$")


def test_an_sdxl_lora_on_an_sd1_model_is_refused(truth, base_unet, tmp_path):
    sdxl = dict(SD1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 3 * 8)
    UNet2DConditionModel(**sdxl).save_pretrained(tmp_path / "sdxl")
    unet = peft_unet(tmp_path / "sdxl", LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), seed=3)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    refused(nnx.clone(base_unet), tmp_path / "pytorch_lora_weights.safetensors",
            r"14 of 16 LoRA modules name no layer of this UNetModel: unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q, ")


def test_rank_mismatch_between_down_and_up_is_named(truth, base_unet, tmp_path):
    tensors = load_file(str(truth[2]["kohya"]))
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"
    tensors[key] = tensors[key][:, :3]
    save_file(tensors, str(tmp_path / "rank.safetensors"))
    refused(nnx.clone(base_unet), tmp_path / "rank.safetensors",
            r"1 LoRA modules do not fit this UNetModel: lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k: "
            r"rank mismatch, down has rank 4 \(\[4, 32\]\), up has 3 \(\[64, 3\]\)$")


@pytest.mark.parametrize("key,kind", [
    ("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "LyCORIS LoHa"),
    ("lora_unet_mid_block_attentions_0_proj_in.lokr_w1", "LyCORIS LoKr"),
])
def test_lycoris_files_are_refused_by_kind(base_unet, tmp_path, key, kind):
    save_file({key: np.ones((4, 64), np.float32), key.rsplit(".", 1)[0] + ".alpha": np.array(4.0, np.float32)}, str(tmp_path / "ly.safetensors"))
    refused(nnx.clone(base_unet), tmp_path / "ly.safetensors", rf"a {kind} file \({key}\); load_lora reads plain LoRA only$")


@pytest.mark.parametrize("scale", ["1.0", None, float("nan"), True])
def test_a_scale_that_is_not_a_number_is_refused(truth, base_unet, scale):
    refused(nnx.clone(base_unet), truth[2]["peft"], r"load_lora: scale must be a finite number; got ", scale=scale)


def test_another_models_part_is_refused_by_name(truth, base_unet, tmp_path):
    """kohya's `lora_te1_` modules beside the UNet's: not placed on a UNet, so the file is refused, naming them."""
    tensors = load_file(str(truth[2]["kohya"]))
    stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors |= {stem + ".lora_down.weight": np.ones((4, 32), np.float32), stem + ".lora_up.weight": np.ones((32, 4), np.float32)}
    save_file(tensors, str(tmp_path / "te.safetensors"))
    refused(nnx.clone(base_unet), tmp_path / "te.safetensors", rf"1 modules are another model's \(text_encoder: {stem}\); "
            r"load_lora applies the unet part to a UNetModel \(ignore_other_parts=True applies it alone\)$")
    unet = load_lora(nnx.clone(base_unet), tmp_path / "te.safetensors", ignore_other_parts=True)
    want = state(load_lora(nnx.clone(base_unet), truth[2]["kohya"]))
    assert all(np.array_equal(v, want[k]) for k, v in state(unet).items())  # the UNet's part, as the file without te


def test_keys_that_are_not_lora_tensors_are_named(truth, base_unet, tmp_path):
    tensors = load_file(str(truth[2]["kohya"])) | {"lora_unet_conv_in.weight": np.ones((4,), np.float32)}
    save_file(tensors, str(tmp_path / "stray.safetensors"))
    refused(nnx.clone(base_unet), tmp_path / "stray.safetensors", r"1 keys are not LoRA tensors: lora_unet_conv_in.weight$")


def test_a_checkpoint_is_not_taken_for_a_lycoris_file():
    """`model.diffusion_model.` holds 'diff' and a kohya module 'lora_unet_..._oft_x' is a name, not a LyCORIS part."""
    from flax_sgm.lora.layout import is_lora, kind_of

    assert kind_of(["model.diffusion_model.input_blocks.0.0.bias", "lora_unet_a_lokr_b.lora_down.weight"]) is None
    assert not is_lora(["model.diffusion_model.input_blocks.0.0.bias"])
    assert kind_of(["lora_unet_a.diff", "x"]) == ("LyCORIS full (diff)", "lora_unet_a.diff")
    assert kind_of(["unet.a.lora_magnitude_vector"]) == ("DoRA", "unet.a.lora_magnitude_vector")


@pytest.mark.slow
def test_adapter_gradients_through_gradient_checkpointing():
    """use_checkpoint=True (the default, what training runs): the adapters' gradients pass the checkpointed blocks
    (their LoRAParams ride with the non-Param state) and equal those without checkpointing. About 25 s of CPU."""
    from flax_sgm.verify.criteria import REORDERED_GRAD

    grads = []
    for checkpoint in (False, True):
        config = flax_sgm.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                     transformer_depth=(0, 1), num_head_channels=16, context_dim=32,
                                     use_linear_in_transformer=True, use_checkpoint=checkpoint)
        unet = flax_sgm.UNetModel(config, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(1)  # off sgm's zero-initialised proj_out and output conv
        nnx.update(unet, jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), nnx.state(unet, nnx.Param)))
        add_adapters(unet, rank=4, targets=["to_q", "to_out.0", "conv1"])
        for _, adapter in flax_sgm.lora.adapters.adapters_of(unet)["default"]:
            adapter.up[...] = jnp.asarray(rng.standard_normal(adapter.up.shape).astype(np.float32) * 0.1)
        x, t, c = inputs(2)
        loss = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x[:, :, :8, :8].transpose(0, 2, 3, 1), t, c) ** 2),
                                argnums=nnx.DiffState(0, LoRAParam)))
        grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(loss(unet))]))
    assert np.abs(grads[0]).max() > 0
    assert_close(grads[1], grads[0], REORDERED_GRAD, what="checkpointed against not")


def test_one_layer_under_two_names_is_refused(truth, base_unet, tmp_path):
    """A kohya file naming a layer under diffusers' and sgm's names: it would be applied twice."""
    tensors = load_file(str(truth[2]["kohya"]))
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    tensors |= {k.replace(stem, "lora_unet_middle_block_1_proj_in"): v for k, v in tensors.items() if k.startswith(stem + ".")}
    save_file(tensors, str(tmp_path / "twice.safetensors"))
    refused(nnx.clone(base_unet), tmp_path / "twice.safetensors",
            rf"1 LoRA modules do not fit this UNetModel: lora_unet_middle_block_1_proj_in adapts the layer {stem} adapts$")


# --- text encoders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_text_encoder_lora_equals_the_peft_model(truth, base_unet, tmp_path, fmt):
    """A tiny transformers CLIPTextModel adapted by peft (random A and B), written by diffusers' save_lora_weights
    (`text_encoder.` keys, peft's config in the metadata) or kohya's names (`lora_te1_`): load_text_encoder of
    the base with load_lora answers as the peft model; save_lora(part="text_encoder_2") writes `lora_te2_` keys."""
    from transformers import CLIPTextConfig as TransformersConfig
    from transformers import CLIPTextModel as TransformersCLIPTextModel

    config = TransformersConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, pad_token_id=1,
                                eos_token_id=2, hidden_act="quick_gelu")
    randomize_(TransformersCLIPTextModel(config), seed=0).save_pretrained(tmp_path / "te")
    tower = TransformersCLIPTextModel.from_pretrained(tmp_path / "te").eval()
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                      init_lora_weights=False)
    torch.manual_seed(4)
    import peft as peft_library  # transformers' add_adapter wants peft >= 0.22; peft's own injection is the same layer

    peft_library.inject_adapter_in_model(lora, tower)
    peft = {k.replace(".default.", "."): v for k, v in tower.state_dict().items() if ".lora_" in k}  # peft's state-dict names
    if fmt == "diffusers":
        StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", text_encoder_lora_layers=peft,
                                                  text_encoder_lora_adapter_metadata=lora.to_dict())
        path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    else:
        kohya = convert_state_dict_to_kohya({"text_encoder." + k: v for k, v in peft.items()})
        path = tmp_path / "te_kohya.safetensors"
        save_file({k: np.asarray(ALPHA, np.float32) if k.endswith(".alpha") else v.contiguous().numpy()
                   for k, v in kohya.items()}, str(path))
    ids = np.random.default_rng(0).integers(3, 999, (2, 77))
    ids[:, 20] = 2
    with torch.no_grad():
        want = tower(torch.from_numpy(ids)).last_hidden_state.numpy()
    flax = flax_sgm.load_text_encoder(tmp_path / "te")
    load_lora(flax, path, scale=1.0)
    encode = jax.jit(lambda m, ids: m(ids).last_hidden_state)
    assert_close(np.asarray(encode(flax, ids)), want, TOL, what=f"text encoder, {fmt}")
    # A pipeline takes each part on its model: the UNet's and the text encoder's of one file, all checked first.
    from flax_sgm.pipeline.pipeline import Pipeline

    from safetensors import safe_open

    both, unet_file = tmp_path / "both.safetensors", truth[2]["kohya" if fmt == "kohya" else "peft"]
    configs = {}  # each file's peft configs (`text_encoder.r`, `unet.r`, ...), as save_lora_weights writes both parts'
    for f in (path, unet_file):
        with safe_open(str(f), "numpy") as opened:
            configs |= json.loads((opened.metadata() or {}).get("lora_adapter_metadata", "{}"))
    save_file(load_file(str(path)) | load_file(str(unet_file)), str(both), metadata={"lora_adapter_metadata": json.dumps(configs)})
    assert f"apply: flax_sgm.load_lora(pipeline, {str(both)!r}" in run_cli("inspect", both).stdout  # not (unet, ...)
    assert f"apply: flax_sgm.load_lora(text_encoder, {str(path)!r}" in run_cli("inspect", path).stdout
    pipe = Pipeline.__new__(Pipeline)  # the models alone: what load_lora reads of a pipeline
    pipe.family, pipe.unet, pipe.text_encoders = "sd", nnx.clone(base_unet), [flax_sgm.load_text_encoder(tmp_path / "te")]
    load_lora(pipe, both)
    assert_close(np.asarray(encode(pipe.text_encoders[0], ids)), want, TOL, what=f"pipeline's text encoder, {fmt}")
    unfused = Pipeline.__new__(Pipeline)  # loaded at weight 0, then set on the pipeline's models
    unfused.family, unfused.unet = "sd", nnx.clone(base_unet)
    unfused.text_encoders = [flax_sgm.load_text_encoder(tmp_path / "te")]
    load_lora(unfused, both, scale=0.0, fuse=False)
    flax_sgm.set_lora_scale(unfused, 1.0)
    assert_close(np.asarray(encode(unfused.text_encoders[0], ids)), want, TOL, what=f"set_lora_scale on a pipeline, {fmt}")
    unet = state(load_lora(nnx.clone(base_unet), unet_file))
    assert all(np.array_equal(v, unet[k]) for k, v in state(pipe.unet).items())
    with pytest.raises(CheckpointError, match=r"modules are another model's \(unet: "):
        load_lora(pipe.text_encoders[0], both)
    refiner = Pipeline.__new__(Pipeline)  # SDXL's refiner: its one text encoder is diffusers' text_encoder_2
    refiner.family, refiner.unet = "sdxl-refiner", nnx.clone(base_unet)
    refiner.text_encoders = [flax_sgm.load_text_encoder(tmp_path / "te")]
    with pytest.raises(CheckpointError, match="holds text_encoder modules; this sdxl-refiner pipeline has no such model"):
        load_lora(refiner, both)  # was put on the refiner's OpenCLIP tower
    tensors, _ = flax_sgm.lora.lora_state_dict(add_adapters(flax, rank=2, targets=["q_proj"]) and flax, format="kohya",
                                               part="text_encoder_2")
    assert sorted(tensors)[:3] == ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                                   "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                                   "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]


def test_a_text_encoder_lora_in_diffusers_older_names_loads_as_diffusers_reads_it(tmp_path):
    """diffusers' older text-encoder spellings: the attention processors' `self_attn.to_q_lora.down.weight` (q_proj,
    and to_out_lora is out_proj, not a UNet's to_out.0) and LoRACompatibleLinear's `mlp.fc1.lora_linear_layer.down
    .weight`. The reference is diffusers' own load_lora_into_text_encoder of the file."""
    import peft as peft_library
    from transformers import CLIPTextModel as TransformersCLIPTextModel

    from flax_sgm.verify.tiny import tower

    tower("clip").save_pretrained(tmp_path / "te")
    adapted = TransformersCLIPTextModel.from_pretrained(tmp_path / "te").eval()
    torch.manual_seed(4)
    peft_library.inject_adapter_in_model(LoraConfig(r=RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj",
                                                                             "fc1", "fc2"], init_lora_weights=False), adapted)
    older = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    tensors = {}
    for key, value in adapted.state_dict().items():
        if ".lora_" not in key:
            continue
        module, layer = key.split(".lora_")[0].rsplit(".", 1)
        role = "down" if ".lora_A." in key else "up"
        name = f"{older[layer]}_lora" if layer in older else f"{layer}.lora_linear_layer"
        tensors[f"text_encoder.{module}.{name}.{role}.weight"] = value.contiguous().numpy()
    path = tmp_path / "older.safetensors"
    save_file(tensors, str(path))
    reference = TransformersCLIPTextModel.from_pretrained(tmp_path / "te").eval()
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, reference)
    ids = np.random.default_rng(0).integers(3, 999, (2, 77))
    ids[:, 20] = 2
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
        assert not np.allclose(want, TransformersCLIPTextModel.from_pretrained(tmp_path / "te")(torch.from_numpy(ids))
                               .last_hidden_state.numpy())  # diffusers took it
    flax = load_lora(flax_sgm.load_text_encoder(tmp_path / "te"), path)
    assert_close(np.asarray(flax(ids).last_hidden_state), want, TOL, what="older text-encoder names")
    assert lora_summary(path)["format"] == "diffusers (lora.down/up names, attention processor names)"
    bare = tmp_path / "bare.safetensors"  # no text_encoder. prefix: `self_attn` says a text encoder's projections
    save_file({k[len("text_encoder."):]: v for k, v in tensors.items()}, str(bare))
    flax = load_lora(flax_sgm.load_text_encoder(tmp_path / "te"), bare)
    assert_close(np.asarray(flax(ids).last_hidden_state), want, TOL, what="older text-encoder names, bare")


def test_peft_alpha_pattern_keys_are_regexes_as_peft_reads_them():
    """peft matches alpha_pattern keys as `(.*\\.)?(key)$` regexes; a regex key was read as a plain suffix, and its
    module silently took lora_alpha instead."""
    from types import SimpleNamespace

    from flax_sgm.lora.load import _alpha

    config = {"lora_alpha": 8, "alpha_pattern": {r"down_blocks\.\d\.attentions\.0\.proj_in": 2, "to_k": 4}}
    no_key = SimpleNamespace(alpha=None)
    assert _alpha(None, no_key, "down_blocks.1.attentions.0.proj_in", config, 4, []) == 2.0
    assert _alpha(None, no_key, "mid_block.attentions.0.transformer_blocks.0.attn1.to_k", config, 4, []) == 4.0
    assert _alpha(None, no_key, "mid_block.attentions.0.proj_in", config, 4, []) == 8.0


def test_fusing_keeps_a_sharded_kernel_where_it_was():
    """A fused kernel stays sharded as it was (a review feared the host-side sum brought it back to one device;
    the in-place write keeps the sharding). In a process with 4 CPU devices."""
    import os
    import subprocess
    import sys

    code = """
import jax, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax_sgm.lora import adapters
from flax_sgm.nn.primitives import Linear
layer = Linear(8, 12, axes=(None, None), rngs=nnx.Rngs(0))
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), PartitionSpec(None, "x"))
layer.kernel[...] = jax.device_put(layer.kernel[...], sharding)
adapters.fuse(layer, adapters.Adapter(np.ones((8, 2)), np.ones((2, 12)), alpha=2.0))
assert layer.kernel[...].sharding == sharding, layer.kernel[...].sharding
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_lora_file_given_to_a_model_loader_is_named_as_one(truth):
    """load_unet / load_vae / load_text_encoder of a LoRA file said only 'it holds unet.' (kohya: a list of stems)."""
    _, _, files = truth
    for fmt, kind in (("peft", "a diffusers LoRA"), ("kohya", "a kohya LoRA")):
        for load in (flax_sgm.load_unet, flax_sgm.load_vae, flax_sgm.load_text_encoder):
            with pytest.raises(CheckpointError, match=f"{kind}: flax_sgm.load_lora applies it to a model") as err:
                load(files[fmt])
            assert "\n" not in str(err.value)
