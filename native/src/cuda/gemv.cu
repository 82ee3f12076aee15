// weft::cuda::Gemv (gemv.cuh) — y [T, N] f32 = x [T, K] f32 @ w [N, K]^T for T <= 8: one pass over the weights
// for all T tokens.
//   - Each warp owns R = 4 weight rows at a time; lane l reads 16 bytes (8 bf16/f16, 4 f32) of each row at
//     vector index v = 32*s + l, so a warp reads 512 contiguous bytes per row per step, U steps (R*U 16-byte
//     loads) in flight per lane before the first use, fp32 accumulation into R x TT registers.
//   - x lives in shared memory as fp32: the block stages its slice of x once ([TT][VEC/4][nv] float4, split in
//     4-float halves so a warp's float4 reads are contiguous, bank-conflict free) and every warp reuses each x
//     float4 for its R rows; tokens beyond T are zero in shared memory and never read from x.
//   - K is split over a thread-block cluster of C blocks (C = 1..8) so that the x slice stays small (T*K*4/C
//     bytes) and the grid has enough blocks; each block streams its K slice of a contiguous range of rows,
//     leaves partial sums in its shared memory, and after one cluster barrier block c sums rows c, c+C, ...
//     over the C blocks' shared memory (DSMEM) in a fixed order: deterministic, no atomics, no scratch.
//   - The R x TT partial sums of a warp are reduced over its 32 lanes with a reduce-scatter butterfly
//     (V-1 shuffles for V = R*TT >= 32 values, instead of 5*V).
//   - The first weight loads of each warp are issued before x is staged, hiding the staging latency.
//   - Gated (siluMulMatmul): x rows are [gate | up] and the block stages silu(gate) * up as its x.
//   - Expert rows (expert-gemv.cu): a grid row of blocks per held expert; a block reads only the pairs routed to
//     its expert, and experts nobody chose are not read.
//   Fallback (K not a multiple of the vector width, misaligned pointers): a simple scalar kernel.
#include "cuda/gemv.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/cluster-split.cuh"
#include "cuda/common.cuh"
#include "cuda/gemv-one-token.cuh"
#include "cuda/expert-slots.cuh"
#include "error.h"

namespace cg = cooperative_groups;

namespace weft::cuda {

namespace {

constexpr int kWarps = 8;          // warps per GEMV block
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 4;           // rows per warp pass
constexpr int kMaxCluster = 8;
constexpr size_t kMaxXSlice = 64 * 1024;   // target bytes of x per block
constexpr size_t kMaxPart = 16 * 1024;     // bytes of partial sums per block (cluster path)

// Quantized weights (gemv.cuh QuantMatrix) as kernel tags: a 16-byte vector holds 16 int8 or 32 int4 weights, all
// inside one group, so it takes one scale: its products are summed in fp32, then multiplied by the scale.
struct QInt8 {};
struct QInt4 {};
template <typename WT> constexpr bool kQuantized = std::is_same_v<WT, QInt8> || std::is_same_v<WT, QInt4>;

template <typename WT> struct VecOf { static constexpr int value = 16 / sizeof(WT); };
template <> struct VecOf<QInt8> { static constexpr int value = 16; };
template <> struct VecOf<QInt4> { static constexpr int value = 32; };

// Four weights of a 16-byte vector (half h) as floats.
template <typename WT>
__device__ __forceinline__ void unpack4(const uint4& u, int h, float (&f)[4]);

template <>
__device__ __forceinline__ void unpack4<__nv_bfloat16>(const uint4& u, int h, float (&f)[4]) {
  const uint32_t a = h ? u.z : u.x, b = h ? u.w : u.y;
  f[0] = __uint_as_float(a << 16);
  f[1] = __uint_as_float(a & 0xffff0000u);
  f[2] = __uint_as_float(b << 16);
  f[3] = __uint_as_float(b & 0xffff0000u);
}

template <>
__device__ __forceinline__ void unpack4<__half>(const uint4& u, int h, float (&f)[4]) {
  const uint32_t a = h ? u.z : u.x, b = h ? u.w : u.y;
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&a));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&b));
  f[0] = lo.x; f[1] = lo.y; f[2] = hi.x; f[3] = hi.y;
}

template <>
__device__ __forceinline__ void unpack4<float>(const uint4& u, int, float (&f)[4]) {
  f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}

