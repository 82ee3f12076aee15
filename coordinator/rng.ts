/**
 * Seeded PRNG for sampling: xoshiro128** (Blackman & Vigna, 2018; 128-bit state, period 2^128 − 1),
 * its state filled from the 32-bit seed by splitmix32 (the 32-bit splitmix variant with the
 * hash-prospector finaliser constants 0x21f0aaad / 0x735a2d97, counter step 0x9e3779b9).
 *
 * All arithmetic is 32-bit integer math (Math.imul, >>>), so the sequence for a seed is identical on
 * every platform and Node version. Not cryptographic.
 *
 * `nextUniform()` takes the top 24 bits of the next 32-bit output: k · 2^-24 for k in [0, 2^24), every
 * value exactly representable as a float32, the largest 1 − 2^-24 (strictly < 1), the smallest 0.
 */
import { WeftError } from '../core/errors.ts';

const TWO_POW_32 = 2 ** 32;
const TWO_POW_MINUS_24 = 2 ** -24;

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

export class SeededRng {
  #s0: number;
  #s1: number;
  #s2: number;
  #s3: number;

  /** `seed`: an integer in [0, 2^32); else WeftError WEFT_BAD_REQUEST. */
  constructor(seed: number) {
    if (typeof seed !== 'number' || !Number.isInteger(seed) || seed < 0 || seed >= TWO_POW_32)
      throw new WeftError('WEFT_BAD_REQUEST', `seed must be an integer in [0, 2^32), got ${String(seed)}`);
    let counter = seed >>> 0;
    const splitmix32 = (): number => {
      counter = (counter + 0x9e3779b9) >>> 0;
      let z = counter;
      z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
      z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
      return (z ^ (z >>> 15)) >>> 0;
    };
    this.#s0 = splitmix32();
    this.#s1 = splitmix32();
    this.#s2 = splitmix32();
    this.#s3 = splitmix32();
    // xoshiro must not start from the all-zero state (splitmix32 is a bijection of distinct counters,
    // so four zeros cannot happen; kept as a guard)
    if ((this.#s0 | this.#s1 | this.#s2 | this.#s3) === 0) this.#s0 = 1;
  }

  /**
   * A generator started from a raw xoshiro128** state (four uint32, not all zero), bypassing the
   * splitmix32 seeding: for known-answer tests against the reference implementation.
   */
  static fromState(state: readonly [number, number, number, number]): SeededRng {
    if (state.some((w) => !Number.isInteger(w) || w < 0 || w >= TWO_POW_32) || state.every((w) => w === 0))
      throw new WeftError('WEFT_BAD_REQUEST', `xoshiro128** state must be four uint32 words, not all zero, got ${JSON.stringify(state)}`);
    const rng = new SeededRng(0);
    [rng.#s0, rng.#s1, rng.#s2, rng.#s3] = state;
    return rng;
  }

  /** the next 32-bit output, an integer in [0, 2^32) */
  nextUint32(): number {
    const s0 = this.#s0;
    const s1 = this.#s1;
    const s2 = this.#s2;
    const s3 = this.#s3;
    const result = Math.imul(rotl(Math.imul(s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (s1 << 9) >>> 0;
    const n2 = (s2 ^ s0) >>> 0;
    const n3 = (s3 ^ s1) >>> 0;
    this.#s1 = (s1 ^ n2) >>> 0;
    this.#s0 = (s0 ^ n3) >>> 0;
    this.#s2 = (n2 ^ t) >>> 0;
    this.#s3 = rotl(n3, 11);
    return result;
  }

  /** a uniform float in [0, 1), exactly a float32 value, at most 1 − 2^-24 */
  nextUniform(): number {
    return (this.nextUint32() >>> 8) * TWO_POW_MINUS_24;
  }
}
