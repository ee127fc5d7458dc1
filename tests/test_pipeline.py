"""Every pipeline layout gives the single-device reference's logits and greedy tokens.

fp32 throughout, on the 8 CPU devices of conftest. The reference is `reference.py` on one
device with the plain [L, ...] params; the pipeline loads the same checkpoint straight onto
its stages.
"""

import re

import jax
import numpy as np
import pytest

import jaxpp
from jaxpp.load import checkpoint
from jaxpp.model import decode_state, sampling
from jaxpp.parallel import mesh, packing, pipeline
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import reference
from tests import hf_models

PROMPTS = [[1, 5, 9, 33, 70, 12, 8], [1, 44], [1, 3, 3, 90, 61, 17, 25, 26, 40, 11, 7, 19, 2, 4],
           [1, 8, 8, 8, 60], [1, 2, 3]]
NEW_TOKENS = 24
MAX_LEN = 48
LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 4, 1), (2, 1, 1), (4, 1, 1), (8, 1, 1), (2, 2, 1), (4, 2, 1),
           (2, 4, 1), (1, 1, 2), (2, 1, 2), (4, 1, 2), (2, 2, 2)]


def single_device(ckpt, prompts):
  """Single-device last-position logits and greedy tokens."""
  config = checkpoint.load_config(ckpt)
  params = checkpoint.load_hf_params(ckpt, config, np.float32)
  logits = np.stack([np.asarray(reference.forward_logits(config, params, np.array([p])))[0, -1]
                     for p in prompts])
  tokens = reference.reference_generate(config, params, prompts, NEW_TOKENS,
                                        sampling.SamplingParams.make(len(prompts)),
                                        max_len=MAX_LEN)
  return logits, tokens


def _deep(tmp_path_factory, head_dim):
  # 8 layers so pp=8 and pp*v=8 have a layer per chunk; kv heads 4 so tp=4 divides them.
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp(f"deep{head_dim}"), "deep",
                                      num_key_value_heads=4, num_attention_heads=8,
                                      head_dim=head_dim, vocab_size=96)
  return ckpt, single_device(ckpt, PROMPTS)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
  return _deep(tmp_path_factory, 8)


@pytest.fixture(scope="module")
def deep16(tmp_path_factory):
  """head_dim 16: a tile side the fused decode kernel takes (8 is not)."""
  return _deep(tmp_path_factory, 16)


def check_layout(ckpt, ref, attention="auto", **layout):
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=8,
                  layout=jaxpp.Layout(**layout), attention=attention)
  ref_logits, ref_tokens = ref
  logits = llm.prompt_logits(PROMPTS)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
  got = [c.token_ids for c in llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
  assert got == ref_tokens
  return llm


@pytest.mark.parametrize("pp,tp,v", LAYOUTS)
@pytest.mark.parametrize("m_per_stage", [1, 2])
def test_layout_matches_single_device(deep, pp, tp, v, m_per_stage):
  ckpt, ref = deep
  check_layout(ckpt, ref, pp=pp, tp=tp, virtual_stages=v, microbatches=m_per_stage * pp)


@pytest.mark.parametrize("dp,pp,tp,v", [(2, 2, 2, 1), (2, 4, 1, 1), (4, 2, 1, 1), (8, 1, 1, 1),
                                        (2, 2, 1, 2)])
def test_replicas_match_single_device(deep, dp, pp, tp, v):
  """dp replicas, each a whole pipeline on its own devices with its own rows, give the
  single-device logits and greedy tokens (prompts spread over the replicas)."""
  ckpt, ref = deep
  llm = check_layout(ckpt, ref, dp=dp, pp=pp, tp=tp, virtual_stages=v)
  assert llm.pipeline.mesh.shape["dp"] == dp


def test_llm_replicas_argument(deep):
  """jaxpp.LLM(dp=0) fills the devices with replicas of the layout; too many is one line."""
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp2tp2", dp=0)
  assert llm.pipeline.layout.name == "dp2pp2tp2"
  named = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="dp0pp4tp2")
  assert named.pipeline.layout.name == "pp4tp2"  # one replica fills the 8 devices
  with pytest.raises(jaxpp.JaxppError, match="layout dp3pp2tp2 needs dp\\*pp\\*tp = 12 devices"):
    jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp2tp2", dp=3)


@pytest.mark.parametrize("pp,tp,v,m", [(1, 1, 1, 1), (1, 1, 1, 2), (2, 1, 1, 2), (2, 2, 1, 4),
                                      (4, 2, 1, 4), (1, 4, 1, 1), (2, 1, 2, 2), (8, 1, 1, 8)])
