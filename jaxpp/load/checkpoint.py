"""Weights in and out: Hugging Face safetensors checkpoints, and orbax for our own layout.

`load_hf_params` streams, one HF tensor at a time. Each leaf is built on its devices: every
tensor a local shard needs (for stacked block leaves, only the layers on the shard's slice
of the leading axes) is read once from the memory-mapped safetensors files, copied as it is
stored to each device whose shard holds it, and converted there (transposed into our
layout, fused, sliced to the shard, cast) into a preallocated shard buffer; a fused leaf's
layer (wqkv from q_proj, k_proj and v_proj) gathers its tensors there first. With pipeline
shardings such as `P('pp', None, 'tp', None)` a stage therefore reads only its own layers,
the host holds two tensors at a time (one being placed, the next being read by a reader
thread, so reading the files overlaps the devices' work; `ReadClock` times the reads), and
the transposes run at device memory speed: on the host numpy moves a transposed bf16 matrix
at 0.3 GB/s (1.3 in bands of rows on a thread): an 89 s load of an 8B model on an H200.

Everything is validated (tensor present, HF shape as `config.json` implies) before the first
byte of weights is read, so a wrong checkpoint fails in a second with a one-line `JaxppError`
instead of an XLA shape error minutes into a load.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxpp.errors import JaxppError
from jaxpp.model import params as params_lib
from jaxpp.model import quant as quant_lib
from jaxpp.model.config import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _existing_dir(ckpt_dir) -> pathlib.Path:
  d = pathlib.Path(ckpt_dir)
  if not d.is_dir():
    raise JaxppError(f"checkpoint directory {d} does not exist")
  return d


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise JaxppError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                     ) from None
  if not isinstance(data, dict):
    raise JaxppError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def load_config(ckpt_dir) -> LlamaConfig:
  """The architecture from `config.json`; `generation_config.json` (if any) adds EOS ids.

  Chat models list their end-of-turn tokens only in `generation_config.json`, so it is read
  too; without it generation would run past the end of a reply.
  """
  d = _existing_dir(ckpt_dir)
  config_path = d / "config.json"
  if not config_path.is_file():
    raise JaxppError(f"checkpoint {d}: no config.json")
  generation_path = d / "generation_config.json"
  generation = _read_json(generation_path) if generation_path.is_file() else None
  return LlamaConfig.from_hf(_read_json(config_path), generation=generation,
                             source=str(config_path))


# safetensors dtype codes -> names; what `checkpoint_dtype` reports
_STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def checkpoint_dtype(ckpt_dir) -> str:
  """The dtype the checkpoint declares, as transformers' `dtype="auto"` picks it:
  config.json's `torch_dtype` (`dtype` from transformers 5), else the stored dtype of the
  embedding."""
  d = _existing_dir(ckpt_dir)
  config_path = d / "config.json"
  hf = _read_json(config_path) if config_path.is_file() else {}
  name = hf.get("torch_dtype") or hf.get("dtype")
  if name is None:
    with contextlib.ExitStack() as stack:
      code = _Reader(d, stack, framework="numpy").dtype("model.embed_tokens.weight")
    name = _STORED_DTYPES.get(code, code)
  return str(name)


# --- Hugging Face safetensors ----------------------------------------------------------------


def _tensor_files(d: pathlib.Path) -> dict[str, pathlib.Path] | pathlib.Path:
  """Tensor name -> file for a sharded checkpoint, or the one file of an unsharded one."""
  single, index = d / SINGLE_FILE, d / INDEX_FILE
  if single.is_file():
    return single
  if not index.is_file():
    raise JaxppError(f"checkpoint {d}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise JaxppError(f"{index}: no 'weight_map' object")
  files = {name: d / fname for name, fname in weight_map.items()}
  for fname in sorted(set(weight_map.values())):
    if not (d / fname).is_file():
      raise JaxppError(f"checkpoint {d}: {INDEX_FILE} names missing file {fname!r}")
  return files


def _host_device() -> jax.Device:
  """This process's own CPU device: in a multi-process run `jax.devices()` lists every
  process's devices, and only local ones can hold the tensors read here."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    raise JaxppError("loading safetensors needs JAX's cpu backend; add 'cpu' to "
                     "JAX_PLATFORMS (e.g. JAX_PLATFORMS=cuda,cpu)") from None


