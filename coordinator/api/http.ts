/**
 * The HTTP gateway (node:http), following the OpenAI convention: `/v1/completions`, `/v1/chat/completions`
 * (SSE streaming: `data: {json}\n\n` chunks, then `data: [DONE]`), `/v1/models`, `/v1/models/{model}`, plus `/health` (200 when
 * every rank serves, else 503 with the load progress), `/live` (always 200), Prometheus `/metrics` and
 * `/tokenize` and `/detokenize`.
 *
 * Errors are `{"error": {"message", "type", "param", "code"}}` everywhere, a failure mid-stream included (then
 * no `[DONE]`). A full queue is 503 with `retry-after`. A client that disconnects cancels its request, which
 * frees its KV slot. Bodies are capped (413), header and request timeouts are explicit, and with a bearer token
 * every route but the public ones (`/health`, `/live`) needs it (compared in constant time). Binding anywhere but
 * loopback requires the token. Host, Origin, content-type and slow-client checks: http-guards.ts. Which body
 * fields are accepted: openai-request.ts. Every answer carries `x-request-id`; OPTIONS on a route (or `*`) is 204
 * with Allow.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { z } from 'zod';
import { WeftError, isWeftError } from '../../core/errors.ts';
import type { Cluster } from '../cluster.ts';
import type { GenerationHandle } from '../scheduler.ts';
import type { ChatPrompter } from '../chat-template.ts';
import type { WeftMetrics } from '../metrics.ts';
import { isLoopback } from './server.ts';
import { HttpError, RequestGuards, answerClientError, requestIdOf, requireJson, slowClientLimits } from './http-guards.ts';
import { chatMessagesOf, chatSchema, choicesOf, completionSchema, messagesSchema, logprobRequestOf, parseBody, promptsOf, refuseUnsupported, samplingOf, stopsOf, type Choice, type CommonBody, type LogprobRequest } from './openai-request.ts';
import { LogprobWriter, answered, echoesOf, mergeLogprobs, type LoggedToken, type TokenText } from './openai-logprobs.ts';

export interface HttpGatewayOptions {
  /** Defaults to 127.0.0.1. */
  readonly host?: string;
  /** 0 picks a free port. Defaults to 0. */
  readonly port?: number;
  /** bearer token; required unless host is loopback */
  readonly apiKey?: string;
  /** the model's chat template (cluster.chatTemplate): rendered and tokenized off the event loop */
  readonly chatTemplate: ChatPrompter | null;
  readonly metrics: WeftMetrics;
  /** Defaults to 4 MiB. */
  readonly maxBodyBytes?: number;
  /** Host names answered besides loopback ones and `host`; '*' answers all (see http-guards.ts) */
  readonly allowedHosts?: readonly string[];
  /** browser origins allowed (CORS); '*' allows all; none by default */
  readonly corsOrigins?: readonly string[];
  /** a request's headers and body must arrive within this, else the connection closes. Defaults to 10 s. */
  readonly clientTimeoutMs?: number;
}

/** `/v1/models/{model}`: the one route with a parameter (the model id, URL-encoded). */
const MODEL_PREFIX = '/v1/models/';
const MODEL_ROUTE = `${MODEL_PREFIX}{model}`;
/** The route a request path belongs to: itself, or MODEL_ROUTE for a model's path. */
const routePath = (path: string): string => (path.startsWith(MODEL_PREFIX) && path.length > MODEL_PREFIX.length ? MODEL_ROUTE : path);

type Handler = (req: IncomingMessage, res: ServerResponse) => Promise<void>;

/** Routes anyone may call without the token. */
export const PUBLIC_ROUTES: readonly string[] = ['GET /health', 'GET /live'];

const STATUS: Partial<Record<string, number>> = {
  WEFT_BAD_REQUEST: 400,
  WEFT_PROTOCOL: 400,
  WEFT_BUSY: 503,
  WEFT_CLOSED: 503,
  WEFT_WORKER_DIED: 503,
  WEFT_TIMEOUT: 504,
};