def test_kernel_attention_matches_single_device(deep16, pp, tp, v, m):
  """The fused decode-attention kernel (interpreted here) gives the einsum reference's
  tokens on every kind of layout: rotated slots, chunk switch, tp split over kv heads."""
  ckpt, ref = deep16
  llm = check_layout(ckpt, ref, pp=pp, tp=tp, virtual_stages=v, microbatches=m,
                     attention="kernel")
  assert llm.pipeline.kernels.decode and llm.pipeline.kernels.prefill


@pytest.mark.parametrize("pp,tp,v,m,prefill_m", [(2, 1, 1, 2, 8), (4, 2, 1, 4, 8),
                                                  (2, 2, 2, 2, 6), (1, 2, 1, 1, 3)])
def test_finer_prefill_matches_single_device(deep, pp, tp, v, m, prefill_m):
  """Prefill cut into more micro-batches than the decode ring (rows land in their slots)."""
  ckpt, ref = deep
  llm = check_layout(ckpt, ref, pp=pp, tp=tp, virtual_stages=v, microbatches=m,
                     prefill_microbatches=prefill_m)
  assert (llm.pipeline.prefill_mb, llm.pipeline.microbatches) == (prefill_m, m)


@pytest.mark.parametrize("pp,split,expected", [
    (2, "4,3", (4, 3)),
    (4, "1,2,2,2", (1, 2, 2, 2)),
    (4, "balanced", None),
    (2, "even", (4, 3)),
])
def test_uneven_splits(tmp_path_factory, pp, split, expected):
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp("odd"), "gqa",
                                      num_hidden_layers=7)
  llm = check_layout(ckpt, single_device(ckpt, PROMPTS), pp=pp, layer_split=split)
  counts = llm.pipeline.partition.counts
  assert sum(counts) == 7 and llm.pipeline.partition.max_layers == max(counts)
  if expected:
    assert counts == expected
  else:  # the LM head weighs on the last chunk, which gets fewer layers
    assert counts[-1] < max(counts) and counts == llm.layout.partition(llm.config).counts


def test_interleaved_uneven(tmp_path_factory):
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp("odd_v"), "gqa",
                                      num_hidden_layers=7)
  check_layout(ckpt, single_device(ckpt, PROMPTS), pp=2, virtual_stages=2, microbatches=2)


def _collectives(hlo: str, op: str) -> list[int]:
  """Element counts of every `op` result in optimized HLO text."""
  sizes = []
  for line in hlo.splitlines():
    if f" {op}(" in line or f" {op}-start(" in line:
      shape = re.search(r"=\s*\(?\s*\w+\[([\d,]*)\]", line)
      dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
      sizes.append(int(np.prod(dims)) if dims else 1)
  return sizes


def _prefilled(llm, prompts):
  """(cache, lengths, sampling params, decode state) after prefilling `prompts`: what the
  HLO and jaxpr checks below feed the programs they inspect."""
  (first, cache), lengths, knobs = llm._prefill_all([p for p, _ in llm.encode(prompts)],
                                                   sampling.SamplingParams.make(len(prompts)))
  return cache, lengths, knobs, decode_state.start_state(first, lengths, lengths * 0 + 8, (),
                                                        MAX_LEN)


def _prefill_inputs(M, b, T=16):
  """A packed prefill of M x b one-token prompts, one a row, and its greedy knobs."""
  knobs = sampling.SamplingParams.make(M * b)
  return (packing.one_per_row([[1]] * (M * b), M, T),
          sampling.SamplingParams(*(np.asarray(a).reshape(M, b, 1) for a in knobs)))


def test_hlo_moves_activations_by_collective_permute(deep):
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp4tp1")
  cache, lengths, knobs, state = _prefilled(llm, PROMPTS)
  c = llm.config
  smallest_weight = c.hidden_size * c.num_kv_heads * c.head_dim
  texts = {
      "decode": pipeline.Pipeline.decode.lower(
          llm.pipeline, llm.params, cache, state, knobs, steps=4, do_sample=False,
          eos_ids=()).compile().as_text(),
      "prefill": pipeline.Pipeline.prefill.lower(
          llm.pipeline, llm.params, cache, *_prefill_inputs(4, 2),
          do_sample=False).compile().as_text(),
  }
  for name, hlo in texts.items():
    assert _collectives(hlo, "collective-permute"), name
    for op in ("all-gather", "all-reduce", "all-to-all"):
      big = [n for n in _collectives(hlo, op) if n >= smallest_weight]
      assert not big, f"{name}: {op} of {big} elements"


