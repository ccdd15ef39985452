"""The GPU path lowered for CUDA on a CPU machine: every attention reaches cuDNN, forward and backward.

`flax-sgm lower` and flax_sgm.lowering trace with abstract weights and lower for
CUDA without a GPU (lowering.py says how). What this proves is what JAX decides at
trace time: the backend of every attention, the padding, the fused cuDNN custom
calls in the program, cuDNN's own trace-time refusals. Not XLA's compilation,
speed or numerics on the device: those are test_gpu.py's and bench/'s.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import flax_sgm
from flax_sgm import lowering
from flax_sgm.attention.policy import AttentionProblem, choose_backend
from flax_sgm.attention.config import PRESETS, SpatialTransformerConfig
from flax_sgm.lowering import cudnn_calls
from flax_sgm import models
from conftest import cli_error, run_cli

FWD, BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
BIAS_FWD, BIAS_BWD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"
BF16 = jnp.bfloat16
S = jax.ShapeDtypeStruct
ON_GPU = jax.default_backend() == "gpu"


def lower_json(*args) -> dict:
    return json.loads(run_cli("lower", "--json", *args).stdout)


def block_modules(depth: int) -> list[str]:
    return [f"transformer_blocks.{i}.{a}" for i in range(depth) for a in ("attn1", "attn2")]


def lower_module(module, *args, backward=False, **kwargs) -> lowering.Program:
    """Lower `module(*args, **kwargs)` for CUDA; backward: gradients of every parameter and the first input."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, rest, *args):
        return nnx.merge(graphdef, params, rest)(*args, **kwargs)

    def loss(*a):
        return forward(*a).astype(jnp.float32).mean()

    return lowering.lower(jax.grad(loss, argnums=(0, 2)) if backward else forward, params, rest, *args)


# --- SpatialTransformer: SDXL-like and long, through the command line --------------------------


@pytest.mark.parametrize("preset", ["sdxl", "long"])
def test_every_attention_is_cudnn_forward_and_backward(preset):
    report = lower_json("--config", preset, "--backward", "--no-checkpoint")
    p = PRESETS[preset]
    depth, attentions = p.config.depth, 2 * p.config.depth
    assert report["platform"] == "cuda" and report["inputs"]["dtype"] == "bfloat16"
    assert [a["module"] for a in report["attention"]] == block_modules(depth)
    tokens = p.hw[0] * p.hw[1]
    for a in report["attention"]:
        assert (a["backend"], a["reason"]) == ("cudnn", "auto: cuDNN takes this input"), a
        self_attn = a["module"].endswith("attn1")
        assert (a["n"], a["m"]) == (tokens, tokens if self_attn else p.context_tokens)
        # cuDNN's backward takes even lengths only: 77 text tokens are padded by one key.
        assert a["padded"] == {"n": tokens % 2, "m": a["m"] % 2}
    calls = report["custom_calls"]
    assert cudnn_calls(calls["forward"]) == {FWD: attentions}
    assert cudnn_calls(calls["backward"]) == {FWD: attentions, BWD: attentions}


def test_77_text_tokens_are_padded_and_the_backward_lowers():
    report = lower_json("--config", "sdxl", "--backward", "--no-checkpoint")
    cross = [a for a in report["attention"] if a["module"].endswith("attn2")]
    assert cross and all(a["m"] == 77 and a["padded"] == {"n": 0, "m": 1} for a in cross)


def test_checkpointed_backward_runs_each_attention_forward_once():
    # The save_attention policy keeps cuDNN's output and softmax statistics: the backward pass
    # does not run the attention forward again (it did before issue 11: 8 forward calls for 4).
    report = lower_json("--config", "sdxl", "--backward")
    assert report["config"]["use_checkpoint"] and report["config"]["checkpoint_policy"] == "save_attention"
    assert cudnn_calls(report["custom_calls"]["backward"]) == {FWD: 4, BWD: 4}


