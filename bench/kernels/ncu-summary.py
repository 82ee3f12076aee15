#!/usr/bin/env python3
"""Summarise an ncu CSV (--csv --page raw with gpu__time_duration.sum) of bench/kernels/step-profile.ts: the kernels
of its profiler range (one decode step's graph replay), grouped by kernel name, in ms and share. Durations are
converted from the unit ncu names in the row under the header (ns, us or ms; it chooses by size).

    python3 bench/kernels/ncu-summary.py ncu.csv
"""
import csv
import sys
from collections import OrderedDict

rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
reader = csv.DictReader(lines)
NS_PER = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}
scale = 1.0
for r in reader:
    name = r.get("Kernel Name") or r.get("Function Name") or ""
    dur = r.get("gpu__time_duration.sum", "")
    if dur in NS_PER:  # the units row
        scale = NS_PER[dur]
        continue
    try:
        d = float(dur.replace(",", "")) * scale  # ns
    except ValueError:
        continue
    grid = r.get("launch__grid_size", "").replace(",", "")
    rows.append((f"{name} grid {grid}" if grid else name, d))
if not rows:
    sys.exit("ncu-summary: no kernel rows")
step = rows
groups = OrderedDict()
for n, d in step:
    grid = n.rsplit(" grid ", 1)[1] if " grid " in n else ""
    short = n.split("(")[0].split("<")[0].replace("weft::cuda::", "").replace("(anonymous namespace)::", "")
    key = f"{short} [{grid} blocks]" if grid else short
    g = groups.setdefault(key, [0, 0.0])
    g[0] += 1
    g[1] += d
total = sum(d for _, d in step)
print(f"kernels in the step: {len(step)}, sum of kernel times {total / 1e6:.3f} ms (serialised by ncu, no overlap)")
print("| kernel | calls | total ms | per call us | share |")
print("|---|---|---|---|---|")
for k, (c, d) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
    print(f"| {k} | {c} | {d / 1e6:.3f} | {d / c / 1e3:.1f} | {100 * d / total:.1f}% |")
# per-call sequence of the first layer, to see the order
print("\nfirst 14 kernels of the step (ns):", [(n.split("(")[0][-40:], int(d)) for n, d in step[:14]])
