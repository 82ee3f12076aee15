// weft::cuda::Gemv: y [T, N] f32 = x [T, K] f32 @ w [N, K]^T for decode (T <= 8 tokens), reading each weight
// byte once for all T tokens (gemv.cu); the same kernel serves the fused SwiGLU form (gated) and the expert
// GEMV (expert-gemv.cu). Capturable in a CUDA graph (no allocation, no sync). Throws weft::Error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/device.h"
#include "tensor.h"  // weft::DType

namespace weft::cuda {

// The routing of an expert GEMV (expertMatmul at decode): pair q = t * topk + j reads x row q / topk (or q with
// per_pair_x), weights of expert experts[q] - expert_start among n_local, and writes y row q.
struct ExpertRows {
  const int32_t* experts;  // device [n_pairs]
  int n_pairs, topk, per_pair_x, expert_start, n_local;
  DeviceStatus* status;    // where a repeated expert is reported
};

// A quantized matrix [N, K] (backend.h upload_quantized) as the kernels read it: int8 values [N, K] (I8) or int4
// codes value + 8, two per byte along K, the even column in the low nibble (I4, [N, K / 2] bytes); bf16 scales
// [N, K / group]. Stacked experts follow each other.
struct QuantMatrix {
  const void* q;
  const uint16_t* scales;  // bf16 bits
  DType dtype;             // I8 | I4
  int group;               // columns per scale
  bool tiles = false;      // codes and scales in tiles (quant-tiles.h): the kernels that read them say so; the others refuse
};

// Copies the routing of `ex` into a GEMV's kernel parameters (the dense and the quantized GEMV name them alike).
template <class Params>
inline void set_expert_rows(Params& p, const ExpertRows& ex) {
  p.experts = ex.experts;
  p.n_pairs = ex.n_pairs;
  p.topk = ex.topk;
  p.per_pair_x = ex.per_pair_x;
  p.expert_start = ex.expert_start;
  p.status = ex.status;
}

// How the vector kernel is launched. The defaults are weft's (measured on H100: bench/RESULTS.md); only the
// kernel benchmark (bench/kernels/matmul-bench.cu) passes others, to compare.
struct GemvTuning {
  int cluster = 0;  // K splits per thread-block cluster, 1..8; 0: chosen from the shape
  int waves = 0;    // at least this many waves of clusters; 0: as few as the partial sums allow
  int u = 0;        // 16-byte steps per row per ring stage, 1 or 2; 0: 2 (1 for quantized weights)
  bool pdl = true;  // launch as a programmatic dependent of the kernel before (pdl_wait, common.cuh)
  bool one_token = true;  // one bf16 token: gemv_one_token's register kernel where it takes the call; false: the ring
};

class Gemv {  // one per engine: device limits and an occupancy cache
 public:
  static constexpr int kMaxTokens = 8;  // the GEMV takes 1..8 tokens (larger T: the GEMM, gemm.cuh)

  Gemv(DeviceState* st, cudaStream_t stream);  // st: where a sticky error marks the engine dead (may be null)
  // y [T, N] = x [T, K] @ w^T, 1 <= T <= 8, w f32/f16/bf16. gated: x is [T, 2K] ([gate | up] rows) and the kernel
  // reads silu(gate) * up as it stages x (siluMulMatmul), only where fuses_silu_mul() says so.
  void run(const float* x, const void* w, DType w_dtype, float* y, int T, int N, int K, bool gated,
           const GemvTuning& tuning = GemvTuning{});
  // y [n_pairs, N] f32 = per pair, x row @ (expert's w [N, K])^T, for T <= 8 tokens (expert-gemv.cu): each chosen
  // expert's weights are read once for all of its pairs; experts nobody chose are not read.
  void run_experts(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K,
                   const ExpertRows& ex, bool gated);
  // The same for quantized weights (gemv-quant.cuh): the vector kernel dequantizes each 16-byte vector (16 int8 or
  // 32 int4 weights, inside one group) as it reads it. False when the shape or pointers need quant_gemv's
  // scalar kernel (K or the group not a multiple of the vector, misaligned pointers, x too large).
  bool run_quant(const float* x, const QuantMatrix& w, float* y, int T, int N, int K, bool gated,
                 const GemvTuning& tuning = GemvTuning{});
  bool run_quant_experts(const float* x, const QuantMatrix& w, float* y, int T, int N, int K, const ExpertRows& ex,
                         bool gated);
  // Whether the gated GEMV takes this shape: 1..8 tokens and K a multiple of the 16-byte weight vector.
  static bool fuses_silu_mul(int64_t T, int64_t K, DType w_dtype);

 private:
  // The vector kernel, dense (ex null) or expert rows; false when the shape or pointers need a scalar fallback.
  // scales/group: a quantized w (dt I8 | I4), else null/0.
  bool launch_vector(const float* x, const void* w, DType dt, float* y, int T, int N, int K, const ExpertRows* ex,
                     bool gated, const GemvTuning& tuning, const uint16_t* scales = nullptr, int group = 0);
  int clusters_at_once(DType dt, int TT, int U, int C, size_t smem);

  DeviceState* st_;
  cudaStream_t stream_;
  size_t max_smem_ = 0;
  struct Occupancy {  // cudaOccupancyMaxActiveClusters answers, keyed by (dtype, TT, U, C, smem / 1 KiB)
    int key[5];
    int n;
  };
  std::vector<Occupancy> occupancy_;
};

// 16-byte vectors and aligned pointers: what the vector kernel reads.
bool gemv_vector_ok(const float* x, const void* w, DType dt, int K);
// Weights per 16-byte vector of a weight dtype: 4 f32, 8 f16/bf16, 16 int8, 32 int4.
int gemv_vector_width(DType dt);

}  // namespace weft::cuda
