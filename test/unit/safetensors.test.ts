import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, describe, it } from 'node:test';
import { MAX_HEADER_BYTES, SafetensorsFile, WeightFiles, parseHeader, weftDType } from '../../core/safetensors.ts';
import { weftError, readTensors, type RawTensor } from '../helpers/safetensors-files.ts';

const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/hf-tiny');
const LLAMA = path.join(FIXTURES, 'llama-tiny', 'model.safetensors');
const BF16 = path.join(FIXTURES, 'llama-tiny-bf16', 'model.safetensors');
const tmp = mkdtempSync(path.join(tmpdir(), 'weft-safetensors-'));
after(() => rmSync(tmp, { recursive: true, force: true }));


/** Writes a file from a raw header object and data section. */
function writeRaw(file: string, header: unknown, data: Buffer, headerLength?: bigint): string {
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLength ?? BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, data]));
  return file;
}

/** Writes tensors back to back, as the reference writer does. */
function writeTensors(file: string, tensors: RawTensor[]): string {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  return writeRaw(file, header, Buffer.concat(tensors.map((t) => t.bytes)));
}


const f32 = (values: number[]) => Buffer.from(new Float32Array(values).buffer);

describe('safetensors header', () => {
  it('parses the llama-tiny fixture: names, dtypes, shapes, absolute offsets, metadata', async () => {
    const file = await SafetensorsFile.open(LLAMA);
    try {
      const { header } = file;
      assert.equal(header.tensors.size, 21);
      assert.deepEqual(header.metadata, { format: 'pt' });
      assert.equal(header.dataStart, 8 + 2144);
      const q = file.tensor('model.layers.0.self_attn.q_proj.weight')!;
      assert.deepEqual([q.dtype, q.shape, q.begin - header.dataStart, q.end - header.dataStart], ['F32', [64, 64], 422400, 438784]);
      assert.equal(weftDType(q), 'f32');
      assert.equal(file.bytesRead, 0); // headers are not counted as tensor data
    } finally {
      await file.close();
    }
  });

  it('accepts every dtype the format defines but refuses all but F32/F16/BF16 at use', () => {
    const header = Buffer.from(JSON.stringify({ ids: { dtype: 'I64', shape: [2], data_offsets: [0, 16] }, h: { dtype: 'F16', shape: [3], data_offsets: [16, 22] } }));
    const parsed = parseHeader(header, 'x.safetensors', 8 + header.length + 22);
    assert.equal(weftDType(parsed.tensors.get('h')!), 'f16');
    assert.throws(() => weftDType(parsed.tensors.get('ids')!), weftError('WEFT_BAD_WEIGHTS', /x\.safetensors: tensor "ids" has dtype I64; weft loads F32, F16 and BF16 only/));
  });

  const badHeaders: [string, unknown, number, RegExp][] = [
    ['unknown dtype', { a: { dtype: 'F128', shape: [1], data_offsets: [0, 16] } }, 16, /tensor "a" has unknown dtype "F128"/],
    ['byte count', { a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 20] } }, 20, /tensor "a" F32 \[2,3\] needs 24 bytes but data_offsets \[0, 20\] hold 20/],
    ['negative dim', { a: { dtype: 'F32', shape: [-1], data_offsets: [0, 4] } }, 4, /tensor "a" has shape \[-1\]/],
    ['bad offsets', { a: { dtype: 'F32', shape: [1], data_offsets: [4] } }, 4, /tensor "a" has data_offsets \[4\], not \[begin, end\]/],
    ['overlap', { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, 12, /tensor "b" at data_offsets \[4, 12\] overlaps "a" which ends at 8/],
    ['gap', { a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, 8, /tensor "a" starts at data offset 4, leaving a gap after the header/],
    ['trailing bytes', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 12, /the tensors end at data offset 4 but the file holds 12 data bytes \(8 bytes unaccounted for\)/],
    ['past the end', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [4], data_offsets: [4, 20] } }, 10, /tensor "b" data_offsets \[4, 20\] run past the end of the file: 10 data bytes/],
    ['metadata', { __metadata__: { n: 3 } }, 0, /__metadata__\["n"\] is not a string/],
    ['not an object', [1, 2], 0, /header is not a JSON object/],
  ];
  for (const [what, header, dataBytes, pattern] of badHeaders) {
    it(`refuses a header with a bad ${what}`, () => {
      const json = Buffer.from(JSON.stringify(header));
      assert.throws(() => parseHeader(json, 'bad.safetensors', 8 + json.length + dataBytes), weftError('WEFT_BAD_WEIGHTS', new RegExp(`^bad\\.safetensors: .*${pattern.source}`)));
    });
  }

  it('refuses invalid JSON, naming the file', async () => {
    const file = path.join(tmp, 'json.safetensors');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(5n);
    writeFileSync(file, Buffer.concat([len, Buffer.from('{"a":')]));
    await assert.rejects(SafetensorsFile.open(file), weftError('WEFT_BAD_WEIGHTS', /json\.safetensors: header \(5 bytes\) is not valid UTF-8 JSON/));
  });

  it('refuses a header length beyond the file or beyond 100 MB', async () => {
    const big = writeRaw(path.join(tmp, 'big.safetensors'), {}, Buffer.alloc(0), 1000n);
    await assert.rejects(SafetensorsFile.open(big), weftError('WEFT_BAD_WEIGHTS', /big\.safetensors: header length 1000 \+ 8 exceeds the file size 10/));
    const huge = writeRaw(path.join(tmp, 'huge.safetensors'), {}, Buffer.alloc(0), BigInt(MAX_HEADER_BYTES) + 1n);
    await assert.rejects(SafetensorsFile.open(huge), weftError('WEFT_BAD_WEIGHTS', /huge\.safetensors: header length 100000001 exceeds the 100000000-byte limit/));
    const tiny = path.join(tmp, 'tiny.safetensors');
    writeFileSync(tiny, Buffer.alloc(3));
    await assert.rejects(SafetensorsFile.open(tiny), weftError('WEFT_BAD_WEIGHTS', /tiny\.safetensors: 3 bytes, too short/));
  });

  it('detects a truncated fixture from header and file size, naming the first tensor past the end', async () => {
    const full = readFileSync(LLAMA);
    const truncated = path.join(tmp, 'truncated.safetensors');
    writeFileSync(truncated, full.subarray(0, full.length - 1000));
    // llama-tiny's last tensors by offset: layers.1 v_proj [623616, 631808), norm [631808, 632064); 632064 - 1000 cuts v_proj.
    await assert.rejects(
      SafetensorsFile.open(truncated),
      weftError('WEFT_BAD_WEIGHTS', /truncated\.safetensors: tensor "model\.layers\.1\.self_attn\.v_proj\.weight" data_offsets \[623616, 631808\] run past the end of the file: 631064 data bytes/),
    );
  });

  it('names a missing file', async () => {
    await assert.rejects(SafetensorsFile.open(path.join(tmp, 'nope.safetensors')), weftError('WEFT_BAD_WEIGHTS', /nope\.safetensors: cannot open weights file/));
  });
});