@dataclasses.dataclass
class ReadClock:
  """Seconds and bytes spent reading tensors out of the checkpoint's files (the reads run
  on a reader thread, beside the devices' conversions: the job reports them apart)."""

  seconds: float = 0.0
  bytes: int = 0

  def __post_init__(self):
    self._lock = threading.Lock()

  def add(self, seconds: float, nbytes: int) -> None:
    with self._lock:
      self.seconds += seconds
      self.bytes += nbytes


class _Reader:
  """Keeps safetensors files open (memory-mapped, once each) and reads one tensor at a time.

  safetensors' numpy framework cannot return bfloat16, so the flax framework is used with
  the CPU device as default: tensors land in host memory and `np.asarray` views them as
  ml_dtypes arrays, which are then sliced and cast on the host before placement.
  """

  def __init__(self, d: pathlib.Path, stack: contextlib.ExitStack, framework: str = "flax",
               clock: ReadClock | None = None):
    """`framework="numpy"` serves names and shapes only (its reads cannot give bfloat16)
    and needs no JAX backend; `clock` sums the reads' time."""
    self._dir = d
    self.clock = clock or ReadClock()
    self._stack = stack
    self._files = _tensor_files(d)
    self._handles: dict[pathlib.Path, Any] = {}
    self._framework = framework
    self._host = _host_device() if framework == "flax" else None
    if isinstance(self._files, pathlib.Path):
      self._names = set(self._open(self._files).keys())
    else:
      self._names = set(self._files)

  def _open(self, file: pathlib.Path):
    if file not in self._handles:
      with contextlib.ExitStack() as on_host:
        if self._host is not None:
          on_host.enter_context(jax.default_device(self._host))
        self._handles[file] = self._stack.enter_context(_safe_open(file, self._framework))
    return self._handles[file]

  def open_all(self) -> None:
    """Opens every file now, so a corrupt one is refused before any tensor is read."""
    files = [self._files] if isinstance(self._files, pathlib.Path) else self._files.values()
    for file in sorted(set(files)):
      self._open(file)

  def _slice(self, name: str):
    file = self._files if isinstance(self._files, pathlib.Path) else self._files[name]
    try:
      return self._open(file).get_slice(name)
    except SafetensorError:  # only possible when the index lies about which file holds it
      raise JaxppError(f"checkpoint {self._dir}: {INDEX_FILE} maps tensor {name!r} to "
                       f"{file.name!r}, which does not contain it") from None

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._names:
      raise JaxppError(f"checkpoint {self._dir}: missing tensor {name!r}")
    return tuple(self._slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The stored dtype code (safetensors': "BF16", "F32", ...)."""
    self.shape(name)  # a missing name is a one-line error
    return self._slice(name).get_dtype()

  def read(self, name: str) -> np.ndarray:
    start = time.perf_counter()
    with jax.default_device(self._host):
      out = np.asarray(self._slice(name)[:])
    self.clock.add(time.perf_counter() - start, out.nbytes)
    return out

  def read_ahead(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor) for each name in turn, the next one read on a thread while the
    caller places this one: the host holds at most two tensors."""
    if not names:
      return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpp-read") as pool:
      pending = pool.submit(self.read, names[0])
      for i, name in enumerate(names):
        raw = pending.result()
        if i + 1 < len(names):
          pending = pool.submit(self.read, names[i + 1])
        yield name, raw
        del raw


def _safe_open(file: pathlib.Path, framework: str):
  """safetensors' reader for a file; a corrupt or truncated file is one JaxppError naming it
  (safetensors checks the header and that the data covers every tensor's offsets)."""
  try:
    return safe_open(str(file), framework=framework)
  except (SafetensorError, OSError) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise JaxppError(f"checkpoint file {file}: unreadable safetensors ({reason})") from None


def check_checkpoint(ckpt_dir, cfg: LlamaConfig) -> None:
  """Refuses a checkpoint whose files are missing, corrupt or truncated, or whose tensors
  lack a name or a shape `config.json` implies; reads headers only, so a job can call it
  before anything compiles or any device is probed."""
  d = _existing_dir(ckpt_dir)
  with contextlib.ExitStack() as stack:
    reader = _Reader(d, stack, framework="numpy")
    reader.open_all()
    _validate(reader, cfg, d)


def _layer_names(src: params_lib.HFSource, i: int) -> tuple[str, ...]:
  """The HF tensors of layer `i` of a leaf (an unstacked leaf's names have no `{i}`)."""
  return tuple(name.format(i=i) for name in src.names)


def _validate(reader: _Reader, cfg: LlamaConfig, d: pathlib.Path) -> None:
  """Every tensor the config implies is present with the shape the config implies."""
  for path in params_lib.leaf_shapes(cfg):
    src = params_lib.hf_source(path, cfg)
    for i in range(cfg.num_layers if src.stacked else 1):
      for name, want in zip(_layer_names(src, i), params_lib.hf_shapes(path, cfg)):
        if (got := reader.shape(name)) != want:
          raise JaxppError(f"checkpoint {d}: tensor {name!r} has shape {got} but "
                           f"config.json implies {want}")


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(shard: jax.Array, pos: jax.Array, value: jax.Array) -> jax.Array:
  """shard[pos] = value in place (the buffer is donated): `pos` indexes the leading axes."""
  start = tuple(pos) + (0,) * value.ndim
  return jax.lax.dynamic_update_slice(shard, value.reshape((1,) * pos.shape[0] + value.shape),
                                      start)


def _place_leaf(reader: _Reader, path: params_lib.Path, cfg: LlamaConfig, dtype: np.dtype,
                shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                layer_index: np.ndarray) -> jax.Array:
  """One leaf, built shard by shard on this process's devices (see the module docstring).

  Stacked leaves lead with `layer_index.shape` (e.g. [L], or [pp, v, layers_per_chunk] for
  a pipeline); padding slots (-1) stay zero. A tensor is read once however many devices
  need it (replication over 'tp', say), and the next is read only once the devices have
  taken it, so the host holds one tensor at a time.
  """
  src = params_lib.hf_source(path, cfg)
  lead = layer_index.ndim if src.stacked else 0
  indices = sharding.addressable_devices_indices_map(shape)
  shards: dict[jax.Device, jax.Array] = {}
  targets = collections.defaultdict(list)  # a layer's HF names -> [(device, pos, rest index)]
  for device, index in indices.items():
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if not src.stacked:
      targets[src.names].append((device, None, index))
      continue
    local = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
    shards[device] = jnp.zeros(local, dtype, device=device)
    for pos, i in np.ndenumerate(layer_index[index[:lead]]):
      if i >= 0:
        targets[_layer_names(src, i)].append((device, np.asarray(pos, np.int32), index[lead:]))
  reads = reader.read_ahead([name for names in targets for name in names])
  for names, places in targets.items():
    parts = collections.defaultdict(list)  # device -> this layer's tensors on it
    for _, raw in itertools.islice(reads, len(names)):
      for device in dict.fromkeys(device for device, _, _ in places):
        parts[device].append(jax.device_put(raw, device))
      jax.block_until_ready(list(parts.values()))
      del raw
    for device, pos, rest in places:
      value = src.to_ours(*parts[device], cfg)[rest].astype(dtype)
      shards[device] = value if pos is None else _write_layer(shards[device], pos, value)
    jax.block_until_ready([shards[device] for device, _, _ in places])
  return jax.make_array_from_single_device_arrays(shape, sharding,
                                                  [shards[d] for d in indices])


def load_hf_params(ckpt_dir, cfg: LlamaConfig, dtype, shardings=None,
                   layer_index: np.ndarray | None = None,
                   quant: quant_lib.Quant = quant_lib.Quant(),
                   read_clock: ReadClock | None = None) -> dict:
  """Reads a HF Llama safetensors checkpoint into our params pytree, placed as asked.

  Args:
    ckpt_dir: directory with `model.safetensors` or `model.safetensors.index.json` + shards.
    cfg: the architecture (usually `load_config(ckpt_dir)`); shapes are checked against it.
    dtype: dtype of the weight leaves; norm scales are always float32.
    shardings: a pytree like the params of `jax.sharding.Sharding`s, or None for everything
      on `jax.devices()[0]`.
    layer_index: int array giving the model layer at each slot of the stacked leaves'
      leading axes (-1 = zero padding); default `arange(L)`. A pipeline passes
      `Partition.layer_index()` ([pp, v, layers_per_chunk]).
    quant: 8-bit weights (quant.py). Each covered leaf is read in `dtype` onto its devices,
      quantised there and dropped before the next leaf is read, so the devices hold at most
      one leaf in both forms.
    read_clock: sums the time and bytes of the file reads (`ReadClock`).

  Returns a nested dict with the structure of `params.abstract_params(cfg, dtype, ...,
  quant)`. With tied embeddings there is no `lm_head` leaf (a stray `lm_head.weight` in the
  files is ignored).
  """
  d = _existing_dir(ckpt_dir)
  layer_index = np.arange(cfg.num_layers) if layer_index is None else np.asarray(layer_index)
  abstract = params_lib.flatten(params_lib.abstract_params(cfg, dtype, layer_index.shape))
  stored = params_lib.flatten(params_lib.abstract_params(cfg, dtype, layer_index.shape, quant))
  if shardings is None:
    flat_shardings = {p: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for p in stored}
  else:
    flat_shardings = params_lib.flatten(shardings)
    if set(flat_shardings) != set(stored):
      missing = sorted("/".join(p) for p in set(stored) - set(flat_shardings))
      extra = sorted("/".join(p) for p in set(flat_shardings) - set(stored))
      raise JaxppError(f"shardings do not match the params tree: missing {missing}, "
                       f"unexpected {extra}")
  out = {}
  with contextlib.ExitStack() as stack:
    reader = _Reader(d, stack, clock=read_clock)
    _validate(reader, cfg, d)
    for path, aval in abstract.items():
      leaf = _place_leaf(reader, path, cfg, np.dtype(aval.dtype), aval.shape,
                         flat_shardings[path], layer_index)
      quant_lib.store(out, path, leaf, quant, layer_index.ndim, flat_shardings, free=True)
  return params_lib.nest(out)


# --- orbax -----------------------------------------------------------------------------------


def _orbax_path(path) -> str:
  """orbax wants absolute paths; remote URLs (gs://...) pass through untouched."""
  s = os.fspath(path)
  return s if "://" in s else str(pathlib.Path(s).expanduser().resolve())


def save_params(path, params, *, force: bool = False) -> None:
  """Writes params (any sharding) as an orbax checkpoint; blocks until it is on disk.

  A converted checkpoint restores straight onto a pipeline's shardings, skipping the
  per-layer transposes of the HF path. An existing `path` is an error unless `force`.
  """
  import orbax.checkpoint as ocp  # imported lazily: orbax pulls in a lot at import time

  target = _orbax_path(path)
  if not force and "://" not in target and os.path.exists(target):
    raise JaxppError(f"orbax checkpoint {target} already exists (pass force=True to overwrite)")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params, force=force)
    ckptr.wait_until_finished()


def restore_params(path, target) -> dict:
  """Restores params saved by `save_params` onto `target`'s shapes, dtypes and shardings.

  `target` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g.
  `params.abstract_params(cfg, dtype)` with shardings attached; each device reads only its
  own shard, so the restore sharding need not match the one that was saved.
  """
  import orbax.checkpoint as ocp

  source = _orbax_path(path)
  if "://" not in source and not os.path.isdir(source):
    raise JaxppError(f"orbax checkpoint {source} does not exist")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(source, target)
