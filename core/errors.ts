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
  | 'WEFT_BAD_CONFIG' // an option, environment variable or key file the operator gave is invalid
  | 'WEFT_ADDRESS_IN_USE' // a socket weft must listen on is taken by another process
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
  /** the request field at fault, as the caller spelled it (a bad request's; the HTTP gateway answers it as `param`) */
  readonly param?: string;
  constructor(code: WeftErrorCode, message: string, options?: { cause?: unknown; param?: string }) {
    super(message, options);
    this.name = 'WeftError';
    this.code = code;
    if (options?.param !== undefined) this.param = options.param;
  }
}

/** An error's message, its first line only (a report's one line). */
export function firstLine(err: unknown): string {
  return ((err as Error)?.message ?? String(err)).split('\n')[0]!;
}

export function isWeftError(err: unknown): err is WeftError {
  return err instanceof Error && typeof (err as { code?: unknown }).code === 'string' && (err as unknown as { code: string }).code.startsWith('WEFT_');
}

/**
 * Exit code of a command that failed on its configuration (model files, architecture, split): EX_CONFIG from
 * sysexits.h. pm2 is told not to restart a process that exits with it: a restart cannot help.
 */
export const EXIT_CONFIG = 78;

/**
 * A busy port counts as configuration: it stays busy across restarts (pm2 restarts a process only after the old
 * one has exited, and weft's sockets reuse addresses), so restarting in a loop cannot free it.
 */
const CONFIG_CODES: ReadonlySet<string> = new Set(['WEFT_BAD_MODEL', 'WEFT_UNSUPPORTED_MODEL', 'WEFT_BAD_WEIGHTS', 'WEFT_BAD_SHARD', 'WEFT_BAD_CONFIG', 'WEFT_ADDRESS_IN_USE']);

/** The exit code for an error that ends a command: EXIT_CONFIG for configuration errors, 1 otherwise. */
export function exitCodeFor(err: unknown): number {
  return isWeftError(err) && CONFIG_CODES.has(err.code) ? EXIT_CONFIG : 1;
}

/**
 * A failed bind or listen as an error naming the socket (`what`: RPC, HTTP, workers) and its endpoint; Node and
 * ZeroMQ both say only "address already in use". Errors that are not about the address pass through unchanged.
 */
export function listenError(err: unknown, endpoint: string, what: string): unknown {
  const code = (err as { code?: unknown } | null)?.code;
  const message = err instanceof Error ? err.message : String(err);
  if (code === 'EADDRINUSE' || /address already in use/i.test(message))
    return new WeftError('WEFT_ADDRESS_IN_USE', `cannot listen on ${endpoint} (${what}): address already in use`, { cause: err });
  if (code === 'EADDRNOTAVAIL' || code === 'EACCES' || /cannot assign requested address|permission denied/i.test(message))
    return new WeftError('WEFT_BAD_CONFIG', `cannot listen on ${endpoint} (${what}): ${message}`, { cause: err });
  return err;
}
