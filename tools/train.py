"""Trains `models/harbor-tiny`: a small Llama that summarises Harbor support tickets.

    python tools/train_tokenizer.py && python tools/train.py

Each training sequence is `<s>Ticket:\\n{text}\\nSummary: {summary}</s>`, the prompt being
configs/harbor.py's `job.prompt_template`; the loss covers only the summary tokens and the EOS.
A prompt too long for `--max_len` is cut the way the job's `length_policy="truncate"` cuts it:
its beginning is kept and the "\\nSummary:" cue re-appended. The tickets come from
`tools/make_tickets.py` with seeds other than data/tickets.jsonl's seed 0.

The model is `jaxpp/model/llama.py`'s `Block` scanned over a stacked layer axis (no KV cache),
trained with AdamW (linear warm-up, cosine decay, global-norm clipping) under a fixed seed, and
written as a Hugging Face directory (config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that jaxpp and transformers both load.
See docs/training.md for the command, run time and accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import train_tokenizer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from jaxpp.model import llama  # noqa: E402
from jaxpp.model import params as params_lib  # noqa: E402
from jaxpp.model.config import LlamaConfig  # noqa: E402

PROMPT_TEMPLATE = train_tokenizer.PROMPT_TEMPLATE
PROMPT_TAIL = PROMPT_TEMPLATE.split("{text}")[-1]  # "\nSummary:"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  hidden_size: int = 128  # D
  num_layers: int = 4  # L
  num_heads: int = 4  # N
  num_kv_heads: int = 2  # K
  ffn_mult: int = 4  # F = ffn_mult * D
  max_position_embeddings: int = 1024
  max_len: int = 256  # training sequence length (prompt + summary + EOS)
  buckets: tuple[int, ...] = (64, 96, 128, 192, 256)  # padded lengths; each a compiled shape
  batch_size: int = 16
  steps: int = 1300
  warmup_steps: int = 30
  learning_rate: float = 4e-3
  end_lr_ratio: float = 0.05
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 25


# --- data ------------------------------------------------------------------------------------


def prompt_ids(tok: Tokenizer, text: str, budget: int) -> list[int]:
  """`<s>` + the templated prompt, cut to `budget` tokens keeping the "\\nSummary:" cue."""
  ids = tok.encode(PROMPT_TEMPLATE.format(text=text)).ids
  if len(ids) <= budget:
    return ids
  tail = tok.encode(PROMPT_TAIL, add_special_tokens=False).ids
  return ids[:budget - len(tail)] + tail


def example(tok: Tokenizer, t: dict, max_len: int) -> tuple[list[int], int]:
  """(token ids, prompt length): the summary tokens + EOS follow the prompt."""
  target = tok.encode(" " + t["summary"], add_special_tokens=False).ids + [tok.token_to_id("</s>")]
  target = target[:max_len // 2]
  prompt = prompt_ids(tok, t["text"], max_len - len(target))
  return prompt + target, len(prompt)


def encode_examples(tok: Tokenizer, tickets: list[dict], max_len: int):
  return [example(tok, t, max_len) for t in tickets]


def batches(examples, cfg: TrainConfig, rng: np.random.RandomState):
  """Endless stream of (tokens i32[B, T], loss mask f32[B, T]) with T from `cfg.buckets`.

  Each epoch shuffles the examples, groups them by bucket, cuts full batches per bucket and
  shuffles the batch order; a bucket's leftover examples wait for the next epoch.
  """
  by_bucket: dict[int, list[int]] = {b: [] for b in cfg.buckets}
  for i, (ids, _) in enumerate(examples):
    by_bucket[next(b for b in cfg.buckets if len(ids) <= b)].append(i)
  while True:
    epoch = []
    for b, idx in by_bucket.items():
      idx = list(rng.permutation(idx))
      epoch += [(b, idx[k:k + cfg.batch_size])
                for k in range(0, len(idx) - cfg.batch_size + 1, cfg.batch_size)]
    for j in rng.permutation(len(epoch)):
      T, idx = epoch[j]
      tokens = np.zeros((len(idx), T), np.int32)
      mask = np.zeros((len(idx), T), np.float32)
      for r, i in enumerate(idx):
        ids, p = examples[i]
        tokens[r, :len(ids)] = ids
        mask[r, p - 1:len(ids) - 1] = 1.0  # position t predicts token t+1
      yield tokens, mask


# --- model -----------------------------------------------------------------------------------


def model_config(cfg: TrainConfig, vocab_size: int, bos: int, eos: int) -> LlamaConfig:
  return LlamaConfig(
      vocab_size=vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.ffn_mult * cfg.hidden_size, num_layers=cfg.num_layers,
      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.hidden_size // cfg.num_heads,
      max_position_embeddings=cfg.max_position_embeddings, eos_token_ids=(eos,),
      bos_token_id=bos)


def init_params(c: LlamaConfig, key) -> dict:
  """Matrices N(0, 0.02^2) (residual outputs scaled by 1/sqrt(2L)), norm scales 1."""
  shapes = params_lib.leaf_shapes(c)
  keys = jax.random.split(key, len(shapes))
  flat = {}
  for k, (path, shape) in zip(keys, sorted(shapes.items())):
    if path[-1] == "scale":
      flat[path] = jnp.ones(shape, jnp.float32)
    else:
      std = 0.02 / np.sqrt(2 * c.num_layers) if path[-1] in ("wo", "w_down") else 0.02
      flat[path] = std * jax.random.normal(k, shape, jnp.float32)
  return params_lib.nest(flat)


def forward(c: LlamaConfig, params, tokens) -> jnp.ndarray:
  """tokens i32[B, T] -> f32 logits [B, T, V] (causal, from position 0, no cache)."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  start = jnp.zeros((B,), jnp.int32)
  block = llama.Block(c, jnp.float32)

  def layer(x, p):
    y, _ = block.apply({"params": p}, x, positions, start, None)
    return y, None

  x = llama.embed(c, params, tokens, jnp.float32)
  x, _ = jax.lax.scan(layer, x, params["blocks"])
  return llama.logits(c, params, x)


