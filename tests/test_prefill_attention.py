"""Prefill attention's kernel path (prefill_attention.py) against the einsum reference.

On CPUs the path runs everything but the cuDNN call itself: the segment bounds cuDNN is
given feed `bounds_reference`, an XLA form of the mask they describe, so these tests check
the bounds, the padding, GQA/MQA head grouping and the split over tp. The cuDNN call cannot
be lowered here (jax checks for cuDNN and a Hopper GPU while lowering it), so its numbers
and the absence of [T, T] f32 buffers in its HLO are checked on a GPU by
tools/prefill_attention_check.py (docs/benchmarks.md, "Prefill attention").
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.axes import TP
from jaxpp.model import attention_choice, llama
from jaxpp.model import prefill_attention as pa
from jaxpp.model.attention_choice import Kernels
from jaxpp.parallel import packing
from jaxpp.parallel.mesh import make_mesh


def _packed(rows: list[list[int]], T: int):
  """(segments, positions) [B, T] of rows holding prompts of the given lengths, then
  padding, as packing.pack lays them out."""
  lengths = [n for row in rows for n in row]
  prompts = [[1] * n for n in lengths]
  index = iter(range(len(lengths)))
  layout = [[next(index) for _ in row] for row in rows]
  batch, _ = packing.pack(prompts, [(0, 0)] * len(prompts), layout, 1, len(rows), T,
                          max(map(len, rows)))
  return jnp.asarray(batch.segments[0]), jnp.asarray(batch.positions[0])


def _qkv(B, T, K, G, H, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, K, G, H), jnp.float32) * H ** -0.5
  k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32)
  v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32)
  return q, k, v


def test_segment_bounds_follow_the_packer():
  """Each prompt's start and length as packing.pack lays them out; -1 past a row's last."""
  prompts = [[1] * 5, [2] * 3, [3] * 7, [4] * 2]
  rows = packing.first_fit([len(p) for p in prompts], 10, 4)
  batch, where = packing.pack(prompts, [(0, i) for i in range(4)], rows, 1, 2, 10, 4)
  lengths, offsets = pa.segment_bounds(jnp.asarray(batch.segments[0]), max_segments=4)
  lengths, offsets = np.asarray(lengths), np.asarray(offsets)
  for k, (j, r, s) in enumerate(where):
    assert lengths[r, s] == len(prompts[k])
    assert offsets[r, s] == batch.ends[j, r, s] - len(prompts[k]) + 1
  used = [len(row) for row in rows]
  for r, n in enumerate(used):
    assert (lengths[r, n:] == -1).all() and (offsets[r, n:] == -1).all()
  assert offsets.shape == (2, 5) and (offsets[:, -1] == -1).all()


@pytest.mark.parametrize("K,G", [(2, 2), (1, 4), (4, 1)])  # GQA, MQA, MHA
def test_kernel_path_equals_einsums_on_packed_rows(K, G):
  """Mixed prompt lengths, a row full to the last token, a fully padded row: the kernel
  path equals llama.attend's einsums on real tokens, gives padding zeros, and no NaN."""
  T, H = 24, 16
  segments, positions = _packed([[5, 11, 3], [24], [], [1, 1, 1, 9]], T)
  q, k, v = _qkv(4, T, K, G, H)
  start = jnp.zeros((4,), jnp.int32)
  want = llama.attend(q, k, v, positions, start, None, jnp.float32, segments=segments)
  got = llama.attend(q, k, v, positions, start, None, jnp.float32, segments=segments,
                     kernels=Kernels(prefill=True))
  real = np.asarray(segments >= 0)
  assert not np.isnan(np.asarray(got)).any()
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                             atol=1e-5)
  assert (np.asarray(got)[~real] == 0).all()


def test_kernel_path_without_segments_is_one_causal_row():
  """The single-device reference's prefill (right padding, no segments): real tokens'
  attention equals the einsums'."""
  q, k, v = _qkv(2, 16, 2, 2, 16, seed=1)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  start = jnp.zeros((2,), jnp.int32)
  want = llama.attend(q, k, v, positions, start, None, jnp.float32)
  got = llama.attend(q, k, v, positions, start, None, jnp.float32,
                     kernels=Kernels(prefill=True))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_split_over_tp_runs_on_each_devices_heads():
  """Under a mesh whose 'tp' is automatic, each device attends over its own heads: the
  result equals one device's, and no q/k/v is gathered."""
  mesh = make_mesh(pp=1, tp=2, devices=jax.devices()[:2])
  segments, _ = _packed([[6, 10], [16]], 16)
  q, k, v = _qkv(2, 16, 2, 2, 16, seed=2)
  B, T, K, G, H = q.shape
  q = q.reshape(B, T, K * G, H)
  want = pa.attend_local(q, k, v, segments, on_gpu=False)
  heads = NamedSharding(mesh, P(None, None, TP))
  args = (jax.device_put(q, heads), jax.device_put(k, heads), jax.device_put(v, heads),
          segments)
  run = jax.jit(lambda *a: pa.attend(*a, on_gpu=False))
  with jax.set_mesh(mesh):
    got = run(*args)
    hlo = run.lower(*args).compile().as_text()
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not [line for line in hlo.splitlines() if "all-gather" in line or "all-to-all" in line]


def _device(platform, capability=None):
  return types.SimpleNamespace(platform=platform, compute_capability=capability)


# auto on a GPU at tp=1 also takes the 8-bit decode GEMM kernel (the fourth field),
# measured 1.9x XLA's path on an H200 (docs/benchmarks.md)
@pytest.mark.parametrize("device,head_dim,want", [
    (_device("gpu", "9.0"), 128, dict(auto=Kernels(True, True, True, True),
                                      kernel=Kernels(True, True, True, True))),
    (_device("gpu", "9.0"), 96, dict(auto=Kernels(False, True, True, True))),  # decode: not 2^n
    (_device("gpu", "9.0"), 12, dict(auto=Kernels(False, False, False, True))),  # cuDNN: not 8k
    (_device("gpu", "8.0"), 128, dict(auto=Kernels(True, False, False, True),  # packed: Hopper
                                      kernel=Kernels(True, False, False, True))),
    (_device("cpu"), 128, dict(auto=Kernels(), kernel=Kernels(True, True, False, True),
                               xla=Kernels())),
])
def test_attention_choice_per_platform(device, head_dim, want):
  for choice, kernels in want.items():
    if pa._cudnn is None and kernels.gpu:  # a jax without the packed form: auto keeps XLA
      kernels = kernels._replace(prefill=False, gpu=False)
    assert attention_choice.resolve(choice, device=device, tp=1, head_dim=head_dim) == kernels
  gpu_tp2 = attention_choice.resolve("auto", device=_device("gpu", "9.0"), tp=2, head_dim=128)
  assert not gpu_tp2.decode and gpu_tp2.prefill == (pa._cudnn is not None)
  assert not gpu_tp2.weights8  # the kernel under tp is checked on CPUs, not yet timed
