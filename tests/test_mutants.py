"""The planted bugs of `mutants/` still apply to the code they mutate.

A mutant whose patch no longer applies proves nothing: `mutants/run.py` would stop at it, and
the mutation tables in docs/torture.md and docs/lazyfs.md would describe code that is gone.
Code moves under the patches all the time; this test says so the moment one rots (regenerate
it as mutants/README.md says). `git apply --check` changes no file. The same holds for the
mutations of the C fast paths (mutants/walk_c.py), which are exact text replacements.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PATCHES = sorted([*(REPO / "mutants" / "patches").glob("*.patch"),
                  *(REPO / "mutants" / "lazyfs").glob("*.patch")])


def test_there_are_mutants_to_check() -> None:
    assert len(PATCHES) >= 15


@pytest.mark.parametrize("patch", PATCHES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_the_patch_applies_to_the_code_it_mutates(patch: Path) -> None:
    git = shutil.which("git")
    assert git, "git is needed to check the mutants' patches"
    check = subprocess.run([git, "apply", "--check", str(patch)], cwd=REPO, capture_output=True,
                           text=True)
    assert check.returncode == 0, f"{patch.name} no longer applies: {check.stderr.strip()}"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_the_patched_python_still_compiles(patch: Path, tmp_path: Path) -> None:
    # A patch regenerated with fuzz once applied, as an IndentationError: every test then
    # failed at import, which catches nothing. Applied to copies of the files it touches.
    git = shutil.which("git")
    assert git, "git is needed to check the mutants' patches"
    names = subprocess.run([git, "apply", "--numstat", str(patch)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()[2::3]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run([git, "apply", str(patch)], cwd=tmp_path, check=True, capture_output=True)
    for name in names:
        if name.endswith(".py"):
            compile((tmp_path / name).read_text(), name, "exec")


def _walk_c() -> Any:
    spec = importlib.util.spec_from_file_location("walk_c", REPO / "mutants" / "walk_c.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "mutants"))  # walk_c imports run, beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "mutants"))
    return module


WALK_C = _walk_c()


@pytest.mark.parametrize("mutation", WALK_C.MUTATIONS, ids=lambda mutation: mutation[0])
def test_the_c_mutation_still_finds_the_text_it_replaces(mutation: tuple[str, str, Any, Any]
                                                         ) -> None:
    """mutants/walk_c.py edits the C files by exact replacement: each text must be there once."""
    name, _, old, _ = mutation
    text = (REPO / WALK_C.source_of(name)[0]).read_text()
    for before in (old,) if isinstance(old, str) else old:
        assert text.count(before) == 1, f"{name} rotted"
