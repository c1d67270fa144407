"""`run_group`: several worker processes at once, cut together (lazyfs_multi.py's power cut).

runner.py's `run_worker` runs one worker and kills it; a power cut ends every process of the
machine at the same moment. `run_group` starts one worker per config, reads every journal as it
arrives (one `select` over their pipes), and when its decision fires (an event of any of them)
or its timer runs out, SIGKILLs each process still running, one right after the other, by the
pid it started; then it reads each journal to its end, so acknowledgements already written when
the SIGKILL landed still count. It signals no other process, and none of its own outlives it,
even when it fails.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wbcache.fault_injection.journal import EventBuffer
from wbcache.fault_injection.runner import WorkerSpec, worker_command, worker_env

GROUP_TIMEOUT = 60.0  # s: a group still not cut by then has hung (it is cut all the same)
SAFE_PATH = {"PYTHONSAFEPATH": "1"}  # see lazyfs.py: never import a checkout's wbcache
Decide = Callable[[int, list[Any]], bool]  # (process index, journal event) -> cut now?



@dataclass
class GroupRun:
    """What a group of processes reported before the cut that ended them all."""

    nodes: list[int]  # per process, its number in the keys (the ledger's "node")
    events: list[list[list[Any]]]  # per process, its journal in order
    returncodes: list[int]
    stderr: list[str]
    triggered: bool  # the decision fired (else the timer, or every process ended by itself)
    hung: bool = False

    def sigkilled(self, index: int) -> bool:
        return self.returncodes[index] == -signal.SIGKILL


def run_group(configs: Sequence[WorkerSpec], nodes: list[int], scratch: str, *,
              decide: Decide | None, kill_after: float | None,
              envs: Sequence[Mapping[str, str]] | None = None,
              cut_on_exit: bool = False) -> GroupRun:
    """Start one worker per config at once (each with its `envs` entry added to the
    environment); SIGKILL every one of them, together, when `decide` first says so, after
    `kill_after` s, or (`cut_on_exit`) as soon as one of them ends by itself (a crash point);
    read each journal to its end. Only these processes are ever signalled, by their pids, even
    when this function fails."""
    os.makedirs(scratch, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    stderr_paths = [os.path.join(scratch, f"worker{index}.stderr")
                    for index in range(len(configs))]
    started = time.monotonic()
    triggered = killed = hung = False
    events: list[list[list[Any]]] = [[] for _ in configs]
    try:
        for index, (config, path) in enumerate(zip(configs, stderr_paths, strict=True)):
            extra = {**SAFE_PATH, **(envs[index] if envs is not None else {})}
            with open(path, "wb") as stderr:
                children.append(subprocess.Popen(
                    worker_command(config), stdout=subprocess.PIPE, stderr=stderr,
                    env=worker_env(extra), cwd=scratch))
        buffers = {child.stdout.fileno(): (index, EventBuffer())  # type: ignore[union-attr]
                   for index, child in enumerate(children)}
        kill_at = None if kill_after is None else started + kill_after
        while buffers:
            now = time.monotonic()
            if not killed and ((kill_at is not None and now >= kill_at)
                               or now - started > GROUP_TIMEOUT):
                hung = kill_at is None or now - started > GROUP_TIMEOUT
                killed = _kill_all(children)
            wait = GROUP_TIMEOUT - (now - started)
            if not killed and kill_at is not None:
                wait = min(wait, kill_at - now)
            ready, _, _ = select.select(list(buffers), [], [], max(wait, 0.0))
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                index, buffer = buffers[fd]
                if not chunk:  # that process has ended
                    del buffers[fd]
                    if cut_on_exit and not killed:
                        triggered = killed = _kill_all(children)
                    continue
                for event in buffer.feed(chunk):
                    events[index].append(event)
                    if not killed and decide is not None and decide(index, event):
                        triggered = killed = _kill_all(children)
    finally:
        _kill_all(children)  # a no-op for those already gone
        for child in children:
            if child.stdout is not None:
                child.stdout.close()
            child.wait()
    stderr_texts = []
    for path in stderr_paths:
        with open(path, encoding="utf-8", errors="replace") as stderr_file:
            stderr_texts.append(stderr_file.read())
    return GroupRun(nodes, events, [child.returncode for child in children], stderr_texts,
                    triggered, hung)


def _kill_all(children: Sequence[subprocess.Popen[bytes]]) -> bool:
    """SIGKILL every child still running, one right after the other (the power cut)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
    return True


def after_total(tag: str, n: int) -> Decide:
    """Cut at the `n`th event tagged `tag`, counted over every process of the group."""
    seen = 0

    def decide(_index: int, event: list[Any]) -> bool:
        nonlocal seen
        seen += event[0] == tag
        return seen >= n

    return decide
