// Hopper's warpgroup MMA (wgmma.mma_async, sm_90a), the few forms weft's kernels use, as inline PTX: the fence,
// commit and wait that bracket an asynchronous MMA, shared-memory matrix descriptors, and MMAs with A in registers
// (the mma.sync m16n8k32 A-fragment layout, warp w of the warpgroup holding rows 16 w .. 16 w + 15) and B in
// shared memory, K-major, swizzled. Accumulators: per warp, n8 block j's d[j][0..1] = row g, columns 8 j + 2 t, +1
// and d[j][2..3] = row g + 8 (g = lane / 4, t = lane % 4), as an mma.sync m16n8 tile's.
#pragma once

#include <cstdint>

namespace weft::cuda::wgmma {

enum Swizzle : uint64_t { kSwizzle128 = 1, kSwizzle64 = 2 };

// The descriptor of a K-major B tile at shared address addr: rows of 128 (kSwizzle128) or 64 (kSwizzle64) bytes
// stored with their 16-byte chunks XOR-permuted by the row within each group of 8 (128 B) or by row / 2 (64 B), the
// tile 1024-byte aligned; sbo: bytes from one 8-row group to the next. A k-step of 32 bytes further into the rows
// is the descriptor + 2 (its start address field counts 16 bytes).
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t sbo, Swizzle swizzle) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(sbo >> 4) << 32) | (uint64_t(swizzle) << 62);
}

// Orders this thread's earlier writes of shared memory (st.shared, cp.async) before wgmma's reads of it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of an accumulator across the asynchronous MMA's bracket.
template <typename T, int N, int E>
__device__ __forceinline__ void fence_operands(T (&d)[N][E]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < E; ++e) asm volatile("" : "+r"(reinterpret_cast<uint32_t&>(d[j][e]))::"memory");
}

// d (64 x 64 s32) = (accumulate ? d : 0) + A (64 x 32 s8, registers) B (32 x 64 s8, K-major in shared memory).
__device__ __forceinline__ void mma_s8_m64n64k32(int (&d)[8][4], const uint32_t (&a)[4], uint64_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p;\n}\n"
      : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]), "+r"(d[3][2]), "+r"(d[3][3]), "+r"(d[4][0]), "+r"(d[4][1]), "+r"(d[4][2]), "+r"(d[4][3]), "+r"(d[5][0]), "+r"(d[5][1]), "+r"(d[5][2]), "+r"(d[5][3]), "+r"(d[6][0]), "+r"(d[6][1]), "+r"(d[6][2]), "+r"(d[6][3]), "+r"(d[7][0]), "+r"(d[7][1]), "+r"(d[7][2]), "+r"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)));
}

// d (64 x 128 f32) += A (64 x 64 e4m3, registers: two k-steps of 32) B (64 x 128 e4m3, K-major in shared memory):
// the two MMAs in one statement, so that no copy of d can fall between them (ptxas would serialise them).
__device__ __forceinline__ void mma_e4m3_m64n128k64(float (&d)[16][4], const uint32_t (&a0)[4], const uint32_t (&a1)[4],
                                                    uint64_t b) {
  asm volatile(
      "{\n.reg .b64 b1;\n.reg .pred p;\nsetp.ne.b32 p, %73, 0;\nadd.s64 b1, %72, 2;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %72, p, 1, 1;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%68, %69, %70, %71}, b1, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a0[0]), "r"(a0[1]), "r"(a0[2]), "r"(a0[3]), "r"(a1[0]), "r"(a1[1]), "r"(a1[2]), "r"(a1[3]), "l"(b), "r"(1));
}

}  // namespace weft::cuda::wgmma