// int8: byte b as the float 2^23 + (b + 128) (one byte permute into 0x4B0000uu, the sign bit flipped first), minus
// 2^23 + 128: exact, and cheaper than an int-to-float conversion, which runs at a fraction of the FMA rate.
template <>
__device__ __forceinline__ void unpack4<QInt8>(const uint4& u, int h, float (&f)[4]) {
  const uint32_t word = (&u.x)[h] ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u | i)) - 8388736.0f;
}

// int4: code c (value + 8) as the float 2^23 + c, minus 2^23 + 8; sub-vector h holds columns 4h .. 4h + 3, the
// even column in the low nibble.
template <>
__device__ __forceinline__ void unpack4<QInt4>(const uint4& u, int h, float (&f)[4]) {
  const uint32_t word = (&u.x)[h >> 1] >> ((h & 1) * 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(0x4B000000u | ((word >> (4 * i)) & 0xfu)) - 8388616.0f;
}

// Reduce-scatter of V partial sums over the 32 lanes of a warp. Afterwards, for V >= 32, lane l holds the
// full sums of indices l*(V/32) + i in a[i], i < V/32; for V < 32 lane l holds index l >> (5 - log2 V) in a[0].
template <int V>
__device__ __forceinline__ void warp_reduce_scatter(float (&a)[V], int lane) {
  constexpr unsigned kFull = 0xffffffffu;
#pragma unroll
  for (int step = 0; step < 5; ++step) {
    const int o = 16 >> step;
    const int n = V >> step;  // values still held
    if (n > 1) {
      const bool upper = lane & o;
#pragma unroll
      for (int i = 0; i < V / 2; ++i) {
        if (i < n / 2) {
          const float send = upper ? a[i] : a[i + n / 2];
          const float keep = upper ? a[i + n / 2] : a[i];
          a[i] = keep + __shfl_xor_sync(kFull, send, o);
        }
      }
    } else {
      a[0] += __shfl_xor_sync(kFull, a[0], o);
    }
  }
}

__host__ __device__ constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v / 2); }

struct GemvParams {
  const float* x;
  const void* w;
  float* y;
  int T, N, K;
  int C;                  // cluster size = K splits
  int nv_slice;           // vectors per K slice (block)
  int rows_per_cluster;   // multiple of kRows
  // Expert mode (experts != nullptr, expertMatmul): w holds gridDim.y experts [El][N][K] and blockIdx.y is the
  // block's expert; the block's "tokens" are the pairs routed to it (at most TT), x row pair / topk (or pair,
  // per_pair_x) and y row pair. Blocks of expert 0 also zero the y rows of pairs routed to no expert in w.
  const int32_t* experts;  // [n_pairs] global expert ids
  int n_pairs, topk, per_pair_x, expert_start;
  DeviceStatus* status;
  // Gated (siluMulMatmul): x rows are [gate | up], 2K wide, and the block stages silu(gate) * up as its x.
  int gated;
  // Quantized w (QInt8 | QInt4): bf16 scales [El][N][K / group].
  const uint16_t* scales;
  int group;
};

