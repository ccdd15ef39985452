"""sgm's KL autoencoder against diffusers' AutoencoderKL: forward and gradients, the files users hold, bad input.

The reference is diffusers' torch AutoencoderKL built in-process at tiny sizes, every weight random, read
into flax_sgm through the conversion table under diffusers' names. sgm single files are written by the
project's sgm layout and checked by diffusers' own converter (convert_ldm_vae_checkpoint), never only by
the project's mapping.
"""

import copy
import inspect
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import nnx
from safetensors.numpy import save_file

from conftest import assert_close, assert_parity, compare, nchw_to_nhwc, nhwc_to_nchw, randomize_, rel_err, run_cli
from flax_sgm import AutoencoderConfig, AutoencoderKL, CheckpointError, load_vae, record_attention_calls, target_platform
from flax_sgm.checkpoints import convert
from flax_sgm.autoencoder import PRESETS
from flax_sgm.autoencoder.diffusers import DEFAULTS, HONOURED, IRRELEVANT
from flax_sgm.autoencoder.layout import SGM_PREFIX, diffusers_layout
from flax_sgm.autoencoder.load import released_vae_fields
from flax_sgm.unet.config import PRESETS as UNETS
from flax_sgm.unet.layout import SGM_PREFIX as UNET_PREFIX
from flax_sgm.verify import criteria, verify_modules
from flax_sgm.verify.tiny import VAES, vae as diffusers_vae
from flax_sgm import models

CONFIGS = ("tiny", "groups8")  # VAES: 32 groups with the mid attention; 8 groups, 3 levels, none


def flax_vae(torch_vae: TorchAutoencoderKL, **options) -> AutoencoderKL:
    """flax_sgm's autoencoder of a diffusers model's config, its weights read under diffusers' names."""
    config = AutoencoderConfig.from_diffusers(dict(torch_vae.config), **options)
    return convert.load_torch_state_dict(models.abstract(config), torch_vae.state_dict(), layout=diffusers_layout(config))


def images(rng, batch: int = 2, hw=(16, 16), channels: int = 3) -> np.ndarray:
    return rng.uniform(-1, 1, (batch, channels, *hw)).astype(np.float32)  # NCHW: torch's layout


@pytest.fixture(scope="module")
def tiny():
    torch_vae = diffusers_vae("tiny")
    return torch_vae, flax_vae(torch_vae)


# Parity ---------------------------------------------------------------------------------------


def test_vae_matches_diffusers(tiny, rng):
    """The whole model (encode, the posterior's mode, decode), forward and gradients of the image and of every
    parameter, against torch's float64 referee (20 s)."""
    torch_vae, flax = tiny
    assert_parity(compare(torch_vae, flax, {"x": images(rng)}), "AutoencoderKL")


@pytest.mark.slow
def test_vae_matches_diffusers_per_submodule(tiny, rng):
    """verify_modules: every module diffusers holds whole (conv_in, each ResnetBlock2D, Downsample2D,
    Upsample2D, the mid-block Attention, quant_conv ...) on its own recorded inputs, forward and gradients (60 s)."""
    torch_vae, flax = tiny
    report = verify_modules(torch_vae, flax, {"x": images(rng)})
    assert report.passed, report.format()
    names = {row.name for row in report.rows}
    assert {"encoder.mid_block.attentions.0", "decoder.up_blocks.0.upsamplers.0", "encoder.down_blocks.0.downsamplers.0",
            "quant_conv", "post_quant_conv", "decoder.up_blocks.1.resnets.1"} <= names


@pytest.mark.slow
def test_a_wrong_weight_fails_its_own_row_only(tiny, rng):
    """A 1% error in the decoder's attention `v` fails that row and the whole model, no other row (45 s)."""
    torch_vae, flax = tiny
    broken = copy.deepcopy(flax)
    kernel = broken.decoder.mid.attn_1.v.kernel
    kernel[...] = kernel[...] * 1.01
    report = verify_modules(torch_vae, broken, {"x": images(rng, batch=1)})
    failed = [row.name for row in report.rows if not row.passed]
    assert failed == ["decoder.mid_block.attentions.0"] and not report.model.passed


