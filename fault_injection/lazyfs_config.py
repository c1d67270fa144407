"""Finding LazyFS, and the faults it is configured with.

The harness finds the `lazyfs` binary through `--lazyfs PATH` or $WBCACHE_LAZYFS, never by
searching: the build (../shared/tools/lazyfs/build.sh, outside this repository; root, apt and
cmake) is the machine's business. Without it the LazyFS mode is skipped in `--mode all` and
refused by name, with one line saying how to build it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

BUILD_HINT = ("build it with ../shared/tools/lazyfs/build.sh where the machine has it (run "
              "from the repository; root, about a minute; its last line is the binary's "
              "path), else from https://github.com/dsrhaslab/lazyfs as its README says, and "
              "pass the binary's path with --lazyfs PATH or WBCACHE_LAZYFS")


class LazyfsUnavailable(Exception):
    """LazyFS cannot run here; the message says why and how to get it."""


def locate_lazyfs(path: str | None) -> str:
    """The LazyFS binary: `path`, else $WBCACHE_LAZYFS; checked, with what FUSE needs.
    Raises `LazyfsUnavailable` with a one-line reason and how to build it."""
    binary = path or os.environ.get("WBCACHE_LAZYFS") or None
    if binary is None:
        raise LazyfsUnavailable(f"LazyFS not given (--lazyfs PATH or WBCACHE_LAZYFS): "
                                f"{BUILD_HINT}")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise LazyfsUnavailable(f"LazyFS binary {binary} is not an executable file: "
                                f"{BUILD_HINT}")
    if shutil.which("fusermount3") is None:
        raise LazyfsUnavailable("fusermount3 is not installed (apt-get install fuse3); "
                                "LazyFS needs it to unmount")
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise LazyfsUnavailable("/dev/fuse is missing or not usable by this user: LazyFS "
                                "needs FUSE (root, or a container given /dev/fuse)")
    return os.path.abspath(binary)


LAZYFS_MODES = ("lazyfs", "lazyfs-shared")  # the campaigns that need LazyFS


def lazyfs_modes(modes: tuple[str, ...], path: str | None, *, asked: bool
                 ) -> tuple[tuple[str, ...], str | None]:
    """`wbcache torture`'s modes once LazyFS is looked for (`path`, else $WBCACHE_LAZYFS): with
    it, $WBCACHE_LAZYFS names it for the campaign; without, the mode is dropped and the reason
    returned, or, if it was `asked` for by name, `LazyfsUnavailable` is raised."""
    if not set(modes) & set(LAZYFS_MODES):
        return modes, None
    try:
        os.environ["WBCACHE_LAZYFS"] = locate_lazyfs(path)
    except LazyfsUnavailable as exc:
        if asked:
            raise
        return tuple(mode for mode in modes if mode not in LAZYFS_MODES), str(exc)
    return modes, None


@dataclass(frozen=True)
class Injection:
    """One `[[injection]]` of LazyFS's config.toml (its src/README.md): `kind` is its `type`
    ("torn-op", "torn-seq", "clear"), `settings` its other keys (paths as LazyFS sees them:
    `LazyfsMount.lazyfs_path`)."""

    kind: str
    settings: tuple[tuple[str, object], ...]

    def toml(self) -> str:
        lines = ["[[injection]]", f"type={toml_value(self.kind)}"]
        lines += [f"{key}={toml_value(value)}" for key, value in self.settings]
        return "\n".join(lines)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(toml_value(item) for item in value) + "]"
    text = str(value)
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError(f"LazyFS config value {text!r}: quotes, backslashes and newlines "
                         f"are not supported")
    return f'"{text}"'
