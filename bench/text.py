"""SDXL's two text encoders at full size on the CPU: flax_sgm under jit against transformers eager. One run.

Encodes 8 prompts' token ids [8, 77] (random words, the end token at a different place in each row) through CLIP
ViT-L (123M, SDXL's first: the 11th hidden state) and OpenCLIP ViT-bigG (695M, with the projection: the
penultimate hidden state and the pooled vector), random weights, float32. flax_sgm: flax_sgm.text.embed with sgm's
specs under jax.jit (the compile timed apart); transformers: CLIPTextModel(WithProjection) eager under
torch.no_grad with output_hidden_states=True, which is what diffusers' encode_prompt calls. Each is run once to
warm up, then timed over --iters calls (the median). Loading both from SDXL's single file is
`bench/load_speed.py --model sdxl-text` (a fresh process per load, as for the UNet).

  python bench/text.py --towers vit-l,bigg
  python bench/text.py --towers vit-l          # where memory or time is short
Prints the load average at the start and the end; results go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOWERS = {  # name -> (flax_sgm preset, sgm's embedder number and spec in EMBEDDERS["sdxl-base"])
    "vit-l": ("clip-vit-l-14", 0),
    "bigg": ("openclip-vit-bigg-14", 1),
}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def torch_tower(preset: str):
    """transformers' model of a flax_sgm preset, random weights (transformers' own init), float32."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flax_sgm.text.config import PRESETS

    c = PRESETS[preset]
    config = CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                            max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
                            projection_dim=c.projection_dim or 768, eos_token_id=c.eos_token_id, bos_token_id=0,
                            pad_token_id=1)
    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if c.projection_dim else CLIPTextModel
    return cls(config).eval()


def encode(name: str, ids, iters: int) -> dict:
    import jax
    import torch
    from flax import nnx

    from flax_sgm.text import EMBEDDERS, embed
    from flax_sgm.verify.seeded import text_encoder_twin

    preset, embedder = TOWERS[name]
    spec = EMBEDDERS["sdxl-base"][embedder]
    tower = torch_tower(preset)
    model = text_encoder_twin(tower)
    params = sum(p.numel() for p in tower.parameters())
    x = torch.from_numpy(ids)

    def torch_run():
        with torch.no_grad():
            out = tower(x, output_hidden_states=True)
        return out.hidden_states[spec.layer_idx if spec.layer == "hidden" else -2]

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids: embed(nnx.merge(graphdef, state), ids, spec))
    start = time.perf_counter()
    compiled = run.lower(state, ids).compile()
    compile_s = time.perf_counter() - start

    def flax_run():
        return jax.block_until_ready(compiled(state, ids))

    times = {}
    for label, fn in (("transformers eager", torch_run), ("flax_sgm jit", flax_run)):
        fn()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[label] = statistics.median(samples)
    got, want = compiled(state, ids)[0], torch_run().numpy()
    err = float(abs(got - want).max() / abs(want).max())
    row = {"tower": f"{preset} ({params / 1e6:.0f}M)", "transformers eager s": times["transformers eager"],
           "flax_sgm jit s": times["flax_sgm jit"], "compile s": compile_s, "max rel diff": err,
           "load average": load_average()}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", default="vit-l,bigg")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    names = args.towers.split(",")
    if not set(names) <= set(TOWERS):
        parser.error(f"--towers: each of {', '.join(TOWERS)}; got {args.towers}")

    from common import environment

    from flax_sgm.text.config import PRESETS
    from flax_sgm.verify.seeded import text_inputs

    env = environment() | {"load average at start": load_average(), "towers": names}
    print(json.dumps(env), flush=True)
    ids = text_inputs(PRESETS["clip-vit-l-14"], seed=0, batch=8)["x"].astype("int32")
    rows = []
    for name in names:
        rows.append(encode(name, ids, args.iters))
        print(json.dumps(rows[-1]), flush=True)
    env["load average at end"] = load_average()
    print(json.dumps(env), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
