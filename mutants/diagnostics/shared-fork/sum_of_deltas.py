# ruff: noqa  (a throwaway diagnostic script, see README.md)
import json, sys, re
from collections import Counter, defaultdict
import wbcache
applies, done = [], set()
for path in sys.argv[2:]:
    for line in open(path, errors="replace"):
        i = line.find("APPLYING {")
        if i >= 0:
            a = json.loads(line[i + 9:]); a["file"] = path.rsplit("/", 1)[-1]; applies.append(a)
        elif line.startswith("APPLIED "):
            _, pid, lane, ck = line.split(); done.add((int(pid), lane, int(ck)))
with wbcache.open(sys.argv[1], shared=True) as c:
    state = dict(c.items())
by_lane = defaultdict(list)
for a in sorted(applies, key=lambda a: a["t"]):
    by_lane[a["lane"]].append(a)
total = Counter(); uncertain = []
for lane, lst in by_lane.items():
    for i, a in enumerate(lst):
        nxt = lst[i + 1] if i + 1 < len(lst) else None
        if (a["pid"], lane, a["after"]) in done or (nxt is not None and nxt["before"] == a["after"] != a["before"]):
            total.update(a["incs"])
        elif nxt is None:
            uncertain.append(a)
# an uncertain last apply committed if the database holds its markers
for a in uncertain:
    if all(state.get(k) == v for k, v in a["markers"].items()):
        total.update(a["incs"])
    else:
        print("last apply not committed:", a["lane"], a["before"], a["after"])
diff = {k: state.get(k, 0) - total.get(k, 0) for k in set(total) | {k for k in state if re.fullmatch(r"c\d+", str(k))}}
diff = {k: v for k, v in diff.items() if v}
print("database counters minus the sum of committed deltas:", sum(diff.values()), sorted(diff.items(), key=lambda kv: int(kv[0][1:]))[:40])
