"""Every other family, and tp beyond the kv heads, on pipeline layouts of 8 CPU devices
against the single-device tokens (fp32; the single-device path is checked against
transformers in tests/test_model_parity.py).

Each test builds its own pipeline, whose programs no other test reuses: they are dropped
after each test (tests/conftest.py says why compiled programs must not pile up)."""

import jax
import pytest

import jaxpp
from jaxpp.model.config import LlamaConfig
from tests import hf_models
from tests.test_pipeline import PROMPTS, check_layout, single_device


@pytest.fixture(autouse=True)
def _drop_programs():
  yield
  jax.clear_caches()


FAMILIES = ["qwen2", "qwen3", "mistral_window", "qwen2_window", "phi3", "gemma2"]
# Every family on the two layouts that exercise the most (stages x tp, and interleaving
# through both kernels); the two with the most new math (a window on every layer; Gemma 2's
# caps and per-layer windows) also on an uneven split and beyond the kv heads. Each case
# compiles its own programs (~12 s on 2 cores).
LAYOUTS = [(4, 2, 1, "auto"), (2, 2, 2, "kernel")]
MORE = [(3, 2, 1, "auto"), (1, 8, 1, "kernel")]
CASES = [(f, layout) for f in FAMILIES
         for layout in LAYOUTS + (MORE if f in ("mistral_window", "gemma2") else [])]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
  """Another family's tiny checkpoint (8 layers, 4 kv heads) and its single-device tokens."""
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp(request.param), request.param,
                                      num_hidden_layers=8, num_key_value_heads=4,
                                      num_attention_heads=8, head_dim=16, vocab_size=96)
  return ckpt, single_device(ckpt, PROMPTS)


@pytest.mark.parametrize("family,layout", CASES, indirect=["family"],
                         ids=[f"{f}-pp{l[0]}tp{l[1]}v{l[2]}-{l[3]}" for f, l in CASES])
def test_other_families_match_single_device(family, layout):
  """Qwen2's biases (split over tp with their heads), Qwen3's per-head norms, sliding
  windows shorter than the prompts (every layer's, or only some layers', as a per-layer
  table), Phi-3's fused checkpoint tensors (split per tp shard on loading) and Gemma 2
  (sandwich norms, soft caps, in the decode kernel too) on every kind of layout, and
  through both kernels' CPU paths, give the single-device logits and greedy tokens: pp=3
  splits the 8 layers unevenly, tp=8 replicates each of the 4 kv heads."""
  ckpt, ref = family
  pp, tp, v, attention = layout
  check_layout(ckpt, ref, pp=pp, tp=tp, virtual_stages=v, microbatches=pp,
               attention=attention)


@pytest.fixture(scope="module", params=[2, 1])
def few_kv_heads(request, tmp_path_factory):
  """8 query heads over 2 kv heads (GQA) or 1 (MQA), 4 layers, and the single-device
  tokens."""
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp(f"kv{request.param}"), "gqa",
                                      num_attention_heads=8, num_key_value_heads=request.param,
                                      head_dim=16)
  return request.param, ckpt, single_device(ckpt, PROMPTS)


@pytest.mark.parametrize("pp,tp,attention", [(2, 4, "kernel"), (1, 8, "auto")])
def test_tp_beyond_the_kv_heads_replicates_them(few_kv_heads, pp, tp, attention):
  """tp larger than the kv heads: each device holds one replica of its query heads' kv head
  (weights and cache), and the tokens are the single-device ones, through the kernels too."""
  K, ckpt, ref = few_kv_heads
  llm = check_layout(ckpt, ref, pp=pp, tp=tp, microbatches=pp, attention=attention)
  config = llm.pipeline.config
  assert (config.num_kv_heads, config.kv_replicas) == (tp, tp // K)
  wqkv = llm.params["blocks"]["attn"]["wqkv"]  # [pp, v, Lc, D, K, G + 2, H]
  assert wqkv.sharding.shard_shape(wqkv.shape)[-3:] == (1, 8 // tp + 2, 16)  # one group a device


def test_tp_that_neither_divides_nor_covers_the_kv_heads_is_refused():
  config = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=96, num_layers=2,
                       num_heads=12, num_kv_heads=4, head_dim=8)
  with pytest.raises(jaxpp.JaxppError, match="tp=6 neither divides num_key_value_heads=4 "
                                             "nor is a multiple of it"):
    jaxpp.Layout(1, 6).check(config)
