# ruff: noqa  (a throwaway diagnostic script, see README.md)
import sys, tempfile, os
import wbcache.fault_injection.shared_dir as sd
from wbcache.fault_injection.campaign import Settings
seed, cycles, triggers = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sd.TRIGGERS = tuple(triggers.split(","))
if os.environ.get("SHTORT_NOFORKS"): sd.OTHER_FORKS = 0
if os.environ.get("SHTORT_SLOTS"): sd.SLOTS = int(os.environ["SHTORT_SLOTS"])
out = sys.argv[4]
os.makedirs(out, exist_ok=True)
_rw = sd.run_worker
count = [0]
def run_worker(config, scratch, **kw):
    run = _rw(config, scratch, **kw)
    count[0] += 1
    with open(f"{out}/run{count[0]:05d}-{config.node}.log", "w") as f:
        f.write(run.stderr)
    return run
sd.run_worker = run_worker
s = Settings(workdir=tempfile.mkdtemp(prefix="shtort-expE-"), seed=seed, cycles=cycles, threads=4, progress=None)
o = sd.run_shared_dir(s)
print("OK" if o.ok else "FAIL", o.tally.counter_mismatches, s.workdir, o.tally.messages[:3])
