/**
 * safetensors: header parsing with the reference implementation's checks, and byte-range reads, so that a rank
 * reads only its own slices. File layout: u64 LE header length N, N bytes of JSON
 * `{name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?: {string: string}}`, then the data; offsets
 * are relative to byte 8 + N. A model is one `model.safetensors` or shards named by `model.safetensors.index.json`.
 */
import { closeSync, fstat, open as openFd, openSync, read, readFileSync, readSync, write } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { WeftError } from './errors.ts';
import type { WeightDType } from './weight-format.ts';

/** Bits per element of every dtype the format defines; only F32, F16 and BF16 can be loaded. */
const DTYPE_BITS: Readonly<Record<string, number>> = {
  BOOL: 8, U8: 8, I8: 8, F8_E5M2: 8, F8_E4M3: 8, F8_E8M0: 8, I16: 16, U16: 16, F16: 16, BF16: 16,
  I32: 32, U32: 32, F32: 32, F64: 64, I64: 64, U64: 64, C64: 64, F4: 4, F6_E2M3: 6, F6_E3M2: 6,
};
const WEFT_DTYPES: Readonly<Record<string, WeightDType>> = { F32: 'f32', F16: 'f16', BF16: 'bf16' };

/** The reference implementation's bound on the JSON header (safetensors MAX_HEADER_SIZE). */
export const MAX_HEADER_BYTES = 100_000_000;
/** One read moves at most 2 GiB - 1 bytes; larger ranges are read in chunks of this size. */
const MAX_READ_BYTES = 1 << 30;
/** Row-by-row column-slice reads kept in flight at once. */
const ROW_READS_IN_FLIGHT = 64;

export const SINGLE_FILE = 'model.safetensors';
export const INDEX_FILE = 'model.safetensors.index.json';

export interface TensorEntry {
  readonly name: string;
  readonly file: string; // path of the file holding it
  readonly dtype: string; // as stored: 'F32', 'BF16', 'I64', ...
  readonly shape: readonly number[];
  readonly begin: number; // absolute byte offset in the file
  readonly end: number; // absolute, exclusive
}

export interface SafetensorsHeader {
  readonly file: string;
  readonly fileSize: number;
  readonly dataStart: number; // 8 + header length
  readonly tensors: ReadonlyMap<string, TensorEntry>;
  readonly metadata: Readonly<Record<string, string>>;
}

