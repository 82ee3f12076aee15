// Device side of the KV block table (kv-block-table.h): the range checks every KV kernel makes before it
// touches the cache. A bad index is reported (thrown at the next synchronising call) and the access skipped
// or redirected to block 0, so a bad table never makes the device fault. Also the cache's element types: f32,
// or bf16 written by the rounding rule both backends share (bf16-round.h) and widened to f32 as read; or the
// 1-byte codes (fp8 e4m3 as __nv_fp8_e4m3, int8 as int8_t) with one f32 scale per row, quantized a row at a time
// by the rule of kv-quant.h (store_kv_row_quantized) and read as code * scale. Kernels that take only f32 and
// bf16 caches dispatch with WEFT_DISPATCH_KV; those that also read the 1-byte caches with WEFT_DISPATCH_KV_ALL.
#pragma once

#include <type_traits>

#include "bf16-round.h"
#include "cuda/common.cuh"
#include "kv-block-table.h"
#include "kv-quant.h"
#ifdef __CUDACC__
#include <cuda_fp8.h>
#endif

namespace weft::cuda {

// kv_token_in_range's `write`: which op's StatusOps a bad index is reported as.
constexpr bool kKvWrite = true, kKvRead = false;

#ifdef __CUDACC__
// Runs `body` with KV bound to the cache's element type (backend.cc allows f32 and bf16 only).
#define WEFT_DISPATCH_KV(dtype, KV, ...)         \
  if ((dtype) == ::weft::DType::BF16) {         \
    using KV = __nv_bfloat16;                   \
    __VA_ARGS__;                                \
  } else {                                      \
    using KV = float;                           \
    __VA_ARGS__;                                \
  }

// Runs `body` with KV bound to any cache element type: the 1-byte codes too (backend.cc checked the scales).
#define WEFT_DISPATCH_KV_ALL(dtype, KV, ...)     \
  if ((dtype) == ::weft::DType::FP8) {          \
    using KV = __nv_fp8_e4m3;                   \
    __VA_ARGS__;                                \
  } else if ((dtype) == ::weft::DType::I8) {    \
    using KV = int8_t;                          \
    __VA_ARGS__;                                \
  } else                                        \
    WEFT_DISPATCH_KV(dtype, KV, __VA_ARGS__)

// Whether KV is a 1-byte code read with its row's scale.
template <typename KV>
constexpr bool kKvQuantized = std::is_same_v<KV, __nv_fp8_e4m3> || std::is_same_v<KV, int8_t>;

__device__ __forceinline__ void store_kv(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_kv(__nv_bfloat16* p, float v) { *p = __ushort_as_bfloat16(f32_to_bf16_rn(v)); }

// VEC consecutive elements (of the cache, or f32 in shared memory) as f32: one load of 4 * VEC or 2 * VEC
// bytes, p aligned to it.
__device__ __forceinline__ void load_as_f32(const float* p, float (&f)[1]) { f[0] = *p; }
__device__ __forceinline__ void load_as_f32(const __nv_bfloat16* p, float (&f)[1]) { f[0] = to_f32(*p); }
__device__ __forceinline__ void load_as_f32(const float* p, float (&f)[2]) {
  const float2 x = *reinterpret_cast<const float2*>(p);
  f[0] = x.x;
  f[1] = x.y;
}
__device__ __forceinline__ void load_as_f32(const __nv_bfloat16* p, float (&f)[2]) {
  const uint32_t x = *reinterpret_cast<const uint32_t*>(p);  // element 0 in the low half (little-endian)
  f[0] = __uint_as_float(x << 16);
  f[1] = __uint_as_float(x & 0xffff0000u);
}

// One cache element as f32: f32 and bf16 as stored, a code times its row's scale.
__device__ __forceinline__ float kv_value(float x, float) { return x; }
__device__ __forceinline__ float kv_value(__nv_bfloat16 x, float) { return to_f32(x); }
__device__ __forceinline__ float kv_value(__nv_fp8_e4m3 x, float scale) {
  return __fmul_rn(__half2float(__half(__nv_cvt_fp8_to_halfraw(x.__x, __NV_E4M3))), scale);
}
__device__ __forceinline__ float kv_value(int8_t x, float scale) { return __fmul_rn(static_cast<float>(x), scale); }

// The 1-byte codes, VEC (1, 2 or 4) consecutive ones widened to f32 (the code's value, not yet times its scale): one
// 2- or 4-byte load, p aligned to it. e4m3 -> f16 is exact (cvt.rn.f16x2.e4m3x2 on sm_89+), f16 -> f32 too.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes), __NV_E4M3);
  return __half22float2(__half2(h));
}
__device__ __forceinline__ void load_as_f32(const __nv_fp8_e4m3* p, float (&f)[1]) { f[0] = kv_value(*p, 1.0f); }
__device__ __forceinline__ void load_as_f32(const int8_t* p, float (&f)[1]) { f[0] = *p; }
__device__ __forceinline__ void load_as_f32(const __nv_fp8_e4m3* p, float (&f)[2]) {
  const float2 a = e4m3x2_to_float2(*reinterpret_cast<const uint16_t*>(p));
  f[0] = a.x;
  f[1] = a.y;
}
// 4 codes packed in a word (element 0 in the low byte), widened; the KV pointer only picks the code type.
__device__ __forceinline__ void codes_as_f32(uint32_t x, const __nv_fp8_e4m3*, float (&f)[4]) {
  const float2 a = e4m3x2_to_float2(x & 0xffffu), b = e4m3x2_to_float2(x >> 16);
  f[0] = a.x;
  f[1] = a.y;
  f[2] = b.x;
  f[3] = b.y;
}
__device__ __forceinline__ void load_as_f32(const int8_t* p, float (&f)[2]) {
  const char2 x = *reinterpret_cast<const char2*>(p);
  f[0] = x.x;
  f[1] = x.y;
}
__device__ __forceinline__ void codes_as_f32(uint32_t x, const int8_t*, float (&f)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) f[e] = static_cast<float>(static_cast<int8_t>(x >> (8 * e)));
}
template <typename KV, typename = std::enable_if_t<kKvQuantized<KV>>>
__device__ __forceinline__ void load_as_f32(const KV* p, float (&f)[4]) {
  codes_as_f32(*reinterpret_cast<const uint32_t*>(p), p, f);
}
// 4 f32 of shared memory, one 16-byte load (p aligned to it).
__device__ __forceinline__ void load_as_f32(const float* p, float (&f)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  f[0] = x.x;
  f[1] = x.y;
  f[2] = x.z;
  f[3] = x.w;
}