def test_sdxl_whole_unet_all_140_attentions_on_cudnn_each_forward_once():
    """SDXL base's UNet at a 128 x 128 latent, batch 2, bf16, default checkpointing (about 17 s here)."""
    report = lower_json("--config", "sdxl-unet", "--backward")
    assert report["inputs"] == {"x": [2, 128, 128, 4], "timesteps": [2], "context": [2, 77, 2048], "y": [2, 2816],
                                "dtype": "bfloat16"}
    assert report["config"]["use_checkpoint"] and report["config"]["checkpoint_policy"] == "save_attention"
    attention = report["attention"]
    assert len(attention) == 140  # 70 transformer blocks: depth 2 and 10 at levels 1 and 2, 10 in the middle
    assert {(a["backend"], a["reason"]) for a in attention} == {("cudnn", "auto: cuDNN takes this input")}
    assert attention[0]["module"] == "input_blocks.4.1.transformer_blocks.0.attn1"
    assert attention[-1]["module"] == "output_blocks.5.1.transformer_blocks.1.attn2"
    assert {(a["n"], a["m"]) for a in attention} == {(4096, 4096), (4096, 77), (1024, 1024), (1024, 77)}
    calls = report["custom_calls"]
    assert cudnn_calls(calls["forward"]) == {FWD: 140}
    assert cudnn_calls(calls["backward"]) == {FWD: 140, BWD: 140}
    assert "a whole-model preset lowers on one device" in cli_error("lower", "--config", "sdxl-unet", "--mesh", "1,2,1")


def test_text_report_names_modules_backends_and_custom_calls():
    out = run_cli("lower", "--config", "default", "--backward").stdout
    assert "lowered for cuda (attention chosen for gpu; cuDNN" in out
    assert "transformer_blocks.0.attn2   cudnn" in out
    assert f"custom calls, forward+backward: {FWD} x" in out


# --- fallbacks: what `auto` documents where cuDNN cannot run ------------------------------------


def test_float32_falls_to_the_documented_path():
    report = lower_json("--config", "sdxl", "--dtype", "float32", "--backward", "--no-checkpoint")
    assert len(report["attention"]) == 4
    for a in report["attention"]:
        problem = AttentionProblem(
            "gpu", jnp.float32, a["batch"], a["heads"], a["n"], a["m"], a["head_dim"], False
        )
        assert (a["backend"], a["reason"]) == tuple(choose_backend("auto", problem)), a
        assert "cuDNN attention takes bfloat16 or float16; got float32" in a["reason"]
    # 2 x 10 x 4096^2 float32 logits (1.25 GiB) exceed the XLA budget: self-attention goes chunked.
    assert [a["backend"] for a in report["attention"]] == ["chunked", "xla", "chunked", "xla"]
    assert not cudnn_calls(report["custom_calls"]["forward"]) and not cudnn_calls(report["custom_calls"]["backward"])


def test_a_head_dim_cudnn_refuses_falls_to_the_documented_path(tmp_path):
    config = SpatialTransformerConfig(288, 8, 36, depth=1, context_dim=64, use_linear=True)  # 36: not a multiple of 8
    path = tmp_path / "d36.json"
    path.write_text(config.to_json())
    report = lower_json("--config", path, "--hw", 32, 32, "--backward", "--no-checkpoint")
    assert [a["module"] for a in report["attention"]] == block_modules(1)
    for a in report["attention"]:
        assert a["backend"] != "cudnn" and "head dim that is a multiple of 8" in a["reason"], a
    assert not cudnn_calls(report["custom_calls"]["backward"])


@pytest.mark.skipif(ON_GPU, reason="a Hopper GPU takes head dims up to 256; the limit below is the CPU machine's")
def test_a_head_dim_over_the_gpus_cudnn_limit_takes_xla(tmp_path):
    """JAX's cuDNN attention takes head dims up to 256 on Hopper and 128 before it (and 128 where it finds no CUDA
    GPU). The policy allowed 256 everywhere, so SD 1.5's head dim of 160 chose cuDNN and failed on an A100 (and
    `flax-sgm lower --config sd15-unet` here): now it takes XLA's path and says why."""
    path = tmp_path / "d160.json"
    path.write_text(SpatialTransformerConfig(320, 2, 160, context_dim=64, use_linear=True).to_json())
    report = lower_json("--config", path, "--hw", 16, 16, "--backward")
    assert {a["backend"] for a in report["attention"]} == {"xla"}
    assert all("<= 128 (no Hopper GPU here); got 160" in a["reason"] for a in report["attention"])
    sd15 = lower_json("--config", "sd15-unet")
    assert {a["backend"] for a in sd15["attention"] if a["head_dim"] == 160} == {"xla"}
    assert {a["backend"] for a in sd15["attention"] if a["head_dim"] < 160} == {"cudnn"}


