// The routing step of the expert GEMVs (gemv.cu, gemv-quant.cu): which pairs a block of one expert serves.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// Run by warp 0 of a block serving expert e: e's pairs q (of n_pairs) with experts[q] == e, in pair order, from its
// `first`-th on, at most `slots` (<= TT) of them, into slots (y_row[slot] = q, x_row[slot] = q, or q / topk when x
// has a row per token); lane 0 stores their count in n_tokens and, where n_after is given, how many of e's pairs
// follow them. More pairs for e than tokens (n_pairs / topk) happens only when a token chose e twice: reported.
template <int TT>
__device__ __forceinline__ void expert_slots(const int32_t* experts, int n_pairs, int topk, int per_pair_x, int e,
                                             int lane, int (&x_row)[TT], int (&y_row)[TT], int& n_tokens,
                                             DeviceStatus* status, int slots = TT, int first = 0,
                                             int* n_after = nullptr) {
  int m = 0;
  for (int base = 0; base < n_pairs; base += 32) {
    const int q = base + lane;
    const bool hit = q < n_pairs && experts[q] == e;
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    const int slot = m + __popc(mask & ((1u << lane) - 1)) - first;
    if (hit && slot >= 0 && slot < slots) {
      y_row[slot] = q;
      x_row[slot] = per_pair_x ? q : q / topk;
    }
    m += __popc(mask);
  }
  __syncwarp();
  if (lane == 0) {
    if (m > n_pairs / topk && first == 0) report(status, StatusOp::ExpertRepeat, y_row[0] / topk, e, slots);
    n_tokens = max(0, min(m - first, slots));
    if (n_after) *n_after = max(0, m - first - slots);
  }
}

}  // namespace weft::cuda