def torch_float64(torch_vae):
    return torch.nn.Module.to(copy.deepcopy(torch_vae), torch.float64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_posterior_and_decode_equal_diffusers(name, rng):
    """The posterior's mean, logvar (clamped), std and KL, and decode, against diffusers' in float64."""
    torch_vae = diffusers_vae(name, seed=3)
    flax = flax_vae(torch_vae)
    x = images(rng)
    with torch.no_grad():
        ref = torch_float64(torch_vae)
        posterior = ref.encode(torch.from_numpy(x).double()).latent_dist
        decoded = ref.decode(posterior.mean).sample
    got = flax.encode(jnp.asarray(nchw_to_nhwc(x)))
    floor = criteria.CRITERIA["float32"].forward
    for what in ("mean", "logvar", "std"):
        err = rel_err(nhwc_to_nchw(np.asarray(getattr(got, what))), getattr(posterior, what).numpy())
        assert err <= floor, f"{what}: {err:.3g}"
    assert rel_err(np.asarray(got.kl()), posterior.kl().numpy()) <= floor
    out = flax.decode(got.mean)
    assert rel_err(nhwc_to_nchw(np.asarray(out)), decoded.numpy()) <= floor


def test_logvar_is_clamped_and_kl_against_another_posterior_is_diffusers():
    moments = np.random.default_rng(0).standard_normal((2, 8, 3, 3)) * 40  # NCHW: mean then logvar channels
    theirs = DiagonalGaussianDistribution(torch.from_numpy(moments))
    other = DiagonalGaussianDistribution(torch.from_numpy(moments[::-1].copy()))
    from flax_sgm.autoencoder.model import DiagonalGaussian

    ours = DiagonalGaussian.from_moments(jnp.asarray(nchw_to_nhwc(moments), jnp.float32))
    mine_other = DiagonalGaussian.from_moments(jnp.asarray(nchw_to_nhwc(moments[::-1].copy()), jnp.float32))
    assert float(ours.logvar.min()) == -30.0 and float(ours.logvar.max()) == 20.0
    assert_close(nhwc_to_nchw(np.asarray(ours.logvar)), theirs.logvar.numpy(), what="logvar")
    assert_close(np.asarray(ours.kl(mine_other)), theirs.kl(other).numpy(), what="kl")
    moderate = DiagonalGaussian.from_moments(jnp.asarray(nchw_to_nhwc(moments / 40), jnp.float32))
    z = moderate.sample(jax.random.key(0))
    noise = (z - moderate.mean) / moderate.std  # the standard normal drawn from the key
    assert_close(noise, jax.random.normal(jax.random.key(0), z.shape), tol=criteria.REORDERED_GRAD, what="sample")


# JAX transforms -------------------------------------------------------------------------------


def test_jit_grad_vmap_equal_eager(tiny, rng):
    """jax.jit over encode (the posterior is a pytree) and decode, jax.vmap over images, jax.grad of a closed-over
    model equal to nnx.grad."""
    _, flax = tiny
    x = jnp.asarray(nchw_to_nhwc(images(rng)))
    posterior = jax.jit(flax.encode)(x)
    z = posterior.mean
    assert_close(z, flax.encode(x).mean, what="jit encode")
    image = jax.jit(flax.decode)(z)
    assert_close(jax.jit(jax.vmap(lambda zi: flax.decode(zi[None])[0]))(z), image, what="vmap decode")

    def loss(model, x):
        return jnp.sum(model.decode(model.encode(x).mode()) ** 2)

    grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(flax, x)
    assert_close(jax.jit(jax.grad(lambda x: loss(flax, x)))(x), dx, tol=criteria.REORDERED_GRAD, what="jit(grad) input")


@pytest.mark.slow
def test_remat_per_resnet_block_changes_no_gradient(tiny, rng):
    """use_checkpoint: each ResnetBlock under jax.checkpoint (training through the decoder); 25 s on 2 cores."""
    torch_vae, flax = tiny
    x = jnp.asarray(nchw_to_nhwc(images(rng)))

    def loss(model, x):
        return jnp.sum(model.decode(model.encode(x).mode()) ** 2)

    grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(flax, x)
    remat = flax_vae(torch_vae, use_checkpoint=True)
    grads_remat, dx_remat = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(remat, x)
    assert_close(dx_remat, dx, tol=criteria.REORDERED_GRAD, what="remat input grad")
    assert_close(nnx.state(grads_remat, nnx.Param), nnx.state(grads, nnx.Param), tol=criteria.REORDERED_GRAD,
                 what="remat param grads")


def test_jvp_in_the_latent_and_vmap_over_images(tiny, rng):
    """jax.jvp with the tangent on the latent only (the model closed over, not passed in): its primal is decode,
    its tangent the adjoint of jax.vjp's (<J t, c> = <t, J^T c>) and linear in t; jax.vmap of encode over
    images equals the batched encode."""
    _, flax = tiny
    z, t = (jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32) for _ in range(2))
    c = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)
    decode = lambda z: flax.decode(z)  # noqa: E731

    @jax.jit
    def run(z, t, c):
        primal, tangent = jax.jvp(decode, (z,), (t,))
        _, twice = jax.jvp(decode, (z,), (2 * t,))
        _, pull = jax.vjp(decode, z)
        return primal, tangent, twice, pull(c)[0], decode(z)

    primal, tangent, twice, back, want = run(z, t, c)
    assert_close(primal, want, what="jvp primal")
    assert_close(jnp.vdot(tangent, c), jnp.vdot(t, back), tol=criteria.REORDERED_GRAD, what="<J t, c> = <t, J^T c>")
    assert_close(twice, 2 * tangent, tol=criteria.REORDERED_GRAD, what="jvp linear in t")
    x = jnp.asarray(nchw_to_nhwc(images(rng, hw=(8, 8))))
    per_image, batched = jax.jit(lambda x: (jax.vmap(lambda xi: flax.encode(xi[None]).mean[0])(x), flax.encode(x).mean))(x)
    assert_close(per_image, batched, what="vmap encode")


