/**
 * A worker's lifecycle: initDevice → loadWeights → allocateKvCache (buildRankModel) → step. Holds the
 * engine, this rank's collectives, its model and the step runner.
 */
import type * as zmq from 'zeromq';
import { hostname } from 'node:os';
import { createEngine, cudaDeviceCount, type Engine } from './native.ts';
import type { InitCommand, StepBatch } from '../core/worker-protocol.ts';
import { soloCollectives, type Collectives } from './collectives/collectives.ts';
import { CpuCollectives } from './collectives/cpu.ts';
import { NcclCollectives } from './collectives/nccl.ts';
import { SharedGpuCollectives, exchangeOver, type HandleExchange } from './collectives/shared-gpu.ts';
import { chooseCollectives, type CollectivesPlan } from './collectives/choose.ts';
import { loadShard, shardBytes } from './weights/load-shard.ts';
import { buildRankModel, uploadWeights } from './models/registry.ts';
import { StepRunner, type LaunchedStep } from './runner.ts';
import { graphArenaTokens, maxGraphBatch, workerArenaBytes } from './step-sizes.ts';
import { WeftError } from '../core/errors.ts';
import { kvCacheLayout, kvDtypeBytes, type KvCacheLayout } from '../core/kv-block-table.ts';
import { allocateSparqState, sparqBytesPerLayer, SPARQ_MAX_STEP_TOKENS } from './models/sparq.ts';
import { allocateSageState, sageStateBytes } from './models/sage-state.ts';
import { DEFAULT_PREFILL_ATTENTION_SLOTS, sagePvType } from '../core/prefill-attention.ts';
import type { WorkerCurveKeys } from '../core/transport.ts';
import {
  KV_POOL_RESERVE_BYTES,
  deviceBeforeGroup,
  kvPoolTokens,
  minKvPoolBytes,
  parseDeviceMeasure,
  rankShare,
  type DeviceBeforeGroup,
  type DeviceMeasure,
} from './kv-pool.ts';

/** What the ranks that may share a GPU traded on the CPU hub before allocating (WorkerState.meetPeers). */
interface Peers {
  readonly exchange: HandleExchange;
  /** every rank's measure of its device, by rank */
  readonly measures: readonly DeviceMeasure[];
  readonly oneHost: boolean;
}

export class WorkerState {
  private comm: Collectives | null = null;
  /** shared-gpu: the CPU hub the ranks traded their handles through (closed with the group) */
  private handleHub: Collectives | null = null;
  private runner: StepRunner | null = null;

  constructor(
    readonly rank: number,
    readonly world: number,
    private hub: zmq.Router | null,
    /** the NCCL shared library cuda groups of several ranks load */
    private readonly ncclLibrary: string,
    private readonly onProgress: (bytesRead: number, bytesTotal: number) => void,
    /** the group's shared secret: CPU collective peers prove it to rank 0's hub */
    private readonly secret: string,
    /** the group's CURVE keys: CPU collective peers reach a tcp:// hub with them */
    private readonly curve?: WorkerCurveKeys,
  ) {}

