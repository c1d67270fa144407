"""The wbcache benchmark (issue #5): one run, one table, one plot.

Run it from a checkout with `python -m bench` or `wbcache bench` (same options; `--help`).
Everything is measured on this machine in this run, so every ratio compares numbers taken
under the same load:

    baselines.py      the physical limits: raw write+fdatasync, dict+msgpack, one-line getters,
                      raw LMDB putmulti, a raw recovery pass
    peers.py          LMDB, SQLite and diskcache, one durable commit per write
    redis_peer.py     a private redis-server, appendfsync always / everysec
    wbcache_rows.py   wbcache put (threads), AsyncCache (tasks), put_many, fsync="interval",
                      get hits, flusher throughput, hot-key write amplification
    postgres_rows.py  wbcache over PostgreSQL against each put its own PostgreSQL transaction
                      (write-through), and flushes into PostgreSQL (with --pg-dsn;
                      postgres_server.py keeps the run to a schema of its own)
    recovery_rows.py  replay of a 1,000,000-record log, and its raw baseline
    memory.py         resident memory of 1,000,000 entries vs a plain dict (in a subprocess)
    targets.py        the issue's targets, each judged met / MISSED
    report.py         the table, the machine description, the PNG plot
    runner.py         runs every measurement in interleaved rounds and keeps the best

This folder is not installed with the package; `wbcache bench` finds it next to `wbcache/`.
"""
