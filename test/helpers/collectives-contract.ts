/**
 * The contract every Collectives implementation keeps, written once as a function of an implementation and
 * registered by test/unit/collectives.test.ts (every implementation this machine has),
 * test/gpu/collectives.test.ts (NCCL) and test/gpu/shared-gpu.test.ts (ranks in processes of their own on one GPU,
 * behind proxies: test/gpu/shared-gpu-group.ts). Each case runs the same collective on every rank at once and
 * checks every rank's result.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, nativeInfo, type Engine, type Tensor } from '../../worker/native.ts';
import { soloCollectives, type Collectives } from '../../worker/collectives/collectives.ts';
import { bindCollectiveHub, CpuCollectives } from '../../worker/collectives/cpu.ts';
import { loadNccl, NcclCollectives } from '../../worker/collectives/nccl.ts';

export interface CollectiveGroup {
  readonly ranks: readonly Collectives[];
  /** the engine rank r computes on (ranks may share one) */
  readonly engines: readonly Engine[];
  /** Makes rank r vanish as a dead process would; null when the group has no peer to lose. */
  readonly killRank: ((rank: number) => void) | null;
  close(): void;
}

export interface Implementation {
  readonly name: string;
  /** why it cannot run on this machine, or false */
  readonly skip: string | false;
  /** Which rank a survivor names when `dead` is gone: the rank it waits on. Defaults to the hub's (rank 0 waits on the dead rank, the others on rank 0). */
  readonly waitsOn?: (rank: number, dead: number) => number;
  open(options: { peerTimeoutMs?: number }): Promise<CollectiveGroup>;
}

function cpuEngine(): Engine {
  return createEngine({ backend: 'cpu', threads: 1 });
}

export function soloImplementation(): Implementation {
  return {
    name: 'solo (one rank)',
    skip: false,
    open: async () => ({ ranks: [soloCollectives()], engines: [cpuEngine()], killRank: null, close: () => undefined }),
  };
}

export const HUB_SECRET = 'collectives-contract-secret';

/** The ZeroMQ hub with `world` ranks in this process, over loopback TCP. */
export function cpuHubImplementation(world: number): Implementation {
  return {
    name: `CPU hub, ${world} ranks`,
    skip: false,
    async open({ peerTimeoutMs }) {
      const engine = cpuEngine();
      const hub = await bindCollectiveHub('127.0.0.1');
      const ranks = await Promise.all(
        Array.from({ length: world }, (_, r) => CpuCollectives.create(engine, r, world, r === 0 ? hub.socket : null, hub.endpoint, { secret: HUB_SECRET, peerTimeoutMs })),
      );
      const closed = new Set<number>();
      const close = (r: number) => {
        if (!closed.has(r)) ranks[r]!.close();
        closed.add(r);
      };
      return { ranks, engines: ranks.map(() => engine), killRank: close, close: () => ranks.forEach((_, r) => close(r)) };
    },
  };
}

export function ncclSkipReason(): string | false {
  if (!nativeInfo().cuda) return 'NCCL needs a CUDA build (WEFT_CUDA=1 node native/build.mjs) and a GPU';
  try {
    createEngine({ backend: 'cuda' });
  } catch (err) {
    return `NCCL needs a GPU: ${(err as Error).message}`;
  }
  try {
    loadNccl();
  } catch (err) {
    return (err as Error).message;
  }
  return false;
}

/** A one-rank NCCL communicator on GPU 0: the same calls as a real group, with nothing to lose. */
export function ncclImplementation(): Implementation {
  return {
    name: 'NCCL, 1 rank',
    skip: ncclSkipReason(),
    async open() {
      const engine = createEngine({ backend: 'cuda' });
      const comm = await NcclCollectives.create(engine, 0, 1, loadNccl().getUniqueId());
      return { ranks: [comm], engines: [engine], killRank: null, close: () => comm.close() };
    },
  };
}

function upload(engine: Engine, values: Float32Array, shape: number[]): Tensor {
  return engine.upload(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), 'f32', shape);
}

/** Row counts every gather case covers: one (decode of one sequence), odd counts, and more than a graph bucket. */
export const GATHER_ROWS = [1, 3, 5, 17] as const;

/** Rank r's piece [rows, width]: values that say where they came from, exact in f32. */
export function piece(r: number, rows: number, width: number): Float32Array {
  return Float32Array.from({ length: rows * width }, (_, i) => r * 10_000 + Math.floor(i / width) * 100 + (i % width) + 0.5);
}

/** What allGatherCols of every rank's `piece` gives: [rows, Σ widths], rank by rank within each row. */
export function gatheredPieces(rows: number, widths: readonly number[]): number[] {
  const expected: number[] = [];
  for (let t = 0; t < rows; t++) widths.forEach((w, r) => expected.push(...piece(r, rows, w).subarray(t * w, (t + 1) * w)));
  return expected;
}