  async init(command: InitCommand): Promise<{ bytesLoaded: number; kvCacheTokens?: number }> {
    if (this.runner) throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank} is already initialised`);
    if (command.plan.tp !== this.world) throw new WeftError('WEFT_PROTOCOL', `plan is for ${command.plan.tp} ranks, this worker was started for ${this.world}`);
    const collectivesPlan = chooseCollectives(command.collectives ?? 'auto', {
      device: command.device,
      world: this.world,
      deviceIndex: command.deviceIndex ?? 0,
      visibleDevices: command.device === 'cuda' ? cudaDeviceCount() : 0,
    });
    const device = collectivesPlan.deviceIndex;
    // CUDA: the step arena is fixed when the engine is made, so a first engine (this rank's context) only measures
    const measured = command.device === 'cuda' ? createEngine({ backend: 'cuda', device }).memoryInfo() : null;
    const mine = measured && { host: hostname(), device, totalBytes: measured.total, freeBytes: measured.free };
    // ranks that may share a GPU (rank r on GPU r mod count) trade their measures before any of them allocates, so
    // that none counts what its siblings loaded as in use
    const shared = collectivesPlan.kind === 'shared-gpu' || collectivesPlan.kind === 'shared-gpu-if-one-host';
    const peers = shared ? await this.meetPeers(command, mine!, collectivesPlan.kind === 'shared-gpu') : null;
    const memory = mine && deviceBeforeGroup(mine, peers?.measures ?? [mine]);
    const sized = memory && this.sizeByFraction(command, memory);
    // the coordinator derives the same layout for its allocator (from the pool this rank reports, when sized here); on CUDA it has a padding block for graph batches
    const kv = sized?.kv ?? kvCacheLayout(command);
    // a pool given in tokens: each rank sharing the device takes its part of what was free before them
    const freeBytes = memory && memory.freeBytes / memory.ranks;
    const arenaBytes = sized?.arenaBytes ?? (freeBytes !== null ? this.arenaBytes(command, kv, freeBytes) : undefined);
    const engine = createEngine({ backend: command.device, threads: command.threads, device, arenaBytes });
    this.comm = await this.joinCollectives(engine, command, collectivesPlan, peers);
    let bytesLoaded = 0;
    const weights = await loadShard(command.modelDir, command.spec, command.plan, this.rank, (read, total) => {
      bytesLoaded = read;
      this.onProgress(read, total);
    });
    const built = buildRankModel(engine, command.spec, command.plan, this.rank, await uploadWeights(engine, command.spec, command.plan, this.rank, weights), kv);
    // --attention sparq: SparQ's state beside the cache, and steps of at most the tokens its kernels serve
    const sparqModel = command.sparq ? { ...built, model: { ...built.model, sparq: allocateSparqState(engine, command.spec, command.plan, kv, command.sparq) } } : built;
    // --prefill-attention int8|fp8: prompt steps attend through sageAttention (the coordinator checked the model),
    // their quantized blocks kept across the steps of a prompt in --prefill-attention-slots slots
    const prefillAttention = command.prefillAttention;
    const slots = this.sageSlots(command);
    const sage = prefillAttention && slots > 0 ? { sage: allocateSageState(engine, command.spec, command.plan, kv, sagePvType(prefillAttention), slots) } : {};
    const model = prefillAttention ? { ...sparqModel, model: { ...sparqModel.model, prefillAttention, ...sage } } : sparqModel;
    this.comm.prepare(model.collectivePlan);
    this.runner = new StepRunner(engine, this.comm, model, kv, { arenaBytes, ...(command.sparq && engine.backend === 'cuda' && { maxStepTokens: SPARQ_MAX_STEP_TOKENS }) });
    return { bytesLoaded, ...(sized && { kvCacheTokens: sized.kvCacheTokens }) };
  }

  /**
   * A paged pool not given in tokens, with gpuMemoryFraction: the step arena as arenaBytes() would ask, within
   * what the fraction leaves beside the weights and one full-context sequence of KV; the pool is the rest
   * (worker/kv-pool.ts), of this rank's part of its device before the group loaded anything (`memory`). Null when
   * the pool is given.
   */
  private sizeByFraction(
    command: InitCommand,
    memory: DeviceBeforeGroup,
  ): { kv: KvCacheLayout; arenaBytes: number; kvCacheTokens: number } | null {
    const { kvBlockSize, spec, plan, maxContext, kvSlots, gpuMemoryFraction: fraction } = command;
    if (fraction === undefined || kvBlockSize === undefined || command.kvCacheTokens !== undefined) return null;
    const part = rankShare(fraction, memory);
    const kvBytesPerToken = this.kvBytesPerToken(command);
    const weightBytes = shardBytes(spec, plan, this.rank);
    const share = Math.floor(part.fraction * part.totalBytes) - (part.totalBytes - part.freeBytes);
    const stateAside = this.sageBytes(command);
    const leftAside = weightBytes + stateAside + minKvPoolBytes({ kvBytesPerToken, kvBlockSize, maxContext }) + KV_POOL_RESERVE_BYTES;
    const arenaBytes = workerArenaBytes(spec, plan, share, leftAside, graphArenaTokens(maxGraphBatch(spec, command.kvSlots)));
    const geometry = { kvBytesPerToken, kvBlockSize, maxContext, kvSlots };
    const kvCacheTokens = kvPoolTokens({ ...part, weightBytes, arenaBytes, stateBytes: stateAside, ...geometry });
    return { kv: kvCacheLayout({ ...command, kvCacheTokens }), arenaBytes, kvCacheTokens };
  }

  /**
   * Bytes one KV position takes on this rank: layers × (k, v) × its KV heads × head size × element bytes (scales
   * included), plus SparQ's transposed K and V block sums when it is on (worker/models/sparq.ts).
   */
  private kvBytesPerToken(command: InitCommand): number {
    const { spec, plan } = command;
    const elementBytes = kvDtypeBytes(command.kvDtype, spec.headDim);
    const blockSize = command.kvBlockSize ?? command.maxContext; // kvCacheLayout's block: one context when not paged
    const sparq = command.sparq ? (spec.nLayers * sparqBytesPerLayer(spec, plan.nKvHeadsPerRank, { kvBlocks: 1, kvBlockSize: blockSize }, elementBytes)) / blockSize : 0;
    return spec.nLayers * 2 * plan.nKvHeadsPerRank * spec.headDim * elementBytes + sparq;
  }

  /**
   * The step arena for a whole PREFILL_STEP_TOKENS-token step and the regions of the decode graphs of every
   * bucket up to the layout's kvSlots, where the memory left beside the weights and the KV cache allows.
   */
  private arenaBytes(command: InitCommand, kv: KvCacheLayout, freeBytes: number): number {
    const { spec, plan } = command;
    const kvBytes = kv.kvBlocks * kv.kvBlockSize * this.kvBytesPerToken(command); // SparQ's state included
    return workerArenaBytes(spec, plan, freeBytes, shardBytes(spec, plan, this.rank) + kvBytes + this.sageBytes(command), graphArenaTokens(maxGraphBatch(spec, kv.kvSlots)));
  }

  /** The prompts' Sage state slots with --prefill-attention (models/sage-state.ts), else 0. */
  private sageSlots(command: InitCommand): number {
    return command.prefillAttention ? (command.prefillAttentionSlots ?? DEFAULT_PREFILL_ATTENTION_SLOTS) : 0;
  }

  /** The bytes of those slots beside the cache. */
  private sageBytes(command: InitCommand): number {
    const slots = this.sageSlots(command);
    return slots > 0 ? sageStateBytes(command.spec, command.plan.nKvHeadsPerRank, command.maxContext, sagePvType(command.prefillAttention!), slots) : 0;
  }

  /** `peers`: what meetPeers traded (shared-gpu kinds). */
  private async joinCollectives(
    engine: Engine,
    command: InitCommand,
    plan: CollectivesPlan,
    peers: Peers | null,
  ): Promise<Collectives> {
    if (plan.kind === 'solo') return soloCollectives();
    if (plan.kind === 'cpu') return this.joinHub(engine, command);
    if (peers?.oneHost) {
      const log = (line: string): void => void process.stderr.write(`weft worker rank ${this.rank}: ${line}\n`);
      return SharedGpuCollectives.create(engine, plan.deviceIndex, this.rank, this.world, peers.exchange, { log });
    }
    if (!command.ncclId) throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank}: a cuda group of ${this.world} ranks needs an NCCL unique id in init`);
    return NcclCollectives.create(engine, this.rank, this.world, command.ncclId, { library: this.ncclLibrary });
  }

  private joinHub(engine: Engine, command: InitCommand): Promise<Collectives> {
    return CpuCollectives.create(engine, this.rank, this.world, this.hub, command.collectiveRoot, { secret: this.secret, ...(this.curve && { curve: this.curve }) });
  }

  /**
   * Ranks that may share a GPU: join the CPU hub the shared-gpu collectives trade their handles through, and trade
   * every rank's measure of its device on it, which no rank passes before all have measured. Whether every rank
   * runs on this host (shared-gpu needs that); `required`: throw, naming the hosts, when not.
   */
  private async meetPeers(command: InitCommand, mine: DeviceMeasure, required: boolean): Promise<Peers> {
    const hubEngine = createEngine({ backend: 'cpu', threads: 1 });
    this.handleHub = await this.joinHub(hubEngine, command);
    const exchange = exchangeOver(this.handleHub, hubEngine);
    const traded = await exchange(Buffer.from(JSON.stringify(mine)));
    const measures = traded.map((bytes, rank) => parseDeviceMeasure(bytes, rank));
    const other = measures.findIndex((m) => m.host !== mine.host);
    if (other >= 0 && required) {
      const where = `rank ${other} runs on ${measures[other]!.host} and rank ${this.rank} on ${mine.host}`;
      const why = `--collectives shared-gpu needs every rank on one host, but ${where} (use --collectives nccl)`;
      throw new WeftError('WEFT_BAD_REQUEST', `rank ${this.rank}: ${why}`);
    }
    return { exchange, measures, oneHost: other < 0 };
  }

  /** Queue the step on this rank's device; its result settles when the answer is on the host (worker/runner.ts). */
  async launch(batch: StepBatch): Promise<LaunchedStep> {
    if (!this.runner) throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank} got a step before init`);
    return this.runner.launch(batch);
  }

  /** An asynchronous collective failure (NCCL or shared-gpu report a dead peer here), polled by the heartbeat. */
  collectiveError(): string | null {
    return this.comm?.asyncError() ?? null;
  }

  /**
   * Leave a group that re-forms around this process: the collectives close (a wait on a dead peer fails at once,
   * ending the step in progress) and the model goes; `init` follows, rank 0's collectives on `hub`, bound anew.
   */
  leave(hub: zmq.Router | null): void {
    this.close();
    this.comm = null;
    this.runner = null;
    this.hub = hub;
  }

  close(): void {
    this.comm?.close();
    this.handleHub?.close();
  }
}