/** The tensor's dtype as weft names it; other stored dtypes (I64, F8_E4M3, ...) are refused here, at use. */
export function weftDType(entry: TensorEntry): WeightDType {
  const dtype = WEFT_DTYPES[entry.dtype];
  if (dtype === undefined) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${entry.file}: tensor "${entry.name}" has dtype ${entry.dtype}; weft loads F32, F16 and BF16 only`);
  }
  return dtype;
}

/**
 * Validates a header the way the reference implementation does: JSON object, known dtypes, non-negative integer
 * shapes, end - begin == numel * element size, tensors contiguous from offset 0 with no overlap or gap, and the
 * last one ending exactly at the end of the file (a truncated file names the tensor that runs past the end).
 */
export function parseHeader(json: Uint8Array, file: string, fileSize: number): SafetensorsHeader {
  const dataStart = 8 + json.length;
  const bad = (message: string): never => {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${file}: ${message}`);
  };
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(json));
  } catch (err) {
    bad(`header (${json.length} bytes) is not valid UTF-8 JSON: ${(err as Error).message}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) bad('header is not a JSON object');
  const metadata: Record<string, string> = {};
  const entries: TensorEntry[] = [];
  for (const [name, info] of Object.entries(raw as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof info !== 'object' || info === null || Array.isArray(info)) bad('__metadata__ is not an object');
      for (const [k, v] of Object.entries(info as Record<string, unknown>)) {
        if (typeof v !== 'string') bad(`__metadata__["${k}"] is not a string`);
        metadata[k] = v as string;
      }
      continue;
    }
    const { dtype, shape, data_offsets: offsets } = (info ?? {}) as Record<string, unknown>;
    if (typeof dtype !== 'string' || DTYPE_BITS[dtype] === undefined) {
      bad(`tensor "${name}" has unknown dtype ${JSON.stringify(dtype)}`);
    }
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      bad(`tensor "${name}" has shape ${JSON.stringify(shape)}, not a list of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)) {
      bad(`tensor "${name}" has data_offsets ${JSON.stringify(offsets)}, not [begin, end]`);
    }
    const [b, e] = offsets as [number, number];
    if (e < b) bad(`tensor "${name}" has data_offsets [${b}, ${e}] with end before begin`);
    const numel = (shape as number[]).reduce((a, d) => a * d, 1);
    const bytes = (numel * DTYPE_BITS[dtype as string]!) / 8;
    if (!Number.isSafeInteger(bytes)) bad(`tensor "${name}" ${dtype as string} ${JSON.stringify(shape)} is not a whole number of bytes or is too large`);
    if (e - b !== bytes) {
      bad(`tensor "${name}" ${dtype as string} ${JSON.stringify(shape)} needs ${bytes} bytes but data_offsets [${b}, ${e}] hold ${e - b}`);
    }
    entries.push({ name, file, dtype: dtype as string, shape: shape as number[], begin: dataStart + b, end: dataStart + e });
  }
  entries.sort((x, y) => x.begin - y.begin || x.end - y.end);
  let expected = dataStart;
  let previous = '';
  const dataBytes = fileSize - dataStart;
  for (const t of entries) {
    if (t.begin < expected) bad(`tensor "${t.name}" at data_offsets [${t.begin - dataStart}, ${t.end - dataStart}] overlaps "${previous}" which ends at ${expected - dataStart}`);
    if (t.begin > expected) bad(`tensor "${t.name}" starts at data offset ${t.begin - dataStart}, leaving a gap after ${previous ? `"${previous}" which ends at ${expected - dataStart}` : 'the header'}`);
    if (t.end > fileSize) {
      bad(`tensor "${t.name}" data_offsets [${t.begin - dataStart}, ${t.end - dataStart}] run past the end of the file: ${dataBytes} data bytes after the ${dataStart}-byte header (file is ${fileSize} bytes; truncated?)`);
    }
    expected = t.end;
    previous = t.name;
  }
  if (expected !== fileSize) {
    bad(`the tensors end at data offset ${expected - dataStart} but the file holds ${dataBytes} data bytes (${fileSize - expected} bytes unaccounted for)`);
  }
  return { file, fileSize, dataStart, tensors: new Map(entries.map((t) => [t.name, t])), metadata };
}

function checkHeaderLength(n: bigint, file: string, fileSize: number): number {
  if (n > BigInt(MAX_HEADER_BYTES)) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${file}: header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit (not a safetensors file?)`);
  }
  if (Number(n) + 8 > fileSize) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${file}: header length ${n} + 8 exceeds the file size ${fileSize} (truncated or not a safetensors file)`);
  }
  return Number(n);
}

// Files are numeric descriptors read through the callback API and closed synchronously, not fs/promises
// FileHandles: a CI run hung in a FileHandle's close() (its close request never completed, with nothing left on the
// thread pool), and a worker that never finishes loading its weights is a hang with no error. A regular file's
// close(2) does not block.
const openFile = promisify(openFd);
const statOf = promisify(fstat);
const readAt = promisify(read);
const writeAt = promisify(write);

/** One safetensors file, open for positional reads until `close()`. */
export class SafetensorsFile {
  /** Bytes of tensor data read so far (headers not counted). */
  bytesRead = 0;

  private constructor(
    private fd: number,
    readonly header: SafetensorsHeader,
    private readonly onRead: ((bytes: number) => void) | undefined,
  ) {}

