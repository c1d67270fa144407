"""The planted bugs of `mutants/` still apply to the code they mutate.

A mutant whose patch no longer applies proves nothing: `mutants/run.py` would stop at it, and
the mutation tables in docs/torture.md and docs/lazyfs.md would describe code that is gone.
Code moves under the patches all the time; this test says so the moment one rots (regenerate
it as mutants/README.md says). `git apply --check` changes no file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