constexpr int kStages = 4;   // cp.async ring depth per warp (kStages - 1 stages in flight while computing)
// Shared-memory ring of a block for U 16-byte steps per row per stage; quantized weights add a ring of the 4-byte
// words holding each vector's bf16 scale (the same slots, 4 bytes each).
__host__ __device__ constexpr size_t ring_bytes(int U) { return static_cast<size_t>(kWarps) * kStages * kRows * U * 32 * 16; }
__host__ __device__ constexpr size_t scale_ring_bytes(int U, bool quantized) { return quantized ? ring_bytes(U) / 4 : 0; }

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(d), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(gmem_src) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Grid: C * G blocks, cluster (C, 1, 1); block b: K slice b % C, rows [(b / C) * rows_per_cluster, ...).
// Dynamic shared memory: the weight ring [kWarps][kStages][kRows * U][32] uint4 (each lane reads back only
// what it copied itself, so no barrier guards it), the x slice [TT][H][nv_slice] float4, then (C > 1) the
// partial sums [rows_per_cluster][TT] f32.
// A warp's work is a list of items (row group, chunk of U steps); item i + kStages - 1 is copied while item
// i is computed.
template <typename WT, int TT, int U>
__global__ void __launch_bounds__(kThreads, 1) gemv_kernel(const GemvParams p) {
  constexpr int VEC = VecOf<WT>::value;
  constexpr int H = VEC / 4;
  constexpr int R = kRows;
  constexpr int S = kStages;
  constexpr int V = R * TT;
  constexpr bool Q = kQuantized<WT>;
  extern __shared__ float4 smem[];
  pdl_trigger();  // the kernel after it may be placed now (it waits for this one to finish before reading)

  const int C = p.C;
  const int c = C > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const int g = blockIdx.x / C;
  const int KV = p.K / VEC;
  const int row0 = g * p.rows_per_cluster;
  const int rows = max(0, min(p.rows_per_cluster, p.N - row0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // Expert mode: the pairs routed to this block's expert, in pair order; slot t reads x row x_row[t] and
  // writes y row y_row[t]. Dense: slot t is token t.
  __shared__ int x_row[TT], y_row[TT], n_tokens;
  if (p.experts) {
    pdl_wait();  // the routing comes from the kernel before: nothing can be read ahead of it
    const int e = static_cast<int>(blockIdx.y) + p.expert_start;
    if (warp == 0) expert_slots<TT>(p.experts, p.n_pairs, p.topk, p.per_pair_x, e, lane, x_row, y_row, n_tokens, p.status);
    if (blockIdx.y == 0 && c == 0) {  // rows of pairs routed to experts w does not hold are zero
      for (int i = threadIdx.x; i < p.n_pairs * rows; i += kThreads) {
        const int q = i / rows, local = p.experts[q] - p.expert_start;
        if (local < 0 || local >= static_cast<int>(gridDim.y)) p.y[static_cast<size_t>(q) * p.N + row0 + i % rows] = 0.f;
      }
    }
    __syncthreads();
    if (n_tokens == 0) return;  // an expert no pair chose: its weights are never read (the whole cluster returns)
  }
  const int T = p.experts ? n_tokens : p.T;
  const auto x_row_of = [&](int t) { return p.experts ? x_row[t] : t; };
  const auto y_row_of = [&](int t) { return p.experts ? y_row[t] : t; };

  const int v0 = c * p.nv_slice;
  const int nv = max(0, min(p.nv_slice, KV - v0));
  const int ngroups = (rows + R - 1) / R;
  const int steps = (nv + 31) / 32;
  const int nchunks = (steps + U - 1) / U;
  const int my_groups = ngroups > warp ? (ngroups - warp + kWarps - 1) / kWarps : 0;
  const int nitems = my_groups * nchunks;

  uint4* ring = reinterpret_cast<uint4*>(smem) + static_cast<size_t>(warp) * S * R * U * 32;
  uint32_t* scale_ring = reinterpret_cast<uint32_t*>(smem + ring_bytes(U) / 16) + static_cast<size_t>(warp) * S * R * U * 32;
  float4* xs = smem + (ring_bytes(U) + scale_ring_bytes(U, Q)) / 16;
  float* part = reinterpret_cast<float*>(xs + TT * H * p.nv_slice);
  const uint4* wbase = reinterpret_cast<const uint4*>(p.w) + static_cast<size_t>(blockIdx.y) * p.N * KV + v0;
  // Quantized: the scale of (row, vector v) is element scale_row0 + row * n_groups + (v0 + v) * VEC / group of
  // the bf16 scales, read as the aligned 4-byte word holding it (cp.async copies 4 bytes at least).
  const int n_groups = Q ? p.K / p.group : 0;
  const size_t scale_row0 = (static_cast<size_t>(blockIdx.y) * p.N + row0) * n_groups;
  const auto scale_index = [&](int row, int v) { return scale_row0 + static_cast<size_t>(row) * n_groups + (v0 + v) * VEC / p.group; };

  auto issue = [&](int item) {
    if (item < nitems) {
      const int k = item / nchunks, ch = item - k * nchunks;
      const int group = warp + k * kWarps;
      uint4* slot = ring + (item % S) * (R * U * 32);
      uint32_t* scale_slot = scale_ring + (item % S) * (R * U * 32);
#pragma unroll
      for (int j = 0; j < U; ++j) {
        const int v = (ch * U + j) * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int row = group * R + r;
          if (v < nv && row < rows) {
            cp_async16(slot + (r * U + j) * 32 + lane, wbase + static_cast<size_t>(row0 + row) * KV + v);
            if constexpr (Q)
              cp_async4(scale_slot + (r * U + j) * 32 + lane, reinterpret_cast<const uint32_t*>(p.scales) + (scale_index(row, v) >> 1));
          }
        }
      }
    }
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue(i);
  if (!p.experts) pdl_wait();  // x comes from the kernel before; the weight loads above did not need it

  // Stage the x slice while the first weights are on their way: consecutive threads read consecutive float4.
  {
    const int f4_per_token = nv * H;
    for (int i = threadIdx.x; i < TT * f4_per_token; i += kThreads) {
      const int t = i / f4_per_token, f = i - t * f4_per_token;
      const int v = f / H, h = f - v * H;
      float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
      if (t < T) {
        const float* xr = p.x + static_cast<size_t>(x_row_of(t)) * (p.gated ? 2 * p.K : p.K) + (v0 + v) * VEC + h * 4;
        val = *reinterpret_cast<const float4*>(xr);
        if (p.gated) {
          const float4 up = *reinterpret_cast<const float4*>(xr + p.K);
          val = make_float4(silu_times(val.x, up.x), silu_times(val.y, up.y), silu_times(val.z, up.z),
                            silu_times(val.w, up.w));
        }
      }
      xs[(t * H + h) * p.nv_slice + v] = val;
    }
  }
  __syncthreads();

  // sums[r * TT + t] += the products of the R rows' vectors wv (vector index v) with the TT tokens' x.
  const auto accumulate = [&](const uint4 (&wv)[R], int v, float (&sums)[V]) {
#pragma unroll
    for (int h = 0; h < H; ++h) {
      float wf[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack4<WT>(wv[r], h, wf[r]);
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        const float4 xv = xs[(t * H + h) * p.nv_slice + v];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float s = sums[r * TT + t];
          s = fmaf(wf[r][0], xv.x, s);
          s = fmaf(wf[r][1], xv.y, s);
          s = fmaf(wf[r][2], xv.z, s);
          s = fmaf(wf[r][3], xv.w, s);
          sums[r * TT + t] = s;
        }
      }
    }
  };

  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  for (int item = 0; item < nitems; ++item) {
    issue(item + S - 1);
    cp_async_wait<S - 1>();
    const int k = item / nchunks, ch = item - k * nchunks;
    const int group = warp + k * kWarps;
    const uint4* slot = ring + (item % S) * (R * U * 32);
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int v = (ch * U + j) * 32 + lane;
      if (v < nv) {
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wv[r] = slot[(r * U + j) * 32 + lane];  // rows >= rows: stale, never stored
        if constexpr (Q) {
          float part[V];
#pragma unroll
          for (int i = 0; i < V; ++i) part[i] = 0.f;
          accumulate(wv, v, part);
          const uint32_t* scale_slot = scale_ring + (item % S) * (R * U * 32);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t word = scale_slot[(r * U + j) * 32 + lane];
            const float scale = __uint_as_float(scale_index(group * R + r, v) & 1 ? word & 0xffff0000u : word << 16);
#pragma unroll
            for (int t = 0; t < TT; ++t) acc[r * TT + t] = fmaf(scale, part[r * TT + t], acc[r * TT + t]);
          }
        } else {
          accumulate(wv, v, acc);
        }
      }
    }
    if (ch != nchunks - 1) continue;

    warp_reduce_scatter<V>(acc, lane);
    constexpr int kPerLane = V >= 32 ? V / 32 : 1;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      int idx;
      bool writer;
      if constexpr (V >= 32) {
        idx = lane * (V / 32) + i;
        writer = true;
      } else {
        idx = lane >> (5 - ilog2(V));
        writer = (lane & ((32 / V) - 1)) == 0;
      }
      const int r = idx / TT, t = idx % TT;
      const int row = group * R + r;
      if (writer && row < rows) {
        if (C == 1) {
          if (t < T) p.y[static_cast<size_t>(y_row_of(t)) * p.N + row0 + row] = acc[i];
        } else {
          part[row * TT + t] = acc[i];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
  }
  cp_async_wait<0>();

  if (C > 1) {
    // A block whose K slice is empty (K / VEC < C * nv_slice) computed nothing: its partial sums are zero.
    if (nchunks == 0)
      for (int i = threadIdx.x; i < rows * TT; i += kThreads) part[i] = 0.f;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int idx = threadIdx.x * C + c; idx < rows * TT; idx += kThreads * C) {
      const int t = idx % TT;
      if (t >= T) continue;
      float s = 0.f;
      for (int q = 0; q < C; ++q) s += cluster.map_shared_rank(part, q)[idx];
      p.y[static_cast<size_t>(y_row_of(t)) * p.N + row0 + idx / TT] = s;
    }
    cluster.sync();
  }
}

