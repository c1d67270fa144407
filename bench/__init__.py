"""The wbcache benchmark: one run, one table, one plot.

Run it from the repository's root with `python -m bench` (`--help` for the options; the
command is bench/cli.py). Everything is measured on this machine in this run, so every ratio
compares numbers taken under the same load:

    baselines.py      the physical limits: raw write+fdatasync, dict+msgpack, one-line getters,
                      raw LMDB putmulti, a raw recovery pass
    peers.py          LMDB, SQLite and diskcache, one durable commit per write
    redis_peer.py     a private redis-server, appendfsync always / everysec, driven by redis-py
                      (what a Python application gets) and by redis-benchmark (its C client)
    wbcache_rows.py   wbcache put (threads, also with a lowered switch interval), AsyncCache
                      (tasks), put_many, fsync="interval", get hits, flusher throughput,
                      hot-key write amplification
    shared_rows.py    shared directories: N processes x 16 threads against 1 process x 64
                      on one directory, flushes of 4 lanes at once, a read in another process
                      and its staleness (worker processes: shared_worker.py, run by
                      shared_pool.py)
    eviction.py       hit ratio of wbcache's CLOCK eviction against exact LRU, same traces
    postgres_rows.py  wbcache over PostgreSQL against each put its own PostgreSQL transaction
                      (write-through), directly and over a far link; flushes into PostgreSQL
                      (with --pg-dsn; postgres_server.py keeps the run to a schema of its own,
                      delay_proxy.py is the far link)
    recovery_rows.py  replay of a 1,000,000-record log and its raw baseline; peak memory of
                      `wbcache recover`
    memory.py         resident memory of 1,000,000 entries vs a plain dict (in a subprocess)
    targets.py        the targets, each judged met / MISSED
    report.py         the table, the latency block, the machine description, the PNG plot
    runner.py         runs every measurement in interleaved rounds and keeps the best
    hot_loops.py      one path in a loop, for a profiler (not part of the table)

This folder is not installed with the package, and nothing in the package imports it.
"""
