/**
 * The markdown table of product-bench rows (bench/product.ts writes them): each figure beside its floor and
 * gpt-fast's figure at the same batch. Run on a rows file, it prints that file's table:
 *
 *   node --import tsx bench/product-table.ts bench-product.jsonl
 */
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

export type ProductPath = 'generate' | 'serve' | 'in-process' | 'gpt-fast';

export interface ProductRow {
  model: string;
  batch: number;
  path: ProductPath;
  tokensPerS: number;
  ttftMs: number | null;
  /** null where no bandwidth was measured (the CPU) */
  floorMs: number | null;
  anchorTokensPerS: number | null;
  /** serve: decode rate while every stream was decoding */
  steadyTokensPerS?: number | null;
  /** generate and serve: seconds from the process start to ready (weights loaded) */
  loadS?: number;
}

const fixed = (x: number | null | undefined, digits: number): string => (x === null || x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(digits));

export function productTable(rows: readonly ProductRow[]): string {
  const lines = ['| model | batch | path | tok/s | steady tok/s | TTFT ms | floor ms | % of floor | x gpt-fast |', '|---|---|---|---|---|---|---|---|---|'];
  for (const r of rows) {
    const ofFloor = r.floorMs === null ? null : (r.floorMs * r.tokensPerS) / (r.batch * 1000); // floor / measured step time
    const ratio = r.anchorTokensPerS ? r.tokensPerS / r.anchorTokensPerS : null;
    lines.push(`| ${r.model} | ${r.batch} | ${r.path} | ${fixed(r.tokensPerS, 1)} | ${fixed(r.steadyTokensPerS, 1)} | ${fixed(r.ttftMs, 1)} | ${fixed(r.floorMs, 3)} | ${fixed(ofFloor === null ? null : ofFloor * 100, 1)} | ${fixed(ratio, 3)} |`);
  }
  return lines.join('\n');
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const text = readFileSync(process.argv[2] ?? 'bench-product.jsonl', 'utf8');
  const rows = text.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as ProductRow & { gpu?: string; commit?: string; bandwidthGBs?: number | null });
  if (rows.length === 0) console.log('(no rows)');
  else console.log(`${rows[0]!.gpu}, commit ${String(rows[0]!.commit).slice(0, 12)}, read bandwidth ${fixed(rows[0]!.bandwidthGBs, 0)} GB/s\n\n${productTable(rows)}`);
}
