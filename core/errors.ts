/**
 * Errors that cross weft's boundaries carry a stable `code` so that callers (CLI, RPC clients, tests)
 * can branch on it without parsing messages. The message always names the offending thing.
 */
export type WeftErrorCode =
  | 'WEFT_BAD_MODEL' // model directory, config.json or tokenizer missing or malformed
  | 'WEFT_UNSUPPORTED_MODEL' // architecture or feature weft does not implement
  | 'WEFT_BAD_WEIGHTS' // safetensors file missing, truncated, wrong dtype or shape
  | 'WEFT_BAD_SHARD' // the tensor-parallel degree cannot split this model
  | 'WEFT_BAD_REQUEST' // prompt too long, bad sampling parameters, bad ids
  | 'WEFT_WORKER_DIED' // a worker process exited or stopped answering
  | 'WEFT_WORKER_ERROR' // a worker reported an error while running a command
  | 'WEFT_PROTOCOL' // malformed or unexpected control-plane message
  | 'WEFT_NATIVE' // the native engine raised (shape check, CUDA/NCCL error)
  | 'WEFT_TIMEOUT'
  | 'WEFT_BUSY' // the request queue is full: retry later
  | 'WEFT_CANCELLED' // the caller cancelled the request (AbortSignal, cancel message, closed connection)
  | 'WEFT_CLOSED'; // the cluster was shut down

export class WeftError extends Error {
  readonly code: WeftErrorCode;
  constructor(code: WeftErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'WeftError';
    this.code = code;
  }
}

export function isWeftError(err: unknown): err is WeftError {
  return err instanceof Error && typeof (err as { code?: unknown }).code === 'string' && (err as unknown as { code: string }).code.startsWith('WEFT_');
}

/**
 * Exit code of a command that failed on its configuration (model files, architecture, split): EX_CONFIG from
 * sysexits.h. pm2 is told not to restart a process that exits with it: a restart cannot help.
 */
export const EXIT_CONFIG = 78;

const CONFIG_CODES: ReadonlySet<string> = new Set(['WEFT_BAD_MODEL', 'WEFT_UNSUPPORTED_MODEL', 'WEFT_BAD_WEIGHTS', 'WEFT_BAD_SHARD']);

/** The exit code for an error that ends a command: EXIT_CONFIG for configuration errors, 1 otherwise. */
export function exitCodeFor(err: unknown): number {
  return isWeftError(err) && CONFIG_CODES.has(err.code) ? EXIT_CONFIG : 1;
}