def test_per_device_memory_is_a_share(deep):
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp4tp2")
  blocks = llm.params["blocks"]
  cache = llm.pipeline.init_cache(4, MAX_LEN, np.float32)
  for tree in (blocks, cache):
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = mesh.per_device_bytes(tree)
    assert len(per_device) == 8
    for nbytes in per_device.values():  # norms are replicated over tp: a little over 1/8
      assert total / 8 <= nbytes <= 1.05 * total / 8


def test_bad_layouts_fail_before_compile(deep):
  ckpt, _ = deep
  config = checkpoint.load_config(ckpt)
  with pytest.raises(jaxpp.JaxppError, match=r"microbatches=2 < pp=4"):
    Pipeline.build(config, jaxpp.Layout(pp=4, microbatches=2))
  with pytest.raises(jaxpp.JaxppError, match=r"8 layers cannot fill pp\*virtual_stages=16"):
    Pipeline.build(config, jaxpp.Layout(pp=4, virtual_stages=4))
  with pytest.raises(jaxpp.JaxppError, match=r"tp=16 does not divide num_attention_heads=8"):
    Pipeline.build(config, jaxpp.Layout(pp=1, tp=16))
  with pytest.raises(jaxpp.JaxppError, match=r"pp\*tp\*dp = 3\*2\*1 = 6 but there are 8"):
    mesh.make_mesh(pp=3, tp=2)
  with pytest.raises(jaxpp.JaxppError, match=r"sums to 9 but the model has 8 layers"):
    Pipeline.build(config, jaxpp.Layout(pp=2, layer_split="5,4"))
  with pytest.raises(jaxpp.JaxppError, match=r"only 8 devices"):
    Pipeline.build(config, jaxpp.Layout(pp=4, tp=4))


def test_hlo_parser_sees_tensor_parallel_reductions(deep):
  """The check above can fail: with tp=2 the stage's matmuls do reduce over 'tp'."""
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp1tp2")
  cache, lengths, knobs, state = _prefilled(llm, PROMPTS[:2])
  hlo = pipeline.Pipeline.decode.lower(llm.pipeline, llm.params, cache, state, knobs,
                                       steps=2, do_sample=False, eos_ids=()).compile().as_text()
  assert _collectives(hlo, "all-reduce")


def test_sampled_tokens_do_not_depend_on_layout(deep):
  """Per-request keys (seed, position): the same seed samples the same tokens anywhere."""
  ckpt, _ = deep
  outs = []
  for layout in ("pp1", "pp2tp2", "pp4v2m4"):
    llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=8, layout=layout)
    outs.append([c.token_ids for c in llm.generate(
        PROMPTS, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=[1, 2, 3, 4, 5])])
  assert outs[0] == outs[1] == outs[2]
  greedy = [c.token_ids for c in llm.generate(PROMPTS, max_new_tokens=16)]
  assert outs[0] != greedy  # sampling really happened


def test_decode_does_not_copy_the_cache_per_layer(deep):
  """The KV cache is updated in place: XLA must not copy it inside the layer loop.

  Writing each layer's keys inside the scan made XLA copy the whole cache per layer (6
  cache-sized copies in the program, two per layer-loop body); one scatter after the loop
  leaves only the copies at the program's edge.
  """
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp1tp1")
  cache, lengths, knobs, state = _prefilled(llm, PROMPTS[:2])
  hlo = pipeline.Pipeline.decode.lower(llm.pipeline, llm.params, cache, state, knobs,
                                       steps=2, do_sample=False, eos_ids=()).compile().as_text()
  local = ",".join(str(d) for d in cache[0].shape[1:])
  copies = [l for l in hlo.splitlines() if re.search(rf"f32\[(1,)?{local}\]\S* copy\(", l)]
  assert len(copies) <= 4, copies


def _equations(jaxpr):
  """(equation, its jaxpr's constant vars) for a jaxpr and every jaxpr nested in it.

  A var is constant when an equation made it from literals and constants only (jnp
  indexing turns a Python int into a small chain of such equations).
  """
  constant = set()
  for eqn in jaxpr.eqns:
    subs = [getattr(sub, "jaxpr", sub) for param in eqn.params.values()
            for sub in (param if isinstance(param, (tuple, list)) else (param,))]
    subs = [sub for sub in subs if hasattr(sub, "eqns")]  # a ClosedJaxpr wraps its Jaxpr
    if not subs and all(hasattr(v, "val") or v in constant for v in eqn.invars):
      constant.update(eqn.outvars)
    yield eqn, constant
    for sub in subs:
      yield from _equations(sub)