// Fallback for shapes or pointers the vector kernel cannot take: one warp per (row), all tokens.
template <typename WT>
__global__ void gemv_scalar_kernel(const float* __restrict__ x, const WT* __restrict__ w, float* __restrict__ y,
                                   int T, int N, int K) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= N) return;
  const WT* wr = w + static_cast<size_t>(row) * K;
  for (int t0 = 0; t0 < T; t0 += 4) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k = lane; k < K; k += 32) {
      const float wv = to_f32(wr[k]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (t0 + i < T) acc[i] = fmaf(wv, x[static_cast<size_t>(t0 + i) * K + k], acc[i]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s = acc[i];
      for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0 && t0 + i < T) y[static_cast<size_t>(t0 + i) * N + row] = s;
    }
  }
}

// ---- launchers

// Lets a kernel use all the shared memory a block may opt into, less its own static __shared__ arrays.
template <typename Kernel>
void allow_max_smem(DeviceState* st, Kernel kernel, size_t max_smem) {
  cudaFuncAttributes attr{};
  check_cuda(st, cudaFuncGetAttributes(&attr, kernel), "matmul", " (cudaFuncGetAttributes)");
  check_cuda(st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_smem - attr.sharedSizeBytes)),
             "matmul", " (cudaFuncSetAttribute)");
}

