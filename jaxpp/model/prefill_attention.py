"""Fresh prefill's attention in cuDNN's flash kernel: packed rows, GQA, no [T, T] scores.

XLA runs prefill attention as einsums around an f32 [rows, heads, T, T] score tensor: on an
H200 44 TFLOP/s at 1,024-token rows and 47 at 8,192, prefill at 29% of the matmul roofline
there, and a single 32,768-token row's scores alone would take 128 GiB. cuDNN's flash
attention keeps the scores on chip; on the same card it ran 272 TFLOP/s at 1,024-token rows
and 571 at 8,192 (docs/benchmarks.md, "Prefill attention in cuDNN's flash kernel").

A prefill row here is packed (parallel/packing.py): up to MAX_SEGMENTS whole prompts one
after another, then padding (segment -1). cuDNN's packed form takes exactly that as each
segment's start and length, and runs each prompt causally on its own, GQA included (the G
query heads of a kv head read it in place: no repeat). `jax.nn.dot_product_attention`
exposes only one sequence per row, so the packed call goes to the function it wraps, in
jax's private `jax._src.cudnn` (signature checked on jax 0.10 and 0.11); should it move,
`available` says so and `auto` stays with XLA. Padding tokens get zeros, not cuDNN's
unwritten memory, so no NaN can reach a real token.

Off CUDA GPUs (the CPU tests) the same bounds feed `bounds_reference`, an XLA form of the
mask cuDNN is given, so the tests check the bounds and everything around the call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpp.axes import TP

try:  # the packed (offsets) form of cuDNN attention; see the module docstring
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn
except ImportError:  # pragma: no cover - depends on the jax build
  _cudnn = None

MAX_SEGMENTS = 16  # prompts a packed row may hold (packing.MAX_SEQS_PER_ROW)
NEG_INF = -1e30
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's flash kernel takes


def supports(head_dim: int) -> bool:
  """Whether cuDNN's flash kernel takes this head dim (a multiple of 8, at most 256 on
  Hopper)."""
  return head_dim % 8 == 0 and head_dim <= 256


def available(device) -> bool:
  """Whether `device` runs the packed kernel: a CUDA GPU of compute capability >= 9.0
  (cuDNN's packed form needs Hopper) with jax's cuDNN attention present."""
  if _cudnn is None or device.platform != "gpu":
    return False
  try:  # CUDA devices say "9.0"; anything else (another GPU kind) does not qualify
    return tuple(int(x) for x in str(device.compute_capability).split(".")) >= (9, 0)
  except (AttributeError, ValueError):
    return False


def segment_bounds(segments, max_segments: int = MAX_SEGMENTS):
  """Packed rows' segments i32[B, T] (0, 1, ... in order, then -1) -> (lengths i32[B, q],
  offsets i32[B, q + 1]): each segment's length and first index, -1 where a row has fewer
  segments (cuDNN's convention), q = max_segments."""
  ids = jnp.arange(max_segments, dtype=segments.dtype)
  lengths = jnp.sum(segments[:, None, :] == ids[None, :, None], axis=-1, dtype=jnp.int32)
  starts = jnp.cumsum(lengths, axis=-1, dtype=jnp.int32) - lengths
  present = lengths > 0
  offsets = jnp.concatenate([jnp.where(present, starts, -1),
                             jnp.full((segments.shape[0], 1), -1, jnp.int32)], axis=-1)
  return jnp.where(present, lengths, -1), offsets


def bounds_reference(q, k, v, lengths, offsets, window: int = 0):
  """What cuDNN computes from the bounds, by XLA: causal attention inside each segment
  [offsets, offsets + lengths) of a row, within `window` positions (0 = none). q
  [B, T, N, H] (scaled), k/v [B, T, K, H]."""
  B, T, N, H = q.shape
  K = k.shape[2]
  idx = jnp.arange(T)
  start, length = offsets[:, :-1, None], lengths[:, :, None]  # [B, q, 1]
  inside = (idx >= start) & (idx < start + jnp.maximum(length, 0))  # [B, q, T]
  segment = jnp.where(jnp.any(inside, axis=1), jnp.argmax(inside, axis=1), -1)  # [B, T]
  mask = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) &
          (idx[:, None] >= idx[None, :]))  # [B, T(query), T(key)]
  if window:
    mask &= idx[:, None] - idx[None, :] < window
  qg = q.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("BTKGH,BUKH->BKGTU", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGTU,BUKH->BTKGH", probs, v).reshape(B, T, N, H)


def _kernel(q, k, v, lengths, offsets, window: int):
  # cuDNN's sliding_window_length counts the token itself, as transformers' window does
  return _cudnn.dot_product_attention(
      q, k, v, None, None, lengths, lengths, offsets, offsets, scale=1.0,
      mask_type=_cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
      sliding_window_length=window or None)


def attend_local(q, k, v, segments, *, on_gpu: bool, window: int = 0):
  """Causal attention of packed rows on one device's heads -> [B, T, N, H].

  q [B, T, N, H] (already scaled by H**-0.5), k/v [B, T, K, H], segments [B, T]; tokens
  of segment -1 (padding) get zeros; `window` (static, 0 = none) keeps each token to the
  keys less than `window` positions back. `on_gpu` picks cuDNN, else `bounds_reference`.
  """
  lengths, offsets = segment_bounds(segments)
  if on_gpu and q.dtype in KERNEL_DTYPES:
    out = _kernel(q, k, v, lengths, offsets, window)
  else:
    out = bounds_reference(q, k, v, lengths, offsets, window)
  return jnp.where((segments >= 0)[:, :, None, None], out, 0).astype(q.dtype)


def attend(q, k, v, segments, *, on_gpu: bool, window: int = 0):
  """`attend_local`, split over heads where the surrounding mesh splits them over 'tp'.

  GSPMD cannot partition the kernel by itself (as with decode_attention.attend): under a
  mesh whose 'tp' axis is automatic, each tp device runs it on its own query and kv heads,
  where q, k and v already lie, so nothing is gathered.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or TP not in mesh.auto_axes or mesh.shape[TP] == 1:
    return attend_local(q, k, v, segments, on_gpu=on_gpu, window=window)
  heads = P(None, None, TP)
  run = jax.shard_map(lambda q, k, v, s: attend_local(q, k, v, s, on_gpu=on_gpu,
                                                      window=window), mesh=mesh,
                      in_specs=(heads, heads, heads, P()), out_specs=heads,
                      axis_names={TP}, check_vma=False)
  return run(q, k, v, segments)