def test_decode_reads_weights_and_cache_at_constant_indices(deep):
  """Every weight and cache read of the decode ring names its chunk and slot as constants.

  A chunk or micro-batch slot read from the schedule table is a traced offset; XLA on GPU
  then copies the slice before the matmuls instead of handing cuBLAS the slice in place
  (the cache copy was 14% of a 70B pp=2 decode step). pipeline.py switches over chunks and
  rotates the cache slots so that both are constants in the m-unrolled tick loop.
  """
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp2tp1v2")
  cache, lengths, knobs, state = _prefilled(llm, PROMPTS)
  jaxpr = pipeline.Pipeline.decode.trace(llm.pipeline, llm.params, cache, state, knobs,
                                         steps=3, do_sample=False, eos_ids=()).jaxpr.jaxpr
  stage = lambda a: tuple(a.shape[1:])  # one device's part: [v, Lc, ...]
  cache_shape = stage(cache[0])
  weight_shapes = {stage(a) for a in jax.tree.leaves(llm.params["blocks"])}
  reads = [(e, constant) for e, constant in _equations(jaxpr)
           if e.primitive.name == "dynamic_slice"]
  is_constant = lambda var, constant: hasattr(var, "val") or var in constant
  cache_reads = [r for r in reads if tuple(r[0].invars[0].aval.shape) == cache_shape]
  weight_reads = [r for r in reads if tuple(r[0].invars[0].aval.shape) in weight_shapes]
  m, v = llm.pipeline.microbatches, llm.pipeline.v
  assert len(cache_reads) == 2 * m * v  # keys and values, per unrolled tick and chunk
  assert len(weight_reads) >= len(weight_shapes) * m * v
  for e, constant in cache_reads:  # index operands follow the array: chunk, layer, slot
    assert is_constant(e.invars[1], constant) and is_constant(e.invars[3], constant)
  for e, constant in weight_reads:
    assert is_constant(e.invars[1], constant)


def test_one_stage_ticks_run_no_conditionals(deep):
  """With one stage and one chunk every tick computes and samples: the programs hold no
  conditional (on GPU each one reads its branch index back to the host, every tick)."""
  ckpt, _ = deep
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp1tp2")
  cache, lengths, knobs, state = _prefilled(llm, PROMPTS)
  decode = pipeline.Pipeline.decode.trace(llm.pipeline, llm.params, cache, state, knobs,
                                          steps=3, do_sample=False, eos_ids=()).jaxpr.jaxpr
  prefill = pipeline.Pipeline.prefill.trace(
      llm.pipeline, llm.params, cache, *_prefill_inputs(*lengths.shape),
      do_sample=False).jaxpr.jaxpr
  for name, jaxpr in (("decode", decode), ("prefill", prefill)):
    conds = [e for e, _ in _equations(jaxpr) if e.primitive.name == "cond"]
    assert not conds, f"{name}: {len(conds)} conditionals"


def test_kernel_reads_each_layer_of_the_whole_cache(deep16):
  """With the fused kernel no decode tick slices the cache: each kernel call gets the whole
  local cache and the layer's (chunk, layer, slot) as scalars, so on GPU nothing is copied
  out of the cache before attention (a slice cut inside the layer loop is a copy there)."""
  ckpt, _ = deep16
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, attention="kernel", layout="pp2tp1v2")
  cache, lengths, knobs, state = _prefilled(llm, PROMPTS)
  jaxpr = pipeline.Pipeline.decode.trace(llm.pipeline, llm.params, cache, state, knobs,
                                         steps=3, do_sample=False, eos_ids=()).jaxpr.jaxpr
  local = tuple(cache[0].shape[1:])  # [v, Lc, M, b, K, S, H]
  whole = (int(np.prod(local[:3])),) + local[3:]
  eqns = [e for e, _ in _equations(jaxpr)]
  calls = [e for e in eqns if e.primitive.name == "pallas_call"]
  m, v = llm.pipeline.microbatches, llm.pipeline.v
  assert len(calls) == m * v  # one per unrolled tick and chunk (the layer loop is a scan)
  for e in calls:  # operands: index, lengths, firsts, q, keys, values
    assert [tuple(x.aval.shape) for x in e.invars[4:]] == [whole, whole]
  assert not [e for e in eqns if e.primitive.name == "dynamic_slice"
              and tuple(e.invars[0].aval.shape) == local]