@pytest.mark.skipif(ON_GPU, reason="pretends this machine's GPU is a Hopper; a real GPU says what it is")
def test_a_program_that_does_not_lower_exits_1(tmp_path, monkeypatch):
    """Where the policy's view of cuDNN and JAX's differ, JAX's trace-time refusal is one line and exit 1: here
    the policy is told the GPU is a Hopper (256) while JAX, finding none, checks 128."""
    from flax_sgm.attention import backends

    monkeypatch.setattr(backends, "cudnn_max_head_dim", lambda: 256)
    path = tmp_path / "d160.json"
    path.write_text(SpatialTransformerConfig(320, 2, 160, context_dim=64, use_linear=True).to_json())
    line = cli_error("lower", "--config", path, "--hw", "16", "16", code=1)
    assert line.startswith("Error: does not lower for cuda: ") and "head dim must be <= 128" in line, line


# --- masks, additional tokens, cross-frame attention (modules lowered directly) ----------------


@pytest.fixture(scope="module")
def cross_attention():
    return nnx.eval_shape(lambda: flax_sgm.CrossAttention(640, 2048, 10, 64, rngs=nnx.Rngs(0), dtype=BF16, param_dtype=BF16))


@pytest.fixture(scope="module")
def block():
    return nnx.eval_shape(
        lambda: flax_sgm.BasicTransformerBlock(
            640, 10, 64, context_dim=2048, checkpoint=False, rngs=nnx.Rngs(0), dtype=BF16, param_dtype=BF16
        )
    )


@pytest.mark.parametrize(
    "mask",
    [S((2, 1, 1024, 77), jnp.bool_), S((1024, 77), jnp.bool_), S((2, 10, 1024, 77), jnp.float32)],
    ids=["boolean-per-batch", "boolean-2d", "additive-per-head"],
)
def test_masked_attention_lowers_to_cudnn_with_a_bias(cross_attention, mask):
    x, context = S((2, 1024, 640), BF16), S((2, 77, 2048), BF16)
    program = lower_module(cross_attention, x, context, mask, backward=True)
    (call,) = program.calls
    assert (call.backend, call.problem.has_mask, call.padded) == ("cudnn", True, (0, 1))
    assert program.cudnn_calls() == {BIAS_FWD: 1, BIAS_BWD: 1}


def test_additional_tokens_lower_to_cudnn(block):
    x, context, extra = S((2, 1024, 640), BF16), S((2, 77, 2048), BF16), S((2, 3, 640), BF16)
    program = lower_module(block, x, context, extra, backward=True)
    # 1024 + 3 tokens: odd, padded by one query (and key, for self-attention).
    assert [(c.backend, c.problem.n, c.padded) for c in program.calls] == [("cudnn", 1027, (1, 1)), ("cudnn", 1027, (1, 1))]
    assert program.cudnn_calls() == {FWD: 2, BWD: 2}


def test_cross_frame_attention_lowers_to_cudnn(block):
    x, context = S((4, 1024, 640), BF16), S((4, 77, 2048), BF16)
    program = lower_module(block, x, context, backward=True, n_times_crossframe_attn_in_self=2)
    assert [c.backend for c in program.calls] == ["cudnn", "cudnn"]
    assert program.cudnn_calls() == {FWD: 2, BWD: 2}


# --- sequence parallelism: cuDNN inside the per-shard program ----------------------------------


