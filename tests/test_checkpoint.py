"""jaxpp.checkpoint against checkpoints written by transformers itself.

The reference is the torch model's state_dict after the conversion documented in
`jaxpp.model.params` (HF stores [out, in]; we store input-dim first with heads split out).
"""

import contextlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxpp.errors import JaxppError
from jaxpp.load import checkpoint
from jaxpp.model import params as params_lib
from tests.hf_models import make_checkpoint


def grouped_qkv(q, k, v, K: int, H: int):
  """HF's q [N*H, ...], k and v [K*H, ...] (rows, then any input dim) -> ours [..., K,
  G + 2, H], head by head: kv head j's query heads j*G .. j*G + G - 1, its key, its value."""
  G = q.shape[0] // H // K
  head = lambda w, n: np.moveaxis(w[n * H:(n + 1) * H], 0, -1)  # head n: [..., H]
  return np.stack([np.stack([head(q, j * G + g) for g in range(G)] + [head(k, j), head(v, j)],
                            axis=-2) for j in range(K)], axis=-3)


def expected_params(model, cfg) -> dict:
  """Our layout, built independently from the torch state_dict (float32 numpy)."""
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layer = lambda name: np.stack([sd[f"model.layers.{i}.{name}"] for i in range(cfg.num_layers)])
  qkv = lambda i: grouped_qkv(*(sd[f"model.layers.{i}.self_attn.{x}_proj.weight"]
                                for x in "qkv"), K, H)
  flat = {
      ("embed",): sd["model.embed_tokens.weight"],
      ("blocks", "attn_norm", "scale"): layer("input_layernorm.weight"),
      ("blocks", "attn", "wqkv"): np.stack([qkv(i) for i in range(cfg.num_layers)]),
      ("blocks", "attn", "wo"): np.stack([w.T.reshape(N, H, D)
                                          for w in layer("self_attn.o_proj.weight")]),
      ("blocks", "mlp_norm", "scale"): layer("post_attention_layernorm.weight"),
      ("blocks", "mlp", "w_gate_up"): np.stack([layer("mlp.gate_proj.weight"),
                                                layer("mlp.up_proj.weight")], axis=2
                                               ).transpose(0, 3, 2, 1),
      ("blocks", "mlp", "w_down"): layer("mlp.down_proj.weight").transpose(0, 2, 1),
      ("final_norm", "scale"): sd["model.norm.weight"],
  }
  if not cfg.tie_word_embeddings:
    flat[("lm_head",)] = sd["lm_head.weight"].T
  return flat


def assert_params_equal(got: dict, want_flat: dict):
  got_flat = params_lib.flatten(got)
  assert set(got_flat) == set(want_flat)
  for path, want in want_flat.items():
    np.testing.assert_array_equal(np.asarray(got_flat[path], np.float32), want,
                                  err_msg="/".join(path))


def pipeline_shardings(cfg, mesh) -> dict:
  """Stacked leaves: layers over 'pp', heads / ffn over 'tp' (as a pipeline would ask)."""
  specs = {
      ("embed",): P(None, "tp"),
      ("blocks", "attn_norm", "scale"): P("pp", None),
      ("blocks", "attn", "wqkv"): P("pp", None, "tp", None, None),
      ("blocks", "attn", "wo"): P("pp", "tp", None, None),
      ("blocks", "mlp_norm", "scale"): P("pp", None),
      ("blocks", "mlp", "w_gate_up"): P("pp", None, None, "tp"),
      ("blocks", "mlp", "w_down"): P("pp", "tp", None),
      ("final_norm", "scale"): P(),
      ("lm_head",): P("tp", None),
  }
  return params_lib.nest({p: NamedSharding(mesh, specs[p]) for p in params_lib.leaf_shapes(cfg)})


