/**
 * A pre-scan of untrusted MessagePack before msgpackr decodes it (reliability.md 3.5): walks the tokens without
 * allocating and rejects what weft never sends: any ext type (msgpackr decodes record definitions, structured
 * clone references, errors, bigints… from ext payloads whatever its options), nesting deeper than `maxDepth`,
 * str/bin/array/map lengths larger than the bytes left (a 5-byte header must not make the decoder allocate
 * for 2^32 elements), non-string map keys, and trailing bytes after the value.
 */
import { WeftError } from './errors.ts';

const reject = (why: string, at: number): never => {
  throw new WeftError('WEFT_PROTOCOL', `malformed message: ${why} at byte ${at}`);
};

/** Throws WEFT_PROTOCOL unless `buf` holds exactly one plain MessagePack value weft can accept. */
export function checkMsgpack(buf: Uint8Array, maxDepth = 32): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const end = buf.byteLength;
  let pos = 0;
  // containers being read: items left, and whether it is a map (then even items are keys)
  const stack: { left: number; map: boolean; index: number }[] = [];
  const need = (n: number): void => {
    if (pos + n > end) reject(`${n} bytes needed, ${end - pos} left`, pos);
  };
  const skip = (n: number): void => {
    need(n);
    pos += n;
  };
  const len = (size: 1 | 2 | 4): number => {
    need(size);
    const n = size === 1 ? view.getUint8(pos) : size === 2 ? view.getUint16(pos) : view.getUint32(pos);
    pos += size;
    return n;
  };
  const open = (count: number, map: boolean, at: number): void => {
    if (count * (map ? 2 : 1) > end - pos) reject(`${map ? 'map' : 'array'} of ${count} entries in ${end - pos} bytes`, at);
    if (stack.length >= maxDepth) reject(`nesting deeper than ${maxDepth}`, at);
    if (count > 0) stack.push({ left: count * (map ? 2 : 1), map, index: 0 });
  };
  do {
    const at = pos;
    need(1);
    const top = stack.at(-1);
    const isKey = top !== undefined && top.map && top.index % 2 === 0;
    const b = view.getUint8(pos++);
    const isString = (b >= 0xa0 && b <= 0xbf) || (b >= 0xd9 && b <= 0xdb);
    if (isKey && !isString) reject('a map key that is not a string', at);
    if (top) {
      top.index++;
      top.left--;
    }
    const depth = stack.length;
    read(b, at);
    // a scalar or empty container completes its parents that have no items left
    if (stack.length === depth) while (stack.length > 0 && stack.at(-1)!.left === 0) stack.pop();
  } while (stack.length > 0);
  if (pos !== end) reject(`${end - pos} bytes after the value`, pos);

  function read(b: number, at: number): void {
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) return;
    if (b >= 0x80 && b <= 0x8f) open(b & 0x0f, true, at);
    else if (b >= 0x90 && b <= 0x9f) open(b & 0x0f, false, at);
    else if (b >= 0xa0 && b <= 0xbf) skip(b & 0x1f);
    else if (b === 0xc4 || b === 0xd9) skip(len(1));
    else if (b === 0xc5 || b === 0xda) skip(len(2));
    else if (b === 0xc6 || b === 0xdb) skip(len(4));
    else if (b === 0xca) skip(4);
    else if (b === 0xcb) skip(8);
    else if (b === 0xcc || b === 0xd0) skip(1);
    else if (b === 0xcd || b === 0xd1) skip(2);
    else if (b === 0xce || b === 0xd2) skip(4);
    else if (b === 0xcf || b === 0xd3) skip(8);
    else if (b === 0xdc) open(len(2), false, at);
    else if (b === 0xdd) open(len(4), false, at);
    else if (b === 0xde) open(len(2), true, at);
    else if (b === 0xdf) open(len(4), true, at);
    else reject(b === 0xc1 ? 'the never-used byte 0xc1' : `ext type 0x${b.toString(16)}`, at);
  }
}
