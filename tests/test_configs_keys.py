"""Every run config has exactly the fields of `configs/harbor.py`, with the same value types.

The loader locks the config and rejects unknown keys, so a config that lacks a field cannot
take its `--config.a.b=...` override, and one with an extra field is a field no code reads.
ml_collections also parses an override by the type of the value it replaces: `top_p = 1`
(int) would refuse `--config.sampling.top_p=0.9`. Comparing every config against the
reference keeps them from drifting apart as new knobs are added to harbor.py.
"""

import importlib.util
import pathlib

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = REPO / "configs" / "harbor.py"
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if p != REFERENCE)


def load_config(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"config_keys_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type]:
  """Dotted path -> value type for every leaf ('mesh.pp' -> int), groups recursed into."""
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out[path] = ml_collections.ConfigDict  # an empty group is still a group
      out.update(leaves(value, path + "."))
    else:
      out[path] = type(value)
  return out


def test_there_is_a_reference_config():
  assert REFERENCE.is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_same_keys_as_harbor(path):
  want, got = leaves(load_config(REFERENCE)), leaves(load_config(path))
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  assert not missing and not extra, f"{path.name}: missing {missing}, extra {extra}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_same_value_types_as_harbor(path):
  """Overrides parse by the default's type; None (a placeholder) matches any type."""
  want, got = leaves(load_config(REFERENCE)), leaves(load_config(path))
  differ = {k: (want[k].__name__, got[k].__name__) for k in sorted(set(want) & set(got))
            if want[k] is not got[k] and type(None) not in (want[k], got[k])}
  assert not differ, f"{path.name}: (harbor type, this type) differ for {differ}"