describe('safetensors reads', () => {
  const reference = new Map(readTensors(LLAMA).map((t) => [t.name, t]));

  it('reads whole tensors, row ranges in one piece and column slices row by row, counting only those bytes', async () => {
    const file = await SafetensorsFile.open(LLAMA);
    try {
      const down = reference.get('model.layers.1.mlp.down_proj.weight')!; // [64, 176] f32
      const entry = file.tensor(down.name)!;
      assert.deepEqual(Buffer.from(await file.readAll(entry)), down.bytes);
      assert.deepEqual(Buffer.from(await file.readRows(entry, 10, 13)), down.bytes.subarray(10 * 176 * 4, 13 * 176 * 4));
      const before = file.bytesRead;
      const cols = await file.readColumns(entry, 44, 88);
      assert.equal(file.bytesRead - before, 64 * 44 * 4); // never the whole tensor
      for (let r = 0; r < 64; r++) {
        assert.deepEqual(Buffer.from(cols.subarray(r * 44 * 4, (r + 1) * 44 * 4)), down.bytes.subarray((r * 176 + 44) * 4, (r * 176 + 88) * 4));
      }
      // Into a caller's buffer at an offset.
      const dest = new Uint8Array(8 + 2 * 176 * 4);
      await file.readRows(entry, 0, 2, dest, 8);
      assert.deepEqual(Buffer.from(dest.subarray(8)), down.bytes.subarray(0, 2 * 176 * 4));
      await assert.rejects(file.readRows(entry, 60, 65), weftError('WEFT_BAD_WEIGHTS', /rows \[60, 65\) of tensor "model\.layers\.1\.mlp\.down_proj\.weight" \[64, 176\] are out of range/));
      await assert.rejects(file.readColumns(entry, 0, 177), weftError('WEFT_BAD_WEIGHTS', /columns \[0, 177\) .* are out of range/));
    } finally {
      await file.close();
    }
  });

  it('closes once: a second close does nothing, a read after it is refused, and the descriptor is released', async () => {
    const file = await SafetensorsFile.open(LLAMA);
    const entry = file.tensor('model.norm.weight')!;
    await file.close();
    await file.close();
    await assert.rejects(file.readAll(entry), /read after close/);
    // A file opened after the close reads as it should (its descriptor may be the number the first one freed).
    const again = await SafetensorsFile.open(LLAMA);
    try {
      assert.deepEqual(Buffer.from(await again.readAll(again.tensor('model.norm.weight')!)), reference.get('model.norm.weight')!.bytes);
    } finally {
      await again.close();
    }
  });

  it('reads column slices of bf16 tensors', async () => {
    const o = readTensors(BF16).find((t) => t.name === 'model.layers.0.self_attn.o_proj.weight')!; // [64, 64] bf16
    const file = await SafetensorsFile.open(BF16);
    try {
      const cols = await file.readColumns(file.tensor(o.name)!, 48, 64);
      assert.equal(cols.length, 64 * 16 * 2);
      for (let r = 0; r < 64; r++) assert.deepEqual(Buffer.from(cols.subarray(r * 32, (r + 1) * 32)), o.bytes.subarray(r * 128 + 96, r * 128 + 128));
    } finally {
      await file.close();
    }
  });

  it('reads a model split into shards through model.safetensors.index.json', async () => {
    const dir = mkdtempSync(path.join(tmp, 'sharded-'));
    const tensors = readTensors(LLAMA);
    const half = Math.floor(tensors.length / 2);
    writeTensors(path.join(dir, 'model-00001-of-00002.safetensors'), tensors.slice(0, half));
    writeTensors(path.join(dir, 'model-00002-of-00002.safetensors'), tensors.slice(half));
    const weightMap = Object.fromEntries(tensors.map((t, i) => [t.name, `model-0000${i < half ? 1 : 2}-of-00002.safetensors`]));
    writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 632064 }, weight_map: weightMap }));

    const files = await WeightFiles.open(dir);
    try {
      assert.deepEqual(files.fileNames, ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']);
      for (const t of tensors) assert.deepEqual(Buffer.from(await files.readAll(t.name)), t.bytes, t.name);
      assert.equal(files.bytesRead, 632064);
      await assert.rejects(files.readAll('lm_head.bias'), weftError('WEFT_BAD_WEIGHTS', /tensor "lm_head\.bias" is not in model-00001-of-00002\.safetensors, model-00002-of-00002\.safetensors/));
    } finally {
      await files.close();
    }

    // The index names a tensor its shard lacks.
    writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { ...weightMap, 'model.norm.weight': 'model-00001-of-00002.safetensors' } }));
    await assert.rejects(WeightFiles.open(dir), weftError('WEFT_BAD_WEIGHTS', /weight_map puts tensor "model\.norm\.weight" in model-00001-of-00002\.safetensors, but model-00001-of-00002\.safetensors has no such tensor/));
    // A shard is missing.
    writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { ...weightMap, 'model.norm.weight': 'model-00003-of-00002.safetensors' } }));
    await assert.rejects(WeightFiles.open(dir), weftError('WEFT_BAD_WEIGHTS', /model-00003-of-00002\.safetensors: cannot open weights file/));
    // A shard outside the directory.
    writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { a: '../x.safetensors' } }));
    await assert.rejects(WeightFiles.open(dir), weftError('WEFT_BAD_WEIGHTS', /weight_map\["a"\] = "\.\.\/x\.safetensors" is not a file name inside the model directory/));
    writeFileSync(path.join(dir, 'model.safetensors.index.json'), '{"metadata": {}}');
    await assert.rejects(WeightFiles.open(dir), weftError('WEFT_BAD_WEIGHTS', /model\.safetensors\.index\.json: field "weight_map" is missing/));
  });

  it('names the directory when it holds no safetensors weights', async () => {
    const dir = mkdtempSync(path.join(tmp, 'empty-'));
    await assert.rejects(WeightFiles.open(dir), weftError('WEFT_BAD_WEIGHTS', /empty-\w+: neither model\.safetensors nor model\.safetensors\.index\.json exists/));
  });

  it('round-trips a hand-written file', async () => {
    const file = writeTensors(path.join(tmp, 'small.safetensors'), [
      { name: 'm', dtype: 'F32', shape: [2, 3], bytes: f32([1, 2, 3, 4, 5, 6]) },
      { name: 'v', dtype: 'F32', shape: [2], bytes: f32([7, 8]) },
    ]);
    const st = await SafetensorsFile.open(file);
    try {
      const cols = await st.readColumns(st.tensor('m')!, 1, 3);
      assert.deepEqual(Array.from(new Float32Array(cols.buffer, cols.byteOffset, 4)), [2, 3, 5, 6]);
    } finally {
      await st.close();
    }
  });
});