def test_checkpointed_resnet_blocks_give_the_same_decoder_gradients(tiny, rng):
    """use_checkpoint: each ResnetBlock under jax.checkpoint (one remat per block in the traced program), the
    decoder's gradients (latent and every parameter) unchanged."""
    torch_vae, flax = tiny
    remat = flax_vae(torch_vae, use_checkpoint=True)
    z = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)

    def loss(model, z):
        return jnp.sum(model.decode(z) * cot)

    grad = nnx.grad(loss, argnums=(0, 1))

    def remats(model) -> int:
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda state, z: grad(nnx.merge(graphdef, state), z))(state, z)).count("remat")

    blocks = 2 + 2 * (1 + 1)  # mid block_1, block_2; two levels of num_res_blocks + 1
    assert remats(remat) - remats(flax) == blocks
    (g, dz), (g_remat, dz_remat) = (nnx.jit(grad)(m, z) for m in (flax, remat))
    assert_close(dz_remat, dz, tol=criteria.REORDERED_GRAD, what="latent grad")
    assert_close(nnx.state(g_remat, nnx.Param), nnx.state(g, nnx.Param), tol=criteria.REORDERED_GRAD, what="param grads")


# Data parallel over a mesh of 4 virtual CPU devices, in a subprocess (the device count is set before jax starts).
MESH_WORKER = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from flax_sgm import AutoencoderConfig, models, sharding
from flax_sgm.verify.criteria import rel_err
jax.config.update("jax_default_matmul_precision", "highest")
config = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8)
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
cot = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)

def build():
    model = models.abstract(config)  # no initialisers run: seeded normal weights of the abstract shapes
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    nnx.update(model, jax.tree.unflatten(tree, [jnp.asarray(np.random.default_rng(i).standard_normal(v.shape) * 0.2, v.dtype)
                                                for i, v in enumerate(leaves)]))
    return model

def step(model, x, cot):
    def loss(model, x):
        out = model(x)
        return jnp.sum(out * cot), out
    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, grads

model = build()
ref_out, ref_grads = nnx.jit(step)(model, x, cot)
report = {"devices": jax.device_count()}
for name, shape in (("data", (4, 1, 1)), ("data+rows", (2, 2, 1))):  # images; images and their rows (seq)
    mesh = sharding.make_mesh(*shape)
    placed = sharding.shard_model(nnx.clone(model), mesh)  # the same weights, placed on the mesh
    xs, cs = (sharding.place(a, sharding.IMAGE, mesh) for a in (x, cot))
    with sharding.use_mesh(mesh):
        out, grads = nnx.jit(step)(placed, xs, cs)
    # The attention's k.bias shifts every logit of a row, which softmax ignores: its gradient is rounding noise.
    pairs = [(a, b) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads))
             if "'k']['bias']" not in jax.tree_util.keystr(path)]
    report[name] = {"out_spec": str(out.sharding.spec), "forward": rel_err(out, ref_out),
                    "grad": max(rel_err(a, b) for a, b in pairs), "compared": len(pairs)}