template <typename WT, int TT>
void set_gemv_attributes(DeviceState* st, size_t max_smem) {
  allow_max_smem(st, gemv_kernel<WT, TT, 1>, max_smem);
  allow_max_smem(st, gemv_kernel<WT, TT, 2>, max_smem);
}

template <typename WT>
void set_gemv_attributes_all(DeviceState* st, size_t max_smem) {
  set_gemv_attributes<WT, 1>(st, max_smem);
  set_gemv_attributes<WT, 2>(st, max_smem);
  set_gemv_attributes<WT, 4>(st, max_smem);
  set_gemv_attributes<WT, 8>(st, max_smem);
}

// Calls f with the kernel tag of a weight dtype (f32, f16, bf16, I8, I4) as a value of that type.
template <typename F>
decltype(auto) with_weight_tag(DType dt, F&& f) {
  switch (dt) {
    case DType::BF16: return f(__nv_bfloat16{});
    case DType::F16: return f(__half{});
    case DType::I8: return f(QInt8{});
    case DType::I4: return f(QInt4{});
    default: return f(float{});
  }
}

// Clusters of C blocks with `smem` bytes each that fit on the device at once (0 if none).
template <typename WT, int TT, int U>
int active_clusters(DeviceState* st, int C, size_t smem) {
  const ClusterLaunchConfig launch(dim3(C * 64), kThreads, smem, C);
  int n = 0;
  check_cuda(st, cudaOccupancyMaxActiveClusters(&n, gemv_kernel<WT, TT, U>, &launch.cfg), "matmul",
             " (cudaOccupancyMaxActiveClusters)");
  return n;
}

template <typename WT, int U>
int dispatch_active_clusters(DeviceState* st, int TT, int C, size_t smem) {
  switch (TT) {
    case 1: return active_clusters<WT, 1, U>(st, C, smem);
    case 2: return active_clusters<WT, 2, U>(st, C, smem);
    case 4: return active_clusters<WT, 4, U>(st, C, smem);
    default: return active_clusters<WT, 8, U>(st, C, smem);
  }
}
template <typename WT>
int dispatch_active_clusters(DeviceState* st, int TT, int U, int C, size_t smem) {
  return U == 1 ? dispatch_active_clusters<WT, 1>(st, TT, C, smem) : dispatch_active_clusters<WT, 2>(st, TT, C, smem);
}

template <typename WT, int TT, int U>
cudaError_t launch_gemv(const GemvParams& p, dim3 grid, size_t smem, bool pdl, cudaStream_t stream) {
  return launch_in_clusters(gemv_kernel<WT, TT, U>, p, grid, kThreads, smem, p.C, pdl, stream);
}