def loss_fn(c: LlamaConfig, params, tokens, mask):
  logits = forward(c, params, tokens)[:, :-1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  m = mask[:, :-1]
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup_steps, cfg.steps - 1), cfg.steps,
      end_value=cfg.learning_rate * cfg.end_lr_ratio)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on norm scales
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask))


def train(cfg: TrainConfig, tickets: list[dict], tok: Tokenizer,
          log: Callable[[str], None] = print):
  """Trains from scratch; returns (LlamaConfig, params, losses per step)."""
  c = model_config(cfg, tok.get_vocab_size(), tok.token_to_id("<s>"), tok.token_to_id("</s>"))
  examples = encode_examples(tok, tickets, cfg.max_len)
  rng = np.random.RandomState(cfg.seed)
  stream = batches(examples, cfg, rng)
  params = init_params(c, jax.random.PRNGKey(cfg.seed))
  opt = make_optimizer(cfg)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(c, p, tokens, mask))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  log(f"model: {n_params:,} params, D={c.hidden_size} L={c.num_layers} N={c.num_heads} "
      f"K={c.num_kv_heads} F={c.intermediate_size} V={c.vocab_size}; {len(examples)} examples")
  losses, t0, window = [], time.perf_counter(), []
  for i in range(cfg.steps):
    tokens, mask = next(stream)
    params, opt_state, loss, gnorm = step(params, opt_state, tokens, mask)
    loss = float(loss)
    losses.append(loss)
    window.append(loss)
    if (i + 1) % cfg.log_every == 0 or i == 0 or i + 1 == cfg.steps:
      log(f"step {i + 1:5d}  loss {np.mean(window):.4f}  gnorm {float(gnorm):.3f}  "
          f"T={tokens.shape[1]}  {time.perf_counter() - t0:7.1f}s")
      window = []
  return c, params, losses


# --- Hugging Face export ---------------------------------------------------------------------


def to_hf(c: LlamaConfig, params) -> dict[str, np.ndarray]:
  """Our leaves -> HF tensors ([out, in]), the inverse of params.HF_SOURCES' conversions."""
  D = c.hidden_size
  out = {}
  for path, leaf in params_lib.flatten(params).items():
    src = params_lib.HF_SOURCES[path]
    layers = [np.asarray(leaf, np.float32)[i] for i in range(c.num_layers)] if src.stacked \
        else [np.asarray(leaf, np.float32)]
    for i, w in enumerate(layers):
      if path[-1] == "wqkv":  # [D, K, G + 2, H] -> q [N*H, D], k and v [K*H, D]
        G = w.shape[2] - 2
        parts = [a.reshape(D, -1).T for a in (w[:, :, :G], w[:, :, G], w[:, :, G + 1])]
      elif path[-1] == "w_gate_up":  # [D, 2, F] -> gate and up [F, D]
        parts = [w[:, 0].T, w[:, 1].T]
      elif path[-1] == "wo":  # [N, H, D] -> [D, N*H]
        parts = [w.reshape(-1, D).T]
      elif w.ndim == 2 and path != ("embed",):
        parts = [w.T]
      else:
        parts = [w]
      names = [name.format(i=i) for name in src.names]
      parts = [np.ascontiguousarray(a) for a in parts]
      assert tuple(a.shape for a in parts) == params_lib.hf_shapes(path, c), names
      assert np.array_equal(src.to_ours(*parts, c), layers[i]), names  # round-trips exactly
      out.update(zip(names, parts))
  return out


