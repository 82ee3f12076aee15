// The state a prompt keeps across its steps under quantized prefill attention (backend.h, sage_attention): per
// layer, slots of quantized K, V operand and K mean, so that a prompt run in chunks quantizes each 64-position block
// of its cache once, not once a chunk. The CPU and CUDA backends share the layout and the rule of what a slot keeps.
#pragma once

#include <cstdint>

#include "tensor.h"

namespace weft {

constexpr int64_t kSageBlock = 64;  // positions per K (and V) scale, query tokens per Q scale

// Bytes of one 64-position record of a slot (n_kv kv heads, head size hd; fp8: the e4m3 V operand, else f16):
// int8 K [n_kv][64][hd], the V operand [n_kv][hd][64] e4m3 or [n_kv][64][hd] f16, K scales [n_kv] f32, V scales
// [n_kv] f32; 256-aligned, for the tiles' 16-byte copies.
inline int64_t sage_state_block_bytes(int64_t n_kv, int64_t hd, bool fp8) {
  return (n_kv * (kSageBlock * hd * (fp8 ? 2 : 3) + 8) + 255) / 256 * 256;
}

// One layer's slots and the step's use of them. header [slots, 2] i32: element 0, the leading positions of the slot's
// sequence whose blocks hold its quantized K and V under the slot's mean (0: none); means [slots, nKv, hd] f32;
// blocks [slots, nbMax, sage_state_block_bytes / 4] i32 (bytes; the CPU reference keeps only the header and
// means); slots [S, 3]
// i32 per table row: its slot (-1: none), 1 where the slot starts afresh for it, and the leading positions the
// caller vouches are unchanged since the slot's last step.
//
// What a row with a slot keeps: its blocks below min(header, vouched, the row's first position in the step),
// floored to a block, and the slot's mean where that leaves a block; else the mean is the step's (over [0, end)),
// kept in the slot. The slot then holds [0, end). Rows without a slot, and rows past the slot's capacity, take the
// step's own quantization, as without state.
struct SageState {
  Tensor header, means, blocks, slots;
};

}  // namespace weft
