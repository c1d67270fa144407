"""CPython's own mapping conformance suite (`test.mapping_tests`) run against `wbcache.Cache`.

`TempCache` is the small adapter: a `Cache` on a fresh temporary directory, constructible as
the suite constructs its mappings (`TempCache()`, `TempCache(x=1)`, `fromkeys`, `copy`: dict's
constructors, which the suite uses to make mappings and which a cache, opened on a directory,
does not have itself). `_reference` holds values that storage keeps as they are (the suite's
own docstring asks for that): a list instead of its tuple.

Every other test of the suite runs unchanged. The only ones allowed to fail are listed in
`DIFFERENCES`, each with the documented difference that makes it fail; a listed test that
passes fails the run (strict), so the list cannot go stale, and a new failure shows at once.
"""

from __future__ import annotations

import shutil
import tempfile
import unittest
from typing import Any

import pytest
from ram_support import RAM_DIR

import wbcache
from wbcache.directory import open_directory
from wbcache.options import Options

mapping_tests = pytest.importorskip(
    "test.mapping_tests",
    reason="this Python was built without its test package (test.mapping_tests); "
           "CPython's mapping suite cannot run here")

_opened: list[wbcache.Cache] = []
_directories: list[str] = []

KEYS_ARE_STR_OR_BYTES = ("keys are str or bytes: the suite stores int (or arbitrary object) "
                         "keys, which a cache refuses with TypeError")
REPR_IS_NOT_THE_CONTENTS = ("repr() names the cache's directory and state; it does not read "
                            "the whole database to print its contents as dict does")
FRESH_COPIES = ("a value read is a fresh copy: setdefault(k, []).append(x) changes the copy, "
                "not the cache")

# test name -> why it fails against a cache (README: "A mapping, with differences")
DIFFERENCES = {
    "BasicTestMappingProtocol": {},
    "TestMappingProtocol": {
        "test_values": KEYS_ARE_STR_OR_BYTES,
        "test_items": KEYS_ARE_STR_OR_BYTES,
        "test_clear": KEYS_ARE_STR_OR_BYTES,
        "test_update": KEYS_ARE_STR_OR_BYTES,
        "test_fromkeys": KEYS_ARE_STR_OR_BYTES,
        "test_copy": KEYS_ARE_STR_OR_BYTES,
        "test_setdefault": FRESH_COPIES,
    },
    "TestHashMappingProtocol": {
        "test_values": KEYS_ARE_STR_OR_BYTES,
        "test_items": KEYS_ARE_STR_OR_BYTES,
        "test_clear": KEYS_ARE_STR_OR_BYTES,
        "test_update": KEYS_ARE_STR_OR_BYTES,
        "test_fromkeys": KEYS_ARE_STR_OR_BYTES,
        "test_copy": KEYS_ARE_STR_OR_BYTES,
        "test_getitem": KEYS_ARE_STR_OR_BYTES,
        "test_pop": KEYS_ARE_STR_OR_BYTES,
        "test_setdefault": f"{FRESH_COPIES}; {KEYS_ARE_STR_OR_BYTES}",
        "test_eq": KEYS_ARE_STR_OR_BYTES,
        "test_mutatingiteration": KEYS_ARE_STR_OR_BYTES,
        "test_repr": REPR_IS_NOT_THE_CONTENTS,
        "test_repr_deep": REPR_IS_NOT_THE_CONTENTS,
    },
}


class TempCache(wbcache.Cache):
    """A cache on a fresh temporary directory, made the way the suite makes mappings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # In RAM where possible: this suite tests the mapping's behaviour, not the disk.
        directory = tempfile.mkdtemp(prefix="wbcache-mapping-", dir=RAM_DIR)
        _directories.append(directory)
        options = Options(flush_interval=3600, fsync="interval")
        opened = open_directory(f"{directory}/cache", options)
        super().__init__(opened.layout, opened.lock, opened.backend, options, opened.recovery,
                         owns_backend=True)
        _opened.append(self)
        self.update(*args, **kwargs)

    @classmethod
    def fromkeys(cls, keys: Any, value: Any = None) -> TempCache:
        made = cls()
        for key in keys:
            made[key] = value
        return made

    def copy(self) -> TempCache:
        return type(self)(self.items())


def close_all() -> None:
    while _opened:
        _opened.pop().close()
    while _directories:
        shutil.rmtree(_directories.pop(), ignore_errors=True)


def adapted(base: type[unittest.TestCase]) -> type[unittest.TestCase]:
    allowed = DIFFERENCES[base.__name__]

    class Adapted(base):  # type: ignore[valid-type, misc]
        type2test = TempCache

        def _reference(self) -> dict[str, Any]:
            return {"1": "2", "key1": "value1", "key2": [1, 2, 3]}

        def tearDown(self) -> None:
            close_all()

    for name, reason in allowed.items():
        test = getattr(Adapted, name)
        wrapped = unittest.expectedFailure(test)
        wrapped.__doc__ = reason
        setattr(Adapted, name, wrapped)
    Adapted.__name__ = Adapted.__qualname__ = f"{base.__name__}OnCache"
    return Adapted


BasicTestMappingProtocolOnCache = adapted(mapping_tests.BasicTestMappingProtocol)
TestMappingProtocolOnCache = adapted(mapping_tests.TestMappingProtocol)
TestHashMappingProtocolOnCache = adapted(mapping_tests.TestHashMappingProtocol)


def test_a_cache_is_a_mutable_mapping(tmp_path: Any) -> None:
    from collections.abc import MutableMapping

    with wbcache.open(tmp_path / "c") as cache:
        assert isinstance(cache, MutableMapping)