export function collectiveContract(impl: Implementation): void {
  describe(`collectives contract: ${impl.name}`, { skip: impl.skip }, () => {
    let group: CollectiveGroup;
    before(async () => {
      group = await impl.open({});
    });
    after(() => group?.close());
    const each = <T>(f: (comm: Collectives, engine: Engine, r: number) => Promise<T>): Promise<T[]> =>
      Promise.all(group.ranks.map((comm, r) => f(comm, group.engines[r]!, r)));

    it('all-reduce: every rank gets the element-wise sum', async () => {
      const world = group.ranks.length;
      const input = (r: number) => Float32Array.from({ length: 12 }, (_, i) => (r + 1) * (i - 5) * 0.25);
      const expected = Float32Array.from({ length: 12 }, (_, i) => Array.from({ length: world }, (_, r) => input(r)[i]!).reduce((a, b) => a + b, 0));
      const results = await each(async (comm, engine, r) => engine.download(await comm.allReduce(upload(engine, input(r), [3, 4]))));
      results.forEach((got, r) => assert.deepEqual(Array.from(got), Array.from(expected), `rank ${r}`));
    });

    for (const widthsOf of [(_r: number) => 4, (r: number) => [5, 2, 7, 3][r % 4]!] as const) {
      for (const rows of GATHER_ROWS) {
        const kind = widthsOf(1) === 4 ? 'equal widths' : 'uneven widths';
        it(`all-gather of ${rows} row${rows > 1 ? 's' : ''}, ${kind}: [T, ΣNr] in rank order on every rank`, async () => {
          const world = group.ranks.length;
          const widths = Array.from({ length: world }, (_, r) => widthsOf(r));
          for (const comm of group.ranks) comm.prepare({ gatherWidths: widths });
          const total = widths.reduce((a, b) => a + b, 0);
          const expected = gatheredPieces(rows, widths);
          const results = await each(async (comm, engine, r) => {
            const gathered = await comm.allGatherCols(upload(engine, piece(r, rows, widths[r]!), [rows, widths[r]!]));
            assert.deepEqual(gathered.shape, [rows, total], `rank ${r} shape`);
            return engine.download(gathered);
          });
          results.forEach((got, r) => assert.deepEqual(Array.from(got), expected, `rank ${r}`));
        });
      }
    }

    it('asyncError is null while the group is healthy', () => {
      group.ranks.forEach((comm, r) => assert.equal(comm.asyncError(), null, `rank ${r}`));
    });

    it('a gather of another width than prepared fails on the rank that made it, naming it', async () => {
      const world = group.ranks.length;
      for (const comm of group.ranks) comm.prepare({ gatherWidths: Array.from({ length: world }, () => 3) });
      const outcomes = await Promise.allSettled(group.ranks.map((comm, r) => comm.allGatherCols(upload(group.engines[r]!, piece(r, 2, 4), [2, 4]))));
      outcomes.forEach((o, r) => {
        assert.equal(o.status, 'rejected', `rank ${r}`);
        assert.match(String((o as PromiseRejectedResult).reason), new RegExp(`rank ${r}: allGatherCols of \\[2, 4\\], but prepare\\(\\) declared 3 columns for rank ${r}`));
      });
      group.ranks.forEach((comm, r) => assert.equal(comm.asyncError(), null, `a refused call leaves rank ${r} healthy`));
    });
  });

  describe(`collectives contract: ${impl.name}, a dead peer`, { skip: impl.skip }, () => {
    // the peer lost just before the collective, or well before it (its socket closed and the close seen)
    for (const [when, settleMs] of [['', 0], [', gone well before the collective', 200]] as const)
      it(`is an error naming the rank, after a bounded wait, not a wait forever${when}`, { timeout: 30_000 }, async (t) => {
        const peerTimeoutMs = 300;
        const group = await impl.open({ peerTimeoutMs });
        try {
          if (group.killRank === null) return t.skip(`${impl.name} has no peer to lose`);
          const dead = group.ranks.length - 1;
          group.killRank(dead);
          await new Promise((resolve) => setTimeout(resolve, settleMs));
          const started = Date.now();
          const survivors = group.ranks.slice(0, dead);
          const outcomes = await Promise.allSettled(survivors.map((comm, r) => comm.allReduce(upload(group.engines[r]!, piece(r, 2, 2), [2, 2]))));
          assert.ok(Date.now() - started < 20 * peerTimeoutMs, `failed within ${Date.now() - started} ms`);
          outcomes.forEach((o, r) => {
            assert.equal(o.status, 'rejected', `rank ${r} must fail`);
            // The hub names the rank that did not answer; the others name the hub they wait on (impl.waitsOn). A rank
            // that sends to the dead one first (two CPU ranks trade pieces) may instead fail on the send.
            const waitedOn = impl.waitsOn?.(r, dead) ?? (r === 0 ? dead : 0);
            assert.match(String((o as PromiseRejectedResult).reason), new RegExp(`rank ${r}: allReduce #0: (no answer from rank ${waitedOn} within ${peerTimeoutMs} ms|cannot send to rank ${waitedOn} )`));
          });
          assert.match(survivors[0]!.asyncError() ?? '', new RegExp(`(no answer from|cannot send to) rank ${dead}`), 'the failure stays visible to the heartbeat');
        } finally {
          group.close();
        }
      });
  });
}
