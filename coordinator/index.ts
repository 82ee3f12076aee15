/**
 * weft's public API. Embed a cluster in-process (`startCluster`), serve one (`serve`), or talk to a running one
 * over its RPC socket (`WeftClient`, which needs neither pm2 nor the native engine).
 */
export { WeftClient, type WeftClientOptions, type HealthStatus, type ClientRequestOptions } from './api/client.ts';
export type { CurveClientKeys, CurveServerKeys } from './api/protocol.ts';
export { startCluster, Cluster, type ClusterOptions, type GenerateRequest, type ScoreResult, type ModelInfo, type ClusterStats } from './cluster.ts';
export type { GenerationEvent, GeneratedToken, GenerationDone, FinishReason } from './generate.ts';
export { serve, type ServeOptions, type RunningServer } from './serve.ts';
export { WeftError, isWeftError, type WeftErrorCode } from '../core/errors.ts';
