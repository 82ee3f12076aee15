// Elementwise and copying ops. Products that the CPU rounds separately use __fmul_rn, so that nvcc does
// not fuse them into an FMA and the results equal the CPU's bit for bit.
#include "cuda/elementwise.cuh"

#include <algorithm>

#include "random-hash.h"

namespace weft::cuda {
namespace {

// ---- kernels

__global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                        int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = a[i] + b[i];
}

// v as four consecutive elements of p (f32, or 16-bit rounded as from_f32), in one store: p at a multiple of 4.
template <typename O>
__device__ __forceinline__ void store_four(O* p, const float (&v)[4]) {
  if constexpr (std::is_same_v<O, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    static_assert(sizeof(O) == 2, "f32 or a 16-bit type");
    uint16_t bits[4];
    for (int e = 0; e < 4; ++e) {
      const O o = from_f32<O>(v[e]);
      memcpy(&bits[e], &o, 2);
    }
    *reinterpret_cast<uint2*>(p) = make_uint2(bits[0] | uint32_t{bits[1]} << 16, bits[2] | uint32_t{bits[3]} << 16);
  }
}

// out in f32, or in f16/bf16 (rounded to nearest) as a prefill GEMM's input (siluMulMatmul); half (when given) the
// same values again in its 16-bit type, from the one read of gate_up (matmulSiluMul's copy for the next GEMM).
// grid (columns / 4 / 256, rows): four columns a thread (one load of each half, one store of each output where
// F % 4 == 0), no index division.
template <typename O, typename H = O>
__global__ void silu_mul(const float* __restrict__ gate_up, O* __restrict__ out, H* __restrict__ half, int64_t T,
                         int64_t F) {
  pdl_trigger();
  pdl_wait();
  const int64_t f = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * 4;
  if (f >= F) return;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const float* gate = gate_up + t * 2 * F + f;
    float v[4];
    if (F % 4 == 0) {
      const float4 g = *reinterpret_cast<const float4*>(gate), u = *reinterpret_cast<const float4*>(gate + F);
      v[0] = silu_times(g.x, u.x), v[1] = silu_times(g.y, u.y);
      v[2] = silu_times(g.z, u.z), v[3] = silu_times(g.w, u.w);
    } else {
      for (int e = 0; e < 4 && f + e < F; ++e) v[e] = silu_times(gate[e], gate[F + e]);
    }
    if (F % 4 == 0) {
      store_four(out + t * F + f, v);
      if (half) store_four(half + t * F + f, v);
    } else {
      for (int e = 0; e < 4 && f + e < F; ++e) {
        out[t * F + f + e] = from_f32<O>(v[e]);
        if (half) half[t * F + f + e] = from_f32<H>(v[e]);
      }
    }
  }
}

template <typename E>
__global__ void copy_cols(const E* __restrict__ x, int64_t x_cols, int64_t x_col, E* __restrict__ out,
                          int64_t out_cols, int64_t out_col, int64_t T, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < T * n; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t t = i / n, c = i % n;
    out[t * out_cols + out_col + c] = x[t * x_cols + x_col + c];
  }
}

// One block per output row; a row index outside x gives a zero row and a device report.
template <typename E>
__global__ void gather_rows(const E* __restrict__ x, int64_t T, int64_t N, const int32_t* __restrict__ rows,
                            E* __restrict__ out, DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  int64_t r = blockIdx.x;
  int32_t row = rows[r];
  bool ok = row >= 0 && row < T;
  if (!ok && threadIdx.x == 0) report(status, StatusOp::GatherRow, r, row, T);
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) out[r * N + n] = ok ? x[row * N + n] : E{};
}

// One thread per id: a handful of tokens per step.
__global__ void feed_tokens(int32_t* __restrict__ ids, const int32_t* __restrict__ from, int64_t n,
                            const int32_t* __restrict__ src, int64_t m, DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int32_t f = from[i];
    if (f >= m) report(status, StatusOp::FeedTokens, i, f, m);
    else if (f >= 0) ids[i] = src[f];
  }
}

template <typename W>
__global__ void embedding(const W* __restrict__ table, int64_t Vr, int64_t H, const int32_t* __restrict__ ids,
                          int64_t vocab_start, float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  int64_t t = blockIdx.x;
  int64_t row = static_cast<int64_t>(ids[t]) - vocab_start;
  bool in = row >= 0 && row < Vr;
  constexpr int kVec = 16 / sizeof(W);  // elements of a 16-byte load
  if (H % kVec == 0) {  // 16-byte rows (tables and tensors start 256-byte aligned): each thread's loads all in flight
    const uint4* src = reinterpret_cast<const uint4*>(table + (in ? row : 0) * H);
    float4* dst = reinterpret_cast<float4*>(out + t * H);
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < H / kVec; v += blockDim.x) {
      const uint4 u = in ? src[v] : make_uint4(0, 0, 0, 0);
      const W* e = reinterpret_cast<const W*>(&u);
#pragma unroll
      for (int i = 0; i < kVec; i += 4)
        dst[v * (kVec / 4) + i / 4] = make_float4(to_f32(e[i]), to_f32(e[i + 1]), to_f32(e[i + 2]), to_f32(e[i + 3]));
    }
    return;
  }
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) out[t * H + h] = in ? to_f32(table[row * H + h]) : 0.0f;
}

__device__ __forceinline__ void store_rz(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_rz(__half* p, float v) { *p = __float2half_rz(v); }
__device__ __forceinline__ void store_rz(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rz(v); }

template <typename W>
__global__ void random_uniform(W* __restrict__ out, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    store_rz(out + i, uniform_value(seed, static_cast<uint64_t>(i), scale));
}

}  // namespace

