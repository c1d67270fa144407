# ruff: noqa  (a throwaway diagnostic script, see README.md)
import json, sys, glob
from collections import Counter, defaultdict
from wbcache.fault_injection.counters import counter_of
applies, done = [], set()
for path in sys.argv[1:]:
    for line in open(path, errors="replace"):
        i = line.find("APPLYING {")
        if i >= 0:
            try:
                a = json.loads(line[i + 9:]); a["file"] = path.rsplit("/", 1)[-1]; applies.append(a)
            except Exception: pass
        elif line.startswith("APPLIED "):
            _, pid, lane, ck = line.split()
            done.add((int(pid), lane, int(ck)))
applies.sort(key=lambda a: a["t"])
by_lane = defaultdict(list)
for a in applies:
    by_lane[a["lane"]].append(a)
committed = []
for lane, lst in by_lane.items():
    for i, a in enumerate(lst):
        if (a["pid"], lane, a["after"]) in done:
            a["ok"] = True
        else:
            nxt = lst[i + 1] if i + 1 < len(lst) else None
            a["ok"] = nxt is not None and nxt["before"] == a["after"] and nxt["before"] != a["before"]
            a["unconfirmed"] = True
        if a["ok"]:
            committed.append(a)
        if i and a["ok"] and a["before"] < lst[i-1]["after"] and lst[i-1]["ok"]:
            print("OVERLAP", lane, lst[i-1]["pid"], lst[i-1]["before"], lst[i-1]["after"], "then", a["pid"], a["before"], a["after"], a["file"])
committed.sort(key=lambda a: a["t"])
prev = {}
for a in committed:
    exp = Counter()
    for key, new in a["markers"].items():
        _, node, thread = key.split(":")
        w = (int(node), int(thread)); p = prev.get(w, 0)
        if new < p:
            print("MARKER REGRESSION", w, p, new, a["pid"], a["lane"], a["file"])
        for n in range(p + 1, new + 1):
            exp[counter_of(w[0], w[1], n)] += 1
        prev[w] = max(p, new)
    act = Counter(a["incs"])
    extra, missing = sum((act - exp).values()), sum((exp - act).values())
    if extra:
        print("EXTRA", extra, "missing", missing, a["pid"], a["thread"], a["lane"], a["before"], "->", a["after"], a["file"], a.get("unconfirmed", False), a["markers"])
print(len(applies), "applies,", len(committed), "committed")
if len(sys.argv) > 1 and __import__("os").environ.get("EVDIR"):
    import wbcache
    with wbcache.open(__import__("os").environ["EVDIR"], shared=True) as c:
        state = dict(c.items())
    for w, m in sorted(prev.items()):
        db = state.get(f"seq:{w[0]}:{w[1]}", 0)
        if db != m:
            print("DB MARKER", w, "db", db, "max applied", m)
    from wbcache.fault_injection.counters import expected_counters
    exp = expected_counters(prev)
    ex = {k: state.get(k, 0) - v for k, v in exp.items() if state.get(k, 0) != v}
    print("counters vs applied markers:", sum(ex.values()), list(ex.items())[:10])
