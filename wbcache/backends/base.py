"""The backend protocol: everything the cache, the flusher and recovery need from a database.

Values cross this boundary msgpack-encoded (`bytes`); keys are `str` or `bytes` and must stay
distinct ("a" and b"a" are two keys). `apply` is atomic and stores the checkpoint LSN in the
same transaction as the data: that is what lets recovery replay exactly the records the
database lacks, and lets the flusher delete log segments only after the data is safe.

Every member below is used by the core; a backend declares them all (there are no `getattr`
defaults). Read-only methods (`get`, `checkpoint`, `count`, `items`) change no state of the
backend. Backends are chosen by the registry in `wbcache/backends/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Protocol, runtime_checkable

Key = str | bytes


class CheckpointTokens(Protocol):
    """DIR/checkpoint_token (wbcache/layout.py): the random token that the directory's last
    known checkpoint was written with, and the one its next flush writes, saved before that
    flush is sent (and saved as known once it committed). A copy of the directory has the
    same file, but it never learns a token that the original writes after the copy was made:
    a database shared by many directories stores the token beside each checkpoint and
    refuses a directory that does not know it."""

    def read(self) -> tuple[str | None, str | None]:
        """(known, pending), each None if absent. `pending` is given only to the directory
        that saved it, not to a copy of it (the file records where it was saved)."""

    def save(self, known: str | None, pending: str | None) -> None:
        """Replace both, durably: before a flush that writes `pending` is sent, and once it
        committed (as `known`, nothing pending)."""


@runtime_checkable
class Backend(Protocol):
    # Read-only: a class attribute satisfies each of these as well as a property does.

    @property
    def kind(self) -> str:
        """What kind of database this is ("lmdb", "postgresql"): the cache records it in
        DIR/backend and refuses to open the directory with another kind."""

    # Optional, not part of the protocol: `table` (a str), where in a database many
    # directories share this backend keeps a directory's data (`PostgresBackend.table`). The
    # cache records it with the kind and refuses another (wbcache/directory.py: table_of).

    @property
    def applies_increments(self) -> bool:
        """Whether `apply` takes `increments` (deltas added to what the database holds, for a
        database shared by many caches). Without it, increments arrive as puts of the
        result."""

    @property
    def default_read_ttl(self) -> float | None:
        """How long a clean entry may be served from memory before it is read again (s), when
        the options do not say: None (forever) for a database only this cache writes, a
        short time for one shared by many caches."""

    @property
    def max_key_size(self) -> int:
        """The largest key, in bytes, this database accepts."""

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        """Called at every open, before recovery, with the directory's id (DIR/cache_id): a
        database shared by many caches keeps one checkpoint per directory. It also starts a
        recovery: what the backend remembered of earlier flushes is forgotten. `tokens`: the
        directory's own record of the checkpoints it wrote, with which such a database tells
        the directory from a copy of it that has the same id (None: not checked). A database
        of one cache ignores both."""

    def get(self, key: Key) -> bytes | None:
        """The encoded value stored under `key`, or None. A backend whose reads cost a round
        trip may also offer `get_many(keys) -> dict[key, bytes | None]`, all in one (not part
        of the protocol: the flusher uses it where there is one)."""

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        """In ONE transaction: store `puts`, remove `deletes` (missing keys are fine), set the
        checkpoint LSN and (only if `applies_increments`) add `increments` to the stored ints.
        Either all of it is durable when this returns, or none of it.

        The same call may come again after one that committed, when the caller could not
        learn that it had (an interrupt between the commit and the caller marking the batch
        flushed). A database only this cache writes may simply write it again. One shared by
        many caches (`applies_increments`) must write nothing: its increments would be added
        twice, and its puts and deletes could undo another cache's newer writes. It tells
        the call by its checkpoint: the one it last committed for this cache."""

    def checkpoint(self) -> int:
        """The checkpoint LSN of the last `apply` (0 for a new database)."""

    def count(self) -> int:
        """How many keys are stored."""

    def items(self) -> Iterator[tuple[Key, bytes]]:
        """Every (key, encoded value), from one consistent snapshot."""

    def close(self) -> None:
        """Release the database; idempotent."""