def test_sequence_parallel_program_runs_cudnn_inside_each_shard():
    # A fresh process: the four virtual CPU devices the mesh is placed on must be set before JAX starts.
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    args = ["lower", "--config", "sdxl", "--mesh", "1,4,1", "--backward", "--no-checkpoint", "--json"]
    out = subprocess.run([sys.executable, "-m", "flax_sgm", *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["mesh"] == {"data": 1, "seq": 4, "model": 1}
    # Each shard attends with its quarter of the 4096 queries to every key.
    assert [(a["backend"], a["n"], a["m"]) for a in report["attention"]] == [("cudnn", 1024, 4096), ("cudnn", 1024, 77)] * 2
    for program in ("forward", "backward"):
        total = cudnn_calls(report["custom_calls"][program])
        assert total and cudnn_calls(report["custom_calls_per_shard"][program]) == total
    assert cudnn_calls(report["custom_calls"]["backward"]) == {FWD: 4, BWD: 4}


# --- the lowering path's own promises ----------------------------------------------------------


@pytest.mark.skipif(ON_GPU, reason="cuDNN is installed here: no stand-in is used")
def test_the_cudnn_version_stand_in_is_confined_to_lowering():
    from jax._src.cudnn import fused_attention_stablehlo as fused

    report = lower_json("--config", "default")
    assert report["cudnn_version"] == {"version": lowering.CUDNN_VERSION_STAND_IN, "stand_in": True}
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        fused.check_cudnn_version()  # JAX's own query again once lowering is done
    x = jnp.ones((1, 8, 1, 8), BF16)
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        jax.nn.dot_product_attention(x, x, x, implementation="cudnn")


def test_other_platforms_choose_for_themselves():
    report = lower_json("--config", "default", "--platform", "cpu")
    assert report["cudnn_version"]["version"] is None
    assert all(a["platform"] == "cpu" and a["backend"] != "cudnn" for a in report["attention"])
    assert not cudnn_calls(report["custom_calls"]["forward"])


def test_calls_are_named_only_when_they_match_the_modules(block):
    program = lower_module(block, S((2, 64, 640), BF16), S((2, 77, 2048), BF16))
    assert lowering.name_calls(block, program.calls) == ["attn1", "attn2"]
    with pytest.raises(ValueError, match="2 attention calls traced for 4 attention modules"):
        lowering.name_calls(models.abstract(PRESETS["sdxl"].config), program.calls)
    other = nnx.eval_shape(lambda: flax_sgm.BasicTransformerBlock(640, 5, 128, context_dim=2048, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="heads x head_dim 10 x 64"):
        lowering.name_calls(other, program.calls)


def test_calls_are_named_in_call_order_past_ten_blocks(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(SpatialTransformerConfig(64, 2, 32, depth=12, context_dim=48, use_linear=True).to_json())
    report = lower_json("--config", path, "--hw", 4, 4, "--context-tokens", 5)
    assert [a["module"] for a in report["attention"]] == block_modules(12)  # 10 and 11 after 9, not after 1
    assert [a["m"] for a in report["attention"]] == [16, 5] * 12


def test_help_has_examples():
    out = run_cli("lower", "--help").output
    assert "Examples:" in out and "flax-sgm lower --config long --backward" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "nope"], "--config: 'nope' is neither a preset"),
        (["--mesh", "1,4"], "--mesh: expected three positive integers"),
        (["--mesh", "1,0,1"], "--mesh: expected three positive integers"),
        (["--dtype", "int8"], "Invalid value for '--dtype'"),
        (["--hw", "0", "8"], "Invalid value for '--hw'"),
        (["--platform", "metal"], "Invalid value for '--platform'"),
        (["--config", "default", "--mesh", "1,64,1"], "make_mesh: data * seq * model = 64 needs 64 devices"),
    ],
    ids=["unknown-config", "mesh-two-axes", "mesh-zero", "dtype", "hw", "platform", "mesh-too-large"],
)
def test_bad_flags_exit_2_with_one_line(args, message):
    assert message in cli_error("lower", *args)


def test_bad_config_files_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in cli_error("lower", "--config", bad)
    bad.write_text(json.dumps({"in_channels": 64, "heads": 2}))
    assert "head_dim" in cli_error("lower", "--config", bad)
    bad.write_text(json.dumps({"in_channels": 64, "heads": 2, "head_dim": 32, "sdp_backend": "cudnn"}))
    # An explicit cuDNN backend in float32: a config that cannot run, said before anything is lowered.
    assert "attention backend 'cudnn' cannot run this input" in cli_error("lower", "--config", bad, "--dtype", "float32")


# --- on a GPU: the same program lowered and compiled for real ----------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (CI and the dev machines have none): lowers with the real cuDNN and compiles")
def test_on_a_gpu_the_lowered_program_compiles_with_the_same_custom_calls():
    p = PRESETS["sdxl"]
    report = lowering.lower_spatial_transformer(
        p.config.replace(use_checkpoint=False), lowering.Inputs(p.batch, p.hw, p.context_tokens), backward=True
    )
    assert report["cudnn_version"]["stand_in"] is False
    assert cudnn_calls(report["custom_calls"]["backward"]) == {FWD: 4, BWD: 4}
    model = models.abstract(p.config.replace(use_checkpoint=False), dtype=BF16, param_dtype=BF16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = S((p.batch, *p.hw, p.config.in_channels), BF16)
    ctx = S((p.batch, p.context_tokens, p.config.context_dim), BF16)

    def loss(params, rest, x, ctx):
        return nnx.merge(graphdef, params, rest)(x, ctx).astype(jnp.float32).mean()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, rest, x, ctx).compile()
    assert "__cudnn$" in compiled.as_text()  # XLA kept cuDNN's attention through compilation


