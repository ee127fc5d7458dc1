"""The `Layout` value: names both ways, every rule in one place, one layer split for all.

The runtime (`Pipeline.build`), the bench (`Layout.parse` of its `--layouts`) and the
planner (`estimate`) all resolve a layout through `Layout`, so the planner sizes exactly
the layers that run.
"""

import re

import pytest

from jaxpp import Layout
from jaxpp.errors import JaxppError
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.plan import estimate, presets
from jaxpp.plan.inputs import Workload

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=8,
                   num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("name,layout", [
    ("pp4tp2v2m8p32", Layout(4, 2, virtual_stages=2, microbatches=8, prefill_microbatches=32)),
    ("pp1tp1", Layout()),
    ("pp4tp1", Layout(4)),
    ("pp2tp1m4", Layout(2, microbatches=4)),
    ("dp2pp2tp2", Layout(2, 2, dp=2)),
])
def test_names_parse_and_print(name, layout):
  assert Layout.parse(name) == layout
  assert layout.name == name
  assert Layout.parse(layout.name) == layout


def test_short_names_and_defaults():
  assert Layout.parse("pp4") == Layout(4, 1)
  assert Layout.parse("tp2").name == "pp1tp2"
  assert Layout.parse("pp4m4").name == "pp4tp1"  # m = pp is the default, not printed
  assert Layout(4).m == 4 and Layout(1).m == 1
  assert Layout.parse("pp2", layer_split="balanced").layer_split == "balanced"
  assert str(Layout(2, layer_split="balanced")) == "pp2tp1 (balanced split)"
  for bad in ("", "pp", "4tp2", "pp2tp", "pp2-tp2", "tp2pp2"):
    with pytest.raises(JaxppError, match="is not of the form"):
      Layout.parse(bad)


@pytest.mark.parametrize("layout,message", [
    (Layout(0), "pp=0 must be >= 1"),
    (Layout(2, microbatches=-1), "microbatches=-1 must be >= 0"),
    (Layout(2, prefill_microbatches=-1), "prefill_microbatches=-1 must be >= 0"),
    (Layout(1, 3), "tp=3 does not divide num_attention_heads=4"),
    (Layout(1, 8), "tp=8 does not divide num_attention_heads=4"),
    (Layout(4, virtual_stages=4), "8 layers cannot fill pp\\*virtual_stages=16 chunks"),
    (Layout(4, microbatches=2), "microbatches=2 < pp=4: the decode ring"),
    (Layout(2, virtual_stages=2, prefill_microbatches=1), "prefill_microbatches=1 < pp=2"),
    (Layout(2, layer_split="5,4"), "layer split '5,4' sums to 9 but the model has 8 layers"),
    (Layout(2, layer_split="lopsided"), "layer_split='lopsided' is not one of even, balanced"),
])
def test_every_rule_is_one_line(layout, message):
  assert layout.problem(TINY) is not None
  with pytest.raises(JaxppError, match=f"^layout {layout.name}: {message}"):
    layout.check(TINY)
  with pytest.raises(JaxppError, match=message):
    Pipeline.build(TINY, layout)
  assert "\n" not in layout.problem(TINY)


@pytest.mark.parametrize("layout, n, want", [
    (Layout(1, 1, dp=0), 8, "dp8pp1tp1"), (Layout(2, 2, dp=0), 8, "dp2pp2tp2"),
    (Layout(2, 2, dp=2), 8, "dp2pp2tp2"), (Layout(4, 1), 4, "pp4tp1")])
def test_layout_on_devices(layout, n, want):
  """dp = 0 takes as many replicas as fill the devices; a layout that fills them stays."""
  assert layout.for_devices(n).name == want


@pytest.mark.parametrize("layout, n, message", [
    (Layout(1, 1), 8, "layout pp1tp1 uses 1 of 8 devices; layouts that use all 8: "
                      "dp8pp1tp1, pp8tp1, pp1tp8 (dp=0: as many replicas as fit)"),
    (Layout(4, 1), 6, "layout pp4tp1 uses 4 of 6 devices; layouts that use all 6: pp6tp1, "
                      "dp6pp1tp1"),
    (Layout(3, 1, dp=0), 8, "replicas of pp3tp1 (3 devices) cannot fill 8 devices; "
                            "layouts that use all 8: pp8tp1, dp8pp1tp1"),
    (Layout(1, 1, dp=-1), 8, "pp=1, tp=1 must be >= 1 and dp=-1 >= 0"),
])
def test_layout_that_does_not_fill_the_devices_names_ones_that_do(layout, n, message):
  with pytest.raises(JaxppError, match="^" + re.escape(message)):
    layout.for_devices(n)


def test_good_layouts_pass():
  for layout in (Layout(), Layout(4, 2), Layout(2, 1, virtual_stages=2, microbatches=2),
                 Layout(8, layer_split="balanced"), Layout(2, layer_split="5,3")):
    assert layout.problem(TINY) is None
    assert layout.check(TINY) is layout


@pytest.mark.parametrize("model", ["llama3-8b", "llama3-70b"])
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_balanced_split_is_the_same_in_runtime_bench_and_planner(model, pp):
  cfg, hw = presets.model_config(model), presets.hardware("h200")
  runtime = Pipeline.build(cfg, Layout(pp, layer_split="balanced")).partition.counts
  bench = Layout.parse(f"pp{pp}tp1", layer_split="balanced").partition(cfg).counts
  planner = estimate.layers_per_chunk(cfg, Layout(pp, layer_split="balanced"), hw).counts
  assert runtime == bench == planner
  assert sum(runtime) == cfg.num_layers
  # the planner's memory is that of the split that runs: the longest chunk, padded
  mem = estimate.memory_per_stage(cfg, Layout(pp, layer_split="balanced"), Workload(), hw)
  even = estimate.memory_per_stage(cfg, Layout(pp), Workload(), hw)
  assert (mem.weights > even.weights) == (max(runtime) > -(-cfg.num_layers // pp))


def test_balanced_70b_at_pp4_moves_layers_off_the_head_stage():
  """The LM head (2.1 GB at tp=1) weighs on the last stage; the embedding costs nothing."""
  cfg = presets.model_config("llama3-70b")
  assert Layout(4, layer_split="balanced").partition(cfg).counts == (21, 21, 21, 17)
  # tp=2 splits the head by vocabulary: it weighs half as much against half-size blocks
  assert Layout(4, 2, layer_split="balanced").partition(cfg).counts == (21, 21, 21, 17)
