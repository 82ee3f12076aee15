// The sampling rule, per row, shared by the CPU backend (cpu/ops.cc: sample, which sorts the candidates) and the
// CUDA backend (cuda/sample.cu: the same kept set by threshold search, without sorting). The scalar steps are
// defined here once, so that both backends compute the same z, p and threshold:
//  1. temperature <= 0 (sample_greedy): argmax of the logits, lowest index on ties.
//  2. z = logit / temperature (sample_z, fp32). Candidates in order of z descending, ties by lower index.
//  3. topK > 0: keep the first topK.
//  4. p = softmax of the kept z in double, max subtracted (sample_weight: a z equal to the max counts exp(0) = 1,
//     so +inf and all -inf rows stay defined).
//  5. topP < 1: keep the shortest prefix whose cumulative p >= topP (at least one).
//  6. total = sum of kept p; return the first kept candidate whose cumulative p > uniform * total
//     (sample_threshold), or the last kept one if rounding leaves none.
#pragma once

#include <cmath>

#include "host-device.h"

namespace weft {

WEFT_HD bool sample_greedy(float temperature) { return !(temperature > 0); }

// -0 is made +0 so that equal z have equal bits (the CUDA kernel orders candidates by the bits of z).
WEFT_HD float sample_z(float logit, float temperature) { return logit / temperature + 0.0f; }

// The unnormalised probability of a candidate: exp(z - z_max) in double, exactly 1 at the max.
WEFT_HD double sample_weight(float z, float z_max) {
  return z == z_max ? 1.0 : exp(static_cast<double>(z) - static_cast<double>(z_max));
}

// The inverse-CDF draw: the first kept candidate whose cumulative p exceeds this value is picked.
WEFT_HD double sample_threshold(float uniform, double total) { return static_cast<double>(uniform) * total; }

}  // namespace weft