# Forward-mode AD on the GPU path: cuDNN's attention has a VJP only.


def _st_bf16(**kwargs):
    config = SpatialTransformerConfig(64, 2, 32, context_dim=48, use_linear=True, **kwargs)
    return models.abstract(config, dtype=BF16, param_dtype=BF16)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
def test_jvp_on_gpu_avoids_cudnn_and_grad_keeps_it(checkpoint):
    graphdef, state = nnx.split(_st_bf16(use_checkpoint=checkpoint))
    x, c = S((2, 8, 8, 64), BF16), S((2, 77, 48), BF16)

    def jvp(state, x, c):  # a consistency-model step: the model's JVP in the input
        model = nnx.merge(graphdef, state)
        return jax.jvp(lambda x: model(x, c), (x,), (x,))[1]

    def grad(state, x, c):
        model = nnx.merge(graphdef, state)
        return jax.grad(lambda x: model(x, c).astype(jnp.float32).sum())(x)

    forward_mode = lowering.lower(jvp, state, x, c)
    assert {call.backend for call in forward_mode.calls} <= {"xla", "chunked"}  # what auto takes without cuDNN
    assert all("forward-mode" in call.reason for call in forward_mode.calls)
    assert not forward_mode.cudnn_calls()
    reverse = lowering.lower(grad, state, x, c)
    assert {call.backend for call in reverse.calls} == {"cudnn"}
    assert reverse.cudnn_calls() == {FWD: 2, BWD: 2}


def test_jvp_with_cudnn_requested_is_one_line_naming_the_backends():
    attention = nnx.eval_shape(lambda: flax_sgm.CrossAttention(64, heads=2, dim_head=32, backend="cudnn",
                                                               dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(attention)
    x = S((2, 16, 64), BF16)
    with pytest.raises(ValueError, match=r"^attention backend 'cudnn' cannot run this input: .*forward-mode.*'chunked'") as err:
        lowering.lower(lambda state, x: jax.jvp(nnx.merge(graphdef, state), (x,), (x,))[1], state, x)
    assert "\n" not in str(err.value)


def test_forward_mode_through_a_transform_boundary_needs_the_explicit_scope():
    """Inside jax.vmap / lax.scan / a user's jax.checkpoint, jax.jvp's tracers are not visible to auto:
    forward_mode_scope(True) says it, and auto leaves cuDNN."""
    from flax_sgm.attention.backends import forward_mode_scope

    graphdef, state = nnx.split(_st_bf16())
    x, c = S((2, 8, 8, 64), BF16), S((2, 77, 48), BF16)

    def jvp_of_vmap(state, x, c):
        f = jax.vmap(lambda x, c: nnx.merge(graphdef, state)(x[None], c[None])[0])
        return jax.jvp(lambda x: f(x, c), (x,), (x,))[1]

    with pytest.raises(TypeError, match="forward-mode autodiff"):  # JAX's own error: cuDNN has a VJP only
        lowering.lower(jvp_of_vmap, state, x, c)
    with forward_mode_scope(True):
        program = lowering.lower(jvp_of_vmap, state, x, c)
    assert program.calls and all(call.backend != "cudnn" for call in program.calls)
    assert not program.cudnn_calls()


def test_vmap_over_the_model_with_odd_lengths_lowers_to_cudnn():
    """Per-example programs (jax.vmap) with 77 text tokens: the padded cuDNN call batches, forward and backward."""
    graphdef, state = nnx.split(_st_bf16())
    x, c = S((2, 8, 8, 64), BF16), S((2, 77, 48), BF16)

    def per_example(state, x, c):
        return jax.vmap(lambda x, c: nnx.merge(graphdef, state)(x[None], c[None])[0])(x, c)

    def grad(state, x, c):
        return jax.grad(lambda x: per_example(state, x, c).astype(jnp.float32).sum())(x)

    assert lowering.lower(per_example, state, x, c).cudnn_calls() == {FWD: 2}
    assert lowering.lower(grad, state, x, c).cudnn_calls() == {FWD: 2, BWD: 2}
