// How the KV cache is addressed, shared by the CPU and CUDA backends so both read and write the same rows.
//
// Caches per layer are k, v [nBlocks, nKv, B, hd] f32: a pool of blocks of B positions each. A sequence owns
// a list of blocks, one row of kvBlockTable [S, maxBlocksPerSeq] i32: block j of the sequence in row s is
// table[s][j] and holds its positions [j B, (j + 1) B). Token t of a batch belongs to row tokenSeq[t]. The
// layout of one block per sequence (nBlocks = slots, B = maxContext, table [[slot]]) is the special case
// maxBlocksPerSeq = 1. A paged allocator changes only the table's contents.
#pragma once

#include <cstdint>

#include "host-device.h"

namespace weft {

struct KvBlockTable {
  const int32_t* table;  // [S, max_blocks] physical block ids
  int64_t max_blocks;    // blocks per sequence row (table columns)
  int64_t block_size;    // B, positions per block (the cache's dim 2)
  int64_t n_kv;          // kv heads (the cache's dim 1)

  // The physical block holding position pos of sequence row seq (one division, so: once per key row).
  WEFT_HD int32_t block_of(int64_t seq, int64_t pos) const { return table[seq * max_blocks + pos / block_size]; }
  // The cache row (in units of hd floats) of position pos, kv head h, inside the physical block `block`.
  WEFT_HD int64_t row(int64_t block, int64_t h, int64_t pos) const {
    return (block * n_kv + h) * block_size + pos % block_size;
  }
  // Positions a sequence row can hold.
  WEFT_HD int64_t capacity() const { return max_blocks * block_size; }
};

}  // namespace weft
