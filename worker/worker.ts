/**
 * A worker's lifecycle: initDevice → loadWeights → allocateKvCache (buildRankModel) → step. Holds the
 * engine, this rank's collectives and its model.
 */
import type * as zmq from 'zeromq';
import { createEngine, type Engine } from './native.ts';
import type { InitCommand, StepBatch, StepResult } from './protocol.ts';
import { soloCollectives, type Collectives } from './collectives/collectives.ts';
import { CpuCollectives } from './collectives/cpu.ts';
import { loadShard } from './weights/load-shard.ts';
import { buildRankModel, type RankModel } from './models/registry.ts';
import { runStep } from './runner.ts';
import { WeftError } from '../coordinator/errors.ts';

export class WorkerState {
  private engine: Engine | null = null;
  private comm: Collectives | null = null;
  private rankModel: RankModel | null = null;

  constructor(
    readonly rank: number,
    readonly world: number,
    private readonly hub: zmq.Router | null,
    private readonly onProgress: (bytesRead: number, bytesTotal: number) => void,
  ) {}

  async init(command: InitCommand): Promise<{ bytesLoaded: number }> {
    if (this.rankModel) throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank} is already initialised`);
    if (command.plan.tp !== this.world) throw new WeftError('WEFT_PROTOCOL', `plan is for ${command.plan.tp} ranks, this worker was started for ${this.world}`);
    const engine = createEngine({ backend: command.device, threads: command.threads });
    this.engine = engine;
    if (command.device !== 'cpu') throw new WeftError('WEFT_UNSUPPORTED_MODEL', `device ${command.device} has no collectives yet in this build`);
    this.comm = this.world === 1 ? soloCollectives() : await CpuCollectives.create(engine, this.rank, this.world, this.hub, command.collectiveRoot);
    let bytesLoaded = 0;
    const weights = await loadShard(command.modelDir, command.spec, command.plan, this.rank, (read, total) => {
      bytesLoaded = read;
      this.onProgress(read, total);
    });
    this.rankModel = buildRankModel(engine, command.spec, command.plan, this.rank, weights, { kvSlots: command.kvSlots, maxContext: command.maxContext });
    return { bytesLoaded };
  }

  async step(batch: StepBatch): Promise<StepResult> {
    if (!this.engine || !this.comm || !this.rankModel) throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank} got a step before init`);
    return runStep(this.engine, this.comm, this.rankModel, batch);
  }

  close(): void {
    this.comm?.close();
  }
}
