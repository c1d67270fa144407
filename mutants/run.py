"""Plant each known bug in a scratch copy of the repository and see which tests catch it.

    python mutants/run.py                      # every mutant, the CI slice of faults and durability
    python mutants/run.py read-ahead-race      # one (or a few) by name
    python mutants/run.py --list
    python mutants/run.py --baseline           # the unmutated copy: everything must pass

For each mutant (patches/<name>.patch, a unified diff against this repository):
  1. copy the repository's files (tracked and untracked, not ignored) to
     SCRATCH/<name>/src, and apply the patch there with `git apply` (never here);
  2. make the copy importable as `wbcache` on its own: the top-level folders install as
     `wbcache.wal`, `wbcache.recovery`, ... (pyproject.toml), so the copy gets symlinks
     wbcache/wal -> ../wal and so on, and PYTHONPATH points at the copy. The interpreter's
     editable install of this repository stays behind PYTHONPATH on the import path; step 3
     proves it is not used. The reader's C fast path is built in the copy from the copy's
     (patched) wal/_walk.c, so a mutant of the C is what the tests run;
  3. check, in a fresh interpreter with that environment, that `wbcache`, every subpackage
     and the C fast path resolve into the copy and that the patched lines are what the copy
     holds;
  4. run the test files with pytest from the copy (PostgreSQL settings are passed through
     from the environment), one JSON line per test (timing_plugin.py), under a time limit.

It writes SCRATCH/results.json and prints, per mutant, which tests failed and how long each
took (its own duration; "at" is the seconds into the run when it failed). A mutant no test
catches is reported as SURVIVED and makes the exit status 1. The table in docs/torture.md is
made from this output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PATCHES = HERE / "patches"
SCRATCH = Path(os.environ.get("MUTANT_SCRATCH", "/tmp/wbcache-mutants"))
# The test files CI runs for faults and durability, harness first.
DEFAULT_TESTS = ("tests/test_fault_*.py", "tests/test_interleavings.py", "tests/test_fork.py",
                 "tests/test_database_durability.py", "tests/test_wal_reader.py",
                 "tests/test_recovery.py", "tests/test_group_commit.py", "tests/test_flusher.py",
                 "tests/test_lmdb_readers.py")
SUBPACKAGES = ("wal", "recovery", "cli", "fault_injection")  # folder -> wbcache.<folder>
TIME_LIMIT = 1800.0  # seconds per mutant run


def mutants() -> list[str]:
    return sorted(path.stem for path in PATCHES.glob("*.patch"))


def repository_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    return [name for name in listed.stdout.decode().split("\0")
            if name and (REPO / name).is_file() and not name.startswith("mutants/")]


def make_copy(name: str) -> Path:
    """A scratch copy of the repository at SCRATCH/name/src with patch `name` applied
    (`baseline`: none)."""
    src = SCRATCH / name / "src"
    shutil.rmtree(src.parent, ignore_errors=True)
    src.mkdir(parents=True)
    for relative in repository_files():
        target = src / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    if name != "baseline":
        patch = PATCHES / f"{name}.patch"
        check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=src,
                               capture_output=True, text=True)
        if check.returncode != 0:  # the code moved under it: tests/test_mutants.py says so too
            raise SystemExit(f"{name}: the patch no longer applies (regenerate it, "
                             f"mutants/README.md): {check.stderr.strip()}")
        subprocess.run(["git", "apply", str(patch)], cwd=src, check=True)
    for folder in SUBPACKAGES:
        (src / "wbcache" / folder).symlink_to(Path("..") / folder)
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"],
        cwd=src, capture_output=True, text=True, env={**os.environ, "WBCACHE_REQUIRE_C": "1"})
    if built.returncode != 0:
        raise SystemExit(f"{name}: building the C fast paths failed: "
                         f"{built.stderr.strip()[-500:]}")
    return src


def environment(src: Path, timings: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(HERE)])
    env["MUTANT_TIMINGS"] = str(timings)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_copy_is_used(src: Path, env: dict[str, str], name: str) -> None:
    """Fail unless `import wbcache` (and each subpackage) resolves into `src`, and the
    patch's added lines are in the files imported."""
    modules = (["wbcache", "wbcache.wal._walk", "wbcache.wal._sync", "wbcache._hit",
                "wbcache.backends._pairs"]
               + [f"wbcache.{folder}" for folder in SUBPACKAGES])
    code = ("import importlib, json, sys; "
            f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {modules!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True,
                         text=True, check=True).stdout
    for module, path in json.loads(out).items():
        if not os.path.realpath(path).startswith(str(src.resolve()) + os.sep):
            raise SystemExit(f"{name}: {module} resolves to {path}, not into the copy {src}")
    if name == "baseline":
        return
    added = [line[1:] for line in (PATCHES / f"{name}.patch").read_text().splitlines()
             if line.startswith("+") and not line.startswith("+++") and "MUTANT" in line]
    text = "".join(path.read_text() for pattern in ("*.py", "*.c") for path in src.rglob(pattern)
                   if path.is_file() and not path.is_symlink() and "tests" not in path.parts)
    if not added or not all(line in text for line in added):
        raise SystemExit(f"{name}: the patched lines are not in the copy")


def run_one(name: str, tests: list[str], time_limit: float) -> dict[str, object]:
    started = time.monotonic()
    src = make_copy(name)
    timings = SCRATCH / name / "timings.jsonl"
    env = environment(src, timings)
    check_copy_is_used(src, env, name)
    # One process (-n 0): the timings say how long after the start each test caught the
    # mutant, as in the tables of docs/torture.md, which xdist's workers would interleave.
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "timing_plugin",
               "-p", "no:cacheprovider", *expand(src, tests)]
    log = SCRATCH / name / "pytest.log"
    try:
        with open(log, "w") as out:
            done = subprocess.run(command, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=time_limit)
        status = done.returncode
    except subprocess.TimeoutExpired:
        status = "timed out"
    lines = [json.loads(line) for line in timings.read_text().splitlines()] \
        if timings.exists() else []
    failed = [line for line in lines if line["outcome"] == "failed"]
    result = {"mutant": name, "status": status, "seconds": round(time.monotonic() - started, 1),
              "tests": len(lines), "failed": failed, "log": str(log)}
    if status != "timed out" and not failed and status != 0:
        result["note"] = "pytest failed outside any test: see the log"
    return result