  static async open(file: string, onRead?: (bytes: number) => void): Promise<SafetensorsFile> {
    let fd: number;
    try {
      fd = await openFile(file, 'r');
    } catch (err) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${file}: cannot open weights file (${(err as Error).message})`, { cause: err });
    }
    try {
      const fileSize = (await statOf(fd)).size;
      if (fileSize < 8) throw new WeftError('WEFT_BAD_WEIGHTS', `${file}: ${fileSize} bytes, too short for a safetensors header`);
      const lengthBytes = new Uint8Array(8);
      await readFully(fd, file, lengthBytes, 0, 'header length');
      const n = checkHeaderLength(new DataView(lengthBytes.buffer).getBigUint64(0, true), file, fileSize);
      const json = new Uint8Array(n);
      await readFully(fd, file, json, 8, 'header');
      return new SafetensorsFile(fd, parseHeader(json, file, fileSize), onRead);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
  }

  tensor(name: string): TensorEntry | undefined {
    return this.header.tensors.get(name);
  }

  /** Rows [r0, r1) of a tensor [R, ...] as one contiguous read, into `dest` at `destOffset` (or a new buffer). */
  async readRows(t: TensorEntry, r0: number, r1: number, dest?: Uint8Array, destOffset = 0): Promise<Uint8Array> {
    const rows = t.shape[0];
    if (rows === undefined || !(0 <= r0 && r0 <= r1 && r1 <= rows)) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${t.file}: rows [${r0}, ${r1}) of tensor "${t.name}" [${t.shape.join(', ')}] are out of range`);
    }
    const rowBytes = rows === 0 ? 0 : (t.end - t.begin) / rows;
    const out = target(dest, destOffset, (r1 - r0) * rowBytes);
    await this.read(out, t.begin + r0 * rowBytes, `tensor "${t.name}" rows [${r0}, ${r1})`);
    return out;
  }

  /** Columns [c0, c1) of a matrix [R, C]: one read per row straight into place; the other columns are never read. */
  async readColumns(t: TensorEntry, c0: number, c1: number, dest?: Uint8Array, destOffset = 0): Promise<Uint8Array> {
    const [rows, cols] = t.shape;
    if (t.shape.length !== 2 || rows === undefined || cols === undefined || !(0 <= c0 && c0 <= c1 && c1 <= cols)) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${t.file}: columns [${c0}, ${c1}) of tensor "${t.name}" [${t.shape.join(', ')}] are out of range`);
    }
    if (c0 === 0 && c1 === cols) return this.readRows(t, 0, rows, dest, destOffset);
    const elem = rows * cols === 0 ? 0 : (t.end - t.begin) / (rows * cols);
    const sliceBytes = (c1 - c0) * elem;
    const out = target(dest, destOffset, rows * sliceBytes);
    for (let r0 = 0; r0 < rows; r0 += ROW_READS_IN_FLIGHT) {
      const batch: Promise<void>[] = [];
      for (let r = r0; r < Math.min(rows, r0 + ROW_READS_IN_FLIGHT); r++) {
        const into = out.subarray(r * sliceBytes, (r + 1) * sliceBytes);
        batch.push(this.read(into, t.begin + (r * cols + c0) * elem, `tensor "${t.name}" row ${r} columns [${c0}, ${c1})`));
      }
      // every read settles before a failure is thrown, so that close() never runs beside a read of this file
      const failed = (await Promise.allSettled(batch)).find((r) => r.status === 'rejected');
      if (failed) throw failed.reason;
    }
    return out;
  }

  /** The whole tensor. */
  async readAll(t: TensorEntry, dest?: Uint8Array, destOffset = 0): Promise<Uint8Array> {
    const out = target(dest, destOffset, t.end - t.begin);
    await this.read(out, t.begin, `tensor "${t.name}"`);
    return out;
  }

  /** Closes the file (once; later calls do nothing). Call it after every read has settled. */
  async close(): Promise<void> {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    closeSync(fd);
  }

  private async read(into: Uint8Array, position: number, what: string): Promise<void> {
    if (this.fd < 0) throw new Error(`${this.header.file}: ${what}: read after close`);
    for (let done = 0; done < into.length; done += MAX_READ_BYTES) {
      const chunk = into.subarray(done, Math.min(into.length, done + MAX_READ_BYTES));
      await readFully(this.fd, this.header.file, chunk, position + done, what);
      this.bytesRead += chunk.length;
      this.onRead?.(chunk.length);
    }
  }
}

function target(dest: Uint8Array | undefined, offset: number, bytes: number): Uint8Array {
  if (dest === undefined) return new Uint8Array(bytes);
  if (offset + bytes > dest.length) throw new RangeError(`read of ${bytes} bytes at ${offset} overflows a ${dest.length}-byte buffer`);
  return dest.subarray(offset, offset + bytes);
}

async function readFully(fd: number, file: string, into: Uint8Array, position: number, what: string): Promise<void> {
  let done = 0;
  while (done < into.length) {
    const { bytesRead } = await readAt(fd, into, done, into.length - done, position + done);
    if (bytesRead === 0) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${file}: ${what}: the file ends at byte ${position + done}, ${into.length - done} bytes short of [${position}, ${position + into.length}) (changed while loading?)`);
    }
    done += bytesRead;
  }
}

