// A host check of quant-mma-rows-bench.cu's fragment mapping, no GPU needed: one m16 tile over all of K, each lane's
// A and B registers built as the kernel builds them (its 32 columns a row per 128-column superchunk, f16 pairs as
// its unpacking yields them, x's pairs staged in its order), then mma.sync.m16n8k16's fragment layout (PTX ISA:
// A regs {row g, k 2t..2t+1}, {row g+8, same}, {row g, k 2t+8..2t+9}, {row g+8, same}; B {k 2t..2t+1, n g},
// {k 2t+8..2t+9, n g}; D {row g, n 2t..2t+1}, {row g+8, same}) applied to them. Column 0 of D must be each row's
// exact dot product with x, for int4 codes and for int8 values. Run by quant-mma-rows-run.sh before the bench.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// The kernel's pair_column: lane column t's pair p in superchunk q is columns (c, c + step).
int pair_column(bool int8, int q, int t, int p) {
  return int8 ? 128 * q + 32 * t + 4 * (p / 2) + 2 * (p % 2) : 128 * q + 32 * t + 8 * (p / 4) + p % 4;
}

// Rows of weights w [16][K] (int4: values -8..7, stored as codes + 8 two a byte; int8: bytes), x [K]: bad rows.
int check(bool int8, int K, unsigned seed) {
  srand(seed);
  std::vector<int> w(16 * K);
  std::vector<double> x(K);
  for (int& v : w) v = int8 ? (rand() & 255) - 128 : (rand() & 15) - 8;
  for (double& v : x) v = (rand() % 17) - 8;
  std::vector<uint8_t> bytes(int8 ? 16 * K : 8 * K);  // the row-major storage the stage holds
  for (int i = 0; i < 16 * K; ++i) {
    if (int8) bytes[i] = static_cast<uint8_t>(w[i]);
    else bytes[i / 2] |= static_cast<uint8_t>((w[i] + 8) << (4 * (i % 2)));
  }
  const int row_bytes = int8 ? K : K / 2, lane_bytes = int8 ? 32 : 16, step = int8 ? 1 : 4;
  std::vector<double> d(16 * 8, 0.0);
  for (int q = 0; q < K / 128; ++q) {
    double a[32][2][16][2], b[32][16][2];  // lane, row half, pair, element
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int half = 0; half < 2; ++half) {
        const uint8_t* src = &bytes[(g + 8 * half) * row_bytes + 4 * lane_bytes * q + lane_bytes * t];
        for (int word = 0; word < lane_bytes / 4; ++word) {
          const uint32_t u = src[4 * word] | src[4 * word + 1] << 8 | src[4 * word + 2] << 16 | static_cast<uint32_t>(src[4 * word + 3]) << 24;
          if (int8) {
            for (int i = 0; i < 2; ++i)  // byte_perm 0x5140 / 0x7362: bytes (2i, 2i + 1)
              for (int e = 0; e < 2; ++e) a[lane][half][2 * word + i][e] = static_cast<int8_t>(u >> (8 * (2 * i + e)));
          } else {
            for (int i = 0; i < 4; ++i)  // nibbles i and i + 4, less 8
              for (int e = 0; e < 2; ++e) a[lane][half][4 * word + i][e] = static_cast<int>((u >> (4 * (i + 4 * e))) & 15) - 8;
          }
        }
      }
      for (int p = 0; p < 16; ++p) {
        const int c = pair_column(int8, q, t, p);
        b[lane][p][0] = x[c];
        b[lane][p][1] = x[c + step];
      }
    }
    for (int j = 0; j < 8; ++j) {
      double A[16][16], B[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 2; ++e) {
          A[g][2 * t + e] = a[lane][0][2 * j][e];
          A[g + 8][2 * t + e] = a[lane][1][2 * j][e];
          A[g][2 * t + 8 + e] = a[lane][0][2 * j + 1][e];
          A[g + 8][2 * t + 8 + e] = a[lane][1][2 * j + 1][e];
          B[2 * t + e][g] = b[lane][2 * j][e];
          B[2 * t + 8 + e][g] = b[lane][2 * j + 1][e];
        }
      }
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 8; ++n)
          for (int k = 0; k < 16; ++k) d[r * 8 + n] += A[r][k] * B[k][n];
    }
  }
  int bad = 0;
  for (int r = 0; r < 16; ++r) {
    double want = 0;
    for (int c = 0; c < K; ++c) want += w[r * K + c] * x[c];
    bad += d[r * 8] != want;
  }
  return bad;
}

}  // namespace

int main() {
  const int bad4 = check(false, 512, 1), bad8 = check(true, 1024, 2);
  std::printf("quant-mma-rows layout: int4 %d of 16 rows wrong, int8 %d of 16\n", bad4, bad8);
  return bad4 + bad8 == 0 ? 0 : 1;
}
