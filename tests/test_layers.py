"""The layers (docs/design.md), checked on the source: who may import whom, and what an import
loads at run time.

`python tests/test_layers.py` prints every module -> module edge between wbcache modules
(imports inside functions included, marked "(lazy)"), the forbidden ones flagged.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject.toml, [tool.setuptools.package-dir])
PACKAGES = {"wbcache": "wbcache", "wal": "wbcache.wal", "recovery": "wbcache.recovery",
            "cli": "wbcache.cli", "fault_injection": "wbcache.fault_injection"}

# Layers, bottom first. A module may import its own layer and those below it, never above.
ERRORS, WAL, RECOVERY, CORE, FAULTS, CLI = range(6)
# What fault_injection may take from wbcache.wal: the hooks the log offers a harness.
WAL_HOOKS = {"wbcache.wal.format", "wbcache.wal.syscalls", "wbcache.wal.crashpoints",
             "wbcache.wal.reader", "wbcache.wal.records"}


def layer(module: str) -> int:
    if module in ("wbcache.errors", "wbcache.backends.base"):  # leaves: import no wbcache
        return ERRORS
    for prefix, level in (("wbcache.wal", WAL), ("wbcache.recovery", RECOVERY),
                          ("wbcache.fault_injection", FAULTS), ("wbcache.cli", CLI)):
        if module == prefix or module.startswith(prefix + "."):
            return level
    return CORE


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, lazy) for every import of a wbcache module or of `bench`; `lazy`
    when the import is inside a function or under `if TYPE_CHECKING:` (typing only)."""
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                targets += [f"{node.module}.{alias.name}" for alias in node.names
                            if f"{node.module}.{alias.name}" in known]
            else:
                continue
            for target in targets:
                if target.startswith("wbcache") or target.split(".")[0] == "bench":
                    found.append((name, target, id(node) not in top_level))
    return found


def problem(importer: str, imported: str) -> str | None:
    if imported.split(".")[0] == "bench":
        return "imports bench (not shipped)"
    if importer == imported or imported == "wbcache":
        return None
    low, high = layer(imported), layer(importer)
    if high == FAULTS and low == WAL and imported not in WAL_HOOKS:
        return "fault_injection reaches into a wal internal that is not a declared hook"
    if high == FAULTS and low == RECOVERY:
        return "fault_injection reaches into recovery (use the public API)"
    if low > high:
        return "a lower layer imports a higher one"
    return None


def test_no_module_imports_a_layer_above_it_nor_bench() -> None:
    forbidden = [f"{importer} -> {imported}: {why}" for importer, imported, _ in edges()
                 if (why := problem(importer, imported)) is not None]
    assert not forbidden, "\n".join(forbidden)


def test_the_checker_catches_a_forbidden_edge() -> None:
    assert problem("wbcache.wal.reader", "wbcache.cache") is not None
    assert problem("wbcache.recovery.replay", "wbcache.sequencer") is not None
    assert problem("wbcache.cache", "bench.harness") is not None
    assert problem("wbcache.fault_injection.kill", "wbcache.wal.commit") is not None
    assert problem("wbcache.cache", "wbcache.wal.reader") is None


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_the_log_imports_alone() -> None:
    loaded = loaded_after("import wbcache.wal")
    assert not {"lmdb", "psycopg", "wbcache.cache", "wbcache.sequencer",
                "wbcache.maintenance", "wbcache.recovery", "click"} & loaded


def test_importing_wbcache_loads_neither_a_database_nor_the_cache() -> None:
    loaded = loaded_after("import wbcache")
    assert not {"lmdb", "psycopg", "wbcache.cache", "click"} & loaded


def test_opening_a_cache_does_not_load_psycopg(tmp_path: Path) -> None:
    loaded = loaded_after(f"import wbcache; wbcache.open({str(tmp_path / 'c')!r}).close()")
    assert "wbcache.cache" in loaded and "lmdb" in loaded
    assert not {"psycopg", "wbcache.backends.postgres"} & loaded


def test_async_cache_uses_only_the_public_api_of_the_cache_and_its_sequencer() -> None:
    """wbcache/aio.py's docstring: `Cache`'s public API, the sequencer's,
    `Cache._get_nowait` and `Cache._when_closed`, nothing else (issue 10's bar; a private
    `_check_open` had crept in unseen). Any `x._name` where x is a cache or a sequencer is
    flagged."""
    tree = ast.parse((ROOT / "wbcache" / "aio.py").read_text())
    reached = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not (
                node.attr.startswith("__") and node.attr.endswith("__")):
            owner = node.value
            name = (owner.attr if isinstance(owner, ast.Attribute)
                    else owner.id if isinstance(owner, ast.Name) else "")
            if name.lstrip("_") in ("cache", "sequencer"):
                reached.add(f"{name}.{node.attr}")
    assert reached == {"_cache._get_nowait", "cache._when_closed"}


if __name__ == "__main__":
    for importer, imported, lazy in sorted(set(edges())):
        why = problem(importer, imported)
        print(f"{importer} -> {imported}{' (lazy)' if lazy else ''}"
              f"{'   FORBIDDEN: ' + why if why else ''}")