print(json.dumps(report))
"""


def test_data_parallel_over_images_equals_one_device():
    """Four images over a (data=4) mesh of virtual CPU devices, and over (data=2, seq=2) with each image's rows
    split too (the spatial axis): output split so, forward and gradients (image and parameters) equal to one
    device's."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", MESH_WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4, report
    assert "('data'" in report["data"]["out_spec"] and "'seq'" in report["data+rows"]["out_spec"], report
    for r in (report["data"], report["data+rows"]):
        assert r["compared"] > 40 and r["forward"] <= criteria.REORDERED and r["grad"] <= criteria.REORDERED_GRAD, report


def test_mid_attention_at_1024_never_materialises_its_logits():
    """Decoding a 128 x 128 latent (a 1024 x 1024 image, SD/SDXL's VAE) traced abstractly: the mid-block
    attention over 16,384 pixels takes the chunked kernel (its float32 logits would be 1 GiB)."""
    graphdef, state = nnx.split(models.abstract(PRESETS["sdxl"]))
    decode = lambda state, z: nnx.merge(graphdef, state).decode(z)  # noqa: E731
    with record_attention_calls() as calls:
        jax.eval_shape(decode, state, jax.ShapeDtypeStruct((1, 128, 128, 4), jnp.float32))
    assert [(c.backend, c.problem.n) for c in calls] == [("chunked", 128 * 128)]
    graphdef, state = nnx.split(models.abstract(PRESETS["sdxl"], dtype=jnp.bfloat16))
    with target_platform("gpu"), record_attention_calls() as calls:
        jax.eval_shape(decode, state, jax.ShapeDtypeStruct((2, 128, 128, 4), jnp.bfloat16))
    # 512 channels are one head of 512, wider than cuDNN takes (256): on GPU the chunked kernel too, once the
    # logits pass the policy's budget (at batch 1 they are exactly its 1 GiB, and XLA runs).
    assert [c.backend for c in calls] == ["chunked"] and "cuDNN attention needs a head dim" in calls[0].reason


@pytest.mark.parametrize("hw", [pytest.param((32, 32), marks=pytest.mark.slow), (24, 36)], ids=["square", "ragged"])
def test_tiled_encode_and_decode_equal_diffusers_enable_tiling(tiny, rng, hw):
    """tiled=True: tiles of config.tile_sample_size (diffusers' sample_size, 16 here) and its latent size,
    overlapping by a quarter and blended as diffusers' blend_v/blend_h, equal to diffusers' enable_tiling;
    edge tiles smaller. The untiled result differs, by the error docs/autoencoder.md gives."""
    torch_vae, flax = tiny
    tiling = copy.deepcopy(torch_vae)
    tiling.enable_tiling()
    assert (flax.config.tile_sample_size, flax.config.tile_latent_size) == (tiling.tile_sample_min_size, tiling.tile_latent_min_size)
    x = images(rng, batch=1, hw=hw)
    with torch.no_grad():
        posterior = tiling.encode(torch.from_numpy(x)).latent_dist
        decoded = tiling.decode(posterior.mean).sample
        untiled = torch_vae.decode(posterior.mean).sample
    got = jax.jit(lambda x: flax.encode(x, tiled=True))(jnp.asarray(nchw_to_nhwc(x)))
    floor = criteria.CRITERIA["float32"].forward
    for what in ("mean", "logvar"):
        assert rel_err(nhwc_to_nchw(np.asarray(getattr(got, what))), getattr(posterior, what).numpy()) <= floor, what
    z = jnp.asarray(nchw_to_nhwc(posterior.mean.numpy()))
    out = nhwc_to_nchw(np.asarray(jax.jit(lambda z: flax.decode(z, tiled=True))(z)))
    assert rel_err(out, decoded.numpy()) <= floor
    assert rel_err(out, untiled.numpy()) > 100 * floor  # tiling happened: a seam the untiled decode lacks
    # Below the tile size nothing is tiled.
    small = jnp.asarray(nchw_to_nhwc(images(rng, batch=1)))
    assert np.array_equal(np.asarray(flax.encode(small, tiled=True).mean), np.asarray(flax.encode(small).mean))


