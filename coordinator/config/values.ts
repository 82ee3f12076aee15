/**
 * The kinds of value an option takes. Each one reads the text of a flag or an environment variable, checks a
 * value given in code (a startCluster option), and writes a value back as argv text (the pm2 ecosystem). A
 * value that does not fit throws InvalidValue, which the config module turns into a WeftError naming the option.
 */
export class InvalidValue extends Error {}

export interface ValueType<T> {
  /** what a valid value is, for messages: "an integer >= 1" */
  readonly expected: string;
  fromText(text: string): T;
  check(value: unknown): T;
  toText(value: T): string;
}

function fail(detail = ''): never {
  throw new InvalidValue(detail);
}

export function integer(min: number, max = Number.MAX_SAFE_INTEGER): ValueType<number> {
  const expected = max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer in [${min}, ${max}]`;
  const check = (value: unknown): number => (typeof value === 'number' && Number.isInteger(value) && value >= min && value <= max ? value : fail());
  return { expected, check, fromText: (text) => check(/^\s*-?\d+\s*$/.test(text) ? Number(text) : NaN), toText: String };
}

/** The longest a Node timer can wait (2^31-1 ms, about 24.8 days): setTimeout fires at once for anything longer. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** A duration in ms that a timer waits: an integer from `min` up to MAX_TIMER_MS, which the message names. */
export function milliseconds(min: number): ValueType<number> {
  const inRange = integer(min, MAX_TIMER_MS);
  return { ...inRange, expected: `an integer number of ms in [${min}, ${MAX_TIMER_MS}] (2^31-1, the longest a timer can wait)` };
}

export const finite: ValueType<number> = {
  expected: 'a finite number',
  check: (value) => (typeof value === 'number' && Number.isFinite(value) ? value : fail()),
  fromText: (text) => finite.check(text.trim() === '' ? NaN : Number(text)),
  toText: String,
};

/** A fraction of a whole: a number in (0, 1]. */
export const fraction: ValueType<number> = {
  expected: 'a number in (0, 1]',
  check: (value) => (typeof value === 'number' && value > 0 && value <= 1 ? value : fail()),
  fromText: (text) => fraction.check(text.trim() === '' ? NaN : Number(text)),
  toText: String,
};

export const text: ValueType<string> = {
  expected: 'a non-empty string',
  check: (value) => (typeof value === 'string' && value !== '' ? value : fail()),
  fromText: (t) => text.check(t),
  toText: (value) => value,
};

/** A string matching `pattern`, described by `expected`. */
export function matching(pattern: RegExp, expected: string): ValueType<string> {
  const check = (value: unknown): string => (typeof value === 'string' && pattern.test(value) ? value : fail());
  return { expected, check, fromText: check, toText: (value) => value };
}

/** A switch: a flag without an argument on the command line; "1"/"true" or "0"/"false" in the environment. */
export const flag: ValueType<boolean> = {
  expected: 'true or false',
  check: (value) => (typeof value === 'boolean' ? value : fail()),
  fromText: (t) => (['1', 'true'].includes(t) ? true : ['0', 'false'].includes(t) ? false : fail()),
  toText: String,
};

export function oneOf<const C extends string>(...choices: C[]): ValueType<C> {
  const check = (value: unknown): C => (choices.includes(value as C) ? (value as C) : fail());
  return { expected: `one of ${choices.join(', ')}`, check, fromText: check, toText: (value) => value };
}

/** Comma-separated non-empty strings (host names, origins), trimmed and lower-cased: both are case-insensitive. */
export const nameList: ValueType<readonly string[]> = {
  expected: 'a comma-separated list of non-empty names',
  check: (value) => {
    if (!Array.isArray(value)) fail();
    const bad = value.findIndex((name) => typeof name !== 'string' || name.trim() === '' || name.includes(','));
    return bad < 0 ? (value as string[]).map((name) => name.trim().toLowerCase()) : fail(`entry ${bad} is ${JSON.stringify(value[bad])}`);
  },
  fromText: (t) => nameList.check(t.split(',')),
  toText: (value) => value.join(','),
};

/** Comma-separated non-negative integers: token ids, GPU indices. */
export const idList: ValueType<readonly number[]> = {
  expected: 'comma-separated non-negative integers',
  check: (value) => {
    if (!Array.isArray(value)) fail();
    const bad = value.findIndex((id) => !Number.isInteger(id) || (id as number) < 0);
    return bad < 0 ? (value as number[]) : fail(`entry ${bad} is ${String(value[bad])}`);
  },
  fromText: (t) => {
    const ids = t.split(',').map((s) => s.trim());
    const bad = ids.findIndex((s) => !/^\d+$/.test(s));
    return bad < 0 ? ids.map(Number) : fail(`entry ${bad} is "${ids[bad]}"`);
  },
  toText: (value) => value.join(','),
};
