// Bulk asynchronous copies (TMA, sm_90) from global into shared memory, completing on a shared-memory mbarrier: the
// one-token GEMV's weight rows (gemv-rows-tma.cu) and bench/kernels' experiments. One thread initialises a barrier
// (one arrival), announces the bytes a stage will receive (mbar_expect_bytes, which is that arrival) and issues the
// copies; every thread waits on the stage's phase parity. Before a stage's buffer is copied into again, the issuing
// thread orders the warps' earlier reads of it before the copy (fence.proxy.async.shared::cta).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace weft::cuda {

constexpr uint32_t kBulkCopyBytes = 32 * 1024;  // the most one bulk copy moves here

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem_u32(bar)));
}
__device__ __forceinline__ void mbar_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
}
// One arrival with no bytes: the barrier's phase completes at once (a slot whose bytes another barrier counts).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// After mbar_init: the barriers' initialisation visible to the copies (the async proxy).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// Before a stage is copied into again: the warps' reads of it ordered before the copy's writes.
__device__ __forceinline__ void reads_before_copies() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), completing on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  for (uint32_t o = 0; o < bytes; o += kBulkCopyBytes)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(static_cast<char*>(dst) + o)), "l"(static_cast<const char*>(src) + o),
                 "r"(min(kBulkCopyBytes, bytes - o)), "r"(smem_u32(bar)) : "memory");
}

}  // namespace weft::cuda
