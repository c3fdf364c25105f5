"""The package's import rules (docs/structure.md), checked from the source with ast so they stay true.

- `ops` imports nothing of the package but `errors`;
- `layers` imports only `ops`, `config` and `errors`;
- the engine imports neither `layers` nor `ops`;
- the server and the CLI import no engine internals and read no private attributes of other objects;
- `train` imports only `models`, `layers`, `ops`, `loader`, `config`, `errors` and `tools` (never the engine,
  the server or the CLI).

Every import counts: module level, inside functions, and under `TYPE_CHECKING` alike, except that
`layers` may name other packages' types under `if TYPE_CHECKING:` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kimi_linear"

ENGINE_INTERNALS = {"scheduler", "block_pool", "state_pool", "model_runner", "memory", "cuda_graph",
                    "input_batch", "block_table", "sampler", "step_result", "overlap"}


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, skip_type_checking: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every `kimi_linear` import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if skip_type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                for sub in node.body:
                    skipped.update(id(n) for n in ast.walk(sub))
    rel_pkg = path.relative_to(PKG.parent).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kimi_linear")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = rel_pkg[:-node.level] if path.name != "__init__.py" else rel_pkg[:len(rel_pkg) - node.level + 1]
                mod = ".".join(base + ((node.module,) if node.module else ()))
            else:
                mod = node.module or ""
            if mod.startswith("kimi_linear"):
                # `from kimi_linear import x` imports the subpackage x when x is one
                names = [f"{mod}.{a.name}" for a in node.names] if mod == "kimi_linear" else [mod]
                out += [(node.lineno, m) for m in names]
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(sub: str, allowed: set[str], skip_type_checking: bool = False) -> list[str]:
    bad = []
    for f in _files(sub):
        for line, mod in _imports(f, skip_type_checking):
            top = _top(mod)
            if top != sub and top not in allowed:
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
    return bad


def test_ops_import_only_errors():
    assert _violations("ops", {"errors"}) == []


def test_layers_import_only_ops_config_errors():
    assert _violations("layers", {"ops", "config", "errors"}, skip_type_checking=True) == []


def test_engine_imports_no_layers_or_ops():
    bad = [v for v in _violations("engine", set(), False)
           if _top(v.rsplit(" ", 1)[1]) in {"layers", "ops"}]
    assert bad == []


def test_train_imports_no_engine_server_or_cli():
    assert _violations("train", {"models", "layers", "ops", "loader", "config", "errors", "tools"}) == []


@pytest.mark.parametrize("sub", ["server", "cli"])
def test_frontends_use_no_engine_internals(sub):
    bad = []
    for f in _files(sub):
        for line, mod in _imports(f):
            parts = mod.split(".")
            if len(parts) >= 3 and parts[1] == "engine" and parts[2] in ENGINE_INTERNALS:
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
            if len(parts) >= 2 and parts[1] in {"layers", "ops"}:
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
    assert bad == []


@pytest.mark.parametrize("sub", ["server", "cli"])
def test_frontends_read_no_private_attributes(sub):
    """`obj._x` is allowed only on `self` / `cls` (an object's own state) and on the standard library's
    argparse (`argparse._SubParsersAction` is the documented type of `add_subparsers()`)."""
    bad = []
    for f in _files(sub):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not (node.attr.startswith("__") and node.attr.endswith("__"))
                    and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", "argparse"})):
                bad.append(f"{f.relative_to(PKG.parent)}:{node.lineno} reads .{node.attr}")
    assert bad == []


def test_rules_see_imports():
    """The checker itself finds imports (guards against a vacuous pass)."""
    found = _imports(PKG / "engine" / "llm_engine.py")
    assert any(m.startswith("kimi_linear.engine") for _, m in found)
