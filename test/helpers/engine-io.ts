/** Host arrays into and out of an engine's tensors, as the op-level tests over one engine write them. */
import type { Engine, Tensor } from '../../worker/native.ts';

/** The bytes of a typed array, for Engine.upload. */
export const bytesOf = (a: Float32Array | Int32Array | Uint16Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** f32 and i32 uploads (i32 of one dimension unless a shape is given) and f32 downloads on `engine`. */
export function engineIo(engine: Engine) {
  return {
    f32: (values: Float32Array, shape: number[]): Tensor => engine.upload(bytesOf(values), 'f32', shape),
    i32: (values: readonly number[], shape = [values.length]): Tensor => engine.upload(bytesOf(Int32Array.from(values)), 'i32', shape),
    get: (t: Tensor): Float32Array => engine.download(t) as Float32Array,
  };
}
