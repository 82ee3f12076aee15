/**
 * A GPTQ/AWQ checkpoint's projections as one rank loads them (ModelSpec.quantization.packed): each source matrix's
 * packed tensors are read whole, unpacked into weft's int4 or int8 format (core/packed-int4.ts), and the rank's rows
 * or columns (with their scales) cut from that, so the layout table and the shard plan serve it unchanged.
 */
import { checkPackedShapes, readWeftMatrix, type PackedInt4Config } from '../../core/packed-int4.ts';
import type { WeightFiles } from '../../core/safetensors.ts';
import type { QuantizedFormat } from '../../core/weight-format.ts';
import type { ShardTensor, SourceSlice } from './layout.ts';

const prefixOf = (s: SourceSlice) => s.hfName.replace(/\.weight$/, '');

/** Every packed tensor a source needs is there with the shape its [N, K] implies (before any data is read). */
export function checkPackedSource(files: WeightFiles, t: ShardTensor, s: SourceSlice, packing: PackedInt4Config): void {
  const [n, k] = s.hfShape as [number, number];
  checkPackedShapes(prefixOf(s), packing, n, k, files, `for weft's ${t.name}`);
}

/** The rank's part of `t`: its sources unpacked and cut, concatenated along dim 0, values then scales. */
export async function readPacked(files: WeightFiles, t: ShardTensor, format: QuantizedFormat, packing: PackedInt4Config): Promise<{ data: Uint8Array; scales: Uint8Array }> {
  const dataParts: Uint8Array[] = [];
  const scaleParts: Uint8Array[] = [];
  for (const s of t.sources) {
    const m = await readWeftMatrix(files, prefixOf(s), packing, format.kind); // the whole matrix
    const rowBytes = format.kind === 'int4' ? m.k / 2 : m.k;
    const group = m.k / m.groups;
    if (s.cut === 'all') {
      dataParts.push(m.data);
      scaleParts.push(m.scales);
    } else if (s.cut === 'rows') {
      const { start, end } = s.range!;
      dataParts.push(m.data.subarray(start * rowBytes, end * rowBytes));
      scaleParts.push(m.scales.subarray(start * m.groups * 2, end * m.groups * 2));
    } else {
      // columns [start, end) of every row; a group never straddles two ranks (the shard plan checks the widths)
      const { start, end } = s.range!;
      const perByte = format.kind === 'int4' ? 2 : 1;
      const [g0, g1] = m.groups === 1 ? [0, 1] : [start / group, end / group];
      const data = new Uint8Array((m.n * (end - start)) / perByte);
      const scales = new Uint8Array(m.n * (g1 - g0) * 2);
      for (let r = 0; r < m.n; r++) {
        data.set(m.data.subarray(r * rowBytes + start / perByte, r * rowBytes + end / perByte), (r * (end - start)) / perByte);
        scales.set(m.scales.subarray((r * m.groups + g0) * 2, (r * m.groups + g1) * 2), r * (g1 - g0) * 2);
      }
      dataParts.push(data);
      scaleParts.push(scales);
    }
  }
  return { data: Buffer.concat(dataParts), scales: Buffer.concat(scaleParts) };
}
