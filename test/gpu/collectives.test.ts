/**
 * The collectives contract (test/helpers/collectives-contract.ts) on NCCL through koffi, one rank on GPU 0:
 * all-reduce, all-gather of 1, 3, 5 and 17 rows (one ncclAllGather for one row of equal widths, grouped
 * broadcasts otherwise), health and refusals. Skips, saying why, without a CUDA build, a GPU or libnccl.
 */
import { collectiveContract, ncclImplementation } from '../helpers/collectives-contract.ts';

collectiveContract(ncclImplementation());
