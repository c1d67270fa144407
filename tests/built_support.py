"""The check each C fast path's tests share: the module was built (the code imported it), and
from the C source in this checkout, not left over from before the source changed."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def assert_built_from(module: str, source: str) -> None:
    """In an editable install, the built `module` (imported) is no older than `source` (a path
    from the repository's root); elsewhere (a wheel) there is nothing to compare."""
    built = Path(sys.modules[module].__file__ or "")
    c_file = REPO / source
    if built.resolve().parent == c_file.parent:  # an editable install: built from this source?
        # Whole seconds: setuptools copies the module into place with its time cut to them.
        assert int(built.stat().st_mtime) >= int(c_file.stat().st_mtime), (
            f"{source} changed after its module was built: run `pip install -e .` again")


def assert_fast_path(fast: object, module: str, source: str, without: str, *,
                     headers: str = "the Python headers", missing: str = "is not built") -> None:
    """`fast` (what the library imported from `module`, None when the import failed) is there,
    built from `source`; `without` says what runs instead."""
    assert fast is not None, (
        f"{module} {missing}: `pip install -e .` compiles {source} when a C compiler and "
        f"{headers} are installed; without it {without}")
    assert_built_from(module, source)