// ---- launchers

void launch_add(const Ctx& ctx, const Tensor& a, const Tensor& b, const Tensor& out) {
  int64_t n = a.numel();
  if (n == 0) return;
  add_f32<<<blocks_for(n, 256), 256, 0, ctx.stream>>>(a.data<float>(), b.data<float>(), out.data<float>(), n);
  check_launch(ctx, "add", {{"a", a}, {"b", b}});
}

static dim3 silu_mul_grid(const Tensor& out) {  // silu_mul's: 4 columns a thread, rows along y (at most 65535)
  return dim3(static_cast<unsigned>(blocks_for((out.dim(1) + 3) / 4, 256)),
              static_cast<unsigned>(std::min<int64_t>(out.dim(0), 65535)));
}

void launch_silu_mul(const Ctx& ctx, const Tensor& gate_up, const Tensor& out) {
  if (out.numel() == 0) return;
  WEFT_DISPATCH_FLOAT(out.dtype, O,
                      launch_pdl(ctx, silu_mul<O>, silu_mul_grid(out), dim3(256), 0,
                                 gate_up.data<float>(), out.data<O>(), static_cast<O*>(nullptr), out.dim(0),
                                 out.dim(1)));
  check_launch(ctx, "siluMul", {{"gateUp", gate_up}});
}

void launch_silu_mul(const Ctx& ctx, const Tensor& gate_up, const Tensor& out, const Tensor& half) {
  if (out.numel() == 0) return;
  WEFT_DISPATCH_FLOAT(half.dtype, H,
                      launch_pdl(ctx, silu_mul<float, H>, silu_mul_grid(out), dim3(256), 0,
                                 gate_up.data<float>(), out.data<float>(), half.data<H>(), out.dim(0), out.dim(1)));
  check_launch(ctx, "siluMul", {{"gateUp", gate_up}});
}

void launch_copy_cols(const Ctx& ctx, const char* op, const Tensor& x, int64_t x_col, const Tensor& out,
                      int64_t out_col, int64_t n_cols) {
  int64_t T = x.dim(0);
  if (T * n_cols == 0) return;
  unsigned blocks = blocks_for(T * n_cols, 256);
  if (dtype_size(x.dtype) == 2)
    copy_cols<uint16_t><<<blocks, 256, 0, ctx.stream>>>(x.data<uint16_t>(), x.dim(1), x_col, out.data<uint16_t>(),
                                                        out.dim(1), out_col, T, n_cols);
  else
    copy_cols<uint32_t><<<blocks, 256, 0, ctx.stream>>>(x.data<uint32_t>(), x.dim(1), x_col, out.data<uint32_t>(),
                                                        out.dim(1), out_col, T, n_cols);
  check_launch(ctx, op, {{"x", x}, {"out", out}});
}

void launch_gather_rows(const Ctx& ctx, const Tensor& x, const Tensor& rows, const Tensor& out) {
  int64_t R = rows.dim(0);
  if (R == 0 || x.dim(1) == 0) return;
  unsigned blocks = static_cast<unsigned>(R);
  if (dtype_size(x.dtype) == 2)
    launch_pdl(ctx, gather_rows<uint16_t>, blocks, 256, 0, x.data<uint16_t>(), x.dim(0), x.dim(1),
               rows.data<int32_t>(), out.data<uint16_t>(), ctx.status);
  else
    launch_pdl(ctx, gather_rows<uint32_t>, blocks, 256, 0, x.data<uint32_t>(), x.dim(0), x.dim(1),
               rows.data<int32_t>(), out.data<uint32_t>(), ctx.status);
  check_launch(ctx, "gatherRows", {{"x", x}, {"rows", rows}});
}

void launch_feed_tokens(const Ctx& ctx, const Tensor& ids, const Tensor& from, const Tensor& src) {
  const int64_t n = ids.dim(0);
  launch_pdl(ctx, feed_tokens, blocks_for(n, 128), 128, 0, ids.data<int32_t>(), from.data<int32_t>(), n,
             src.data<int32_t>(), src.dim(0), ctx.status);
  check_launch(ctx, "feedTokens", {{"ids", ids}, {"from", from}, {"src", src}});
}

void launch_embedding(const Ctx& ctx, const Tensor& table, const Tensor& ids, int64_t vocab_start, const Tensor& out) {
  int64_t T = ids.dim(0);
  if (T == 0 || table.dim(1) == 0) return;
  WEFT_DISPATCH_FLOAT(table.dtype, W,
                      launch_pdl(ctx, embedding<W>, static_cast<unsigned>(T), 256, 0,
                                 static_cast<const W*>(table.buffer->data()), table.dim(0), table.dim(1),
                                 ids.data<int32_t>(), vocab_start, out.data<float>()));
  check_launch(ctx, "embedding", {{"table", table}, {"ids", ids}});
}

void launch_random_uniform(const Ctx& ctx, const Tensor& out, uint64_t seed, float scale) {
  int64_t n = out.numel();
  if (n == 0) return;
  WEFT_DISPATCH_FLOAT(out.dtype, W,
                      random_uniform<W><<<blocks_for(n, 256), 256, 0, ctx.stream>>>(
                          static_cast<W*>(out.buffer->data()), n, seed, scale));
  check_launch(ctx, "randomUniform", {{"out", out}});
}

}  // namespace weft::cuda