@contextlib.contextmanager
def raises_one_line(pattern):
  """pytest.raises(JaxppError, match=...) that also checks the message is a single line."""
  with pytest.raises(JaxppError, match=pattern) as info:
    yield info
  assert "\n" not in str(info.value), str(info.value)


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", ["gqa", "mqa", "tied", "head_dim"])
def test_load_fp32_matches_torch(tmp_path, variant, sharded):
  d, model = make_checkpoint(tmp_path / "ckpt", variant, sharded=sharded)
  assert (d / "model.safetensors.index.json").is_file() == sharded
  cfg = checkpoint.load_config(d)
  got = checkpoint.load_hf_params(d, cfg, jnp.float32)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), got) == jax.tree.map(
      lambda x: (x.shape, x.dtype), params_lib.abstract_params(cfg, jnp.float32))
  assert ("lm_head" in got) == (variant != "tied")
  for leaf in jax.tree.leaves(got):
    assert leaf.sharding == SingleDeviceSharding(jax.devices()[0])
  assert_params_equal(got, expected_params(model, cfg))


@pytest.mark.parametrize("variant", ["gqa", "qwen2", "phi3"])
def test_fused_leaves_group_each_kv_heads_query_heads(tmp_path, variant):
  """wqkv[l, :, k, g] is query head k*G + g of q_proj (its rows, transposed), [l, :, k, G]
  key head k of k_proj and [l, :, k, G + 1] value head k of v_proj; bqkv likewise (Qwen2);
  w_gate_up[l, :, 0] is gate_proj transposed, [l, :, 1] up_proj. Phi-3 holds q|k|v rows in
  one qkv_proj and gate|up rows in one gate_up_proj. Beyond the kv heads (tp=8 over K=2)
  each kv head is copied tp / K times and query head n still sits at [n // G, n % G];
  `replicate_kv` of the plain leaves (as `place_plain` does it) gives the same."""
  d, _ = make_checkpoint(tmp_path / "ckpt", variant, num_attention_heads=8,
                         num_key_value_heads=2)
  hf = safetensors.numpy.load_file(d / "model.safetensors")
  cfg = checkpoint.load_config(d)
  N, H, F = cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  sizes = dict(q=N * H, k=2 * H, v=2 * H)

  def rows(l: int, x: str, kind: str = "weight"):  # HF's [n * H, ...] of q, k or v
    name = f"model.layers.{l}.self_attn.{{}}_proj.{kind}"
    if variant != "phi3":
      return hf[name.format(x)]
    start = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}[x]
    return hf[name.format("qkv")][start:start + sizes[x]]

  def mlp(l: int, part: int):  # gate (0) or up (1), HF's [F, D]
    if variant == "phi3":
      return hf[f"model.layers.{l}.mlp.gate_up_proj.weight"][part * F:(part + 1) * F]
    return hf[f"model.layers.{l}.mlp.{('gate', 'up')[part]}_proj.weight"]

  loaded = {}
  for tp in (1, 8):
    c = cfg.for_tp(tp)
    K, r = c.num_kv_heads, c.kv_replicas
    G = N // K
    assert (K, r) == ((2, 1) if tp == 1 else (8, 4))
    got = loaded[tp] = {p[-1]: np.asarray(a) for p, a in params_lib.flatten(
        checkpoint.load_hf_params(d, c, jnp.float32)).items()}
    assert got["wqkv"].shape == (cfg.num_layers, cfg.hidden_size, K, G + 2, H)
    for l in range(cfg.num_layers):
      fused = [(got["wqkv"][l], "weight")] + ([(got["bqkv"][l], "bias")] if c.qkv_bias else [])
      for leaf, kind in fused:
        head = lambda x, n: rows(l, x, kind)[n * H:(n + 1) * H].T
        for n in range(N):
          np.testing.assert_array_equal(leaf[..., n // G, n % G, :], head("q", n))
        for k in range(K):  # copy k % r of the checkpoint's kv head k // r
          np.testing.assert_array_equal(leaf[..., k, G, :], head("k", k // r))
          np.testing.assert_array_equal(leaf[..., k, G + 1, :], head("v", k // r))
      for part in (0, 1):
        np.testing.assert_array_equal(got["w_gate_up"][l][:, part], mlp(l, part).T)
  for name in params_lib.KV_LEAVES:
    if name in loaded[1]:
      np.testing.assert_array_equal(params_lib.replicate_kv(loaded[1][name], cfg.for_tp(8)),
                                    loaded[8][name])


def test_load_config_reads_generation_config(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  cfg = checkpoint.load_config(d)
  assert cfg.eos_token_ids == (2, 5)
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 4, 2, 16)


def test_load_bf16_matches_torch_exactly(tmp_path):
  d, model = make_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
  cfg = checkpoint.load_config(d)
  got = checkpoint.load_hf_params(d, cfg, jnp.bfloat16)
  flat = params_lib.flatten(got)
  assert flat[("blocks", "attn", "wqkv")].dtype == jnp.bfloat16
  assert flat[("final_norm", "scale")].dtype == jnp.float32
  assert_params_equal(got, expected_params(model, cfg))  # model holds bf16 values as fp32


def test_tied_ignores_stray_lm_head(tmp_path):
  d, model = make_checkpoint(tmp_path / "ckpt", "tied")
  tensors = safetensors.numpy.load_file(d / "model.safetensors")
  tensors["lm_head.weight"] = np.zeros((97, 64), np.float32)
  safetensors.numpy.save_file(tensors, d / "model.safetensors")
  cfg = checkpoint.load_config(d)
  got = checkpoint.load_hf_params(d, cfg, jnp.float32)
  assert "lm_head" not in got
  assert_params_equal(got, expected_params(model, cfg))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_sharded_placement_reads_own_shard(tmp_path, sharded):
  d, _ = make_checkpoint(tmp_path / "ckpt", "gqa", sharded=sharded, num_hidden_layers=8)
  cfg = checkpoint.load_config(d)
  mesh = jax.make_mesh((4, 2), ("pp", "tp"))
  shardings = pipeline_shardings(cfg, mesh)
  ref = params_lib.flatten(checkpoint.load_hf_params(d, cfg, jnp.float32))
  got = params_lib.flatten(checkpoint.load_hf_params(d, cfg, jnp.float32, shardings))
  L, D, F, N, K, H = 8, 64, 96, 4, 2, 16
  shard_shapes = {
      ("blocks", "attn", "wqkv"): (L // 4, D, K // 2, N // K + 2, H),
      ("blocks", "attn", "wo"): (L // 4, N // 2, H, D),
      ("blocks", "mlp", "w_gate_up"): (L // 4, D, 2, F // 2),
      ("blocks", "mlp", "w_down"): (L // 4, F // 2, D),
      ("blocks", "mlp_norm", "scale"): (L // 4, D),
      ("embed",): (97, D // 2),
      ("lm_head",): (D // 2, 97),
  }
  for path, arr in got.items():
    assert arr.sharding == params_lib.flatten(shardings)[path]
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref[path]))
    shards = arr.addressable_shards
    assert len(shards) == 8
    for shard in shards:
      if path in shard_shapes:
        assert shard.data.shape == shard_shapes[path], path
      # Each device holds exactly its own slice (its layers, its heads) of the full tensor.
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(ref[path])[shard.index])
  # Stage s (mesh row s) holds layers 2s, 2s+1.
  wqkv = got[("blocks", "attn", "wqkv")]
  for shard in wqkv.addressable_shards:
    stage = int(np.argwhere(mesh.devices == shard.device)[0][0])
    assert range(*shard.index[0].indices(L)) == range(2 * stage, 2 * stage + 2)


def test_streaming_reads_only_own_layers(tmp_path, monkeypatch):
  """With layers sharded over 'pp', each layer tensor is read by its own stage only, and
  once however many devices (the stage's 'tp' shards) need it."""
  d, _ = make_checkpoint(tmp_path / "ckpt", "gqa")
  cfg = checkpoint.load_config(d)
  mesh = jax.make_mesh((4, 2), ("pp", "tp"))
  reads = []
  original = checkpoint._Reader.read
  monkeypatch.setattr(checkpoint._Reader, "read",
                      lambda self, name: reads.append(name) or original(self, name))
  checkpoint.load_hf_params(d, cfg, jnp.float32, pipeline_shardings(cfg, mesh))
  q_reads = [n for n in reads if n.endswith("q_proj.weight")]
  # 4 layers, each read once for its stage's 2 tp devices (never all layers per device)
  assert sorted(q_reads) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)]
  assert sum(n.endswith("input_layernorm.weight") for n in reads) == 4
  assert len(reads) == len(set(reads))  # no tensor read twice


def test_reads_are_timed_and_read_ahead_in_order(tmp_path):
  """The read clock counts every tensor of the checkpoint once; the reader thread hands
  tensors over in the order asked, each equal to a plain read."""
  d, _ = make_checkpoint(tmp_path / "ckpt", "gqa")
  cfg = checkpoint.load_config(d)
  stored = sum(a.nbytes for f in pathlib.Path(d).glob("*.safetensors")
               for a in safetensors.numpy.load_file(f).values())
  clock = checkpoint.ReadClock()
  checkpoint.load_hf_params(d, cfg, jnp.float32, read_clock=clock)
  assert clock.bytes == stored and clock.seconds > 0
  with contextlib.ExitStack() as stack:
    reader = checkpoint._Reader(pathlib.Path(d), stack)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (3, 0, 2)]
    got = list(reader.read_ahead(names))
    assert [n for n, _ in got] == names
    for name, value in got:
      np.testing.assert_array_equal(value, reader.read(name))
    assert list(reader.read_ahead([])) == []


# --- orbax -----------------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path, monkeypatch):
  d, _ = make_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
  cfg = checkpoint.load_config(d)
  mesh = jax.make_mesh((4, 2), ("pp", "tp"))
  params = checkpoint.load_hf_params(d, cfg, jnp.bfloat16, pipeline_shardings(cfg, mesh))
  monkeypatch.chdir(tmp_path)
  checkpoint.save_params("orbax_ckpt", params)  # relative: resolved to absolute for orbax
  with raises_one_line("already exists"):
    checkpoint.save_params(tmp_path / "orbax_ckpt", params)

  def target(sharding_of):
    return jax.tree.map(
        lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_of(x)),
        params_lib.abstract_params(cfg, jnp.bfloat16), params)

  same = checkpoint.restore_params(tmp_path / "orbax_ckpt", target(lambda x: x.sharding))
  # Onto a different sharding: everything replicated on a (2, 4) mesh of the same devices.
  other_mesh = jax.make_mesh((2, 4), ("a", "b"))
  other = checkpoint.restore_params(tmp_path / "orbax_ckpt",
                                    target(lambda x: NamedSharding(other_mesh, P())))
  for restored, sharding_of in ((same, lambda x: x.sharding),
                                (other, lambda x: NamedSharding(other_mesh, P()))):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
      assert a.dtype == b.dtype and a.sharding == sharding_of(b)
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  assert jax.tree.structure(same) == jax.tree.structure(params)


# --- errors ----------------------------------------------------------------------------------


def _edit_config(d, **changes):
  path = d / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_error_missing_dir(tmp_path):
  with raises_one_line("checkpoint directory .*nope does not exist"):
    checkpoint.load_config(tmp_path / "nope")
  cfg = checkpoint.load_config(make_checkpoint(tmp_path / "ckpt")[0])
  with raises_one_line("checkpoint directory .*nope does not exist"):
    checkpoint.load_hf_params(tmp_path / "nope", cfg, jnp.float32)


def test_error_missing_config(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  (d / "config.json").unlink()
  with raises_one_line("no config.json"):
    checkpoint.load_config(d)


def test_error_invalid_json(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  (d / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
  with raises_one_line(r"config\.json: not valid JSON"):
    checkpoint.load_config(d)


def test_error_not_llama(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  with raises_one_line(r"config\.json: model_type='gpt2' .* is not supported; supported: llama, "
                       r"mistral, qwen2, qwen3, phi3, gemma, gemma2"):
    checkpoint.load_config(d)
  _edit_config(d, model_type="mixtral", architectures=["MixtralForCausalLM"],
               num_local_experts=8)
  with raises_one_line(r"model_type='mixtral' is a mixture-of-experts model "
                       r"\(num_local_experts=8\); not supported yet"):
    checkpoint.load_config(d)


def test_error_no_safetensors(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  cfg = checkpoint.load_config(d)
  (d / "model.safetensors").unlink()
  with raises_one_line("neither model.safetensors nor model.safetensors.index.json found"):
    checkpoint.load_hf_params(d, cfg, jnp.float32)


def test_error_index_names_missing_file(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt", sharded=True)
  cfg = checkpoint.load_config(d)
  weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
  victim = weight_map["model.layers.2.self_attn.k_proj.weight"]
  (d / victim).unlink()
  with raises_one_line(re.escape(f"model.safetensors.index.json names missing file {victim!r}")):
    checkpoint.load_hf_params(d, cfg, jnp.float32)


def test_error_index_points_to_wrong_file(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt", sharded=True)
  cfg = checkpoint.load_config(d)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  name, other = "model.layers.1.mlp.up_proj.weight", index["weight_map"]["model.norm.weight"]
  index["weight_map"][name] = other
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  with raises_one_line(re.escape(f"maps tensor {name!r} to {other!r}, which does not contain")):
    checkpoint.load_hf_params(d, cfg, jnp.float32)


def test_error_missing_tensor(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  cfg = checkpoint.load_config(d)
  tensors = safetensors.numpy.load_file(d / "model.safetensors")
  del tensors["model.layers.3.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, d / "model.safetensors")
  with raises_one_line(re.escape("missing tensor 'model.layers.3.mlp.up_proj.weight'")):
    checkpoint.load_hf_params(d, cfg, jnp.float32)


def test_error_shape_mismatch(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  _edit_config(d, intermediate_size=128)
  cfg = checkpoint.load_config(d)
  with raises_one_line(re.escape("tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                 "(96, 64) but config.json implies (128, 64)")):
    checkpoint.load_hf_params(d, cfg, jnp.float32)


def test_error_shardings_tree_mismatch(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  cfg = checkpoint.load_config(d)
  shardings = params_lib.flatten(pipeline_shardings(cfg, jax.make_mesh((4, 2), ("pp", "tp"))))
  del shardings[("lm_head",)]
  with raises_one_line(r"shardings do not match the params tree: missing \['lm_head'\]"):
    checkpoint.load_hf_params(d, cfg, jnp.float32, params_lib.nest(shardings))


def test_error_missing_orbax_path(tmp_path):
  d, _ = make_checkpoint(tmp_path / "ckpt")
  cfg = checkpoint.load_config(d)
  with raises_one_line("orbax checkpoint .*nope does not exist"):
    checkpoint.restore_params(tmp_path / "nope", params_lib.abstract_params(cfg, jnp.float32))


def test_dtype_auto_takes_the_checkpoints(tmp_path):
  """dtype="auto" is config.json's dtype (torch_dtype before transformers 5), else the
  stored embedding's; float16 runs in bfloat16; no checkpoint, no auto."""
  from jaxpp.llm import resolve_dtype

  bf16, _ = make_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
  f32, _ = make_checkpoint(tmp_path / "f32")
  assert resolve_dtype("auto", bf16) == jnp.bfloat16
  assert resolve_dtype("auto", f32) == jnp.float32
  for key in ("torch_dtype", "dtype"):
    _edit_config(bf16, **{key: None})
  assert checkpoint.checkpoint_dtype(bf16) == "bfloat16"  # from the stored tensors
  _edit_config(f32, dtype="float16")
  assert resolve_dtype("auto", f32) == jnp.bfloat16
  _edit_config(f32, dtype="int4")
  with raises_one_line("declares dtype 'int4'; pass dtype as one of bfloat16, float32"):
    resolve_dtype("auto", f32)
  with raises_one_line('dtype "auto" takes the checkpoint'):
    resolve_dtype("auto")
