// How the KV cache is addressed, shared by the CPU and CUDA backends so both read and write the same rows.
//
// Caches per layer are k, v [nBlocks, nKv, B, hd] f32 or bf16, or fp8 / i8 codes whose scales [nBlocks, nKv, B] f32
// are indexed by the same row (row(), below; kv-quant.h): a pool of blocks of B positions each. A sequence owns
// a list of blocks, one row of kvBlockTable [S, maxBlocksPerSeq] i32: block j of the sequence in row s is
// table[s][j] and holds its positions [j B, (j + 1) B). Token t of a batch belongs to row tokenSeq[t]. The
// layout of one block per sequence (nBlocks = slots, B = maxContext, table [[slot]]) is the special case
// maxBlocksPerSeq = 1. A paged allocator changes only the table's contents.
#pragma once

#include <cstdint>

#include "host-device.h"
#include "tensor.h"

namespace weft {

// Passed by value to kernels: table points to host memory on the CPU backend, device memory on CUDA (read at
// run time, so a captured graph follows the table's contents).
struct KvBlockTable {
  const int32_t* table;  // [S, max_blocks] physical block ids
  int64_t max_blocks;    // blocks per sequence row (table columns)
  int64_t block_size;    // B, positions per block (the cache's dim 2)
  int64_t n_kv;          // kv heads (the cache's dim 1)
  int64_t n_blocks;      // blocks in the pool (the cache's dim 0)
  int64_t n_seqs;        // S, sequence rows (table rows)

  // Block j of sequence row seq (j = pos / B: one division per key row, not per element).
  WEFT_HD int32_t block_id(int64_t seq, int64_t j) const { return table[seq * max_blocks + j]; }
  // The cache row (in units of hd elements) of kv head h, row `offset` (= pos - j B) of physical block `block`.
  WEFT_HD int64_t row(int64_t block, int64_t h, int64_t offset) const { return (block * n_kv + h) * block_size + offset; }
  // The cache row of position pos of sequence row seq, kv head h (indices known to be in range).
  WEFT_HD int64_t row_of(int64_t seq, int64_t h, int64_t pos) const {
    const int64_t j = pos / block_size;
    return row(block_id(seq, j), h, pos - j * block_size);
  }
  // Positions a sequence row can hold.
  WEFT_HD int64_t capacity() const { return max_blocks * block_size; }

  // caches [nBlocks, nKv, B, hd], table [S, maxBlocksPerSeq] i32 (shapes checked in backend.cc).
  static KvBlockTable of(const Tensor& k_cache, const Tensor& table) {
    return {table.data<int32_t>(), table.dim(1), k_cache.dim(2), k_cache.dim(1), k_cache.dim(0), table.dim(0)};
  }
};

}  // namespace weft
