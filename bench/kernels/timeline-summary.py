#!/usr/bin/env python3
"""Summarise kernel-timeline.cc's rows (start_ns,end_ns,grid_x,graph_node_id,name) for the decode graph's replays.

The decode graph is the graph whose nodes ran most often; each replay starts at its first node. For each kernel the
critical-path increment is how far its end moved the step's latest end (0 when it finished under another kernel);
the increments of a replay add up to its span. Printed: per kernel (name and grid), the median replay's increments
and durations (a duration starts when the kernel's first block runs, so under programmatic dependent launch it
includes the wait for the kernel before), then one layer's kernels in order.
With --kernel NAME, also each call of the kernels whose name holds NAME, in step order: its increment's median,
min and max over the replays (a kernel whose time depends on the layer's data shows it here).
With --eager, the kernels outside graphs instead (prefills: bench/decode.ts runs a warm-up prefill, then the timed
one), in bursts split where the GPU idled over 20 ms (the host between two runs): per burst its span, the time some
kernel ran (busy) and the idle rest, and per kernel its calls and summed durations.
usage: timeline-summary.py FILE.csv [--layer N] [--kernel NAME] | FILE.csv --eager"""
import collections
import statistics
import sys


def short(name):
    for cut in ('weft::cuda::', '(anonymous namespace)::', 'decode::', 'void '):
        name = name.replace(cut, '')
    return name.split('(')[0][:60]


def eager(path):
    rows = []
    for line in open(path):
        start, end, grid, node, name = line.rstrip('\n').split(',', 4)
        if not int(node):
            rows.append((int(start), int(end), short(name)))
    rows.sort()
    bursts, latest = [], None
    for r in rows:
        if latest is None or r[0] - latest > 20e6:
            bursts.append([])
        bursts[-1].append(r)
        latest = r[1] if latest is None else max(latest, r[1])
    for i, burst in enumerate(bursts):
        span = max(e for _, e, _ in burst) - burst[0][0]
        busy, s0, e0 = 0, burst[0][0], burst[0][1]
        for s, e, _ in burst[1:]:
            if s > e0:
                busy, s0 = busy + e0 - s0, s
            e0 = max(e0, e)
        busy += e0 - s0
        print(f'\nburst {i}: {len(burst)} kernels, span {span / 1e6:.1f} ms, busy {busy / 1e6:.1f} ms, '
              f'idle {(span - busy) / 1e6:.1f} ms')
        if len(burst) < 100:
            continue
        totals = collections.defaultdict(lambda: [0, 0])
        for s, e, name in burst:
            totals[name][0] += 1
            totals[name][1] += e - s
        print('| kernel | calls | summed durations, ms |')
        print('|---|---|---|')
        for name, (n, d) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            if d >= 0.05 * 1e6:
                print(f'| {name} | {n} | {d / 1e6:.1f} |')


def main():
    path = sys.argv[1]
    if '--eager' in sys.argv:
        return eager(path)
    layer = int(sys.argv[sys.argv.index('--layer') + 1]) if '--layer' in sys.argv else 5
    kernel = sys.argv[sys.argv.index('--kernel') + 1] if '--kernel' in sys.argv else None
    rows = []
    for line in open(path):
        start, end, grid, node, name = line.rstrip('\n').split(',', 4)
        if int(node):
            rows.append((int(start), int(end), int(grid), int(node), short(name)))
    if not rows:
        sys.exit('no kernels of a graph in ' + path)
    counts = collections.Counter(r[3] for r in rows)
    top = max(counts.values())
    rows = sorted((r for r in rows if counts[r[3]] == top), key=lambda r: r[0])
    first = rows[0][3]
    replays, cur = [], []
    for r in rows:
        if r[3] == first and cur:
            replays.append(cur)
            cur = []
        cur.append(r)
    replays.append(cur)
    replays = [p for p in replays if len(p) == len(replays[0])][1:]  # the first replay warms up
    spans = [p[-1][1] - p[0][0] for p in replays]
    med = sorted(range(len(replays)), key=lambda i: spans[i])[len(replays) // 2]
    print(f'{len(replays)} replays of {len(replays[0])} kernels; span median {statistics.median(spans) / 1e3:.1f} us, '
          f'min {min(spans) / 1e3:.1f}')

    def increments(p):
        out, latest = [], p[0][0]
        for s, e, g, n, name in p:
            out.append(max(0, e - latest))
            latest = max(latest, e)
        return out

    def key(r):
        return f'{r[4]} [{r[2]}]'

    incs = [increments(p) for p in replays]
    calls = collections.Counter(key(r) for r in replays[med])
    by_kind = {k: ([], []) for k in calls}  # per replay: the kind's summed increments and durations
    for p, inc in zip(replays, incs):
        sums = collections.defaultdict(lambda: [0, 0])
        for r, d in zip(p, inc):
            sums[key(r)][0] += d
            sums[key(r)][1] += r[1] - r[0]
        for k, (i_sum, d_sum) in sums.items():
            by_kind[k][0].append(i_sum)
            by_kind[k][1].append(d_sum)
    print('| kernel [grid] | calls | increments, us (median replay) | per call | durations, us | per call |')
    print('|---|---|---|---|---|---|')
    for k, (i_sums, d_sums) in sorted(by_kind.items(), key=lambda kv: -statistics.median(kv[1][0])):
        n, i_med, d_med = calls[k], statistics.median(i_sums) / 1e3, statistics.median(d_sums) / 1e3
        print(f'| {k} | {n} | {i_med:.1f} | {i_med / n:.2f} | {d_med:.1f} | {d_med / n:.2f} |')
    # one layer: the kernels from the (layer+1)-th qkv_rope's predecessor on, in start order
    p, inc = replays[med], incs[med]
    ropes = [i for i, r in enumerate(p) if 'rope' in r[4]]
    if len(ropes) > layer + 1:
        a, b = ropes[layer] - 1, ropes[layer + 1] - 1
        t0 = p[a][0]
        print(f'\nlayer {layer} of the median replay (us from its first kernel\'s start):')
        print('| kernel [grid] | start | end | duration | starts after the previous end | increment |')
        print('|---|---|---|---|---|---|')
        for i in range(a, b):
            s, e, g, n, name = p[i]
            print(f'| {name} [{g}] | {(s - t0) / 1e3:.2f} | {(e - t0) / 1e3:.2f} | {(e - s) / 1e3:.2f} | '
                  f'{(s - p[i - 1][1]) / 1e3:.2f} | {inc[i] / 1e3:.2f} |')

    if kernel:
        at = [i for i, r in enumerate(replays[0]) if kernel in r[4]]
        print(f'\n{kernel}: increments by call (us, median / min / max over {len(replays)} replays)')
        print(' '.join(f'{statistics.median(inc[i] for inc in incs) / 1e3:.0f}/{min(inc[i] for inc in incs) / 1e3:.0f}/'
                       f'{max(inc[i] for inc in incs) / 1e3:.0f}' for i in at))


main()
