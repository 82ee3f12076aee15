/**
 * reliability.md G13: weight headers are untrusted input. 1,000 mutated safetensors headers (byte flips in the
 * JSON, and structural edits: shapes and offsets out of range, overlapping, huge or fractional, unknown dtypes,
 * shape products past 2^53, non-UTF-8) each either parse into a header whose every tensor lies inside the file,
 * or fail with WEFT_BAD_WEIGHTS naming the file. Nothing else may escape: no TypeError, no RangeError, no hang.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { parseHeader } from '../../core/safetensors.ts';
import { isWeftError } from '../../core/errors.ts';
import { FIXTURES } from '../helpers/fixtures.ts';
import { prng } from '../helpers/random.ts';

const file = join(FIXTURES, 'llama-tiny', 'model.safetensors');
const bytes = readFileSync(file);
const headerLength = Number(bytes.readBigUInt64LE(0));
const headerJson = bytes.subarray(8, 8 + headerLength);
const fileSize = statSync(file).size;

type Entry = { dtype: string; shape: number[]; data_offsets: [number, number] };

function structural(rand: () => number): Uint8Array {
  const header = JSON.parse(headerJson.toString('utf8')) as Record<string, Entry>;
  const names = Object.keys(header).filter((n) => n !== '__metadata__');
  const entry = header[names[Math.floor(rand() * names.length)]!]!;
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const edits: Array<() => void> = [
    () => (entry.shape = [pick([-1, 0, 2 ** 31, 2 ** 53, 1.5, 1e308])]),
    () => (entry.shape = [2 ** 27, 2 ** 27, 2 ** 27]), // product past 2^53
    () => (entry.data_offsets = [entry.data_offsets[0], entry.data_offsets[1] + pick([1, 4, fileSize, -8])]),
    () => (entry.data_offsets = [pick([-4, 0, fileSize, 2 ** 60]), entry.data_offsets[1]]),
    () => (entry.data_offsets = [entry.data_offsets[1], entry.data_offsets[0]]),
    () => (entry.dtype = pick(['F64', 'I8', 'U8', 'BOOL', 'F8_E4M3', 'x', ''])),
    () => ((entry as unknown as Record<string, unknown>).shape = pick(['64', null, {}, [[64]]])),
    () => ((entry as unknown as Record<string, unknown>).data_offsets = pick([null, [0], 'a', [0, 1, 2]])),
    () => (header[names[0]!]!.data_offsets = [...entry.data_offsets]), // two tensors over the same bytes
  ];
  pick(edits)();
  return Buffer.from(JSON.stringify(header));
}

function byteFlips(rand: () => number): Uint8Array {
  const json = Buffer.from(headerJson);
  const flips = 1 + Math.floor(rand() * 4);
  for (let i = 0; i < flips; i++) json[Math.floor(rand() * json.length)] = Math.floor(rand() * 256);
  return json;
}

test('1,000 mutated headers: a valid header inside the file, or WEFT_BAD_WEIGHTS naming the file', () => {
  const rand = prng(13);
  let refused = 0;
  for (let i = 0; i < 1000; i++) {
    const json = i % 2 === 0 ? structural(rand) : byteFlips(rand);
    // the data size stays the fixture's, so a header that grew or shrank no longer matches the file
    const size = fileSize - headerLength + json.length;
    try {
      const header = parseHeader(json, file, size);
      for (const t of header.tensors.values()) {
        assert.ok(t.begin >= 8 + json.length && t.end <= size && t.begin <= t.end, `mutation ${i}: tensor outside the file accepted`);
      }
    } catch (err) {
      assert.ok(isWeftError(err) && err.code === 'WEFT_BAD_WEIGHTS', `mutation ${i}: ${String(err)}`);
      assert.ok(err.message.includes(file), `mutation ${i}: the message names the file`);
      refused++;
    }
  }
  assert.ok(refused > 500, `most mutations are refused (${refused})`);
});