/** A model directory's weights: one file or the shards named by the index, each opened once. */
export class WeightFiles {
  private constructor(
    readonly dir: string,
    private readonly files: readonly SafetensorsFile[],
    private readonly byName: ReadonlyMap<string, { file: SafetensorsFile; entry: TensorEntry }>,
  ) {}

  /** Opens `<dir>/model.safetensors`, or else every shard that `<dir>/model.safetensors.index.json` names. */
  static async open(dir: string, options: { onRead?: (bytes: number) => void } = {}): Promise<WeightFiles> {
    const single = path.join(dir, SINGLE_FILE);
    const indexFile = path.join(dir, INDEX_FILE);
    if (await exists(single)) {
      const file = await SafetensorsFile.open(single, options.onRead);
      const byName = new Map([...file.header.tensors.values()].map((entry) => [entry.name, { file, entry }]));
      return new WeightFiles(dir, [file], byName);
    }
    if (!(await exists(indexFile))) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${dir}: neither ${SINGLE_FILE} nor ${INDEX_FILE} exists (weft loads safetensors weights only)`);
    }
    const weightMap = await readIndex(indexFile);
    const files: SafetensorsFile[] = [];
    try {
      const byFile = new Map<string, SafetensorsFile>();
      for (const shard of new Set(weightMap.values())) {
        const file = await SafetensorsFile.open(path.join(dir, shard), options.onRead);
        files.push(file);
        byFile.set(shard, file);
      }
      const byName = new Map<string, { file: SafetensorsFile; entry: TensorEntry }>();
      for (const [name, shard] of weightMap) {
        const file = byFile.get(shard)!;
        const entry = file.tensor(name);
        if (entry === undefined) {
          throw new WeftError('WEFT_BAD_WEIGHTS', `${indexFile}: weight_map puts tensor "${name}" in ${shard}, but ${shard} has no such tensor`);
        }
        byName.set(name, { file, entry });
      }
      return new WeightFiles(dir, files, byName);
    } catch (err) {
      await Promise.all(files.map((f) => f.close()));
      throw err;
    }
  }

  /** Names of the files holding the weights, relative to the directory. */
  get fileNames(): string[] {
    return this.files.map((f) => path.relative(this.dir, f.header.file));
  }

  /** Bytes of tensor data read so far, over all files. */
  get bytesRead(): number {
    return this.files.reduce((sum, f) => sum + f.bytesRead, 0);
  }

  /** Every tensor's name. */
  get names(): string[] {
    return [...this.byName.keys()];
  }

  /** The names of the tensors in one of `fileNames`, in the file's order. */
  namesInFile(fileName: string): string[] {
    const file = this.files.find((f) => path.relative(this.dir, f.header.file) === fileName);
    return file ? [...file.header.tensors.values()].sort((a, b) => a.begin - b.begin).map((e) => e.name).filter((n) => this.byName.has(n)) : [];
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  tensor(name: string): TensorEntry | undefined {
    return this.byName.get(name)?.entry;
  }

  async readRows(name: string, r0: number, r1: number, dest?: Uint8Array, destOffset?: number): Promise<Uint8Array> {
    const { file, entry } = this.lookup(name);
    return file.readRows(entry, r0, r1, dest, destOffset);
  }

  async readColumns(name: string, c0: number, c1: number, dest?: Uint8Array, destOffset?: number): Promise<Uint8Array> {
    const { file, entry } = this.lookup(name);
    return file.readColumns(entry, c0, c1, dest, destOffset);
  }

  async readAll(name: string, dest?: Uint8Array, destOffset?: number): Promise<Uint8Array> {
    const { file, entry } = this.lookup(name);
    return file.readAll(entry, dest, destOffset);
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }

  private lookup(name: string): { file: SafetensorsFile; entry: TensorEntry } {
    const found = this.byName.get(name);
    if (found === undefined) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${this.dir}: tensor "${name}" is not in ${this.fileNames.join(', ')}`);
    }
    return found;
  }
}

