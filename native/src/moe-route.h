// The Mixtral router rule for one token, shared by the CPU and CUDA backends (routeTopK) so both choose the
// same experts: softmax over all E logits in fp32 (max subtracted, the sum taken in expert order), the k
// largest probabilities, highest first and ties to the lower expert index (torch.topk's order), then the k
// weights divided by their sum (Hugging Face renormalises in fp32, in that same order).
#pragma once

#include <cmath>
#include <cstdint>

#include "host-device.h"

namespace weft {

WEFT_HD void route_token(const float* logits, int64_t E, int64_t k, int32_t* experts, float* weights) {
  float max = -INFINITY;
  for (int64_t e = 0; e < E; ++e) max = fmaxf(max, logits[e]);
  float total = 0.f;
  for (int64_t e = 0; e < E; ++e) total += expf(logits[e] - max);
  float chosen_total = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float best_p = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken = taken || experts[i] == e;
      const float p = expf(logits[e] - max) / total;
      if (!taken && (best < 0 || p > best_p)) {
        best = e;
        best_p = p;
      }
    }
    experts[j] = static_cast<int32_t>(best);
    weights[j] = best_p;
    chosen_total += best_p;
  }
  for (int64_t j = 0; j < k; ++j) weights[j] /= chosen_total;
}

// A row that only pads a graph step to its bucket: its k pairs choose no expert, ids -1 .. -k (distinct, as a
// token's must be; no expert GEMV serves a negative id, so their rows come out zero), with weight 0. Identical
// padding rows would otherwise all choose the same experts, and an expert's reads grow with its pairs.
WEFT_HD void route_padding(int64_t k, int32_t* experts, float* weights) {
  for (int64_t j = 0; j < k; ++j) {
    experts[j] = static_cast<int32_t>(-1 - j);
    weights[j] = 0.f;
  }
}

}  // namespace weft
