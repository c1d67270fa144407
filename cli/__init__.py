"""The `wbcache` command line (click). Each command lives in its own module.

Errors a user can cause become one line on stderr and a documented exit code, never a traceback:
0 ok, 1 failure or damage found, 2 usage error (bad arguments, not a cache directory),
3 directory in use by a live cache.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from wbcache import __version__
from wbcache.errors import CacheLockedError, InvalidDirectoryError, WbcacheError

EXIT_OK = 0
EXIT_DAMAGE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3


class CommandFailed(click.ClickException):
    """A failure with its own exit code (ClickException always exits 1)."""

    def __init__(self, message: str, exit_code: int = EXIT_DAMAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class WbcacheGroup(click.Group):
    """Turns library errors into one-line messages with the documented exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CacheLockedError as exc:
            raise CommandFailed(str(exc), EXIT_LOCKED) from None
        except InvalidDirectoryError as exc:
            raise CommandFailed(str(exc), EXIT_USAGE) from None
        except WbcacheError as exc:
            raise CommandFailed(str(exc), EXIT_DAMAGE) from None
        except OSError as exc:
            raise CommandFailed(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                                EXIT_DAMAGE) from None


@click.group(cls=WbcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wbcache")
def main() -> None:
    """wbcache: a crash-durable write-back cache. Run `wbcache COMMAND --help` for details."""


def _register() -> None:
    # Each module owns its commands; this is the only list of them.
    from wbcache.cli import bench, demo, ops, torture

    main.add_command(demo.demo)
    for command in ops.COMMANDS:
        main.add_command(command)
    main.add_command(torture.torture)
    main.add_command(bench.bench)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
