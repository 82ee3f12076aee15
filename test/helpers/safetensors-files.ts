/** Reading and writing safetensors files by hand in tests: an independent reader, and bad files on demand. */
import { readFileSync, writeFileSync } from 'node:fs';
import assert from 'node:assert/strict';
import { isWeftError } from '../../core/errors.ts';

export interface RawTensor {
  name: string;
  dtype: string;
  shape: number[];
  bytes: Buffer;
}

/** Independent reader: the whole file parsed by hand, tensors in offset order. */
export function readTensors(file: string): RawTensor[] {
  const buf = readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  return Object.entries(header)
    .filter(([name]) => name !== '__metadata__')
    .sort(([, a], [, b]) => a.data_offsets[0] - b.data_offsets[0])
    .map(([name, t]) => ({ name, dtype: t.dtype, shape: t.shape, bytes: buf.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1]) }));
}

/** The header object as written, and the bytes after it. */
export function headerOf(tensors: RawTensor[]): Record<string, unknown> {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  return header;
}

export function writeTensors(file: string, tensors: RawTensor[]): void {
  const json = Buffer.from(JSON.stringify(headerOf(tensors)));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, ...tensors.map((t) => t.bytes)]));
}

/** An assert.throws/rejects matcher: a WeftError with this code and a message matching the pattern. */
export function weftError(code: string, pattern: RegExp) {
  return (err: unknown): true => {
    assert.ok(isWeftError(err), `expected a WeftError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, pattern);
    return true;
  };
}