@pytest.mark.parametrize("backend,materialised", [("auto", False), ("xla", True)])
def test_lowered_decode_at_a_128_latent_holds_no_logits_buffer(backend, materialised):
    """SDXL's VAE decode of a 128 x 128 latent lowered for CPU: with the default backend no [16384, 16384] logits
    tensor is in the program (the chunked kernel); forcing plain XLA attention puts it there (what is guarded).
    `flax-sgm lower --config sdxl-vae` reports the chunked call."""
    from flax_sgm import lowering

    config = PRESETS["sdxl"].replace(sdp_backend=backend)
    graphdef, state = nnx.split(models.abstract(config))
    z = jax.ShapeDtypeStruct((1, 128, 128, 4), jnp.float32)
    program = lowering.lower(lambda state, z: nnx.merge(graphdef, state).decode(z), state, z, platform="cpu")
    assert ("16384x16384" in program.lowered.as_text()) == materialised
    if not materialised:
        out = run_cli("lower", "--config", "sdxl-vae", "--platform", "cpu", "--dtype", "float32").output
        assert re.search(r"mid\.attn_1 +chunked +16384 x 16384", out), out


def test_force_upcast_computes_float16_in_float32():
    """force_upcast (diffusers' default; SDXL's original VAE): a float16 model computes in float32 from its
    float16 weights; the fp16-fixed VAE and bfloat16 stay as built."""
    def out_dtype(name, dtype):
        graphdef, state = nnx.split(models.abstract(PRESETS[name].replace(ch=32, ch_mult=(1, 2)), dtype=dtype, param_dtype=dtype))
        assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(dtype)}
        z = jax.ShapeDtypeStruct((1, 8, 8, 4), dtype)
        return jax.eval_shape(lambda state, z: nnx.merge(graphdef, state).decode(z), state, z).dtype

    assert out_dtype("sdxl", jnp.float16) == jnp.float32
    assert out_dtype("sdxl-fp16-fix", jnp.float16) == jnp.float16
    assert out_dtype("sdxl", jnp.bfloat16) == jnp.bfloat16


# Files ----------------------------------------------------------------------------------------


def assert_holds(flax, torch_vae) -> None:
    """`flax` holds `torch_vae`'s weights, bit for bit (to_torch_state_dict under diffusers' names)."""
    got = convert.to_torch_state_dict(flax, layout=diffusers_layout(flax.config))
    want = torch_vae.state_dict()
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k].numpy()) for k in want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_round_trip_both_layouts(name):
    """diffusers -> flax -> diffusers bit for bit; sgm's names are what diffusers' own single-file converter
    (convert_ldm_vae_checkpoint) maps back onto the diffusers model; sgm -> flax -> sgm bit for bit."""
    torch_vae = diffusers_vae(name, seed=5)
    flax = flax_vae(torch_vae)
    assert_holds(flax, torch_vae)
    sgm = convert.to_torch_state_dict(flax, prefix=SGM_PREFIX)
    if name == "tiny":
        assert sgm[SGM_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # sgm's 1x1 convs
    mapped = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in sgm.items()}, dict(torch_vae.config))
    want = torch_vae.state_dict()
    assert mapped.keys() == want.keys()
    assert all(torch.equal(mapped[k], want[k]) for k in want)
    again = convert.load_torch_state_dict(models.abstract(flax.config), sgm, prefix=SGM_PREFIX)
    back = convert.to_torch_state_dict(again, prefix=SGM_PREFIX)
    assert back.keys() == sgm.keys() and all(np.array_equal(back[k], sgm[k]) for k in sgm)


