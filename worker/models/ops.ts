/**
 * The operation set model code is written against: the native engine (CPU or CUDA backend, same surface)
 * plus a few conveniences for building small index tensors. Model files import only this and the
 * collectives interface.
 */
import type { Engine, Tensor } from '../native.ts';

export type Ops = Engine;
export type { Tensor };

export function int32Tensor(ops: Ops, values: readonly number[] | Int32Array): Tensor {
  const array = values instanceof Int32Array ? values : Int32Array.from(values);
  return ops.upload(new Uint8Array(array.buffer, array.byteOffset, array.byteLength), 'i32', [array.length]);
}

export function float32Tensor(ops: Ops, values: readonly number[] | Float32Array, shape: number[] = [values.length]): Tensor {
  const array = values instanceof Float32Array ? values : Float32Array.from(values);
  return ops.upload(new Uint8Array(array.buffer, array.byteOffset, array.byteLength), 'f32', shape);
}

/** The per-step index tensors every layer reads: which cache slot and position each batch token has. */
export interface StepIndex {
  readonly tokenIds: Tensor; // [T] i32
  readonly slots: Tensor; // [T] i32
  readonly positions: Tensor; // [T] i32
  readonly logitRows: Tensor; // [R] i32: batch rows whose logits the step returns
}
