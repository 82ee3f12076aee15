// Device side of the KV block table (kv-block-table.h): the range checks every KV kernel makes before it
// touches the cache. A bad index is reported (thrown at the next synchronising call) and the access skipped
// or redirected to block 0, so a bad table never makes the device fault. Also the cache's element types: f32,
// or bf16 written by the rounding rule both backends share (bf16-round.h) and widened to f32 as read.
#pragma once

#include "bf16-round.h"
#include "cuda/common.cuh"
#include "kv-block-table.h"

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
