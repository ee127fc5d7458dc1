"""The house's rules, checked on the source: wings import only downwards, no import circles,
no file past its size, no absl flag defined on import.

The wings follow the data path (docs/design.md). `ALLOWED[w]` lists the wings a module of
wing `w` may import besides its own; anything else (a lower wing reaching up, or two wings
leaning on each other) fails here with the offending file, line and import. Imports inside
functions and under `TYPE_CHECKING` count too: a lazy import hides a circle, it does not
remove one.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "jaxpp"
MAX_LINES = 400

VOCABULARY = {"errors", "axes"}  # root modules every wing may use
ALLOWED = {
    "errors": set(), "axes": set(),
    "model": VOCABULARY,
    "parallel": VOCABULARY | {"model"},
    "load": VOCABULARY | {"model", "parallel"},
    "serve": VOCABULARY | {"model", "parallel"},
    "llm": VOCABULARY | {"model", "parallel", "load", "serve"},
    "dist": VOCABULARY | {"parallel"},
    "plan": VOCABULARY | {"model", "parallel"},
    "job": VOCABULARY | {"model", "parallel", "load", "serve", "llm", "dist"},
    "bench": VOCABULARY | {"model", "parallel", "load", "serve", "llm", "dist", "plan", "job"},
    "run": VOCABULARY | {"dist", "job"},
    "__init__": VOCABULARY | {"llm", "parallel"},
}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def wing(module: str) -> str:
  """'jaxpp.parallel.pipeline' -> 'parallel'; 'jaxpp' (the package face) -> '__init__'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def imports(path: pathlib.Path, root: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) for every import of the package in a file, resolved to modules."""
  package = root.name
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names
                if a.name.split(".")[0] == package]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
        node.module.split(".")[0] == package):
      base = root.parent.joinpath(*node.module.split("."))
      for a in node.names:
        is_module = (base / f"{a.name}.py").is_file() or (base / a.name).is_dir()
        found.append((node.lineno, f"{node.module}.{a.name}" if is_module else node.module))
  return found


def violations(root: pathlib.Path) -> list[str]:
  """Every wing rule a package breaks, one line each; [] when the house is in order."""
  problems, graph = [], {}
  files = sorted(root.rglob("*.py"))
  for path in files:
    here = module_name(path, root)
    graph[here] = set()
    for line, target in imports(path, root):
      graph[here].add(target)
      src, dst = wing(here), wing(target)
      if dst != src and dst not in ALLOWED.get(src, set()):
        problems.append(f"{path.relative_to(root.parent)}:{line}: wing {src!r} imports "
                        f"{target} of wing {dst!r}")
  problems += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
  return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import circles among the package's modules (one path around each)."""
  found, state = [], {}

  def visit(node: str, path: list[str]) -> None:
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if nxt not in graph:
        continue
      if state.get(nxt) == "open":
        found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


def test_wings_import_only_downwards_and_nothing_circles():
  assert violations(PACKAGE) == []


def test_the_checker_catches_a_bad_import_and_a_circle(tmp_path):
  """The rule can fail: a model module that imports the pipeline, and a circle."""
  root = tmp_path / "jaxpp"
  for folder in ("model", "parallel", "serve"):
    (root / folder).mkdir(parents=True)
    (root / folder / "__init__.py").write_text('"""A wing."""\n')
  (root / "__init__.py").write_text("")
  (root / "model" / "llama.py").write_text("from jaxpp.parallel import pipeline\n")
  (root / "parallel" / "pipeline.py").write_text("import jaxpp.model.llama\n")
  (root / "serve" / "engine.py").write_text("def f():\n  from jaxpp.serve import loop\n")
  (root / "serve" / "loop.py").write_text("from jaxpp.serve.engine import f\n")
  found = violations(root)
  assert "jaxpp/model/llama.py:1: wing 'model' imports jaxpp.parallel.pipeline of wing " \
         "'parallel'" in found
  assert any(f.startswith("import circle:") and "jaxpp.model.llama" in f for f in found)
  assert any(f.startswith("import circle:") and "jaxpp.serve.loop" in f for f in found)


def test_every_module_belongs_to_a_wing_with_a_docstring():
  for path in sorted(PACKAGE.rglob("*.py")):
    assert wing(module_name(path, PACKAGE)) in ALLOWED, f"{path}: no wing"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: no module docstring"


def test_no_file_is_past_its_size():
  for path in sorted(list(PACKAGE.rglob("*.py")) + list((REPO / "tools").glob("*.py"))):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines (> {MAX_LINES})"


def test_importing_jaxpp_defines_no_flags():
  """Entry points define their flags when they run; a library import defines none."""
  show = "; print(' '.join(sorted(absl.flags.FLAGS)))"
  base = "import absl.flags, absl.logging"  # absl's logging flags come with any dependency
  code = base + ", jaxpp.job.runner, jaxpp.bench.suite, jaxpp.plan.recommend" + show
  before = subprocess.run([sys.executable, "-c", base + show], capture_output=True, text=True)
  after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert after.returncode == 0, after.stderr[-2000:]
  assert set(after.stdout.split()) - set(before.stdout.split()) == set()


@pytest.mark.parametrize("doc", sorted(p.relative_to(REPO).as_posix() for p in
                                       [REPO / "README.md", *(REPO / "docs").glob("*.md")]))
def test_docs_point_only_at_files_in_the_repository(doc):
  """Every repository path a doc names in backticks (`jaxpp/...`, `docs/...`) exists."""
  import re
  text = (REPO / doc).read_text()
  named = set(re.findall(r"`((?:jaxpp|docs|tools|configs|tests|models|data)/[\w./-]+)`", text))
  missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
  assert missing == [], f"{doc} names files that are not in the repository: {missing}"
