"""The `wbcache` command line (click). Each command lives in its own module.

Errors a user can cause become one line on stderr and a documented exit code, never a traceback:
0 ok, 1 failure or damage found, 2 usage error (bad arguments, not a cache directory, a bad or
missing --backend URL), 3 directory (or, for `recover`, a lane of it) in use by a live cache.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import sys
from typing import Any

import click

from wbcache import __version__
from wbcache.errors import (
    CacheLockedError,
    CorruptLogError,
    InvalidDirectoryError,
    UnsupportedFormatError,
    WbcacheError,
)
from wbcache.lanes import refuse_lane
from wbcache.wal.owned import check_parents, open_private_dir

EXIT_OK = 0
EXIT_DAMAGE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


class CommandFailed(click.ClickException):
    """A failure with its own exit code (ClickException always exits 1)."""

    def __init__(self, message: str, exit_code: int = EXIT_DAMAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it per class


class BadBackendUrl(Exception):
    """--backend (or WBCACHE_BACKEND) names no database wbcache can open: a usage error. The
    message holds no password (`redact`)."""


class WholeNumber(click.IntRange):
    """`click.IntRange` that calls a non-number what it is (click says "'abc' is not a valid
    integer range", as if a range had been asked for)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            try:
                int(value)
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        return super().convert(value, param, ctx)


class Seconds(click.FloatRange):
    """`click.FloatRange` of seconds that refuses nan and inf (a range lets nan through: every
    comparison with it is false)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        try:
            float(value)
        except (TypeError, ValueError):  # click's own says "is not a valid seconds"
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def new_directory(directory: str) -> None:
    """Make `demo`'s or `torture`'s DIRECTORY (or take it if it is empty): a usage error (exit
    2) if its parent is missing, if it holds anything, or if it is not yours alone, as a cache
    directory must be (wbcache/wal/owned.py): the scratch work and its evidence go there."""
    refuse_lane(directory)  # a lane's place: a shared open would take what is made there
    check_parents(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):  # one line, as every error found in a directory
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise InvalidDirectoryError(f"{parent} {what}: give a DIRECTORY in one that does")
    if os.path.isdir(directory) and os.listdir(directory):
        raise InvalidDirectoryError(f"{directory} is not empty; give a new or empty directory")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # empty, as checked: then it must be private (a file there is refused below)
    os.close(open_private_dir(directory, follow=True))  # InvalidDirectoryError: one line, 2


class WbcacheGroup(click.Group):
    """Turns library errors into one-line messages with the documented exit codes.

    A command run with `--json` records that in `ctx.meta[JSON_META]` (cli/ops_output.py); its
    errors are then also printed on stdout as one JSON object, so a script always gets JSON:
    {"ok": false, "exit_code": N, "error": KIND, "message": ...} plus, for damage, "segment",
    "offset" and "reason". A command that names its directory in `ctx.meta[DIR_META]` gets the
    exact `--salvage` command line in the hint that follows a damaged-log message.
    """

    JSON_META = "wbcache.json"
    DIR_META = "wbcache.directory"
    # Commands imported only when named (or listed by --help): `torture` pulls in the whole
    # fault-injection harness, two thirds of the start-up time of every other command.
    LAZY = {"torture": ("wbcache.cli.torture", "torture")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        _register()
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _register()
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            module, name = self.LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), name))
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CacheLockedError as exc:
            raise self._failed(ctx, str(exc), "directory_in_use", EXIT_LOCKED) from None
        except InvalidDirectoryError as exc:
            raise self._failed(ctx, str(exc), "invalid_directory", EXIT_USAGE) from None
        except BadBackendUrl as exc:
            raise self._failed(ctx, str(exc), "bad_backend_url", EXIT_USAGE) from None
        except CorruptLogError as exc:
            raise self._failed(ctx, str(exc), "corrupt_log", EXIT_DAMAGE,
                               self._salvage_hint(ctx, exc.path),
                               segment=exc.path, offset=exc.offset, reason=exc.reason) from None
        except UnsupportedFormatError as exc:
            raise self._failed(ctx, str(exc), "unsupported_format", EXIT_DAMAGE,
                               segment=exc.path, version=exc.version) from None
        except WbcacheError as exc:
            raise self._failed(ctx, str(exc), "error", EXIT_DAMAGE) from None
        except KeyboardInterrupt:
            again = ("the command can be run again (recover replays what the database still "
                     "lacks)")
            if ctx.invoked_subcommand == "demo":  # its DIRECTORY is no longer new or empty
                again = ("to run the demo again, give a new or empty directory (the one given "
                         "keeps this run's cache)")
            raise self._failed(ctx, f"interrupted: nothing durable was lost; {again}",
                               "interrupted", EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`wbcache dump DIR | head`): stop quietly, as `cat` does.
            # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise click.exceptions.Exit(EXIT_DAMAGE) from None
        except OSError as exc:
            message = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            raise self._failed(ctx, message, "os_error", EXIT_DAMAGE, path=exc.filename) from None

    @classmethod
    def _salvage_hint(cls, ctx: click.Context, segment: str) -> str:
        directory = ctx.meta.get(cls.DIR_META, "DIR")
        # beside the damaged log: DIR/quarantine/, or in a shared directory the lane's own
        quarantine = os.path.join(os.path.dirname(os.path.dirname(segment)), "quarantine")
        return (f"Nothing was changed. `wbcache recover --salvage {directory}` replays the log "
                f"up to the damage and moves the damaged segment and any after it into "
                f"{quarantine}/ (preview with --dry-run); `wbcache verify {directory}` "
                f"lists every problem.")

    @classmethod
    def _failed(cls, ctx: click.Context, message: str, kind: str, exit_code: int,
                hint: str | None = None, **fields: Any) -> CommandFailed:
        if ctx.meta.get(cls.JSON_META):
            document = {"ok": False, "exit_code": exit_code, "error": kind, "message": message,
                        **fields}
            if hint is not None:
                document["hint"] = hint
            click.echo(json.dumps(document, indent=2))
        return CommandFailed(message if hint is None else f"{message}\n{hint}", exit_code)


@click.group(cls=WbcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wbcache")
def main() -> None:
    """wbcache: a crash-durable write-back cache. Run `wbcache COMMAND --help` for details."""
    # A path that is not UTF-8 (Latin-1, as os.fsdecode gives it) is printed as its bytes,
    # as `ls` prints it: under a UTF-8 locale stdout's "strict" gave a traceback instead.
    # Put back as the command ends, for a program that runs it in its own process.
    stdout = sys.stdout
    if isinstance(stdout, io.TextIOWrapper) and stdout.errors == "strict":
        stdout.reconfigure(errors="surrogateescape")
        click.get_current_context().call_on_close(lambda: stdout.reconfigure(errors="strict"))


def _register() -> None:
    """Each module owns its commands; this is the only list of them (and WbcacheGroup.LAZY
    those imported when named). Imported when the group first looks for a command, not when
    this module is: most of the command's start-up, and a Ctrl-C there printed a traceback
    (now it meets `invoke`'s one line, or click's own "Aborted!")."""
    if "demo" in main.commands:
        return
    from wbcache.cli import demo, ops

    for command in ops.COMMANDS:
        main.add_command(command)
    main.add_command(demo.demo)  # last: the mark that all of them are in

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