template <typename WT, int U>
cudaError_t dispatch_gemv(int TT, const GemvParams& p, dim3 grid, size_t smem, bool pdl, cudaStream_t stream) {
  switch (TT) {
    case 1: return launch_gemv<WT, 1, U>(p, grid, smem, pdl, stream);
    case 2: return launch_gemv<WT, 2, U>(p, grid, smem, pdl, stream);
    case 4: return launch_gemv<WT, 4, U>(p, grid, smem, pdl, stream);
    default: return launch_gemv<WT, 8, U>(p, grid, smem, pdl, stream);
  }
}
template <typename WT>
cudaError_t dispatch_gemv(int TT, int U, const GemvParams& p, dim3 grid, size_t smem, bool pdl, cudaStream_t stream) {
  return U == 1 ? dispatch_gemv<WT, 1>(TT, p, grid, smem, pdl, stream) : dispatch_gemv<WT, 2>(TT, p, grid, smem, pdl, stream);
}

}  // namespace

int gemv_vector_width(DType dt) {
  return with_weight_tag(dt, [](auto tag) { return VecOf<decltype(tag)>::value; });
}

bool gemv_vector_ok(const float* x, const void* w, DType dt, int K) {
  return K % gemv_vector_width(dt) == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

bool Gemv::fuses_silu_mul(int64_t T, int64_t K, DType w_dtype) {
  return T >= 1 && T <= kMaxTokens && K > 0 && K % (w_dtype == DType::F32 ? 4 : 8) == 0;
}

Gemv::Gemv(DeviceState* st, cudaStream_t stream) : st_(st), stream_(stream) {
  int dev = 0, optin = 0;
  check_cuda(st_, cudaGetDevice(&dev), "matmul");
  check_cuda(st_, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "matmul");
  max_smem_ = static_cast<size_t>(optin);
  set_gemv_attributes_all<__nv_bfloat16>(st_, max_smem_);
  set_gemv_attributes_all<__half>(st_, max_smem_);
  set_gemv_attributes_all<float>(st_, max_smem_);
  set_gemv_attributes_all<QInt8>(st_, max_smem_);
  set_gemv_attributes_all<QInt4>(st_, max_smem_);
}

int Gemv::clusters_at_once(DType dt, int TT, int U, int C, size_t smem) {
  const int key[5] = {static_cast<int>(dt), TT, U, C, static_cast<int>((smem + 1023) / 1024)};
  for (const Occupancy& o : occupancy_)
    if (std::equal(key, key + 5, o.key)) return o.n;
  int n = 0;
  const size_t rounded = static_cast<size_t>(key[4]) * 1024;
  n = with_weight_tag(dt, [&](auto tag) { return dispatch_active_clusters<decltype(tag)>(st_, TT, U, C, rounded); });
  occupancy_.push_back(Occupancy{{key[0], key[1], key[2], key[3], key[4]}, n});
  return n;
}

// ex == nullptr: y [T, N] = x [T, K] @ w^T. Otherwise expert rows: T is the token count (each expert gets at
// most T pairs), a grid row of blocks per expert in w.
bool Gemv::launch_vector(const float* x, const void* w, DType dt, float* y, int T, int N, int K, const ExpertRows* ex,
                         bool gated, const GemvTuning& tuning, const uint16_t* scales, int group) {
  const bool quantized = dt == DType::I8 || dt == DType::I4;
  const int vec = gemv_vector_width(dt);
  // A quantized vector must lie inside one group, and the scales are read as aligned 4-byte words.
  if (quantized && (group <= 0 || group % vec != 0 || K % group != 0 || reinterpret_cast<uintptr_t>(scales) % 4 != 0))
    return false;
  const int TT = T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8;
  const int KV = K / vec;
  auto slice_vecs = [&](int c) { return (KV + c - 1) / c; };
  auto xbytes = [&](int c) { return static_cast<size_t>(TT) * slice_vecs(c) * vec * sizeof(float); };
  int C = 1;
  if (tuning.cluster > 0) {
    C = tuning.cluster;
  } else {
    // Smallest K split whose x slice fits the target, at least 2 (measured: 2 blocks sharing the rows of a
    // cluster beat 1 on most shapes), and 8 for long rows with T >= 4 (measured on K = 11008, 14336).
    C = 2;
    while (C < kMaxCluster && xbytes(C) > kMaxXSlice) C *= 2;
    if (TT >= 4 && K > 8192) C = kMaxCluster;
  }
  // Quantized: one step per stage by default, so the rings (and the scale ring beside them) leave room for x.
  const int U = tuning.u > 0 ? tuning.u : quantized ? 1 : 2;
  const int ngroups = (N + kRows - 1) / kRows;
  const int max_groups = static_cast<int>(kMaxPart / (static_cast<size_t>(kRows) * TT * 4));
  const size_t part_bytes = C > 1 ? static_cast<size_t>(std::min(max_groups, ngroups)) * kRows * TT * 4 : 0;
  const size_t smem = ring_bytes(U) + scale_ring_bytes(U, quantized) + xbytes(C) + part_bytes;
  const size_t static_smem = 1024;  // room for the kernel's own __shared__ row maps (allow_max_smem)
  if (!gemv_vector_ok(x, w, dt, K) || smem + static_smem > max_smem_) return false;
  // One wave of clusters (as many as fit at once), rows split evenly; more waves only when the partial sums of
  // a cluster's rows would not fit.
  // Expert mode: at most min(El, pairs) experts have work; give each a share of one wave.
  const int busy = ex ? std::max(1, std::min(ex->n_local, ex->n_pairs)) : 1;
  const int active = std::max(1, clusters_at_once(dt, TT, U, C, smem) / busy);
  int waves = 1;
  if (C > 1) {
    const int per = (ngroups + active - 1) / active;
    waves = (per + max_groups - 1) / max_groups;
  }
  if (tuning.waves > 0) waves = std::max(waves, tuning.waves);
  int G = std::min(ngroups, active * waves);
  const int groups_per_cluster = (ngroups + G - 1) / G;
  G = (ngroups + groups_per_cluster - 1) / groups_per_cluster;
  GemvParams p{x, w, y, T, N, K, C, slice_vecs(C), groups_per_cluster * kRows, nullptr, 0, 1, 0, 0, nullptr,
               gated ? 1 : 0, scales, group};
  if (ex) set_expert_rows(p, *ex);
  const dim3 grid(G * C, ex ? ex->n_local : 1);
  const cudaError_t e = with_weight_tag(
      dt, [&](auto tag) { return dispatch_gemv<decltype(tag)>(TT, U, p, grid, smem, tuning.pdl, stream_); });
  check_cuda(st_, e, "matmul", " (cudaLaunchKernelEx)");
  check_cuda(st_, cudaGetLastError(), "matmul");
  return true;
}

bool Gemv::run_quant(const float* x, const QuantMatrix& w, float* y, int T, int N, int K, bool gated,
                     const GemvTuning& tuning) {
  // rows of 16-byte vectors: tiles (quant-tiles.h) are the tensor-core kernels' (gemv-quant-mma.cu) and the fallback's
  return !w.tiles && T >= 1 && T <= kMaxTokens &&
         launch_vector(x, w.q, w.dtype, y, T, N, K, nullptr, gated, tuning, w.scales, w.group);
}

bool Gemv::run_quant_experts(const float* x, const QuantMatrix& w, float* y, int T, int N, int K, const ExpertRows& ex,
                             bool gated) {
  return !w.tiles && T >= 1 && T <= kMaxTokens &&
         launch_vector(x, w.q, w.dtype, y, T, N, K, &ex, gated, GemvTuning{}, w.scales, w.group);
}

void Gemv::run(const float* x, const void* w, DType dt, float* y, int T, int N, int K, bool gated,
               const GemvTuning& tuning) {
  if (T == 1 && tuning.one_token && gemv_one_token(Ctx{st_, stream_, nullptr}, x, w, dt, nullptr, 0, y, N, K, gated))
    return;
  if (launch_vector(x, w, dt, y, T, N, K, nullptr, gated, tuning)) return;
  const bool vector_ok = gemv_vector_ok(x, w, dt, K);
  if (gated && !(vector_ok && T > 1))
    WEFT_FAIL("matmul", "the fused siluMul GEMV cannot take K = ", K, " (needs K % ", dt == DType::F32 ? 4 : 8,
              " == 0 and x within shared memory)");
  if (vector_ok && T > 1) {  // x too large for shared memory: two passes over fewer tokens
    const int half = T / 2;
    run(x, w, dt, y, half, N, K, gated, tuning);
    run(x + static_cast<size_t>(half) * K * (gated ? 2 : 1), w, dt, y + static_cast<size_t>(half) * N, T - half, N, K,
        gated, tuning);
    return;
  }
  WEFT_DISPATCH_FLOAT(dt, W,
                      gemv_scalar_kernel<<<(N + 7) / 8, 256, 0, stream_>>>(x, static_cast<const W*>(w), y, T, N, K));
  check_cuda(st_, cudaGetLastError(), "matmul");
}

}  // namespace weft::cuda