def test_load_vae_diffusers_directories(tmp_path):
    """A vae/ directory, a whole pipeline directory (its vae/), a sharded one, and fp16 variants."""
    torch_vae = diffusers_vae("tiny", seed=7)
    torch_vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "unet").mkdir()
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    torch_vae.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    half = copy.deepcopy(torch_vae).half()
    half.save_pretrained(tmp_path / "pipe" / "vae", variant="fp16")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe", tmp_path / "sharded"):
        vae = load_vae(path)
        assert_holds(vae, torch_vae)
        assert vae.config.scaling_factor == torch_vae.config.scaling_factor and vae.config.force_upcast
    vae = load_vae(tmp_path / "pipe", variant="fp16")
    assert vae.encoder.conv_in.kernel[...].dtype == jnp.float16
    assert_holds(vae, half)
    assert load_vae(tmp_path / "pipe", scaling_factor=0.5).config.scaling_factor == 0.5


def sgm_single_file(torch_vae, path, others=None) -> None:
    """An sgm/LDM single file of `torch_vae` under first_stage_model. beside a UNet and text-encoder key, its
    keys checked by diffusers' own converter."""
    vae = convert.to_torch_state_dict(flax_vae(torch_vae), prefix=SGM_PREFIX)
    mapped = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in vae.items()}, dict(torch_vae.config))
    want = torch_vae.state_dict()
    assert mapped.keys() == want.keys() and all(torch.equal(mapped[k], want[k]) for k in want)
    others = others or {
        UNET_PREFIX + "input_blocks.0.0.weight": np.ones((32, 4, 3, 3), np.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(16, np.float32),
        SGM_PREFIX + "loss.logvar": np.zeros((), np.float32),  # sgm's training loss: not the model
    }
    if path.suffix == ".ckpt":  # a torch.save pickle as LDM wrote them, read with weights_only
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in (vae | others).items()}}, path)
    else:
        save_file(vae | others, str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_vae_sgm_single_file(tmp_path, suffix):
    torch_vae = diffusers_vae("tiny", seed=8)
    path = tmp_path / f"model{suffix}"
    sgm_single_file(torch_vae, path)
    # Not a released model by its UNet: the scaling factor is asked for, in one line.
    with pytest.raises(CheckpointError, match=rf"model{suffix}: an autoencoder of no recognised model .*give scaling_factor="):
        load_vae(path)
    vae = load_vae(path, scaling_factor=0.13025)
    assert_holds(vae, torch_vae)
    assert vae.config.scaling_factor == 0.13025


def test_a_released_single_file_gives_its_scaling_factor():
    """An SDXL file (recognised by its UNet's shapes) takes 0.13025 and force_upcast; a file of no released UNet
    none."""
    for unet, vae in (("sdxl-base", "sdxl"),):
        shapes = convert.torch_shapes(models.abstract(UNETS[unet]), prefix=UNET_PREFIX)
        infos = {k: jax.ShapeDtypeStruct(v, jnp.float16) for k, v in shapes.items()}
        fields = released_vae_fields(infos)
        assert fields == {"scaling_factor": PRESETS[vae].scaling_factor, "force_upcast": PRESETS[vae].force_upcast,
                          "tile_sample_size": PRESETS[vae].tile_sample_size}
    assert released_vae_fields({}) == {"scaling_factor": None}


@pytest.mark.parametrize("weights", ["safetensors", "orbax"])
def test_cli_convert_vae_output_loads_back_bit_exact(tmp_path, weights):
    """`flax-sgm convert --vae` of an sgm single file: load_vae reads the output back with its config and scaling
    factor, every weight bit for bit; `inspect` says what the file and the output hold."""
    torch_vae = diffusers_vae("tiny", seed=9)
    path = tmp_path / "model.safetensors"
    sgm_single_file(torch_vae, path)
    out = run_cli("inspect", path).output
    assert "a KL autoencoder under first_stage_model., " in out and "load_vae needs scaling_factor=" in out
    refused = run_cli("convert", path, "--scaling-factor", "0.5", "-o", tmp_path / "x", ok=False)
    assert refused.exit_code == 2 and "Error: --scaling-factor goes with --vae" in refused.output
    run_cli("convert", path, "--vae", "--scaling-factor", "0.13025", "--format", weights, "-o", tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert_holds(vae, torch_vae)
    assert vae.config == load_vae(path, scaling_factor=0.13025).config and vae.config.scaling_factor == 0.13025
    assert "the autoencoder (32 ch x [1, 2]" in run_cli("inspect", tmp_path / "vae").output
    with pytest.raises(CheckpointError, match=r"no variants"):
        load_vae(tmp_path / "vae", variant="fp16")
    from flax_sgm import load_pretrained, load_unet

    for load in (load_unet, load_pretrained):
        with pytest.raises(CheckpointError, match=r"vae: holds an autoencoder.*load_vae"):
            load(tmp_path / "vae")


def test_cli_inspect_shows_a_diffusers_vae(tmp_path):
    diffusers_vae("tiny", seed=1).save_pretrained(tmp_path / "vae")
    out = run_cli("inspect", tmp_path / "vae").output
    assert "a KL autoencoder, " in out and "none of the presets (32 ch x [1, 2], 1 blocks per level" in out
    assert run_cli("inspect", tmp_path / "vae", "--json").output.count('"vae": {') == 1


# Bad input ------------------------------------------------------------------------------------

NOT_VAES = {
    "unet": ({UNET_PREFIX + "input_blocks.0.0.weight": (32, 4, 3, 3)}, r"no autoencoder under 'first_stage_model\.'.*\(a UNet, not a VAE\)"),
    "text-encoder": ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (16,)},
                     r"no autoencoder under 'first_stage_model\.'.*\(a text encoder, not a VAE\)"),
    "vq": ({SGM_PREFIX + "encoder.conv_in.weight": (32, 3, 3, 3), SGM_PREFIX + "quantize.embedding.weight": (16, 4)},
           r"a VQ autoencoder under 'first_stage_model\.'"),
    "video": ({SGM_PREFIX + "encoder.conv_in.weight": (32, 3, 3, 3), SGM_PREFIX + "decoder.time_mixer.mix_factor": (1,)},
              r"a video autoencoder \(SVD's temporal decoder\) under 'first_stage_model\.'"),
    "controlnet": ({"control_model.input_blocks.0.0.weight": (32, 4, 3, 3)},
                   r"no autoencoder under 'first_stage_model\.'.*\(a ControlNet, not a VAE\)"),
}


