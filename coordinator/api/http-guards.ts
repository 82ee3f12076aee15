/**
 * What the HTTP gateway checks before a request reaches a route, against browsers and slow clients:
 *
 * - Host: only loopback names, the bound address and `--allowed-hosts` are answered, so a page whose DNS name is
 *   rebound to 127.0.0.1 cannot read the answers (its requests carry its own name as Host).
 * - Origin: a request with an Origin header (a browser page) is refused unless `--cors-origins` allows it; an
 *   allowed one gets CORS headers, and OPTIONS is answered (204, Allow and the preflight headers).
 * - JSON bodies need `content-type: application/json`: a page may POST text/plain without a preflight.
 * - Slow clients: a request's headers and body must arrive within the client deadline (10 s by default), and a
 *   request the parser refuses (a header over 16 KiB, Transfer-Encoding with Content-Length, a timeout) gets an
 *   HTTP answer in the OpenAI error shape before the socket closes.
 * - Request ids: every answer carries `x-request-id`, the client's own when it sent a sane one (requestIdOf).
 */
import { STATUS_CODES, type IncomingMessage, type ServerOptions, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { randomUUID } from 'node:crypto';

/** An answer other than success, in the OpenAI error shape `{"error": {message, type, param, code}}`. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
    /** sent with the answer (allow, for a 405) */
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
  }

  body(): { error: { message: string; type: string; param: string | null; code: string } } {
    return { error: { message: this.message, type: this.status < 500 ? 'invalid_request_error' : 'server_error', param: this.param, code: this.code } };
  }
}

export interface RequestGuardOptions {
  /** the address the gateway binds; its Host header is answered too */
  readonly host: string;
  /** Host names answered besides loopback ones (a port is ignored); '*' answers every name */
  readonly allowedHosts?: readonly string[];
  /** browser origins (scheme://host:port) allowed, with CORS headers; '*' allows every origin; none by default */
  readonly corsOrigins?: readonly string[];
}