// A code of x * inv (kv-quant.h): e4m3 by the hardware conversion (round to nearest even, saturating, as
// f32_to_e4m3 on the host), int8 by the shared rule.
__device__ __forceinline__ void encode_kv(__nv_fp8_e4m3* p, float x_times_inv) {
  p->__x = __nv_cvt_float_to_fp8(x_times_inv, __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ void encode_kv(int8_t* p, float x_times_inv) { *p = f32_to_int8_code(x_times_inv); }

// Max over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. NaN is ignored (fmaxf).
__device__ inline float kv_block_max(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float m = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
    m = warp_max(m);
    if (threadIdx.x == 0) total = m;
  }
  __syncthreads();
  return total;
}

// Threads [0, n) of a group (the block, or a warp's lanes) quantize row src[hd] (f32, global or shared memory)
// into dst[hd] and *scale by the rule of kv-quant.h (the host's kv_quantize_row, bit for bit); group_max gives
// every thread of the group the group's max.
template <typename KV, typename GroupMax>
__device__ void store_kv_row_quantized(const float* src, int64_t hd, KV* dst, float* scale, int thread, int n,
                                       GroupMax group_max) {
  float amax = 0;
  for (int64_t d = thread; d < hd; d += n) amax = fmaxf(amax, fabsf(src[d]));
  amax = group_max(amax);
  const KvRowScale s = kv_row_scale(amax, std::is_same_v<KV, int8_t> ? kInt8Max : kFp8Max);
  if (thread == 0) *scale = s.scale;
  for (int64_t d = thread; d < hd; d += n) encode_kv(dst + d, __fmul_rn(src[d], s.inv));
}

// The same by every thread of the block.
template <typename KV>
__device__ void store_kv_row_quantized(const float* src, int64_t hd, KV* dst, float* scale) {
  store_kv_row_quantized(src, hd, dst, scale, threadIdx.x, blockDim.x, [](float x) { return kv_block_max(x); });
}

// True when token t's sequence row is in the table and its position within the row's capacity; otherwise false,
// and the reporter files the report (as writeKv's when `write`, else as attention's).
__device__ __forceinline__ bool kv_token_in_range(const KvBlockTable& kv, int64_t t, int seq, int pos, bool write,
                                                  DeviceStatus* status, bool reporter) {
  const bool bad_seq = seq < 0 || seq >= kv.n_seqs;
  if (!bad_seq && pos >= 0 && pos < kv.capacity()) return true;
  const StatusOp op = bad_seq ? (write ? StatusOp::WriteKvSeq : StatusOp::AttentionSeq)
                              : (write ? StatusOp::WriteKvPosition : StatusOp::AttentionPosition);
  if (reporter) report(status, op, t, bad_seq ? seq : pos, bad_seq ? kv.n_seqs : kv.capacity());
  return false;
}

// Block j of sequence row seq (in range), or -1 when the table entry is outside the pool (reported).
__device__ __forceinline__ int64_t kv_block_checked(const KvBlockTable& kv, int64_t t, int seq, int64_t j,
                                                    StatusOp op, DeviceStatus* status, bool reporter) {
  const int32_t block = kv.block_id(seq, j);
  if (block >= 0 && block < kv.n_blocks) return block;
  if (reporter) report(status, op, t, block, kv.n_blocks);
  return -1;
}

// The cache row token t writes for kv head h, or -1 (reported by the reporter) when its sequence row, position
// or table entry is out of range.
__device__ __forceinline__ int64_t kv_write_row(const KvBlockTable& kv, int64_t t, int seq, int pos, int64_t h,
                                                DeviceStatus* status, bool reporter) {
  if (!kv_token_in_range(kv, t, seq, pos, kKvWrite, status, reporter)) return -1;
  const int64_t j = pos / kv.block_size;
  const int64_t block = kv_block_checked(kv, t, seq, j, StatusOp::WriteKvBlock, status, reporter);
  return block < 0 ? -1 : kv.row(block, h, pos - j * kv.block_size);
}

// The cache row of token t's (in range) position pos, kv head h, for a read: a bad table entry is reported and
// the read goes to row 0 (the op's output is then unspecified, as the report says).
// 32-bit division: attention checks capacity < 2^31 on the host.
__device__ __forceinline__ int64_t kv_read_row(const KvBlockTable& kv, int64_t t, int seq, int64_t h, int pos,
                                               DeviceStatus* status) {
  const int B = static_cast<int>(kv.block_size), j = pos / B;
  const int64_t block = kv_block_checked(kv, t, seq, j, StatusOp::AttentionBlock, status, true);
  return block < 0 ? 0 : kv.row(block, h, pos - j * B);
}
#endif

}  // namespace weft::cuda
