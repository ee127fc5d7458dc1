"""Writes a random-weight Hugging Face checkpoint of a model shape, for timing the job.

    python tools/random_checkpoint.py --model=llama3-8b --out=out/llama3-8b-random \\
        --tokenizer=models/harbor-tiny

The job (`python -m jaxpp.run`) reads real checkpoints only; this makes one of a preset's
shape (jaxpp/plan/presets.py) with no download: bf16 safetensors shards of about
`--shard_gb` each with a `model.safetensors.index.json`, `config.json` from the preset, and
the tokenizer files of `--tokenizer` (their ids all fall inside the shape's vocabulary).
Each weight is a random window of one seeded pool of normal values (std 0.02; the pool is
`POOL` values, so writing is disk-bound rather than bound by the generator), and each shard
is written as soon as it is full, so host memory stays about one shard. The summaries it
yields are gibberish; the speed is real (it does not depend on the values).
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

POOL = 1 << 24  # distinct random values drawn; every tensor is a window of them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tensors(c) -> list[tuple[str, tuple[int, ...]]]:
  """(HF name, shape) of every tensor of a Llama checkpoint, in file order."""
  D, F, N, K, H, V = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                      c.head_dim, c.vocab_size)
  out = [("model.embed_tokens.weight", (V, D))]
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (N * H, D)),
            (p + "self_attn.k_proj.weight", (K * H, D)),
            (p + "self_attn.v_proj.weight", (K * H, D)),
            (p + "self_attn.o_proj.weight", (D, N * H)),
            (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F))]
  out.append(("model.norm.weight", (D,)))
  if not c.tie_word_embeddings:
    out.append(("lm_head.weight", (V, D)))
  return out


def leaf(shape: tuple[int, ...], name: str, pool: np.ndarray, rng: np.random.Generator
         ) -> np.ndarray:
  """Norm scales are ones; any other tensor a window of the pool at a random offset."""
  if name.endswith("norm.weight"):
    return np.ones(shape, ml_dtypes.bfloat16)
  n = int(np.prod(shape))
  start = int(rng.integers(0, pool.size))
  return np.resize(np.roll(pool, -start), n).reshape(shape)


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
  pool = (rng.standard_normal(POOL, np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)
  names = tensors(cfg)
  groups, size = [[]], 0  # tensor names per shard, cut at --shard_gb
  for name, shape in names:
    nbytes = 2 * int(np.prod(shape))
    if size and size + nbytes > args.shard_gb * 1e9:
      groups.append([])
      size = 0
    groups[-1].append((name, shape))
    size += nbytes
  weight_map, total = {}, 0
  for i, group in enumerate(groups):
    fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    shard = {name: leaf(shape, name, pool, rng) for name, shape in group}
    save_file(shard, str(out / fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
    total += sum(a.nbytes for a in shard.values())
    del shard
  (out / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
  hf = cfg.to_hf() | {"torch_dtype": "bfloat16"}
  (out / "config.json").write_text(json.dumps(hf, indent=1))
  for f in TOKENIZER_FILES:
    if (pathlib.Path(args.tokenizer) / f).is_file():
      shutil.copy(pathlib.Path(args.tokenizer) / f, out / f)
  print(f"{out}: {len(groups)} shards, {total / 1e9:.1f} GB, {len(weight_map)} tensors")


if __name__ == "__main__":
  main()
