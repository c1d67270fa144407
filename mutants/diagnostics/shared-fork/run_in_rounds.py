# ruff: noqa  (a throwaway diagnostic script, see README.md)
import sys, tempfile, time, re, threading
import wbcache
import wbcache.fault_injection.shared_dir as sd
from wbcache.fault_injection.campaign import Settings
from wbcache.fault_injection.counters import expected_counters
import os; os.makedirs("/tmp/shtort-rounds", exist_ok=True)
seed, rounds, triggers = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sd.TRIGGERS = tuple(triggers.split(","))
def excess(directory):
    with wbcache.open(directory, shared=True) as c:
        state = dict(c.items())
    markers = {}
    for k, v in state.items():
        m = re.fullmatch(r"seq:(\d+):(\d+)", str(k))
        if m: markers[(int(m[1]), int(m[2]))] = v
    exp = expected_counters(markers)
    return sum(state.get(k, 0) - v for k, v in exp.items())
import wbcache.fault_injection.runner as runner
logs = []
_rw = sd.run_worker
def run_worker(config, scratch, **kw):
    run = _rw(config, scratch, **kw)
    ready = [e for e in run.events if e[0] == "R"]
    logs.append(f"===== node {config.node} pid {ready[0][1] if ready else '?'} killed={run.killed} rc={run.returncode} forks={config.forks} opts={config.options}\n" + run.stderr)
    return run
sd.run_worker = run_worker
s = Settings(workdir=tempfile.mkdtemp(prefix="shtort-expD-"), seed=seed, cycles=4*rounds, threads=4, progress=lambda m: print(m, flush=True))
directory = s.path("shared", "directory")
slots = [sd.Slot(i, s, directory, rounds, None) for i in range(4)]
last = 0
for r in range(rounds):
    ths = [threading.Thread(target=slot._one_run, args=(r,)) for slot in slots]
    for t in ths: t.start()
    for t in ths: t.join()
    e = excess(directory)
    if e != last:
        print(f"!!! EXCESS changed {last} -> {e} after round {r}", flush=True)
        last = e
    with open(f"/tmp/shtort-rounds/round{r}.log", "w") as f:
        f.write("\n".join(logs))
    logs.clear()
print("done", last, s.workdir)
