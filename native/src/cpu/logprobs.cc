// The reference of topLogprobs: per asked-for row, the log-softmax of the raw logits at one id and at the k most
// likely ids. The log-probs are log_softmax's own formula ((x - max) - log_sum), so they equal logSoftmax's values.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/ops.h"

namespace weft::cpu {

void top_logprobs(float* out, const float* logits, const int32_t* rows, const int32_t* ids, int64_t Q, int64_t V,
                  int64_t k) {
  const int64_t width = 1 + 2 * k;
  std::vector<int32_t> order;
  for (int64_t q = 0; q < Q; ++q) {
    const float* row = logits + static_cast<int64_t>(rows[q]) * V;
    float m, log_sum;
    log_sum_exp(row, V, &m, &log_sum);
    float* o = out + q * width;
    o[0] = (row[ids[rows[q]]] - m) - log_sum;
    // candidates: every id whose logit is a number, most likely first, ties to the lower id
    order.resize(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    auto end = std::remove_if(order.begin(), order.end(), [&](int32_t i) { return std::isnan(row[i]); });
    const int64_t kept = std::min<int64_t>(k, end - order.begin());
    std::partial_sort(order.begin(), order.begin() + kept, end,
                      [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    for (int64_t j = 0; j < k; ++j) {
      o[1 + j] = j < kept ? static_cast<float>(order[j]) : -1.0f;
      o[1 + k + j] = j < kept ? (row[order[j]] - m) - log_sum : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace weft::cpu
