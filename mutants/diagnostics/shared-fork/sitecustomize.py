# ruff: noqa  (a throwaway diagnostic script, see README.md)
import logging, os, sys, json
if os.environ.get("SHTORT_TRACE"):
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(created).4f %(process)d %(threadName)s %(name)s: %(message)s")
    from wbcache.backends import lmdb as _L
    from wbcache.codec import decode_value as _dv
    _orig = _L.SharedLmdbBackend.apply
    def _apply(self, puts, deletes, checkpoint, increments=()):
        before = self.checkpoint()
        markers = {k: _dv(v) for k, v in puts if isinstance(k, str) and k.startswith("seq:")}
        rec = {"t": __import__("time").time(), "pid": os.getpid(), "lane": self._name[-6:].decode(),
               "before": before, "after": checkpoint, "markers": markers,
               "incs": {k: d for k, d in increments}, "nputs": len(puts),
               "cputs": {k: _dv(v) for k, v in puts if isinstance(k, str) and k[:1] == "c" and k[1:].isdigit()},
               "thread": __import__("threading").current_thread().name}
        sys.stderr.write("APPLYING " + json.dumps(rec) + "\n"); sys.stderr.flush()
        _orig(self, puts, deletes, checkpoint, increments)
        sys.stderr.write("APPLIED %d %s %d\n" % (os.getpid(), rec["lane"], checkpoint)); sys.stderr.flush()
    _L.SharedLmdbBackend.apply = _apply
if os.environ.get("SHTORT_NOREOPEN"):
    from wbcache import forking as _F
    def _exit_instead(self):
        os._exit(0)
    _F.Disowned.reopen = _exit_instead
    _F._OWN["reopen"] = _exit_instead
if os.environ.get("SHTORT_NOCLOSE"):
    from wbcache.backends import lmdb as _L2
    from wbcache import forking as _F2
    def _disown_no_close(self):
        if _L2._shared.get(self.path, (None,))[0] is self:
            del _L2._shared[self.path]
        _F2.disown(self, _L2._ForkedLmdbDatabase, "LmdbDatabase", self.path, self._pid)
    _L2.LmdbDatabase._disown_after_fork = _disown_no_close