/** Host names answered whatever the options say. */
export const LOOPBACK_HOST_NAMES: readonly string[] = ['localhost', '127.0.0.1', '[::1]'];
/** Headers a browser may send cross-origin when the preflight does not name its own. */
const DEFAULT_ALLOWED_HEADERS = 'authorization, content-type';
/** A list of header names (RFC 9110 tokens), as Access-Control-Request-Headers carries it. */
const HEADER_NAMES = /^[\w!#$%&'*+.^`|~-]+(\s*,\s*[\w!#$%&'*+.^`|~-]+)*$/;
const PREFLIGHT_MAX_AGE_S = '600';

/** The name of a Host header value (or a list entry): lower case, without its port or a trailing dot. */
function hostName(value: string): string {
  const host = value.trim().toLowerCase();
  if (host.startsWith('[')) return host.slice(0, host.indexOf(']') + 1) || host;
  if (host.indexOf(':') !== host.lastIndexOf(':')) return `[${host}]`; // a bare IPv6 address (a bind address)
  return host.split(':')[0]!.replace(/\.$/, '');
}

export class RequestGuards {
  private readonly anyHost: boolean;
  private readonly hosts: ReadonlySet<string>;
  private readonly anyOrigin: boolean;
  private readonly origins: ReadonlySet<string>;

  constructor(options: RequestGuardOptions) {
    const allowed = options.allowedHosts ?? [];
    this.anyHost = allowed.includes('*');
    this.hosts = new Set([...LOOPBACK_HOST_NAMES, hostName(options.host), ...allowed.map(hostName)]);
    const origins = options.corsOrigins ?? [];
    this.anyOrigin = origins.includes('*');
    this.origins = new Set(origins.map((o) => o.trim().toLowerCase().replace(/\/$/, '')));
  }

  /** Host and Origin checks; an allowed origin's CORS headers are set on `res`. Throws HttpError (403) to refuse. */
  admit(req: IncomingMessage, res: ServerResponse): void {
    const host = req.headers.host;
    if (!this.anyHost && (host === undefined || !this.hosts.has(hostName(host))))
      throw new HttpError(403, 'host_not_allowed', `Host "${host ?? ''}" is not served here; allowed: ${[...this.hosts].join(', ')} (add names with --allowed-hosts)`);
    const origin = req.headers.origin;
    if (origin === undefined) return;
    if (!this.anyOrigin && !this.origins.has(origin.trim().toLowerCase()))
      throw new HttpError(403, 'origin_not_allowed', `requests from the browser origin "${origin}" are refused (allow it with --cors-origins)`);
    res.setHeader('access-control-allow-origin', origin);
    res.setHeader('access-control-expose-headers', 'retry-after, x-request-id');
    res.setHeader('vary', 'origin');
  }

  /** OPTIONS on a route that exists: 204 with Allow, and for an admitted origin the CORS preflight answer. */
  preflight(req: IncomingMessage, res: ServerResponse, methods: readonly string[]): void {
    const allow = [...methods, 'OPTIONS'].join(', ');
    const headers: Record<string, string> = { allow };
    if (req.headers.origin !== undefined) {
      const requested = req.headers['access-control-request-headers'];
      headers['access-control-allow-methods'] = allow;
      headers['access-control-allow-headers'] = requested !== undefined && HEADER_NAMES.test(requested) ? requested : DEFAULT_ALLOWED_HEADERS;
      headers['access-control-max-age'] = PREFLIGHT_MAX_AGE_S;
    }
    res.writeHead(204, headers);
    res.end();
  }
}

/** A JSON route's body must say it is JSON: a browser sends text/plain (or no type) cross-origin without asking. */
export function requireJson(req: IncomingMessage): void {
  const type = req.headers['content-type'];
  if (type?.split(';')[0]!.trim().toLowerCase() !== 'application/json')
    throw new HttpError(415, 'unsupported_media_type', `the request body must be sent as content-type: application/json, got ${type === undefined ? 'no content-type' : `"${type}"`}`);
}

/** A client's x-request-id is echoed when it is short printable ASCII without spaces; any other gets a fresh one. */
const SANE_REQUEST_ID = /^[\x21-\x7e]{1,128}$/;

/** The id this request's answer (and any log line about it) carries: the client's `x-request-id`, or a fresh one. */
export function requestIdOf(req: IncomingMessage): string {
  const given = req.headers['x-request-id'];
  return typeof given === 'string' && SANE_REQUEST_ID.test(given) ? given : randomUUID();
}

/** Largest request head (request line and headers) read; larger ones get 431. */
export const MAX_HEADER_BYTES = 16 * 1024;

/**
 * node:http options closing a client whose headers or body are not in within `clientTimeoutMs`. Node checks its
 * deadlines every `connectionsCheckingInterval`, so the timeouts leave one interval of room within the deadline.
 */
export function slowClientLimits(clientTimeoutMs: number): ServerOptions {
  const interval = Math.min(1000, Math.max(10, Math.floor(clientTimeoutMs / 10)));
  const timeout = Math.max(1, clientTimeoutMs - interval);
  return { headersTimeout: timeout, requestTimeout: timeout, connectionsCheckingInterval: interval, maxHeaderSize: MAX_HEADER_BYTES };
}

/** A request the parser refused, or one too slow: its status and why. */
function describeClientError(err: NodeJS.ErrnoException): HttpError {
  if (err.code === 'HPE_HEADER_OVERFLOW') return new HttpError(431, 'headers_too_large', `the request headers are over the limit of ${MAX_HEADER_BYTES} bytes`);
  if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') return new HttpError(408, 'request_timeout', 'the request headers and body did not arrive in time');
  return new HttpError(400, 'bad_request', `the request is not valid HTTP/1.1: ${(err as { reason?: string }).reason ?? err.message}`);
}

/** How long an answered bad client may take to read the answer before its socket is destroyed. */
const LINGER_MS = 500;

/** node:http 'clientError': answer in HTTP (no dropped socket), then close; nothing is written after a response began. */
export function answerClientError(err: NodeJS.ErrnoException, socket: Duplex, onAnswer?: (status: number) => void): void {
  const started = (socket as Duplex & { _httpMessage?: ServerResponse })._httpMessage?.headersSent === true;
  // a client that hung up (reset, or closed before its request was complete) is not answered
  if (err.code === 'ECONNRESET' || err.code === 'HPE_INVALID_EOF_STATE' || !socket.writable || started) return void socket.destroy();
  const refusal = describeClientError(err);
  const text = JSON.stringify(refusal.body());
  socket.end(`HTTP/1.1 ${refusal.status} ${STATUS_CODES[refusal.status]}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nx-request-id: ${randomUUID()}\r\nconnection: close\r\n\r\n${text}`);
  setTimeout(() => socket.destroy(), LINGER_MS).unref();
  onAnswer?.(refusal.status);
}
