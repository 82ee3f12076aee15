// SageAttention-style quantized prefill attention (opt-in: --prefill-attention int8|fp8). The algorithm, which
// the CPU reference (cpu/attention-sage.cc) defines and these kernels follow, per query head h of kv head g:
//  1. smoothing: per (sequence s, kv head g) the mean of K over the positions [0, end_s) the step attends to
//     (end_s = 1 + the largest position of s's tokens in the step) is subtracted from every K row; a row with a
//     state slot (sage-state.h) keeps the mean of its prompt's first quantized step instead. Exact under softmax
//     either way: it shifts each score of a query row by the same q . mean.
//  2. int8 per block (kv-quant.h's rule: amax, scale = amax / 127, code = round-half-even(x * 127 / amax)): Q
//     per (block of 64 query tokens of the step, head), the smoothed K per (s, g, block of 64 positions).
//  3. scores in log2 units: s = i32(Q8 . K8) * ((sq * sk) * scale * log2(e)); online softmax in f32 over key
//     tiles of 64 positions aligned with the K blocks, causal through positions.
//  4. P V: int8 mode, P and V rounded to f16; fp8 mode, V as e4m3 codes with one scale per (s, g, 64-position
//     block) (amax / 448) and P as e4m3(p * 448); f32 accumulation either way; out = sum / (sum of unrounded p).
// CUDA: a pre-pass writes end_s, the K means, int8 K and the V operand (f16 rows, or e4m3 transposed per tile)
// into the step's scratch, or a row's state slot (only the blocks from its step's first position), each 64-position
// tile contiguous, so the main kernel needs no block table (per-row descriptors say where); the main kernel
// is attention-prefill.cu's FlashAttention-2 plan with mma.sync m16n8k32 s8 for Q K^T and m16n8k16 f16 (int8
// mode) or m16n8k32 e4m3 (fp8 mode) for P V, both tiles double-buffered by cp.async; fp8 mode at head dim 128 runs
// both products as Hopper warpgroup MMAs instead (wgmma.cuh: s8 m64n64k32, e4m3 m64n128k32), 64 query rows a block.
// Head dims 64 and 128.
#pragma once

#include "cuda/common.cuh"
#include "sage-state.h"

namespace weft::cuda {

constexpr int kSageBlock = static_cast<int>(weft::kSageBlock);  // the kernels' tiles (sage-state.h)
// The scratch a call may take (a step's sequences x their capacity): larger calls attend exactly (backend-cuda.cc).
constexpr int64_t kSageMaxScratchBytes = int64_t{512} << 20;

inline bool sage_head_dim_supported(int64_t hd) { return hd == 64 || hd == 128; }

// Bytes of device scratch launch_sage_attention needs (q, the caches' shape and the table's). seqs: the most table
// rows the rows of q name (-1: every row of the table); a sequence's quantized operands take its whole capacity.
int64_t sage_scratch_bytes(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, bool fp8,
                           int64_t seqs = -1);

// A layer's state slots (sage-state.h) as the kernels take them; slots null: no state.
struct SageStateArgs {
  int32_t* header = nullptr;
  float* means = nullptr;
  unsigned char* blocks = nullptr;
  const int32_t* slots = nullptr;
  int n_slots = 0, nb_max = 0;
  int64_t block_bytes = 0;
};

// q [T, nH * hd] f32 -> out [T, nH * hd] f32 over caches [nBlocks, nKv, B, hd] of any KV dtype; fp8 picks the P V
// operand type (e4m3, else f16). scratch: sage_scratch_bytes of device memory, 256-byte aligned. num_sms: the
// device's, for the kernel's choice of query rows a warp. state: the sequences' slots, or none. seqs: as
// sage_scratch_bytes'; rows naming more sequences are reported (StatusOp::SageSeqs) at the next synchronising call.
void launch_sage_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                           int64_t n_heads, float scale, bool fp8, const Tensor& out, void* scratch, int num_sms,
                           const SageStateArgs& state, int64_t seqs = -1);
