/**
 * One contract (test/helpers/collectives-contract.ts) run against every Collectives implementation this
 * machine has: the group of one, the CPU hub with 2 and 4 ranks, and NCCL with one rank (skipped, saying
 * why, without a CUDA build and a GPU; test/gpu/collectives.test.ts runs it on the GPU host).
 */
import { collectiveContract, cpuHubImplementation, ncclImplementation, soloImplementation } from '../helpers/collectives-contract.ts';

collectiveContract(soloImplementation());
collectiveContract(cpuHubImplementation(2));
collectiveContract(cpuHubImplementation(4));
collectiveContract(ncclImplementation());
