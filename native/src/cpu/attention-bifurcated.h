// The CPU reference of bifurcated decode attention (Backend::attention_bifurcated): what the op means. Each token
// attends over its group's shared prefix and then over its own positions, two softmax partials merged by their
// log-sum-exp; the result equals cpu::attention over the whole range up to the summation order.
#pragma once

#include <cstdint>

#include "cpu/thread-pool.h"
#include "kv-block-table.h"
#include "tensor.h"

namespace weft::cpu {

// The value checks the op's contract names (backend.h): token_group in [-1, G), group_shared[g] >= 0 and at most
// positions[t] + 1 for each member t, and every member's table row holding the first member's blocks over
// [0, group_shared[g]). Throws naming the first failure.
void check_prefix_groups(const char* op, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                         const int32_t* token_group, int64_t T, const int32_t* group_shared, int64_t G);

// out, q [T, nH * hd]; caches of kv_dtype (f32 or bf16) read through kv; descriptors as check_prefix_groups.
void attention_bifurcated(ThreadPool& pool, float* out, const float* q, const void* k_cache, const void* v_cache,
                          DType kv_dtype, const KvBlockTable& kv, const int32_t* token_seq, const int32_t* positions,
                          const int32_t* token_group, const int32_t* group_shared, int64_t T, int64_t n_heads,
                          int64_t hd, float scale);

}  // namespace weft::cpu
