#!/usr/bin/env python3
"""One kernel's time by phase from Nsight Compute's source page: where its warps were sampled (stall reasons) and how
many instructions each phase executed. The phases are the kernel's "// ---- " comments (attention-sparq.cu marks its
steps so), read from the source as it was built (the CSV lists code lines only); a machine instruction belongs to
the phase of its source line when that line lies in that file at or after the first marker, and otherwise (inlined helpers, headers) to the phase of the instruction before it in
address order. Why: a kernel whose few blocks each run a long chain (SparQ at batch 1) is bound by instruction issue
and barriers, which a per-kernel summary does not show (bench/RESULTS.md, session 39).

On the GPU host, with a build that has line info (NVCC_FLAGS=-lineinfo for the *-run.sh scripts):
    ncu --clock-control none --kernel-name regex:NAME --launch-skip S --launch-count 1 \\
        --section WarpStateStats --section SourceCounters --import-source yes -o rep BENCH ARGS...
    ncu --import rep.ncu-rep --page source --csv --print-source cuda,sass > src.csv
then (anywhere):
    python3 bench/kernels/ncu-phases.py src.csv native/src/cuda/attention-sparq.cu [--warps N]
--warps (the launch's blocks x warps a block) turns executed instructions into instructions a warp.
"""
import argparse
import csv
import re
from collections import OrderedDict

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("csv")
ap.add_argument("source", help="the kernel's source file as it was built (its '// ---- ' lines name the phases)")
ap.add_argument("--warps", type=int, help="warps the launch ran, for instructions a warp")
args = ap.parse_args()

# The CSV: per source file a "File Path" row, a header row, then each source line's row (its number and text)
# followed by the rows of its machine instructions (empty line number, an address).
main = args.source.split("/")[-1]
files = OrderedDict()  # file -> {line: text}
insts = {}  # address -> (file, line, warp instructions executed, samples, {stall: samples})
header, path, line = None, None, None
with open(args.csv, newline="") as f:
    for row in csv.reader(f):
        if len(row) == 2 and row[0] == "File Path":
            path = row[1].split("/")[-1]
            files.setdefault(path, {})
            continue
        if len(row) > 2 and row[0] == "Line No":
            header = row
            continue
        if header is None or len(row) != len(header):
            continue
        if row[0] != "":
            line = int(row[0])
            files[path][line] = row[1]
            continue
        if not row[2].startswith("0x"):
            continue
        col = dict(zip(header[2:], row[2:]))  # the machine-instruction columns (after line number and text)
        stalls = {k[6:]: int(v) for k, v in zip(header[4:], row[4:])
                  if k.startswith("stall_") and "(Not" not in k and v.isdigit() and int(v) > 0}
        addr = int(row[2], 16)
        entry = (path, line, int(col.get("Instructions Executed") or 0),
                 int(col.get("Warp Stall Sampling (All Samples)") or 0), stalls)
        # an instruction listed under several inline levels keeps the profiled file's line
        if addr not in insts or entry[0] == main:
            insts[addr] = entry

if main not in files:
    raise SystemExit(f"ncu-phases: {args.csv} has no lines of {main} (files: {', '.join(files) or 'none'})")
with open(args.source) as f:
    markers = [(n, re.sub(r"^\s*// ---- ", "", t).split(":")[0].strip()[:36])
               for n, t in enumerate(f, 1) if t.lstrip().startswith("// ---- ")]
if not markers:
    raise SystemExit(f"ncu-phases: no '// ---- ' lines in {args.source}")
first = markers[0][0]


def phase_of(n):
    name = "start"
    for start, label in markers:
        if n >= start:
            name = label
    return name


totals = OrderedDict((label, [0, 0, {}]) for label in ["start"] + [m[1] for m in markers])
current = "start"
for addr in sorted(insts):
    path, n, executed, samples, stalls = insts[addr]
    if path == main and n >= first:
        current = phase_of(n)
    t = totals[current]
    t[0] += executed
    t[1] += samples
    for k, v in stalls.items():
        t[2][k] = t[2].get(k, 0) + v

all_exec = sum(t[0] for t in totals.values()) or 1
all_samples = sum(t[1] for t in totals.values()) or 1
unit = "a warp" if args.warps else "in all"
print(f"{'phase':42s} {'instructions ' + unit:>20s} {'share':>6s} {'samples':>8s}  top stalls")
for label, (executed, samples, stalls) in totals.items():
    if executed == 0 and samples == 0:
        continue
    count = executed / args.warps if args.warps else executed
    top = ", ".join(f"{k} {v}" for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:3])
    print(f"{label:42s} {count:20.0f} {100 * executed / all_exec:5.1f}% {100 * samples / all_samples:7.1f}%  {top}")
print(f"{'all':42s} {(all_exec / args.warps if args.warps else all_exec):20.0f}")
