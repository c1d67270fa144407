"""A TCP proxy that delays every byte by a fixed time each way: a far link, on one machine.

    python -m bench.delay_proxy TARGET_HOST TARGET_PORT DELAY_SECONDS

Listens on a free loopback port, prints it on stdout (one line), and forwards every connection
to TARGET_HOST:TARGET_PORT, holding each chunk of data DELAY_SECONDS after it arrived before
passing it on, in both directions. It runs until its stdin is closed (the benchmark that
started it ends, however it ends).

It runs in a process of its own so that its threads never compete with the benchmark's for the
GIL. Each direction of each connection has a receiving thread, which stamps every chunk with
its arrival time, and a sending thread, which sleeps until that time plus the delay (nanosleep:
tens of µs late at most, where an event loop's timers round up to whole milliseconds) and sends
it. So the delay is added once per chunk and never accumulates: a request that arrives in
several chunks is delayed by DELAY_SECONDS, not by a multiple of it, and a link does not
become slower as it gets busier (it is a latency, not a bandwidth limit).
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time

CHUNK = 1 << 20
_END = b""


def forward(source: socket.socket, target: socket.socket, delay: float) -> None:
    """Copy `source` to `target`, each chunk `delay` seconds after it arrived; on end of data
    (or an error either side) shut the target's sending side."""
    held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                held.put((time.monotonic(), data))
                if not data:
                    return
        except OSError:
            held.put((time.monotonic(), _END))

    threading.Thread(target=receive, daemon=True).start()
    clock, sleep = time.monotonic, time.sleep
    try:
        while True:
            arrived, data = held.get()
            wait = arrived + delay - clock()
            if wait > 0:
                sleep(wait)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((target, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def serve(listener: socket.socket, address: tuple[str, int], delay: float) -> None:
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(address)
        except OSError:
            client.close()
            continue
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = [client, server]

        def pipe(source: socket.socket, target: socket.socket, pair: list[socket.socket] = pair,
                 ) -> None:
            forward(source, target, delay)
            pair.append(source)  # the second direction to finish closes both sockets
            if len(pair) == 4:
                for sock in pair[:2]:
                    sock.close()

        threading.Thread(target=pipe, args=(client, server), daemon=True).start()
        threading.Thread(target=pipe, args=(server, client), daemon=True).start()


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: python -m bench.delay_proxy TARGET_HOST TARGET_PORT "
                         "DELAY_SECONDS")
    address, delay = (argv[0], int(argv[1])), float(argv[2])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    threading.Thread(target=serve, args=(listener, address, delay), daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin (or dies)


if __name__ == "__main__":
    main(sys.argv[1:])
