import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { type ModelSpec, readModelSpec } from '../../core/model-spec.ts';
import { planShards, workingTpSizes } from '../../core/shard-plan.ts';
import { weftError } from '../helpers/safetensors-files.ts';
import { fixtureDir } from '../helpers/fixtures.ts';

const LLAMA_TINY = readModelSpec(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/hf-tiny/llama-tiny')); // 4 heads, 2 kv, ffn 176, vocab 512

/** Shapes of published models, enough for planning. */
const spec = (s: Partial<ModelSpec>): ModelSpec => ({ ...LLAMA_TINY, ...s });
const LLAMA2_7B = spec({ hidden: 4096, nHeads: 32, nKvHeads: 32, headDim: 128, ffnDim: 11008, vocabSize: 32000 });
const LLAMA3_70B = spec({ hidden: 8192, nHeads: 64, nKvHeads: 8, headDim: 128, ffnDim: 28672, vocabSize: 128256 });
const MIXTRAL_8X7B = spec({ family: 'mixtral', architecture: 'MixtralForCausalLM', hidden: 4096, nHeads: 32, nKvHeads: 8, headDim: 128, ffnDim: 14336, vocabSize: 32000, nExperts: 8, nExpertsPerToken: 2 });


describe('planShards', () => {
  it('tp 1 holds everything', () => {
    assert.deepEqual(planShards(LLAMA_TINY, 1), {
      tp: 1, nHeadsPerRank: 4, nKvHeadsPerRank: 2, ffnPerRank: 176, expertParallel: false,
      ranks: [{ rank: 0, qHeads: { start: 0, end: 4 }, kvHeads: { start: 0, end: 2 }, ffn: { start: 0, end: 176 }, vocab: { start: 0, end: 512 }, experts: { start: 0, end: 0 }, expertFfn: { start: 0, end: 176 } }],
    });
  });

  it('tp 2 splits heads, kv heads, ffn and vocab evenly', () => {
    const plan = planShards(LLAMA_TINY, 2);
    assert.deepEqual([plan.nHeadsPerRank, plan.nKvHeadsPerRank, plan.ffnPerRank], [2, 1, 88]);
    assert.deepEqual(plan.ranks[1], { rank: 1, qHeads: { start: 2, end: 4 }, kvHeads: { start: 1, end: 2 }, ffn: { start: 88, end: 176 }, vocab: { start: 256, end: 512 }, experts: { start: 0, end: 0 }, expertFfn: { start: 88, end: 176 } });
    assert.deepEqual(JSON.parse(JSON.stringify(plan)), plan); // plain data
  });

  it('replicates kv heads when there are fewer than ranks: rank r holds floor(r * nKvHeads / tp)', () => {
    const plan = planShards(LLAMA_TINY, 4);
    assert.equal(plan.nKvHeadsPerRank, 1);
    assert.deepEqual(plan.ranks.map((r) => r.kvHeads.start), [0, 0, 1, 1]);
    const l70 = planShards(LLAMA3_70B, 16);
    assert.deepEqual(l70.ranks.map((r) => r.kvHeads.start), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]);
  });

  it('every rank holds the kv heads its query heads read (GQA group = nHeads / nKvHeads)', () => {
    for (const s of [LLAMA_TINY, LLAMA2_7B, LLAMA3_70B, MIXTRAL_8X7B]) {
      for (const tp of workingTpSizes(s)) {
        const plan = planShards(s, tp);
        const group = s.nHeads / s.nKvHeads;
        const covered = new Array<number>(s.nHeads).fill(0);
        for (const r of plan.ranks) {
          assert.equal(r.qHeads.end - r.qHeads.start, plan.nHeadsPerRank);
          assert.equal(r.kvHeads.end - r.kvHeads.start, plan.nKvHeadsPerRank);
          for (let q = r.qHeads.start; q < r.qHeads.end; q++) {
            covered[q]! += 1;
            const kv = Math.floor(q / group);
            assert.ok(r.kvHeads.start <= kv && kv < r.kvHeads.end, `tp ${tp} rank ${r.rank}: q head ${q} needs kv head ${kv}`);
          }
        }
        assert.ok(covered.every((c) => c === 1), `tp ${tp}: each query head on exactly one rank`);
        assert.equal(plan.ranks.at(-1)!.ffn.end, s.ffnDim);
        assert.equal(plan.ranks.at(-1)!.vocab.end, s.vocabSize);
      }
    }
  });

  it('splits the vocab unevenly: ceil(vocab / tp) rows, the last rank fewer', () => {
    const rows = (s: ModelSpec, tp: number) => planShards(s, tp).ranks.map((r) => r.vocab.end - r.vocab.start);
    assert.deepEqual(rows(spec({ vocabSize: 1000 }), 4), [250, 250, 250, 250]);
    assert.deepEqual(rows(spec({ vocabSize: 1001 }), 4), [251, 251, 251, 248]);
    const v32k = spec({ nHeads: 24, nKvHeads: 3, ffnDim: 3 * 176, vocabSize: 32000 });
    assert.deepEqual(rows(v32k, 3), [10667, 10667, 10666]);
    assert.deepEqual(planShards(v32k, 3).ranks.map((r) => r.vocab.start), [0, 10667, 21334]);
  });

  it('published shapes split as expected', () => {
    assert.deepEqual(workingTpSizes(LLAMA2_7B), [1, 2, 4, 8, 16, 32]);
    assert.equal(planShards(LLAMA2_7B, 8).ffnPerRank, 1376);
    assert.deepEqual(workingTpSizes(LLAMA3_70B), [1, 2, 4, 8, 16, 32, 64]);
    const mixtral = planShards(MIXTRAL_8X7B, 8);
    assert.deepEqual([mixtral.nHeadsPerRank, mixtral.nKvHeadsPerRank, mixtral.ffnPerRank], [4, 1, 1792]);
  });
});

