"""On a GPU: tiny bf16 models end to end, the kernels (`attention="auto"`) against XLA's
attention: Mistral-shaped with and without a sliding window, and Gemma 2 (soft caps,
alternating windows: the decode kernel with caps and per-layer window starts), at two
weight scales. One JSON line per case: the largest prompt-logit difference over the
largest logit, and where each prompt's 48 greedy tokens first differ (docs/benchmarks.md,
"Sliding windows in both kernels"). Needs the test extra (transformers writes the models).

    JAX_PLATFORMS=cuda,cpu PYTHONPATH=. python tools/kernels_vs_xla_e2e.py
"""

import json
import pathlib
import tempfile

import jax
import numpy as np
import torch

import jaxpp
from tests import hf_models

rng = np.random.default_rng(0)
prompts = [[1] + rng.integers(3, 500, size=n).tolist() for n in (300, 17, 200, 450)]
shape = dict(hidden_size=512, num_attention_heads=4, head_dim=128, num_key_value_heads=2,
             intermediate_size=1024, max_position_embeddings=1024, vocab_size=512)
cases = [("mistral_window", dict(sliding_window=None)), ("mistral_window", dict(sliding_window=64)),
         ("gemma2", dict(sliding_window=64, query_pre_attn_scalar=128,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0))]
for init in (0.02, 0.2):
  for family, extra in cases:
    d = pathlib.Path(tempfile.mkdtemp())
    ckpt, _ = hf_models.make_checkpoint(d / "m", family, dtype=torch.bfloat16,
                                        initializer_range=init, **shape, **extra)
    llms = {a: jaxpp.LLM(ckpt, dtype="bfloat16", max_len=512, attention=a)
            for a in ("auto", "xla")}
    lg = {a: llms[a].prompt_logits(prompts) for a in llms}
    gen = {a: [c.token_ids for c in llms[a].generate(prompts, max_new_tokens=48)]
           for a in llms}
    print(json.dumps(dict(
        family=family, init=init, **{k: v for k, v in extra.items() if "window" in k},
        kernels=str(llms["auto"].pipeline.kernels),
        logits_rel_err=float(np.max(np.abs(lg["auto"] - lg["xla"])) / np.max(np.abs(lg["xla"]))),
        first_diff=[next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                    for x, y in zip(gen["auto"], gen["xla"])])), flush=True)
print(json.dumps(dict(jax=jax.__version__, device=jax.devices()[0].device_kind)))
