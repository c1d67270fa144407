"""The keys, values and log record every row uses, and the scratch directory.

Every write row (wbcache and peers) cycles through the same `key_pool` keys, and writes the
same value per key: a small dict, about 50 bytes encoded. Peers store its msgpack encoding and
encode it inside the timed call, as an application would; wbcache encodes it inside `put`.
The raw fsync baseline writes the very bytes one such put appends to wbcache's log.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import msgpack


def key_of(i: int) -> str:
    return f"key:{i:08d}"


def dict_value_of(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"user-{i:08d}", "score": i / 2, "tags": ["a", "b"]}


def str_value_of(i: int) -> str:
    return f"value-{i:08d}-abcdefghijklmnopq"  # 32 characters


@dataclass
class Workload:
    """Keys and values of a run, built once (building them is not what is measured)."""

    size: int

    @cached_property
    def keys(self) -> list[str]:
        return [key_of(i) for i in range(self.size)]

    @cached_property
    def dict_values(self) -> list[dict[str, Any]]:
        return [dict_value_of(i) for i in range(self.size)]

    @cached_property
    def shuffled_keys(self) -> list[str]:
        """The keys in a fixed random order: reads that do not follow insertion order."""
        keys = list(self.keys)
        random.Random(5).shuffle(keys)
        return keys

    @cached_property
    def str_values(self) -> list[str]:
        return [str_value_of(i) for i in range(self.size)]

    @cached_property
    def encoded_values(self) -> list[bytes]:
        return [msgpack.packb(value) for value in self.dict_values]

    def distinct(self, count: int) -> tuple[list[str], list[dict[str, Any]]]:
        """`count` distinct keys and their dict values: the pool's, then suffixed copies."""
        rounds = -(-count // self.size)
        keys = [key if r == 0 else f"{key}/{r}" for r in range(rounds) for key in self.keys]
        return keys[:count], (self.dict_values * rounds)[:count]

    def slice_for(self, worker: int, workers: int) -> tuple[list[str], list[Any]]:
        """Worker `worker`'s share of the keys (and their dict values): every `workers`-th."""
        return self.keys[worker::workers], self.dict_values[worker::workers]


class Scratch:
    """The run's temporary directory, on the same filesystem as the repository unless told
    otherwise (/tmp may be a tmpfs, where fsync costs nothing). Removed at the end."""

    def __init__(self, repo_root: Path, parent: Path | None) -> None:
        if parent is None:
            parent = Path(tempfile.gettempdir())
            if os.stat(parent).st_dev != os.stat(repo_root).st_dev:
                parent = repo_root / "bench" / ".scratch"
        parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="wbcache-bench-", dir=parent))
        self._made_parent = parent.name == ".scratch"
        self._count = 0

    @contextmanager
    def directory(self, name: str) -> Iterator[Path]:
        """A fresh, empty directory for one trial, deleted afterwards."""
        self._count += 1
        path = self.root / f"{self._count:04d}-{name}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._made_parent:
            try:
                self.root.parent.rmdir()
            except OSError:
                pass