describe('planShards refusals (WEFT_BAD_SHARD, before any load)', () => {
  it('names every broken constraint with its numbers, and the TP sizes that work', () => {
    assert.throws(
      () => planShards(LLAMA_TINY, 3),
      weftError('WEFT_BAD_SHARD', /^cannot split LlamaForCausalLM over tp=3: 4 query heads do not divide by 3 \(remainder 1\); 2 kv heads cannot be replicated evenly over 3 ranks \(3 is not a multiple of 2\); intermediate size 176 does not divide by 3 \(remainder 2\)\. TP sizes that work for this model: 1, 2, 4$/),
    );
  });

  it('kv heads: divisible when at least tp, a divisor of tp when fewer', () => {
    assert.throws(() => planShards(spec({ nHeads: 12, nKvHeads: 6, ffnDim: 96 }), 4), weftError('WEFT_BAD_SHARD', /6 kv heads do not divide by 4 \(remainder 2\).*TP sizes that work for this model: 1, 2, 3, 6, 12$/));
    assert.throws(() => planShards(spec({ nHeads: 12, nKvHeads: 3, ffnDim: 96 }), 4), weftError('WEFT_BAD_SHARD', /3 kv heads cannot be replicated evenly over 4 ranks \(4 is not a multiple of 3\)/));
    assert.equal(planShards(spec({ nHeads: 12, nKvHeads: 3, ffnDim: 96 }), 6).nKvHeadsPerRank, 1);
  });

  it('refuses a vocab split that leaves a rank with no rows', () => {
    // 9 rows over 4 ranks at ceil(9/4) = 3 rows each: 3, 3, 3, 0.
    assert.throws(() => planShards(spec({ vocabSize: 9 }), 4), weftError('WEFT_BAD_SHARD', /vocab 9 at ceil\(9\/4\) = 3 rows per rank leaves rank 3 with no rows\. TP sizes that work for this model: 1, 2$/));
  });

  it('refuses a tp that is not a positive integer', () => {
    for (const tp of [0, -2, 1.5, Number.NaN]) {
      assert.throws(() => planShards(LLAMA_TINY, tp), weftError('WEFT_BAD_SHARD', new RegExp(`tp must be a positive integer, got ${tp}\\. TP sizes that work for this model: 1, 2, 4`)));
    }
  });
});

describe('planShards with expert parallelism', () => {
  const mixtral = readModelSpec(fixtureDir('mixtral-tiny'));
  it('whole experts per rank, nothing cut along the intermediate dimension', () => {
    const plan = planShards(mixtral, 2, { expertParallel: true });
    assert.equal(plan.expertParallel, true);
    assert.deepEqual(plan.ranks.map((r) => [r.experts, r.expertFfn]), [
      [{ start: 0, end: 2 }, { start: 0, end: mixtral.ffnDim }],
      [{ start: 2, end: 4 }, { start: 0, end: mixtral.ffnDim }],
    ]);
    const cut = planShards(mixtral, 2);
    assert.deepEqual(cut.ranks[1]!.experts, { start: 0, end: 4 });
    assert.deepEqual(cut.ranks[1]!.expertFfn, cut.ranks[1]!.ffn);
  });
  it('refused when the experts do not divide, or the model has none', () => {
    assert.throws(() => planShards({ ...mixtral, nHeads: 8, nKvHeads: 8 }, 8, { expertParallel: true }), weftError('WEFT_BAD_SHARD', /4 experts do not divide by 8/));
    assert.throws(() => planShards(LLAMA_TINY, 2, { expertParallel: true }), weftError('WEFT_BAD_SHARD', /no experts/));
  });
});
