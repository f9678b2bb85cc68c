"""The code's shape, as a newcomer relies on it: stages import one way, each third-party
boundary has one owner, and no module grows past what a reader can hold in their head."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ttsd"
MAX_LINES = 420
"""A module longer than this is split along its seams (about 400 lines, with slack)."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports at run time (``from a import b`` counts a.b when it is
    a module); ``top_level_only``: those imported when the module itself is."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:   # module level, including under ``if TYPE_CHECKING`` / try
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nodes += [n for top in tree.body if isinstance(top, ast.ClassDef)
                  for n in top.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    typing_only = {id(n) for top in tree.body if isinstance(top, ast.If)
                   and getattr(top.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(top)}
    found = set()
    for node in nodes:
        if id(node) in typing_only:   # annotations only: nothing is imported at run time
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in MODULES)
    return found


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their seams: {long}"


def test_module_level_imports_form_no_cycle() -> None:
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_nothing_imports_the_daemon_or_the_cli() -> None:
    """The CLI is the entry point and the daemon the top of the service: nothing below
    them reaches back up (the CLI alone starts the daemon)."""
    for name, path in MODULES.items():
        used = _imports(path, top_level_only=False)
        assert "ttsd.cli" not in used, name
        if name != "ttsd.cli":
            assert "ttsd.service.daemon" not in used, name


@pytest.mark.parametrize(("library", "owner"), [
    ("sqlite3", "ttsd.store"), ("sqlite_utils", "ttsd.store"),
    ("soundfile", "ttsd.output"), ("watchdog", "ttsd.ingest.watch"),
    ("av", "ttsd.output.codecs"), ("soxr", "ttsd.output.levels"), ("scipy", "ttsd.output.levels"),
    ("defusedxml", "ttsd.markup.ssml"),
])
def test_each_library_boundary_has_one_owner(library: str, owner: str) -> None:
    users = sorted(name for name, path in MODULES.items()
                   if any(m == library or m.startswith(library + ".")
                          for m in _imports(path, top_level_only=False))
                   and not (name == owner or name.startswith(owner + ".")))
    assert not users, f"only {owner} imports {library}; also: {users}"


def test_only_the_engine_loads_torch() -> None:
    """Reading inputs, the journal, the cache and the outputs, and `ttsd status`, never
    load torch (seconds of start-up and hundreds of MB): only building an engine does."""
    code = ("import sys\n"
            "import ttsd.cache, ttsd.ingest.files, ttsd.jobs, ttsd.output.wav, "
            "ttsd.service.status, ttsd.service.purge, ttsd.store.journal\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert out.returncode == 0, out.stderr