function errorBody(err: unknown): { status: number; body: { error: { message: string; type: string; param: string | null; code: string } } } {
  if (err instanceof HttpError) return { status: err.status, body: err.body() };
  const code = isWeftError(err) ? err.code : 'WEFT_INTERNAL';
  const status = STATUS[code] ?? 500;
  const type = status < 500 ? 'invalid_request_error' : code === 'WEFT_BUSY' ? 'overloaded_error' : 'server_error';
  const param = isWeftError(err) ? (err.param ?? null) : null;
  return { status, body: { error: { message: (err as Error).message ?? String(err), type, param, code } } };
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

/**
 * A failure of the server's own (5xx, a full queue aside) is logged on stderr with its request id, so a client's
 * report (which carries the x-request-id header) finds its log line.
 */
function logFailure(res: ServerResponse, status: number, body: ReturnType<typeof errorBody>['body']): void {
  if (status < 500 || body.error.code === 'WEFT_BUSY') return;
  const req = res.req as IncomingMessage | undefined;
  process.stderr.write(`weft: HTTP ${status} ${req?.method ?? ''} ${(req?.url ?? '').split('?')[0]} x-request-id=${String(res.getHeader('x-request-id'))}: ${body.error.code}: ${body.error.message}\n`);
}

function sendError(res: ServerResponse, err: unknown): void {
  const { status, body } = errorBody(err);
  logFailure(res, status, body);
  if (res.headersSent) return void res.end();
  sendJson(res, status, body, { ...(err instanceof HttpError && err.headers), ...(status === 503 && { 'retry-after': '1' }) });
}

const digest = (s: string): Buffer => createHash('sha256').update(s).digest();

/** The most bytes a request body may have, and why (said in the refusal). */
interface BodyLimit {
  readonly bytes: number;
  readonly why: string;
}

async function readJson(req: IncomingMessage, { bytes: limit, why }: BodyLimit): Promise<unknown> {
  requireJson(req);
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > limit) throw new HttpError(413, 'body_too_large', `the request body is ${declared} bytes; the limit is ${limit}${why}`);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new HttpError(413, 'body_too_large', `the request body is over the limit of ${limit} bytes${why}`);
    chunks.push(chunk);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new HttpError(400, 'invalid_json', `the request body is not valid JSON: ${(err as Error).message}`);
  }
}

/** Holds back text that may be the start of a stop string; ends the text at the first stop string. */
export class StopMatcher {
  private pending = '';
  constructor(private readonly stops: readonly string[]) {}
  push(piece: string): { text: string; stopped: boolean } {
    this.pending += piece;
    let cut = -1;
    for (const stop of this.stops) {
      const at = this.pending.indexOf(stop);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      const text = this.pending.slice(0, cut);
      this.pending = '';
      return { text, stopped: true };
    }
    let hold = 0;
    for (const stop of this.stops)
      for (let k = Math.min(stop.length - 1, this.pending.length); k > hold; k--)
        if (this.pending.endsWith(stop.slice(0, k))) {
          hold = k;
          break;
        }
    const text = this.pending.slice(0, this.pending.length - hold);
    this.pending = this.pending.slice(this.pending.length - hold);
    return { text, stopped: false };
  }
  flush(): string {
    const text = this.pending;
    this.pending = '';
    return text;
  }
}

export class HttpGateway {
  private constructor(
    private readonly server: Server,
    readonly url: string,
  ) {}

  static async start(cluster: Cluster, options: HttpGatewayOptions): Promise<HttpGateway> {
    const host = options.host ?? '127.0.0.1';
    if (!isLoopback(host) && !options.apiKey) throw new WeftError('WEFT_BAD_REQUEST', `binding HTTP to ${host} (not loopback) needs a bearer token (--api-key or WEFT_API_KEY)`);
    const routes = buildRoutes(cluster, options);
    const expected = options.apiKey !== undefined ? digest(`Bearer ${options.apiKey}`) : null;
    const guards = new RequestGuards({ host, ...(options.allowedHosts && { allowedHosts: options.allowedHosts }), ...(options.corsOrigins && { corsOrigins: options.corsOrigins }) });
    const server = createServer(slowClientLimits(options.clientTimeoutMs ?? 10_000), (req, res) => {
      res.once('finish', () => options.metrics.httpAnswered(res.statusCode));
      res.setHeader('x-request-id', requestIdOf(req));
      const path = routePath((req.url ?? '/').split('?')[0]!);
      const key = `${req.method} ${path}`;
      const handler = routes.get(key);
      // `OPTIONS *` asks about the server as a whole: every method it answers somewhere
      const methods = [...new Set([...routes.keys()].filter((k) => (path === '*' && req.method === 'OPTIONS') || k.endsWith(` ${path}`)).map((k) => k.split(' ')[0]!))];
      try {
        guards.admit(req, res);
      } catch (err) {
        req.resume();
        return sendError(res, err);
      }
      if (req.method === 'OPTIONS' && methods.length > 0) {
        req.resume();
        return guards.preflight(req, res, methods);
      }
      if (expected && !PUBLIC_ROUTES.includes(key) && !timingSafeEqual(digest(String(req.headers.authorization ?? '')), expected)) {
        req.resume();
        return sendJson(res, 401, { error: { message: 'missing or wrong bearer token', type: 'authentication_error', param: null, code: 'unauthorized' } });
      }
      if (!handler) {
        req.resume();
        const known = methods.length > 0;
        const allow = { allow: [...methods, 'OPTIONS'].join(', ') };
        return sendError(res, new HttpError(known ? 405 : 404, known ? 'method_not_allowed' : 'not_found', `${known ? 'method not allowed' : 'no route'}: ${key}`, null, known ? allow : {}));
      }
      handler(req, res).catch((err) => {
        req.resume();
        sendError(res, err);
      });
    });
    server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => answerClientError(err, socket, (status) => options.metrics.httpAnswered(status)));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.port ?? 0, host, () => resolve());
    });
    const address = server.address() as AddressInfo;
    const shown = address.family === 'IPv6' ? `[${address.address}]` : address.address;
    return new HttpGateway(server, `http://${shown}:${address.port}`);
  }

  /** Registered routes, as "METHOD /path" (tests enumerate them for the auth check). */
  static routes(): string[] {
    return ['GET /health', 'GET /live', 'GET /metrics', 'GET /v1/models', `GET ${MODEL_ROUTE}`, 'POST /v1/completions', 'POST /v1/chat/completions', 'POST /tokenize', 'POST /detokenize'];
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}

