/**
 * `weft serve`: the coordinator as a long-running server. The RPC socket and the HTTP gateway open first (so
 * `/health` answers 503 with the per-rank load progress while the weights load), then the cluster loads, and
 * `/health` turns 200. A worker fault re-forms the group; after too many failed attempts the process exits
 * non-zero so its supervisor can restart it. The cluster's text threads (tokenizer, chat template) close with it.
 */
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import * as zmq from 'zeromq';
import { Cluster, type ClusterOptions, type ClusterState } from './cluster.ts';
import { WeftError, listenError } from '../core/errors.ts';
import { apiConfig } from './config.ts';
import { RpcServer, isLoopback } from './api/server.ts';
import { HttpGateway } from './api/http.ts';
import { WeftMetrics } from './metrics.ts';
import { startServerLog, type LogFormat } from './server-log.ts';
import type { CurveServerKeys } from './api/protocol.ts';

/** What serve() takes besides the cluster's options; defaults and checks as declared in config/options.ts. */
export interface ServeOptions extends ClusterOptions {
  /** Interface RPC and HTTP bind. */
  readonly host?: string;
  /** 0 picks a free port (the default here; the CLI's are 5555 and 8000). */
  readonly rpcPort?: number;
  readonly httpPort?: number;
  /** Bearer token HTTP clients must send; required with CURVE keys unless host is loopback. */
  readonly apiKey?: string;
  readonly curve?: CurveServerKeys;
  /** Host header names HTTP answers besides loopback ones and `host`; ['*'] answers every name. */
  readonly allowedHosts?: readonly string[];
  /** Browser origins allowed to call HTTP (CORS); ['*'] allows every origin; none by default. */
  readonly corsOrigins?: readonly string[];
  /** An HTTP request's headers and body must arrive within this (default 10 s). */
  readonly clientTimeoutMs?: number;
  /** Seconds between server log lines on stderr (server-log.ts); 0, the default here: none. */
  readonly logIntervalSeconds?: number;
  readonly logFormat?: LogFormat;
}

export interface RunningServer {
  readonly cluster: Cluster;
  readonly rpcEndpoint: string;
  readonly httpUrl: string;
  close(): Promise<void>;
}

export async function serve(options: ServeOptions): Promise<RunningServer> {
  const { host, rpcPort, httpPort, apiKey, recover, allowedHosts, corsOrigins, clientTimeoutMs, logIntervalSeconds, logFormat } = apiConfig('server', options);
  if (!isLoopback(host) && (!options.curve || !apiKey))
    throw new WeftError('WEFT_BAD_CONFIG', `serving on ${host} (not loopback) needs CURVE keys for RPC (--curve-dir) and a bearer token for HTTP (--api-key or WEFT_API_KEY)`);
  let metrics: WeftMetrics | null = null;
  // the chat template is loaded (and probed) in the cluster's text threads, where a slow one cannot stall this loop
  const cluster = await Cluster.open({ ...options, recover, chatTemplate: true, observer: { ...forward(() => metrics) } });
  metrics = new WeftMetrics(cluster.info().name);
  metrics.attach(cluster);
  let rpc: RpcServer | null = null;
  let http: HttpGateway | null = null;
  try {
    const at = (scheme: string, port: number): string => `${scheme}://${host.includes(':') ? `[${host}]` : host}:${port}`;
    rpc = await RpcServer.start(cluster, { host, port: rpcPort, ...(options.curve && { curve: options.curve }) }).catch((err: unknown) => {
      throw listenError(err, at('tcp', rpcPort), 'RPC');
    });
    http = await HttpGateway.start(cluster, { host, port: httpPort, chatTemplate: cluster.chatTemplate, metrics, clientTimeoutMs, ...(apiKey !== undefined && { apiKey }), ...(allowedHosts && { allowedHosts }), ...(corsOrigins && { corsOrigins }) }).catch((err: unknown) => {
      throw listenError(err, at('http', httpPort), 'HTTP');
    });
  } catch (err) {
    await rpc?.close();
    await cluster.close();
    throw err;
  }
  const [r, h] = [rpc, http];
  const stopLog = startServerLog(cluster, metrics, logIntervalSeconds, logFormat, (line) => void process.stderr.write(line));
  return {
    cluster,
    rpcEndpoint: r.endpoint,
    httpUrl: h.url,
    async close() {
      stopLog();
      await h.close();
      await r.close();
      await cluster.close();
    },
  };
}

/** The metrics observer exists only once the cluster is open; forward to it lazily. */
function forward(get: () => WeftMetrics | null): NonNullable<ClusterOptions['observer']> {
  return {
    firstToken: (s, p) => get()?.observer.firstToken?.(s, p),
    tokens: (n, sequence) => get()?.observer.tokens?.(n, sequence),
    finished: (o, s) => get()?.observer.finished?.(o, s),
    rejected: (r) => get()?.observer.rejected?.(r),
    preempted: () => get()?.observer.preempted?.(),
    prefixCache: (q, h) => get()?.observer.prefixCache?.(q, h),
  };
}

/** CURVE keys from a directory: server.json ({publicKey, secretKey}) and clients.txt (one public key a line). */
export function readCurveDir(dir: string): CurveServerKeys {
  try {
    const server = JSON.parse(readFileSync(join(dir, 'server.json'), 'utf8')) as { publicKey: string; secretKey: string };
    const allowedClientKeys = readFileSync(join(dir, 'clients.txt'), 'utf8')
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('#'));
    if (typeof server.publicKey !== 'string' || typeof server.secretKey !== 'string' || server.secretKey.length !== 40)
      throw new Error('server.json must hold {publicKey, secretKey} as 40-character Z85 strings');
    return { publicKey: server.publicKey, secretKey: server.secretKey, allowedClientKeys };
  } catch (err) {
    throw new WeftError('WEFT_BAD_CONFIG', `cannot read CURVE keys from ${dir}: ${(err as Error).message}`);
  }
}

/** Write a server key pair and one client key pair (allowed in clients.txt), files mode 0600. */
export function writeCurveDir(dir: string): { server: string; client: string } {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const server = zmq.curveKeyPair();
  const client = zmq.curveKeyPair();
  const write = (name: string, text: string): void => writeFileSync(join(dir, name), text, { mode: 0o600 });
  write('server.json', JSON.stringify(server, null, 2) + '\n');
  write('client.json', JSON.stringify({ serverKey: server.publicKey, ...client }, null, 2) + '\n');
  write('clients.txt', client.publicKey + '\n');
  return { server: join(dir, 'server.json'), client: join(dir, 'client.json') };
}

export type { ClusterState };