/** `weight_map` of an index file: tensor name → shard file name (a plain name inside the model directory). */
async function readIndex(indexFile: string): Promise<Map<string, string>> {
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(indexFile, 'utf8'));
  } catch (err) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${indexFile}: cannot read or parse (${(err as Error).message})`, { cause: err });
  }
  const weightMap = (raw as { weight_map?: unknown } | null)?.weight_map;
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
    throw new WeftError('WEFT_BAD_WEIGHTS', `${indexFile}: field "weight_map" is missing or not an object`);
  }
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap)) {
    if (typeof shard !== 'string' || shard === '' || path.isAbsolute(shard) || shard.split(/[\\/]/).includes('..')) {
      throw new WeftError('WEFT_BAD_WEIGHTS', `${indexFile}: weight_map["${name}"] = ${JSON.stringify(shard)} is not a file name inside the model directory`);
    }
    map.set(name, shard);
  }
  if (map.size === 0) throw new WeftError('WEFT_BAD_WEIGHTS', `${indexFile}: weight_map is empty`);
  return map;
}

async function exists(file: string): Promise<boolean> {
  try {
    await stat(file);
    return true;
  } catch {
    return false;
  }
}

/**
 * The stored dtype ('F32', 'BF16', ...) of the first tensor of a model directory's weights, read synchronously
 * from one header; undefined when there are no readable safetensors. For configs that do not state a dtype.
 */
export function peekStoredDType(dir: string): string | undefined {
  let file = path.join(dir, SINGLE_FILE);
  let fd: number | undefined;
  try {
    try {
      fd = openSync(file, 'r');
    } catch {
      const index = JSON.parse(readFileSync(path.join(dir, INDEX_FILE), 'utf8')) as { weight_map?: Record<string, string> };
      const first = Object.values(index.weight_map ?? {})[0];
      if (first === undefined) return undefined;
      file = path.join(dir, first);
      fd = openSync(file, 'r');
    }
    const len = Buffer.alloc(8);
    if (readSync(fd, len, 0, 8, 0) !== 8) return undefined;
    const n = len.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER_BYTES)) return undefined;
    const json = Buffer.alloc(Number(n));
    if (readSync(fd, json, 0, json.length, 8) !== json.length) return undefined;
    const header = JSON.parse(json.toString('utf8')) as Record<string, { dtype?: unknown }>;
    const first = Object.entries(header).find(([k]) => k !== '__metadata__');
    const dtype = first?.[1].dtype;
    return typeof dtype === 'string' ? dtype : undefined;
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** A tensor to write: its bytes are asked for once, in order, after the header (so each may be computed then). */
export interface TensorToWrite {
  readonly name: string;
  readonly dtype: string; // as stored: 'BF16', 'I8', 'U8', ...
  readonly shape: readonly number[];
  readonly bytes: () => Promise<Uint8Array>;
}

/**
 * Writes `tensors` to `file` in order (header first, data 8-byte aligned after it); returns the data bytes written.
 * Throws when a tensor's bytes are not what its dtype and shape say.
 */
export async function writeSafetensorsFile(file: string, tensors: readonly TensorToWrite[]): Promise<number> {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  const sizes: number[] = [];
  for (const t of tensors) {
    const size = (t.shape.reduce((a, d) => a * d, 1) * DTYPE_BITS[t.dtype]!) / 8;
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + size] };
    sizes.push(size);
    offset += size;
  }
  const json = Buffer.from(JSON.stringify(header));
  const padded = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(padded.length));
  const fd = await openFile(file, 'w');
  const writeFully = async (bytes: Uint8Array) => {
    for (let done = 0; done < bytes.length; ) done += (await writeAt(fd, bytes, done, bytes.length - done)).bytesWritten;
  };
  try {
    await writeFully(length);
    await writeFully(padded);
    for (const [i, t] of tensors.entries()) {
      const bytes = await t.bytes();
      if (bytes.length !== sizes[i]) throw new Error(`writeSafetensorsFile: ${t.name} has ${bytes.length} bytes, ${t.dtype} [${t.shape.join(', ')}] needs ${sizes[i]}`);
      await writeFully(bytes);
    }
  } finally {
    closeSync(fd); // synchronous, as SafetensorsFile's: see there
  }
  return offset;
}