function buildRoutes(cluster: Cluster, options: HttpGatewayOptions): Map<string, Handler> {
  // A body that could hold no prompt the context allows is refused from its length, before it is read or parsed
  // (parsing megabytes of JSON would stall this event loop): 6 bytes per character (a JSON \uXXXX escape) of the
  // longest text the cluster tokenizes, plus 64 KiB for the other fields, and never over 4 MiB.
  const textBound = Math.min(4 << 20, 6 * cluster.maxTextChars + (64 << 10));
  const limit: BodyLimit =
    options.maxBodyBytes !== undefined
      ? { bytes: options.maxBodyBytes, why: '' }
      : { bytes: textBound, why: textBound < 4 << 20 ? ` (6 bytes for each of the ${cluster.maxTextChars} characters a prompt may have, plus 64 KiB)` : '' };
  const modelName = cluster.info().name;
  const checkModel = (model: string | undefined): void => {
    if (model !== undefined && model !== modelName) throw new HttpError(404, 'model_not_found', `model "${model}" is not served here; this server serves "${modelName}"`, 'model');
  };
  const routes = new Map<string, Handler>();
  routes.set('GET /live', async (_req, res) => sendJson(res, 200, { status: 'ok' }));
  routes.set('GET /health', async (_req, res) => {
    const stats = cluster.stats();
    sendJson(res, stats.state === 'ready' ? 200 : 503, { status: stats.state, detail: stats.detail, ranks: stats.ranks });
  });
  routes.set('GET /metrics', async (_req, res) => {
    const text = await options.metrics.text();
    res.writeHead(200, { 'content-type': options.metrics.registry.contentType });
    res.end(text);
  });
  const model = { id: modelName, object: 'model', created: 0, owned_by: 'weft', max_model_len: cluster.maxContext };
  routes.set('GET /v1/models', async (_req, res) => sendJson(res, 200, { object: 'list', data: [model] }));
  routes.set(`GET ${MODEL_ROUTE}`, async (req, res) => {
    const raw = (req.url ?? '').split('?')[0]!.slice(MODEL_PREFIX.length);
    let id = raw;
    try {
      id = decodeURIComponent(raw);
    } catch {
      // not valid percent-encoding: the raw text is named in the 404
    }
    checkModel(id);
    sendJson(res, 200, model);
  });
  // vLLM's shapes: /tokenize takes a prompt (add_special_tokens: whether BOS is added, by default as the model's
  // tokenizer_config.json says) or a chat's messages (as
  // the chat route renders them) and answers the count and the context beside the ids; /detokenize the text of ids.
  const tokenizeSchema = z.object({ prompt: z.string().optional(), messages: messagesSchema.optional(), add_special_tokens: z.boolean().optional() }).loose();
  routes.set('POST /tokenize', async (req, res) => {
    const body = parseBody(tokenizeSchema, await readJson(req, limit));
    if ((body.prompt === undefined) === (body.messages === undefined)) throw new HttpError(400, 'invalid_request', 'give either prompt or messages', 'prompt');
    let tokens: number[];
    if (body.messages) {
      if (!options.chatTemplate) throw new HttpError(400, 'no_chat_template', `model "${modelName}" has no chat_template in its tokenizer_config.json; tokenize a prompt`, 'messages');
      tokens = await options.chatTemplate.promptIds(chatMessagesOf(body.messages));
    } else tokens = await cluster.tokenize(body.prompt!, body.add_special_tokens === undefined ? {} : { addBos: body.add_special_tokens });
    sendJson(res, 200, { count: tokens.length, max_model_len: cluster.maxContext, tokens });
  });
  const { vocabSize } = cluster.spec;
  const tokenIds = z
    .array(z.number().int().min(0).max(vocabSize - 1, { error: `must be a token id in [0, ${vocabSize})` }))
    .max(cluster.maxContext, { error: `holds more than the context of ${cluster.maxContext} tokens` });
  routes.set('POST /detokenize', async (req, res) => {
    const body = parseBody(z.object({ tokens: tokenIds }).loose(), await readJson(req, limit));
    sendJson(res, 200, { prompt: await cluster.detokenize(body.tokens, { skipSpecial: false }) }); // as Hugging Face's decode
  });
  routes.set('POST /v1/completions', async (req, res) => {
    const body = parseBody(completionSchema, await readJson(req, limit));
    checkModel(body.model);
    refuseUnsupported(body);
    const asked = logprobRequestOf(body);
    await complete(cluster, req, res, body, choicesOf(promptsOf(body), asked.samples, samplingOf(body, null, cluster.maxContext, asked)), modelName, asked);
  });
  routes.set('POST /v1/chat/completions', async (req, res) => {
    const body = parseBody(chatSchema, await readJson(req, limit));
    checkModel(body.model);
    refuseUnsupported(body);
    const asked = logprobRequestOf(body);
    if (!options.chatTemplate) throw new HttpError(400, 'no_chat_template', `model "${modelName}" has no chat_template in its tokenizer_config.json; use /v1/completions with a prompt`);
    const promptIds = await options.chatTemplate.promptIds(chatMessagesOf(body.messages));
    await complete(cluster, req, res, body, choicesOf([{ promptIds }], asked.samples, samplingOf(body, promptIds.length, cluster.maxContext, asked)), modelName, asked);
  });
  return routes;
}