@pytest.mark.parametrize("name", list(NOT_VAES))
def test_load_vae_names_what_a_file_holds_instead(tmp_path, name):
    keys, message = NOT_VAES[name]
    save_file({k: np.ones(shape, np.float32) for k, shape in keys.items()}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}.safetensors: {message}") as err:
        load_vae(tmp_path / f"{name}.safetensors")
    assert "\n" not in str(err.value)


def test_load_vae_refuses_a_unet_directory(tmp_path):
    UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=8, attention_head_dim=2,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match=r"unet/config.json: a UNet2DConditionModel config, not a diffusers AutoencoderKL$"):
        load_vae(tmp_path / "unet")
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    save_file({"x": np.ones(1, np.float32)}, str(tmp_path / "vq" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vq/config.json: a VQ autoencoder \(VQModel\), not a diffusers AutoencoderKL$"):
        load_vae(tmp_path / "vq")
    for kind, said in (("ControlNetModel", r"a ControlNetModel config"),
                       ("AutoencoderKLTemporalDecoder", r"a video autoencoder \(SVD's temporal decoder\) \(AutoencoderKLTemporalDecoder\)")):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "config.json").write_text(json.dumps({"_class_name": kind}))
        save_file({"x": np.ones(1, np.float32)}, str(tmp_path / kind / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(CheckpointError, match=rf"{kind}/config.json: {said}, not a diffusers AutoencoderKL$"):
            load_vae(tmp_path / kind)


@pytest.mark.parametrize(
    "method,shape,message",
    [
        ("encode", (2, 16, 16, 4), r"AutoencoderKL.encode: `x` must have 3 channels last, \[b, h, w, 3\]; got shape \[2, 16, 16, 4\]$"),
        ("encode", (2, 3, 16, 16), r"got shape \[2, 3, 16, 16\] \(NCHW\? flax_sgm is channels-last: x.transpose\(0, 2, 3, 1\)\)$"),
        ("encode", (2, 15, 16, 3), r"`x`'s height and width must be multiples of 2 .*; got 15 x 16$"),
        ("encode", (16, 16, 3), r"`x` must be a batch of images \[b, h, w, 3\]; got shape \[16, 16, 3\]$"),
        ("decode", (2, 8, 8, 3), r"AutoencoderKL.decode: `z` must have 4 channels last, \[b, h, w, 4\]; got shape \[2, 8, 8, 3\]$"),
        ("decode", (2, 4, 8, 8), r"\(NCHW\? flax_sgm is channels-last"),
    ],
    ids=["4-channels", "nchw", "odd-size", "rank-3", "latent-channels", "latent-nchw"],
)
def test_bad_inputs_are_one_line(tiny, method, shape, message):
    _, flax = tiny
    with pytest.raises(ValueError, match=message):
        getattr(flax, method)(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=r"is a torch.Tensor; pass a numpy or JAX array"):
        flax.encode(torch.zeros(1, 16, 16, 3))


# The config -----------------------------------------------------------------------------------


def test_every_diffusers_field_is_honoured_refused_or_irrelevant():
    params = [p for p in inspect.signature(TorchAutoencoderKL.__init__).parameters if p != "self"]
    groups = (set(HONOURED), set(DEFAULTS), set(IRRELEVANT))
    for p in params:
        assert sum(p in g for g in groups) == 1, p
    assert set().union(*groups) == set(params)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(act_fn="gelu"), r"act_fn = 'gelu' is not supported \(sgm's autoencoder computes act_fn = 'silu'\)"),
        (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]), r"down_block_types .* is not supported"),
        (dict(block_out_channels=[32, 48]), r"block_out_channels \[32, 48\] are not multiples of the first"),
        (dict(norm_num_groups=24), r"norm_num_groups 24 does not divide block_out_channels"),
        (dict(latents_mean=[0.0]), r"latents_mean must list one number per latent channel \(4\)"),
        (dict(new_field=1), r"field new_field = 1 is unknown to flax_sgm's autoencoder"),
    ],
    ids=["act_fn", "attn-blocks", "channels", "groups", "latents-mean", "unknown"],
)
def test_refused_fields_name_field_and_value(change, message):
    config = dict(TorchAutoencoderKL(**VAES["tiny"]).config) | change
    with pytest.raises(CheckpointError, match=r"^config.json: " + message) as err:
        AutoencoderConfig.from_diffusers(config)
    assert "\n" not in str(err.value)


