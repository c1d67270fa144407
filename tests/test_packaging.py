"""Packaging: the repository's top-level folders install as ONE namespace, `wbcache`.

docs/design.md: `wal/`, `recovery/`, `cli/` and `fault_injection/` are mapped to `wbcache.wal`, ...
so nothing named `wal` or `cli` ever lands in site-packages. These tests build a real wheel,
look inside it, install it into a bare target directory and import it from there.

The wheel is built from a copy of the repository, so that setuptools' `build/` and
`*.egg-info` directories never appear in the working tree. The build uses pip's build
isolation: the venv's setuptools is older than pyproject.toml's `setuptools>=68` and has no
`bdist_wheel` command, so pip fetches the declared build requirements (from PyPI or its cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAPPED_FOLDERS = ("wal", "recovery", "cli", "fault_injection")
MODULES = ("wbcache", "wbcache.wal", "wbcache.recovery", "wbcache.cli",
           "wbcache.fault_injection", "wbcache.backends",
           # the C fast paths, compiled by the wheel's build
           "wbcache.wal._walk", "wbcache.wal._sync", "wbcache._hit", "wbcache.backends._pairs")
EXPECTED_FILES = (
    "wbcache/__init__.py",
    "wbcache/py.typed",
    "wbcache/errors.py",
    "wbcache/cache.py",
    "wbcache/backends/lmdb.py",
    "wbcache/wal/__init__.py",
    "wbcache/wal/format.py",
    "wbcache/wal/reader.py",
    "wbcache/wal/writer.py",
    "wbcache/wal/segments.py",
    "wbcache/wal/commit.py",
    "wbcache/recovery/__init__.py",
    "wbcache/recovery/scan.py",
    "wbcache/recovery/replay.py",
    "wbcache/cli/__init__.py",
    "wbcache/fault_injection/__init__.py",
)


def _pip(*args: str, cwd: Path) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.so"))
    out = work / "wheelhouse"
    _pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(source), cwd=work)
    wheels = list(out.glob("wbcache-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def site(wheel: Path) -> Path:
    target = wheel.parent.parent / "site"
    _pip("install", "--no-deps", "--quiet", "--target", str(target), str(wheel),
         cwd=wheel.parent)
    return target


def _top_level(names: list[str]) -> set[str]:
    return {name.split("/", 1)[0] for name in names}


def test_wheel_holds_only_the_wbcache_package_and_its_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()

    top = _top_level(names)
    dist_info = [name for name in top if name.endswith(".dist-info")]

    assert len(dist_info) == 1 and dist_info[0].startswith("wbcache-")
    assert top == {"wbcache", dist_info[0]}
    for folder in (*MAPPED_FOLDERS, "tests", "bench"):
        assert folder not in top
    assert not [name for name in names if name.startswith("wbcache/tests/")]


def test_wheel_maps_every_folder_into_the_wbcache_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(name.split("/")[0] for name in names if ".dist-info/" in name)
        top_level_txt = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()

    missing = [name for name in EXPECTED_FILES if name not in names]
    assert missing == []
    assert top_level_txt == ["wbcache"]
    assert "wbcache = wbcache.cli:main" in entry_points


def test_installed_wheel_adds_only_wbcache_to_site_packages(site: Path) -> None:
    entries = {path.name for path in site.iterdir()}
    # `pip install --target` puts console scripts in bin/; that is pip's layout, not ours.
    scripts = sorted(path.name for path in (site / "bin").iterdir()) if "bin" in entries else []

    packages = entries - {"bin"}
    dist_info = [name for name in packages if name.endswith(".dist-info")]

    assert len(dist_info) == 1 and dist_info[0].startswith("wbcache-")
    assert packages == {"wbcache", dist_info[0]}
    assert scripts in ([], ["wbcache"])
    assert (site / "wbcache" / "py.typed").is_file()
    assert (site / "wbcache" / "wal" / "format.py").is_file()


def test_installed_wheel_imports_every_subpackage_from_the_install(
        site: Path, tmp_path: Path) -> None:
    program = (
        "import importlib, json, importlib.util\n"
        f"names = {list(MODULES)!r}\n"
        "files = {name: importlib.import_module(name).__file__ for name in names}\n"
        "from wbcache.cli import main\n"
        "files['cli.main callable'] = callable(main)\n"
        "files['bare wal importable'] = importlib.util.find_spec('wal') is not None\n"
        "print(json.dumps(files))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)
    assert files.pop("cli.main callable") is True
    assert files.pop("bare wal importable") is False
    root = site.resolve()
    for name, file in files.items():
        assert Path(file).resolve().is_relative_to(root), f"{name} imported from {file}"
    assert Path(files["wbcache"]).resolve() == root / "wbcache" / "__init__.py"
