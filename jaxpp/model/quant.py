"""8-bit weights: int8 or fp8 (e4m3) storage with one scale per output channel.

Weight-only quantisation. A quantised leaf `w` is stored in 8 bits and gets a sibling
`w_scale` holding one scale per output channel (the leaf's shape without its input, i.e.
contracted, dimensions). A matmul reads the 8-bit weight, widens it to the activation dtype
inside the product and multiplies the output by the scale; since the scale is constant along
the contracted dimensions this equals the product with the dequantised weight, and a decode
step reads half the bytes of bf16.

Per-output-channel scales are the usual choice for weight-only 8-bit (LLM.int8 and
SmoothQuant report per-channel int8 weights within noise of fp16 on Llama-class models):
one outlier row then only coarsens its own channel. Scales are kept in the activation dtype,
so the rescale is one multiply in the product's own dtype; a bf16 scale is off by at most
2^-9 relative, well below int8's own rounding step of amax/127.

Which leaves: the block projections (attention and MLP) always; the embedding and LM head
only with `Quant(embed=True)` (they are the most sensitive and, at 128k vocabulary, a large
share of a small model but a small share of a big one). The embedding is scaled per token
row (its "output" is the gathered row), which also serves a tied LM head.

Block leaves are stored two 8-bit values to a 16-bit element (`packed8.py`: the decode
kernel could not address layers past 2^31 bytes of a stack otherwise); every reader
unpacks them, and reads an unpacked leaf (a test's, a tool's) as it is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.model import int8_matmul, packed8

FORMATS = ("none", "int8", "fp8")
STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
LARGEST = {"int8": 127.0, "fp8": 448.0}  # largest magnitude each storage type holds
SCALE = "_scale"  # suffix of a quantised leaf's scale sibling

# Leading (input, contracted) dimensions of each per-layer matmul leaf; the rest are output
# channels. Block leaves: see params.py for the layouts.
INPUT_DIMS = {"wqkv": 1, "wo": 2, "w_gate_up": 1, "w_down": 1, "lm_head": 1}
EMBED = "embed"  # [V, D]: quantised per row; its contracted dimension (D) comes last


@dataclasses.dataclass(frozen=True)
class Quant:
  """How weights are stored: `mode` none | int8 | fp8; `embed` also the embedding/LM head."""

  mode: str = "none"
  embed: bool = False

  def __post_init__(self):
    if self.mode not in FORMATS:
      raise JaxppError(f"quant={self.mode!r} is not supported; choose one of "
                       f"{', '.join(FORMATS)}")
    if self.embed and self.mode == "none":
      raise JaxppError("quant_embed=True needs quant='int8' or 'fp8'")

  @property
  def enabled(self) -> bool:
    return self.mode != "none"

  @property
  def storage(self):
    return STORAGE[self.mode]

  def stored(self, path: tuple[str, ...], shape: tuple[int, ...]):
    """(dtype, shape) of the leaf at `path` of `shape` once `store` has put it away."""
    if not self.applies(path):
      raise ValueError(f"{path} is not stored in 8 bits under {self}")
    return packed8.stored(self.storage, shape) if packs(path) else (self.storage, shape)

  def applies(self, path: tuple[str, ...]) -> bool:
    """Whether the leaf at `path` is stored in 8 bits under this setting."""
    if not self.enabled:
      return False
    if path[0] == "blocks":
      return path[-1] in INPUT_DIMS
    return self.embed and path in ((EMBED,), ("lm_head",))


def packs(path: tuple[str, ...]) -> bool:
  """Whether an 8-bit leaf at `path` is stored packed (`packed8.py`): the stacked block
  projections, the arrays that reach 2 GiB; not the embedding or LM head."""
  return path[0] == "blocks"


def detect(params: dict) -> Quant:
  """The setting a (nested) params tree is stored in, read off its leaves."""
  attn = params["blocks"]["attn"]
  if "wqkv" + SCALE not in attn:
    return Quant()
  dtype = jnp.dtype(attn["wqkv"].dtype)
  dtype = packed8.CONTAINED.get(dtype, dtype)
  mode = next(m for m, t in STORAGE.items() if jnp.dtype(t) == dtype)
  return Quant(mode, EMBED + SCALE in params)


def scale_path(path: tuple[str, ...]) -> tuple[str, ...]:
  return path[:-1] + (path[-1] + SCALE,)


def reduced_axes(path: tuple[str, ...], ndim: int, lead: int) -> tuple[int, ...]:
  """Axes of a stored leaf that one scale spans; block leaves lead with `lead` layer axes."""
  if path == (EMBED,):
    return (ndim - 1,)
  lead = lead if path[0] == "blocks" else 0
  return tuple(range(lead, lead + INPUT_DIMS[path[-1]]))


def scale_shape(path: tuple[str, ...], shape: tuple[int, ...], lead: int) -> tuple[int, ...]:
  axes = reduced_axes(path, len(shape), lead)
  return tuple(n for i, n in enumerate(shape) if i not in axes)


def quantize(w, mode: str, axes: tuple[int, ...], scale_dtype):
  """(8-bit weight, scale): w ≈ q * scale, one scale per index of the axes not in `axes`.

  The scale maps each channel's largest magnitude onto the storage type's largest value;
  all-zero channels (padding layers) get scale 1 so they stay exactly zero.
  """
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / LARGEST[mode], 1.0)
  q = w / scale
  if mode == "int8":
    q = jnp.round(q)
  q = jnp.clip(q, -LARGEST[mode], LARGEST[mode]).astype(STORAGE[mode])
  return q, jnp.squeeze(scale, axes).astype(scale_dtype)


def dequantize(q, scale, axes: tuple[int, ...], dtype):
  """The weight a quantised leaf (packed or not) stands for (tests and reference checks)."""
  wide = packed8.unpack(q).astype(jnp.float32)
  return (wide * jnp.expand_dims(scale.astype(jnp.float32), axes)).astype(dtype)


def einsum(spec: str, x, w, scale=None):
  """`jnp.einsum(spec, x, w)` for a plain or quantised weight (scale over output dims), or
  for `w` an `int8_matmul.LayerWeight` (its scale inside; `spec` must contract x's trailing
  dims with the weight's leading ones, as every block projection does), the 8-bit kernel."""
  if isinstance(w, int8_matmul.LayerWeight):
    return int8_matmul.project(x, w)
  if scale is None:
    return jnp.einsum(spec, x, w)
  return jnp.einsum(spec, x, packed8.unpack(w).astype(x.dtype)) * scale.astype(x.dtype)


def store(out: dict, path: tuple[str, ...], leaf, quant: Quant, lead: int,
          shardings: dict | None = None, free: bool = False) -> None:
  """Puts `leaf` into the flat tree `out` as `quant` stores it: as it is, or in 8 bits with
  its scale, computed on the leaf's devices in one jitted program.

  `lead`: the stacked layer axes of block leaves ([L] = 1, [pp, v, Lc] = 3). `shardings`
  (flat, for the stored tree) places the 8-bit leaf and its scale. `free` deletes the wide
  leaf once quantised, so a loader holds at most one leaf in both forms.
  """
  if not quant.applies(path):
    out[path] = leaf
    return
  scale = scale_path(path)
  axes = reduced_axes(path, np.ndim(leaf), lead)

  def fn(w):
    q, s = quantize(w, quant.mode, axes, leaf.dtype)
    return (packed8.pack(q) if packs(path) else q), s

  placed = None if shardings is None else (shardings[path], shardings[scale])
  out[path], out[scale] = jax.jit(fn, out_shardings=placed)(leaf)
  if free:
    leaf.delete()


def check_backend(quant: Quant, device: jax.Device) -> None:
  """fp8 needs float8_e4m3fn arithmetic on the device; a one-line error where it is missing."""
  if quant.mode != "fp8":
    return
  if not runs_fp8(device):
    raise JaxppError(f"quant='fp8' is not supported on {device.platform} "
                     f"({device.device_kind}): its XLA backend cannot convert float8_e4m3fn; "
                     "use quant='int8'")


def runs_fp8(device: jax.Device) -> bool:
  """Compiles and runs a tiny fp8 -> float matmul on `device`; False if XLA refuses."""
  try:
    w = jax.device_put(np.full((8, 8), 0.5, STORAGE["fp8"]), device)
    y = jax.jit(lambda w: jnp.ones((1, 8), jnp.float32) @ w.astype(jnp.float32))(w)
    return bool(np.allclose(np.asarray(y), 4.0))
  except Exception:  # any compile or runtime failure means "not supported here"  # noqa: BLE001
    return False