// Where a step with slots attends exactly instead (a short step): the slots that start afresh are emptied.
void launch_sage_state_reset(const Ctx& ctx, const SageStateArgs& state, int64_t n_seqs);

namespace detail {
// Where one table row's quantized K, V operand and scales lie (the step's scratch or its state slot): tile j of kv
// head g at base + j * tile + g * head, in bytes; V scales at the K scales' address + v_scale_off. Blocks below
// from_block are the slot's from earlier steps; needs_mean: the row's K mean is computed (else the slot's).
struct SageSeqOperands {
  unsigned char *k8, *v, *scales;
  int64_t k8_tile, k8_head, v_tile, v_head, sc_tile, sc_head, v_scale_off;
  int32_t from_block, needs_mean, slot;
  int32_t index;  // the row's place among the step's quantized sequences: its K sums and mean in scratch
};

// Byte offsets of the scratch's parts (each 256-aligned), for S table rows of which at most Q (seqs; -1: S) have
// rows in the step, G kv heads, capacity C, head dim hd. Per table row: its end, start and operands; per quantized
// sequence (SageSeqOperands::index, given in the order the pre-pass reaches them): its K sums, mean, and where it
// has no state slot, its operands. A mixed step's decode rows attend exactly, so its quantized part names only
// the prompts' rows (Backend::sage_attention): sized by the table, 32 decode rows beside a 32K prompt would take 33
// sequences' 268 MB (Llama-2-7B, fp8) and pass kSageMaxScratchBytes.
struct SageScratch {
  static constexpr int64_t kSpanRows = 512;  // positions per partial K sum of the pre-pass
  int64_t nb, cp, spans, seqs;                                     // 64-position blocks, padded capacity, spans, Q
  int64_t count, seq_end, seq_start, operands, sums, mean, k_scale, v_scale, k8, v, total;  // offsets (bytes)
  static SageScratch of(int64_t S, int64_t G, int64_t C, int64_t hd, bool fp8, int64_t seqs = -1) {
    SageScratch s{};
    const int64_t Q = s.seqs = seqs < 0 ? S : std::max<int64_t>(seqs, 1);  // a place for a report's overflow
    s.nb = (C + kSageBlock - 1) / kSageBlock;
    s.cp = s.nb * kSageBlock;
    s.spans = (C + kSpanRows - 1) / kSpanRows;
    int64_t at = 0;
    auto take = [&](int64_t bytes) {
      const int64_t off = at;
      at += (bytes + 255) / 256 * 256;
      return off;
    };
    s.count = take(4);                           // i32: quantized sequences given an index so far
    s.seq_end = take(S * 4);                     // [S] i32
    s.seq_start = take(S * 4);                   // [S] i32: the least position of the row's tokens
    s.operands = take(S * int64_t(sizeof(SageSeqOperands)));
    s.sums = take(Q * G * s.spans * hd * 4);     // [Q, G, spans, hd] f32
    s.mean = take(Q * G * hd * 4);               // [Q, G, hd] f32
    s.k_scale = take(Q * G * s.nb * 4);          // [Q, G, nb] f32
    s.v_scale = take(Q * G * s.nb * 4);          // [Q, G, nb] f32 (fp8 mode)
    s.k8 = take(Q * G * s.cp * hd);              // [Q, G, cp, hd] i8
    s.v = take(Q * G * s.cp * hd * (fp8 ? 1 : 2));  // [Q, G, cp, hd] f16, or [Q, G, nb, hd, 64] e4m3
    s.total = at;
    return s;
  }
};

// The pre-pass (attention-sage-prepass.cu): the sequences' ends, the K means, int8 K with its scales and the V
// operand, written into scratch at the offsets of sc.
void launch_sage_prepass(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                         const Tensor& kv_block_table, const Tensor& positions, bool fp8, const SageScratch& sc,
                         unsigned char* scratch, const SageStateArgs& state);
}  // namespace detail

}  // namespace weft::cuda
