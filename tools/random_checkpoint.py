"""Writes a random-weight Hugging Face checkpoint of a model shape, for timing the job.

    python tools/random_checkpoint.py --model=llama3-8b --out=out/llama3-8b-random \\
        --tokenizer=models/harbor-tiny

The job (`python -m jaxpp.run`) reads real checkpoints only; this makes one of a preset's
shape (jaxpp/plan/presets.py) with no download: bf16 safetensors shards of about
`--shard_gb` each with a `model.safetensors.index.json`, `config.json` from the preset, and
the tokenizer files of `--tokenizer` (their ids all fall inside the shape's vocabulary).
Weights are normal with std 0.02 from a seeded numpy generator, leaf by leaf, so host
memory stays about one shard. The summaries it yields are gibberish; the speed is real.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from jaxpp.plan import presets  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tensors(c) -> list[tuple[str, tuple[int, ...]]]:
  """(HF name, shape) of every tensor of a Llama checkpoint, in file order."""
  D, F, N, K, H, V = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                      c.head_dim, c.vocab_size)
  out = [("model.embed_tokens.weight", (V, D))]
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (N * H, D)), (p + "self_attn.k_proj.weight", (K * H, D)),
            (p + "self_attn.v_proj.weight", (K * H, D)), (p + "self_attn.o_proj.weight", (D, N * H)),
            (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F))]
  out.append(("model.norm.weight", (D,)))
  if not c.tie_word_embeddings:
    out.append(("lm_head.weight", (V, D)))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="llama3-8b", help="preset name or HF config.json")
  ap.add_argument("--out", required=True)
  ap.add_argument("--tokenizer", default="models/harbor-tiny", help="dir with tokenizer.json")
  ap.add_argument("--shard_gb", type=float, default=5.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  cfg = presets.model_config(args.model)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, shape in tensors(cfg):
    if name.endswith("norm.weight"):
      leaf = np.ones(shape, np.float32)
    else:
      leaf = rng.standard_normal(shape, np.float32) * np.float32(0.02)
    leaf = leaf.astype(ml_dtypes.bfloat16)
    if size and size + leaf.nbytes > args.shard_gb * 1e9:
      shards.append({})
      size = 0
    shards[-1][name] = leaf
    size += leaf.nbytes
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(out / fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
    total += sum(a.nbytes for a in shard.values())
    shard.clear()
  (out / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
  hf = cfg.to_hf() | {"torch_dtype": "bfloat16"}
  (out / "config.json").write_text(json.dumps(hf, indent=1))
  for f in TOKENIZER_FILES:
    if (pathlib.Path(args.tokenizer) / f).is_file():
      shutil.copy(pathlib.Path(args.tokenizer) / f, out / f)
  print(f"{out}: {len(shards)} shards, {total / 1e9:.1f} GB, {len(weight_map)} tensors")


if __name__ == "__main__":
  main()
