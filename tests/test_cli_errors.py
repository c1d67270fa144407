"""Bad input and a directory in use: one clear line, the documented exit code, no traceback,
and nothing created or changed, for every operating command, in-process and as a subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import (
    DRIVERS,
    WBCACHE,
    assert_one_line_error,
    live_owner,
    new_cache_dir,
    puts,
    run,
    run_all,
    three_segment_log,
    tree_state,
    write_segment,
)

import wbcache

COMMANDS = (
    ("recover",),
    ("recover", "--dry-run"),
    ("recover", "--salvage", "--yes"),
    ("inspect",),
    ("verify",),
    ("stats",),
    ("dump",),
    ("dump", "--pending"),
    ("get", "{DIR}", "key-1"),
)


def argv(command: tuple[str, ...], directory: Path) -> list[str]:
    """The command line, DIR last unless the command places it ("{DIR}")."""
    if "{DIR}" in command:
        return [str(directory) if part == "{DIR}" else part for part in command]
    return [*command, str(directory)]


def missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere"


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "file"
    path.write_text("not a cache\n")
    return path


def under_a_file(tmp_path: Path) -> Path:
    return a_file(tmp_path) / "cache"


def empty_directory(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def other_directory(tmp_path: Path) -> Path:
    path = tmp_path / "photos"
    (path / "wal").mkdir(parents=True)  # a wal/ alone does not make a cache directory
    (path / "holiday.jpg").write_bytes(b"\xff\xd8")
    return path


def unknown_version(tmp_path: Path) -> Path:
    path = new_cache_dir(tmp_path / "cache")
    write_segment(path / "wal", puts(1, 10))
    write_segment(path / "wal", puts(11, 20), version=7)
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    "missing directory": (missing, 2, "does not exist"),
    "a file, not a directory": (a_file, 2, "is not a directory"),
    "a path under a file": (under_a_file, 2, "does not exist (a parent is a file)"),
    "an empty directory": (empty_directory, 2, "is not a wbcache directory"),
    "a directory of something else": (other_directory, 2, "is not a wbcache directory"),
    "an unknown log format version": (unknown_version, 1, "has format version 7; this wbcache "
                                                          "reads versions 1 to 2"),
}


# Every case runs in-process; as the real script (each of its commands a process of its own),
# one case of each exit code by default, all of them with --soak: the refusals before the lock
# share their path to the exit, and the in-process run lets no exception escape either.
SCRIPT_CASES = ("missing directory", "an unknown log format version")
BAD_INPUT_RUNS = [
    pytest.param(case, driver, id=f"{case}-{driver}",
                 marks=[pytest.mark.soak] if driver == "script" and case not in SCRIPT_CASES
                 else [])
    for case in BAD_INPUTS for driver in DRIVERS]


@pytest.mark.parametrize(("case", "driver"), BAD_INPUT_RUNS)
def test_bad_input_is_one_line_and_an_exit_code_and_changes_nothing(
        tmp_path: Path, case: str, driver: str) -> None:
    make, exit_code, message = BAD_INPUTS[case]
    path = make(tmp_path)
    before = tree_state(tmp_path)

    # Refused before the lock (exit 2) they may run side by side; a log of an unknown version
    # is refused after it, so those run one at a time.
    results = run_all(driver, [argv(command, path) for command in COMMANDS],
                      side_by_side=exit_code == 2)

    for command, result in zip(COMMANDS, results, strict=True):
        assert_one_line_error(result, exit_code, message, str(path))
        assert result.stdout == "", command
    assert tree_state(tmp_path) == before  # nothing created, nothing changed


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("digit", ["\u00b2", "\uff11"])  # superscript two, fullwidth one
def test_a_name_like_a_segment_s_with_other_digits_is_no_segment(tmp_path: Path, driver: str,
                                                                 digit: str) -> None:
    # str.isdigit took both: '²' then failed int() (a traceback from verify, a ValueError
    # from open), and the fullwidth one read as segment 1, beside the real one.
    path = new_cache_dir(tmp_path / "cache")
    write_segment(path / "wal", puts(1, 10))
    (path / "wal" / f"{'0' * 19}{digit}.log").write_bytes(b"not a segment")

    result = run(driver, "verify", str(path))

    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    with wbcache.open(path) as cache:
        assert [cache.get(f"key-{lsn}") for lsn in range(1, 11)] == list(range(1, 11))


def test_an_open_refused_by_another_open_in_progress_names_no_past_owner(
        tmp_path: Path) -> None:
    # The holder writes its pid once it has opened (recovery done): meanwhile LOCK held the
    # pid of the last owner, which closed, here this very process, named as the holder.
    path = tmp_path / "cache"
    wbcache.open(path).close()
    held = os.open(path / "LOCK", os.O_RDONLY)  # an open in progress holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(wbcache.CacheLockedError) as refused:
            wbcache.open(path)
    finally:
        os.close(held)
    assert str(refused.value) == f"{path} is in use by another cache"


def test_an_open_while_a_command_reads_the_directory_names_no_past_owner(
        tmp_path: Path) -> None:
    # `wbcache dump` holds the lock shared while it writes: the open was refused as "in use
    # by another cache (pid N)", N the pid LOCK holds, a past owner's (here: this process).
    path = tmp_path / "cache"
    with wbcache.open(path) as cache:
        cache.put_many({f"k{i}": "v" * 100 for i in range(5000)})  # more than a pipe holds
    reader = subprocess.Popen([str(WBCACHE), "dump", str(path)], stdout=subprocess.PIPE)
    try:
        assert reader.stdout is not None and reader.stdout.readline()  # reading, lock held
        with pytest.raises(wbcache.CacheLockedError) as refused:
            wbcache.open(path)
    finally:
        reader.kill()
        reader.wait()
    assert str(refused.value) == (f"{path} is in use by another process: a wbcache command "
                                  f"reading it, or a cache opening it; try again once it is "
                                  f"done")
    wbcache.open(path).close()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("text", ["\u00b2", "0", "12345678901234567890123"])
def test_a_held_lock_whose_pid_is_no_pid_is_in_use_by_another_process(
        tmp_path: Path, driver: str, text: str) -> None:
    # Its LOCK held (as by an opener still recovering) with something no pid in it: '²'
    # (str.isdigit took it, int() did not) was a ValueError from open and a traceback from
    # inspect; a number past any pid an OverflowError from os.kill; 0 was "alive" (kill(0)
    # signals our own process group).
    path = tmp_path / "cache"
    wbcache.open(path).close()
    (path / "LOCK").write_text(text)
    held = os.open(path / "LOCK", os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(wbcache.CacheLockedError, match="is in use by another cache$"):
            wbcache.open(path)
        inspected = run(driver, "inspect", "--json", str(path))
    finally:
        os.close(held)
    assert inspected.exit_code == 0, inspected.stdout + inspected.stderr
    assert (inspected.json()["live_owner"], inspected.json()["owner_pid"]) == (True, None)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_directory_the_user_may_not_read_is_one_line_and_changes_nothing(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)
    before = tree_state(path)

    results = run_all(driver, [argv(command, path) for command in COMMANDS], as_nobody=True,
                      side_by_side=True)  # refused at the first stat, before any lock

    for result in results:
        assert_one_line_error(result, 1, "Permission denied: ", str(path))
    assert tree_state(path) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_errors_under_json_are_also_one_json_object_on_stdout(tmp_path: Path,
                                                              driver: str) -> None:
    result = run(driver, "inspect", "--json", str(tmp_path / "nowhere"))

    assert result.exit_code == 2
    assert json.loads(result.stdout) == {
        "ok": False, "exit_code": 2, "error": "invalid_directory",
        "message": f"{tmp_path / 'nowhere'} does not exist"}


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_directory_in_use_is_refused_with_exit_3_by_every_recover(tmp_path: Path,
                                                                   driver: str) -> None:
    path = tmp_path / "cache"
    with live_owner(path) as pid:
        before = tree_state(path / "wal")
        results = [run(driver, *argv(command, path)) for command in COMMANDS[:3]]
        as_json = run(driver, "recover", "--json", str(path))
        after = tree_state(path / "wal")

    for result in results:
        assert_one_line_error(result, 3, f"{path} is in use by a live cache (pid {pid})")
    assert as_json.exit_code == 3 and as_json.json()["error"] == "directory_in_use"
    assert after == before  # the owner was idle: only a recover could have changed the log
    assert run(driver, "recover", str(path)).exit_code == 0  # once the owner is gone


@pytest.mark.parametrize("driver", DRIVERS)
def test_usage_errors_exit_2(tmp_path: Path, driver: str) -> None:
    path = new_cache_dir(tmp_path / "cache")

    results = [
        run(driver, "get", str(path)),  # no KEY
        run(driver, "dump", "--format", "xml", str(path)),
        run(driver, "dump", "--json", "--format", "table", str(path)),
        run(driver, "get", "--hex", str(path), "zz"),
        run(driver, "recover", "--frobnicate", str(path)),
        run(driver, "recover", ""),
    ]

    assert [result.exit_code for result in results] == [2] * len(results)
    for result in results:
        assert "Traceback" not in result.stderr
    assert "the directory path is empty" in results[-1].stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["torture", "--cycles", "abc"], "'--cycles': 'abc' is not a whole number"),
    (["torture", "--threads", "1.5"], "'--threads': '1.5' is not a whole number"),
    (["demo", "--threads", "x"], "'--threads': 'x' is not a whole number"),
    (["torture", "--cycles", "0"], "'--cycles': 0 is not in the range x>=1"),
])
def test_a_count_that_is_not_a_whole_number_says_so(argv: list[str], message: str) -> None:
    # click's own wording for IntRange was "'abc' is not a valid integer range"
    result = run("runner", *argv)
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["demo", "--seconds", "nan"], ["torture", "--seconds", "inf"],
                                  ["torture", "--seconds", "nan"],
                                  ["demo", "--seconds", "abc"]])  # was "not a valid seconds"
def test_seconds_that_are_not_a_number_are_refused(argv: list[str]) -> None:
    """A range lets nan through (every comparison with it is false): the demo slept nan
    seconds (a traceback, and its writer never killed: it never exited), torture ignored
    its limit. A timeout here, so that a regression fails rather than hangs."""
    result = subprocess.run([str(WBCACHE), *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a number of seconds" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["demo"], ["torture", "--mode", "kill", "--cycles", "1"]])
def test_demo_and_torture_refuse_a_directory_a_cache_could_not_use(
        tmp_path: Path, command: list[str]) -> None:
    """A directory others may write into, or another user's: refused in one line, as open()
    refuses it (demo printed its child writer's traceback; torture ran there, making its
    scratch directories in it). A missing parent is a usage error too (it was exit 1)."""
    open_to_all = tmp_path / "open-to-all"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    someone_elses = tmp_path / "someone-elses"
    someone_elses.mkdir(mode=0o700)
    os.chown(someone_elses, 65534, 65534)
    for directory, message in ((open_to_all, "world-writable"),
                               (someone_elses, "is owned by uid 65534")):
        result = run("script", *command, str(directory))
        assert result.exit_code == 2 and "Traceback" not in result.stderr
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
        assert os.listdir(directory) == []
    result = run("script", *command, str(tmp_path / "missing" / "dir"))
    assert result.exit_code == 2 and "missing does not exist: give a DIRECTORY" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "missing").exists()
    (tmp_path / "a-file").write_text("")
    result = run("script", *command, str(tmp_path / "a-file" / "dir"))
    assert result.exit_code == 2 and "a-file is not a directory: give" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    (open_to_all / "file").write_text("")
    open_to_all.chmod(0o700)
    result = run("script", *command, str(open_to_all))
    assert result.exit_code == 2 and "is not empty; give a new or empty directory" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and os.listdir(open_to_all) == ["file"]


def test_torture_refuses_a_directory_that_is_not_empty_before_it_says_anything(
        tmp_path: Path) -> None:
    """It printed which modes it would skip (LazyFS missing) and only then refused."""
    (tmp_path / "file").write_text("")
    result = subprocess.run([str(WBCACHE), "torture", str(tmp_path)], capture_output=True,
                            text=True, timeout=60,
                            env=dict(os.environ, WBCACHE_LAZYFS=str(tmp_path / "no-lazyfs")))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Error: {tmp_path} is not empty; give a new or empty directory"]


@pytest.mark.parametrize("command", ["recover", "inspect", "verify", "stats", "dump", "get"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = run("runner", command, "--help")

    assert result.exit_code == 0
    assert "Example" in result.stdout and "Exit status" in result.stdout


@pytest.mark.parametrize("command", ["recover", "torture", "demo"])
def test_ctrl_c_is_one_line_saying_what_to_do_and_exit_130(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """Click printed only "Aborted!" (exit 1): not whether running it again is safe, nor
    where torture's scratch directory was. `demo DIR` said it could be run again, which its
    DIR, no longer empty, then refused (a new user's walk)."""
    import wbcache.cli.demo as cli_demo
    import wbcache.cli.ops_recover as cli_recover
    import wbcache.cli.torture as cli_torture

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    path = tmp_path / "cache"
    wbcache.open(path).close()
    if command == "recover":
        monkeypatch.setattr(cli_recover, "recover_directory", interrupted)
        args = ["recover", str(path)]
    elif command == "torture":
        monkeypatch.setattr(cli_torture, "run_torture", interrupted)
        args = ["torture", str(tmp_path / "scratch"), "--mode", "kill", "--cycles", "1"]
    else:
        monkeypatch.setattr(cli_demo, "_run_and_kill", interrupted)
        args = ["demo", str(tmp_path / "demo")]
    result = run("runner", *args)
    assert_one_line_error(result, 130, "interrupted")
    if command == "recover":
        assert "can be run again" in result.stderr
    elif command == "torture":
        assert f"the scratch directory is kept: {tmp_path / 'scratch'}" in result.stderr
    else:
        assert "can be run again" not in result.stderr
        assert "give a new or empty directory" in result.stderr
        assert os.listdir(tmp_path / "demo")  # which is why


def test_ctrl_c_while_the_commands_are_imported_is_one_line_too(tmp_path: Path) -> None:
    """A Ctrl-C in the command's start-up, while the commands' modules are imported (most of
    it: they were imported with `wbcache.cli` itself, outside every handler), printed a
    traceback (an outside hunt: `timeout -s INT 0.2 wbcache inspect DIR`). Here the interrupt
    comes as the script imports `wbcache.cli.ops` (an audit hook in sitecustomize raises it
    there, as a signal arriving then would)."""
    path = tmp_path / "cache"
    wbcache.open(path).close()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent("""\
        import sys

        def interrupt_at_the_commands(event, args):
            if event == "import" and args[0] == "wbcache.cli.ops":
                raise KeyboardInterrupt

        sys.addaudithook(interrupt_at_the_commands)
        """))
    pythonpath = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    result = run("script", "inspect", str(path), env={"PYTHONPATH": pythonpath})
    assert_one_line_error(result, 130, "interrupted")
