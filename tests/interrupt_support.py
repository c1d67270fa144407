"""Interrupts where CPython raises them, at each such point of the code under test in turn.

A signal handler's exception (KeyboardInterrupt from SIGINT, SystemExit from a SIGTERM handler,
a SIGALRM timeout) is raised in the main thread where the interpreter checks for pending
signals: as a function's frame starts or resumes, as a call returns (before its result is
stored), at a jump back. Not between other bytecodes, and not between a `with` statement's
`__enter__` and its block. Raised by the tracing hook as the next instruction starts, which
is where CPython raises it, except after a block's last call (`return f()` inside `with`): the
call's instruction is inside the block and the next is not, so that point is left out.

`InterruptAt(n, codes)` raises KeyboardInterrupt at the n-th such point reached in `codes`
(frames of other code are left alone), through the tracing hook, in this thread only. One
interrupt a run: the handlers it sets off run whole, as they do unless a second signal comes.
Walking n from 1 until it no longer fires (`every_point`) puts an interrupt at every point of
one run.
"""

from __future__ import annotations

import dis
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from types import CodeType, FrameType
from typing import Any


def code_of(function: Callable[..., Any]) -> CodeType:
    """The code of a function, a method, or a @contextmanager's generator function."""
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function.__code__  # type: ignore[attr-defined, no-any-return]


_CALLS: dict[CodeType, frozenset[int]] = {}


def _calls(code: CodeType) -> frozenset[int]:
    """Offsets of `code`'s calls: the interpreter checks for signals as each returns (CALL,
    and 3.10's CALL_FUNCTION, CALL_METHOD...; not 3.11's PRECALL, nor CALL_INTRINSIC)."""
    found = _CALLS
    if code not in found:
        found[code] = frozenset(
            ins.offset for ins in dis.get_instructions(code)
            if ins.opname.startswith("CALL") and not ins.opname.startswith("CALL_INTRINSIC"))
    return found[code]


_HANDLERS: dict[CodeType, dict[int, int | None]] = {}


def _handler(code: CodeType, offset: int) -> int | None:
    """Where an exception raised at `offset` of `code` is handled (3.11's exception table; None:
    it leaves the frame). Before 3.11 (a block stack, popped by an instruction of its own)
    every point is taken as handled where it is met."""
    if code not in _HANDLERS:
        _HANDLERS[code] = {inside: entry.target
                           for entry in getattr(dis.Bytecode(code), "exception_entries", ())
                           for inside in range(entry.start, entry.end, 2)}
    return _HANDLERS[code].get(offset)


class InterruptAt:
    def __init__(self, n: int, codes: Iterable[CodeType]) -> None:
        self.n = n
        self.codes = set(codes)
        self.seen = 0
        self.fired_in: str | None = None  # "function:line" where it was raised
        self._last: dict[int, int] = {}  # frame id -> offset of the bytecode it ran last

    @property
    def fired(self) -> bool:
        return self.fired_in is not None

    def __enter__(self) -> InterruptAt:
        assert threading.current_thread() is threading.main_thread()
        self._before = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._before)

    def run(self, call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """`call(*args, **kwargs)` with this point armed; the KeyboardInterrupt it injects is
        caught here, and only that one (another would fail the assertion)."""
        with self:
            try:
                call(*args, **kwargs)
            except KeyboardInterrupt:
                assert self.fired

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code in self.codes and self.fired_in is None:
            self._last.pop(id(frame), None)  # started or resumed: a point
            # The local trace first: on 3.12+ (sys.monitoring underneath) opcode events are
            # turned on for a frame only once it has one; set after, they never came.
            frame.f_trace = self._opcode
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self._opcode
        return None

    def _opcode(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and self.fired_in is None:
            offset, last = frame.f_lasti, self._last.get(id(frame))
            self._last[id(frame)] = offset
            if last is not None and offset > last and last not in _calls(frame.f_code):
                return self._opcode  # not a point where a signal's exception is raised
            if last is not None and _handler(frame.f_code, last) != _handler(frame.f_code,
                                                                                offset):
                # CPython raises it in the call's own instruction, whose handler (a `with`
                # block's exit, say) differs from the next one's: not raised from here
                return self._opcode
            self.seen += 1
            if self.seen == self.n:
                self.fired_in = f"{frame.f_code.co_name}:{frame.f_lineno}"
                raise KeyboardInterrupt(f"injected at {self.fired_in}")
        return self._opcode


def every_point(codes: Iterable[CodeType], limit: int = 100_000) -> Iterator[InterruptAt]:
    """InterruptAt(1), InterruptAt(2)... for the caller to run the code under, until one does
    not fire (the run ended before its n-th bytecode): every point has then had its turn."""
    codes = list(codes)
    for n in range(1, limit):
        point = InterruptAt(n, codes)
        yield point
        if not point.fired:
            return
    raise AssertionError(f"still interrupting after {limit} points")