/** What one choice ended with. */
interface ChoiceResult {
  text: string;
  finish: string;
  completionTokens: number;
  promptTokens: number;
  /** the tokens drawn, with their log-probs when the request asked (or best_of ranks) */
  tokens: LoggedToken[];
}

/**
 * Runs a request's choices (each a sequence of its own) and answers with all of them: as one JSON body, or as SSE
 * chunks tagged with each choice's index, interleaved as tokens come. A choice the cluster refuses at submission
 * (a full queue, a prompt too long) fails the request before any header, and the choices already submitted are
 * cancelled; a failure while streaming ends the stream with one error event. With best_of, each prompt's samples
 * are ranked by cumulative log-prob and its n best answered (never streamed: logprobRequestOf refuses it).
 */
async function complete(cluster: Cluster, req: IncomingMessage, res: ServerResponse, body: CommonBody, choices: readonly Choice[], modelName: string, asked: LogprobRequest): Promise<void> {
  const object = 'messages' in body ? 'chat.completion' : 'text_completion';
  const abort = new AbortController();
  res.on('close', () => abort.abort());
  const echoes = asked.echo ? await echoesOf(cluster, choices, asked.top) : null; // before any header: a refusal is a plain error
  const handles: GenerationHandle[] = [];
  try {
    for (const c of choices) handles.push(await cluster.submit({ ...c.request, sampling: c.sampling }, { signal: abort.signal })); // throws WEFT_BUSY / WEFT_BAD_REQUEST before any header
  } catch (err) {
    for (const h of handles) h.cancel();
    throw err;
  }
  const id = `${object === 'chat.completion' ? 'chatcmpl' : 'cmpl'}-${randomBytes(12).toString('hex')}`;
  const created = Math.floor(Date.now() / 1000);
  const chat = object === 'chat.completion';
  const tokenText: TokenText = (token) => cluster.tokenizer.decode([token], { skipSpecial: false });
  // one writer per choice: text_offset runs from 0 through the echoed prompt's tokens and on through the answer's
  const writerOf = (): LogprobWriter | null => (asked.top === null ? null : new LogprobWriter(chat, tokenText));
  const choice = (index: number, text: string, finish: string | null, logprobs: Record<string, unknown> | null): Record<string, unknown> =>
    chat ? { index, delta: text === '' && finish === null ? { role: 'assistant', content: '' } : finish ? {} : { content: text }, logprobs, finish_reason: finish } : { index, text, logprobs, finish_reason: finish };
  const chunkObject = chat ? 'chat.completion.chunk' : 'text_completion';
  const stream = body.stream === true;
  const write = (data: unknown): void => void res.write(`data: ${JSON.stringify(data)}\n\n`);
  const chunk = (index: number, text: string, finish: string | null, logprobs: Record<string, unknown> | null = null): void =>
    write({ id, object: chunkObject, created, model: modelName, choices: [choice(index, text, finish, logprobs)] });
  if (stream) {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', 'x-accel-buffering': 'no', connection: 'keep-alive' });
    if (chat) for (const c of choices) chunk(c.index, '', null);
  }
  const run = async (c: Choice, handle: GenerationHandle): Promise<ChoiceResult> => {
    const matcher = new StopMatcher(stopsOf(body));
    const result: ChoiceResult = { text: '', finish: 'length', completionTokens: 0, promptTokens: 0, tokens: [] };
    const writer = stream ? writerOf() : null;
    const echo = echoes?.get(c.request);
    if (stream && echo) chunk(c.index, echo.text, null, writer && echo.tokens ? writer.write(echo.tokens) : null);
    let unsent = 0; // result.tokens not yet in a streamed chunk
    const send = (text: string, finish: string | null = null): void => {
      if (!stream || (!text && finish === null)) return;
      chunk(c.index, text, finish, writer ? writer.write(result.tokens.slice(unsent)) : null);
      unsent = result.tokens.length;
    };
    for await (const event of handle.events) {
      if (event.type === 'token') {
        const { text: piece, stopped } = matcher.push(event.text);
        result.text += piece;
        if (event.logprobs) result.tokens.push({ token: event.token, logprob: event.logprobs });
        send(piece);
        result.completionTokens++;
        if (stopped) {
          result.finish = 'stop';
          handle.cancel(new WeftError('WEFT_CANCELLED', 'stop string reached'), 'stop');
          break;
        }
      } else {
        const rest = matcher.flush();
        result.text += rest;
        send(rest);
        result.finish = event.finishReason;
        result.completionTokens = event.tokens.length;
        result.promptTokens = event.promptTokens;
        // best_of ranks by every token drawn, the stop token's included
        if (event.logprobs) result.tokens = event.tokens.map((token, i) => ({ token, logprob: event.logprobs![i] ?? null }));
      }
    }
    if (result.promptTokens === 0) result.promptTokens = handle.promptTokens;
    send('', result.finish); // with the log-probs of tokens whose text was held back (part of a character, a stop string's start)
    return result;
  };
  let results: ChoiceResult[];
  try {
    results = await Promise.all(choices.map((c, i) => run(c, handles[i]!)));
  } catch (err) {
    for (const h of handles) h.cancel();
    if (abort.signal.aborted) return; // the client left
    if (!stream) throw err;
    const { status, body: failure } = errorBody(err);
    logFailure(res, status, failure);
    write(failure);
    res.end();
    return;
  }
  // each prompt's tokens count once, however many samples continue it (as OpenAI counts); every sample best_of drew counts
  const promptTokens = results.filter((_, i) => choices[i]!.sample === 0).reduce((sum, r) => sum + r.promptTokens, 0);
  const completionTokens = results.reduce((sum, r) => sum + r.completionTokens, 0);
  const usage = { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens };
  if (stream) {
    if (body.stream_options?.include_usage) write({ id, object: chunkObject, created, model: modelName, choices: [], usage });
    res.end('data: [DONE]\n\n');
    return;
  }
  const answers = answered(choices, results, asked.samples, body.n ?? 1).map(({ choice: c, result: r, index }) => {
    const echo = echoes?.get(c.request);
    const writer = writerOf();
    const echoed = writer && echo?.tokens ? writer.write(echo.tokens) : null; // first: text_offset runs on into the answer
    const drawn = writer && writer.write(r.tokens.slice(0, r.completionTokens));
    const merged = echoed && drawn ? mergeLogprobs(echoed, drawn) : drawn;
    return chat
      ? { index, message: { role: 'assistant', content: r.text }, logprobs: merged, finish_reason: r.finish }
      : { index, text: (echo?.text ?? '') + r.text, logprobs: merged, finish_reason: r.finish };
  });
  sendJson(res, 200, { id, object, created, model: modelName, choices: answers, usage });
}