def save_hf(out_dir: pathlib.Path, c: LlamaConfig, params, tok: Tokenizer,
            extra_readme: str = "") -> None:
  from safetensors.numpy import save_file
  out_dir.mkdir(parents=True, exist_ok=True)
  bos, eos = c.bos_token_id, c.eos_token_ids[0]
  hf = dict(c.to_hf(), attention_dropout=0.0, initializer_range=0.02, pretraining_tp=1,
            use_cache=True, eos_token_id=eos, torch_dtype="float32")
  dump = lambda p, d: p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
  dump(out_dir / "config.json", hf)
  dump(out_dir / "generation_config.json", dict(bos_token_id=bos, eos_token_id=eos,
                                                do_sample=False))
  dump(out_dir / "tokenizer_config.json",
       dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", model_max_length=c.max_position_embeddings,
            clean_up_tokenization_spaces=False))
  tok.save(str(out_dir / "tokenizer.json"))
  save_file(to_hf(c, params), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


# --- evaluation ------------------------------------------------------------------------------

SUMMARY_RE = re.compile(r"^\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|\s*(.*?)\s*$")


def parse_summary(text: str) -> tuple[str, str, str] | None:
  m = SUMMARY_RE.match(text.strip().split("\n")[0])
  return m.groups() if m else None


def evaluate(model_dir, tickets: list[dict], *, llm=None, prompt_budget: int = 224,
             max_new_tokens: int = 32, batch: int = 16) -> dict:
  """Greedy summaries of `tickets` via jaxpp.LLM; category / product / exact-match accuracy.

  Prompts are cut to `prompt_budget` tokens by the training (and job) truncation rule.
  """
  import jaxpp
  llm = llm or jaxpp.LLM(str(model_dir), dtype="float32", max_len=prompt_budget + max_new_tokens)
  tok = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json"))
  rows = []
  for k in range(0, len(tickets), batch):
    chunk = tickets[k:k + batch]
    prompts = [prompt_ids(tok, t["text"], prompt_budget) for t in chunk]
    outs = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_k=0,
                        top_p=1.0, seed=0)
    for t, o in zip(chunk, outs):
      rows.append((t, o.text, parse_summary(o.text)))
  n = len(rows)
  cat = sum(p is not None and p[0] == t["category"] for t, _, p in rows) / n
  prod = sum(p is not None and p[1] == t["product"] for t, _, p in rows) / n
  exact = sum(o.strip() == t["summary"] for t, o, _ in rows) / n
  return dict(n=n, category=cat, product=prod, exact=exact, rows=rows)


# --- entry point -----------------------------------------------------------------------------


def main(argv):
  del argv
  from absl import flags
  F = flags.FLAGS
  buckets = tuple(b for b in TrainConfig.buckets if b < F.max_len) + (F.max_len,)
  cfg = TrainConfig(buckets=buckets, hidden_size=F.hidden_size, num_layers=F.num_layers,
                    num_heads=F.num_heads,
                    num_kv_heads=F.num_kv_heads, max_len=F.max_len, batch_size=F.batch_size,
                    steps=F.steps, warmup_steps=F.warmup_steps, learning_rate=F.learning_rate,
                    seed=F.seed, log_every=F.log_every)
  tok = Tokenizer.from_file(F.tokenizer)
  t0 = time.perf_counter()
  tickets = train_tokenizer.generate_tickets(F.count, F.data_seed)
  c, params, losses = train(cfg, tickets, tok)
  secs = time.perf_counter() - t0
  save_hf(pathlib.Path(F.out), c, params, tok)
  print(f"trained {cfg.steps} steps in {secs:.0f}s; final loss (mean of last 50 steps) "
        f"{np.mean(losses[-50:]):.4f}; wrote {F.out}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_integer("hidden_size", 128, "D")
  flags.DEFINE_integer("num_layers", 4, "L")
  flags.DEFINE_integer("num_heads", 4, "N")
  flags.DEFINE_integer("num_kv_heads", 2, "K")
  flags.DEFINE_integer("max_len", 256, "training sequence length")
  flags.DEFINE_integer("batch_size", 16, "sequences per step")
  flags.DEFINE_integer("steps", 1300, "optimizer steps")
  flags.DEFINE_integer("warmup_steps", 30, "linear warm-up steps")
  flags.DEFINE_float("learning_rate", 4e-3, "peak learning rate")
  flags.DEFINE_integer("seed", 0, "init and data-order seed")
  flags.DEFINE_integer("log_every", 25, "steps between loss lines")
  flags.DEFINE_integer("count", 4000, "training tickets")
  flags.DEFINE_integer("data_seed", 1001, "make_tickets seed of the training tickets")
  flags.DEFINE_string("tokenizer", str(REPO / "models" / "harbor-tiny" / "tokenizer.json"),
                      "tokenizer.json from tools/train_tokenizer.py")
  flags.DEFINE_string("out", str(REPO / "models" / "harbor-tiny"), "output directory")
  app.run(main)
