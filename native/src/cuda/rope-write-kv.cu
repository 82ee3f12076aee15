// rope: one thread per rotated pair; angle = fp32(position * invFreq), sincosf in full precision.
// writeKv: one block per (token, kv head), the cache row found through the block table once per block; bad
// sequence rows, positions and table entries are skipped and reported on the device. f32 or bf16 caches
// (kv-block-table.cuh: bf16 rounded to nearest even, as the CPU), or fp8 / int8 codes with a scale per row
// (the block quantizes its row: kv-quant.h's rule, as the CPU).
#include "cuda/rope-write-kv.cuh"

#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

__global__ void rope(const float* __restrict__ x, const int32_t* __restrict__ positions,
                     const float* __restrict__ inv_freq, float* __restrict__ out, int64_t T, int64_t width,
                     int64_t head_dim, DeviceStatus* status) {
  int64_t half = head_dim / 2, heads = width / head_dim;
  int64_t n = T * heads * half;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t j = i % half, h = (i / half) % heads, t = i / (half * heads);
    int32_t pos = positions[t];
    if (pos < 0 && j == 0 && h == 0) report(status, StatusOp::RopePosition, t, pos, 0);
    float s, c;
    sincosf(__fmul_rn(static_cast<float>(pos), inv_freq[j]), &s, &c);
    const float* xh = x + t * width + h * head_dim;
    float* oh = out + t * width + h * head_dim;
    float x1 = xh[j], x2 = xh[j + half];
    oh[j] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    oh[j + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
  }
}

template <typename KV>
__global__ void write_kv(KV* __restrict__ k_cache, KV* __restrict__ v_cache, const float* __restrict__ k,
                         const float* __restrict__ v, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                         const int32_t* __restrict__ positions, int64_t hd, DeviceStatus* status,
                         float* __restrict__ k_scales, float* __restrict__ v_scales) {
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int32_t seq = token_seq[t], pos = positions[t];
  const int64_t row = kv_write_row(kv, t, seq, pos, h, status, h == 0 && threadIdx.x == 0);
  if (row < 0) return;
  const int64_t dst = row * hd, src = (t * kv.n_kv + h) * hd;
  if constexpr (kKvQuantized<KV>) {  // k_scales, v_scales [rows]: the row is the block's (row < 0 is block-uniform)
    store_kv_row_quantized(k + src, hd, k_cache + dst, k_scales + row);
    store_kv_row_quantized(v + src, hd, v_cache + dst, v_scales + row);
  } else {
    for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
      store_kv(k_cache + dst + d, k[src + d]);
      store_kv(v_cache + dst + d, v[src + d]);
    }
  }
}

}  // namespace

void launch_rope(const Ctx& ctx, const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim,
                 const Tensor& out) {
  int64_t n = x.numel() / 2;
  if (n == 0) return;
  rope<<<blocks_for(n, 256), 256, 0, ctx.stream>>>(x.data<float>(), positions.data<int32_t>(), inv_freq.data<float>(),
                                                   out.data<float>(), x.dim(0), x.dim(1), head_dim, ctx.status);
  check_launch(ctx, "rope", {{"x", x}, {"positions", positions}, {"invFreq", inv_freq}});
}

void launch_write_kv(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                     const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) {
  int64_t T = k.dim(0), n_kv = k_cache.dim(1);
  if (T == 0 || n_kv == 0) return;
  dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(n_kv));
  WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV,
                   write_kv<KV><<<grid, 128, 0, ctx.stream>>>(
                       k_cache.data<KV>(), v_cache.data<KV>(), k.data<float>(), v.data<float>(),
                       KvBlockTable::of(k_cache, kv_block_table), token_seq.data<int32_t>(), positions.data<int32_t>(),
                       k_cache.dim(3), ctx.status, k_cache.kv_scales(), v_cache.kv_scales()));
  check_launch(ctx, "writeKv",
               {{"kCache", k_cache}, {"k", k}, {"tokenSeq", token_seq}, {"kvBlockTable", kv_block_table},
                {"positions", positions}});
}

}  // namespace weft::cuda
