/**
 * The device's read bandwidth by weft's own probe (the one bench/decode.ts reports), as one JSON line:
 *
 *   node --import tsx bench/bandwidth.ts        → {"bandwidthGBs": 4512.3}
 *
 * A process of its own, so that the CUDA context it opens is gone before the benchmarked weft processes start.
 */
import { createEngine } from '../worker/native.ts';

const engine = createEngine({ backend: 'cuda', arenaBytes: 2 ** 26 });
console.log(JSON.stringify({ bandwidthGBs: engine.measureBandwidth(4 * 2 ** 30, 20) }));