def expand(src: Path, patterns: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(str(path.relative_to(src)) for path in src.glob(pattern))
        found.extend(match for match in matches if match not in found)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--baseline", action="store_true",
                        help="run the unmutated copy instead (everything must pass)")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS),
                        help="test files (globs, relative to the repository)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT)
    args = parser.parse_args()
    if args.list:
        print("\n".join(mutants()))
        return 0
    names = ["baseline"] if args.baseline else (args.names or mutants())
    unknown = [name for name in names if name != "baseline" and name not in mutants()]
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)}; see --list")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        result = run_one(name, args.tests, args.time_limit)
        results.append(result)
        report(result)
        (SCRATCH / "results.json").write_text(json.dumps(results, indent=2))
    survived = [r["mutant"] for r in results if r["mutant"] != "baseline" and not r["failed"]
                and r["status"] != "timed out"]
    if survived:
        print(f"SURVIVED: {', '.join(survived)}")
    baseline_failed = [r for r in results if r["mutant"] == "baseline" and r["failed"]]
    return 1 if survived or baseline_failed else 0


def report(result: dict[str, object]) -> None:
    failed = result["failed"]
    assert isinstance(failed, list)
    print(f"   {result['tests']} tests, pytest status {result['status']}, "
          f"{result['seconds']} s in all")
    for line in failed:
        print(f"   FAILED {line['test']}  ({line['seconds']} s, at {line['at']} s)")
        for text in line["message"].splitlines()[:2]:
            print(f"      {text[:160]}")
    if not failed:
        print("   no test failed" + (f" ({result['note']})" if "note" in result else ""))


if __name__ == "__main__":
    raise SystemExit(main())