# diffusers' vae/config.json of the released models (their fields that matter).
RELEASED = {
    "sd": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
               sample_size=512),  # no scaling_factor nor force_upcast: diffusers' defaults
    "sdxl": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "sdxl-fp16-fix": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                          norm_num_groups=32, sample_size=512, scaling_factor=0.13025, force_upcast=False),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_presets_are_the_released_models(name):
    config = dict(RELEASED[name], _class_name="AutoencoderKL", down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, act_fn="silu")
    assert AutoencoderConfig.from_diffusers(config) == PRESETS[name]
    # The preset's weights are diffusers' model's, name for name and shape for shape.
    shapes = convert.torch_shapes(models.abstract(PRESETS[name]), layout=diffusers_layout(PRESETS[name]))
    with torch.device("meta"):
        torch_vae = TorchAutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert shapes == {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}


def test_config_json_round_trip():
    config = PRESETS["sdxl"].replace(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 1.0, 1.0, 1.0), shift_factor=0.1)
    assert AutoencoderConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"unknown autoencoder config keys \['heads'\]"):
        AutoencoderConfig.from_dict(config.to_dict() | {"heads": 2})


# flax-sgm verify --model vae ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_verify_model_vae(tmp_path, dtype):
    """`flax-sgm verify --model vae` (seeded) and `--checkpoint` a pipeline directory: a row per diffusers module,
    PASS; bfloat16 within torch's own bfloat16 error (60 s each on 2 cores)."""
    from click.testing import CliRunner

    from flax_sgm.cli import cli

    diffusers_vae("tiny", seed=2).save_pretrained(tmp_path / "pipe" / "vae")
    for args in (["--model", "vae"], ["--model", "vae", "--checkpoint", str(tmp_path / "pipe")]):
        result = CliRunner().invoke(cli, ["verify", *args, "--dtype", dtype])
        assert result.exit_code == 0, result.output
        assert "decoder.mid_block.attentions.0" in result.output and result.output.rstrip().endswith("PASS")


def test_cli_verify_model_vae_refuses_stack_options():
    from click.testing import CliRunner

    from flax_sgm.cli import cli

    result = CliRunner().invoke(cli, ["verify", "--model", "vae", "--checkpoint", ".", "--heads", "2"])
    assert result.exit_code != 0 and "--model vae verifies a whole autoencoder" in result.output
