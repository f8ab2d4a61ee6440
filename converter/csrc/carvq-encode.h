// carvq-encode.h - the converter's residual encoder: every sub-vector's codes by beam search
// through the levels of its group's codebooks (converter/rvq.py's encode, written in C).
//
// Why C: in PyTorch the search spent its time in small reductions (a min over 64 candidates,
// gathers of 4 paths) at a few GB/s: LLaMA-3.2-1B's shape at 3.0 bpw (6 + 4 levels) took
// minutes a pass. Here 8 sub-vectors are searched side by side in vector lanes (GCC/Clang
// vector extensions: AVX on x86, NEON on Arm); at beam 4 about 60 ns a sub-vector and level on
// one core, 15x PyTorch's on two (bench numbers in docs/RESULTS.md, session 31).
//
// Self-contained: C11 + libc + GCC/Clang vector extensions. Compile with -ffp-contract=off: the
// distances are float32 sums in a fixed order, the same as the NumPy reference in
// tests/test_encode.py, so the codes are too.
//
// Search (beam B): a sub-vector x starts as one path with residual x. At each level every path
// r and centroid c give a candidate of error ||r - c||^2 (summed over the d components in
// order, in float32); the B candidates of least error survive, ties to the earlier path and
// then the earlier centroid. The codes are the surviving path of least error at the last
// level. B = 1 is greedy residual quantization; with one level it is nearest-centroid
// assignment.

#ifndef CARVQ_ENCODE_H
#define CARVQ_ENCODE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CARVQ_ENCODE_MAX_BEAM   16
#define CARVQ_ENCODE_MAX_LEVELS 32
#define CARVQ_ENCODE_MAX_K      256
#define CARVQ_ENCODE_MAX_D      64

// Encodes rows [0, n_rows) of x. Element j of group g of row r is
// x[r * x_row_stride + g * x_group_stride + j]; codebooks are (n_groups, n_levels, k, d)
// float32, contiguous. The code of level l of group g of row r goes to
// codes[r * c_row_stride + g * c_group_stride + l].
// Returns 0, or -1 when a size is out of range (nothing written).
int32_t carvq_rows_encode(const float * x, int64_t n_rows, int64_t x_row_stride, int64_t x_group_stride,
                          const float * codebooks, int32_t n_groups, int32_t n_levels, int32_t k, int32_t d,
                          int32_t beam, uint8_t * codes, int64_t c_row_stride, int64_t c_group_stride);

// The polish's two passes over rows of varying depth (converter/polish.py). codes are (n_rows,
// n_groups, n_levels) uint8 and row r keeps its first depth[r] levels; codebooks (n_groups,
// n_levels, k, d) float32. Both work on the groups [g0, g1) only, so that threads can share the
// rows by groups without sharing an output.
//
// out[r][g][:] = the sum of row r's kept levels of group g in level order, level `skip` left
// out (skip < 0: none), in float32 from zero: the polish's decode.
void carvq_rows_levels_sum(const uint8_t * codes, const int32_t * depth, int64_t n_rows, const float * codebooks,
                           int32_t n_groups, int32_t n_levels, int32_t k, int32_t d, int32_t skip, int32_t g0,
                           int32_t g1, float * out);

// One k-means step's statistics of level `level`, over the rows that keep it (depth[r] > level):
// left = x_r - (the row's other kept levels, as carvq_rows_levels_sum), per group; with
// `reassign`, the row's code of the level first becomes the centroid nearest to left (the
// encoder's distance and tie rule); then num[g][c][:] += w[r] * left and mass[g][c] += w[r],
// c the row's code, in row order. x is (n_rows, n_groups * d) float32, num (n_groups, k, d)
// and mass (n_groups, k) float64, both added to.
void carvq_level_refit(const float * x, uint8_t * codes, const int32_t * depth,
                       const double * w, int64_t n_rows, const float * codebooks, int32_t n_groups, int32_t n_levels,
                       int32_t k, int32_t d, int32_t level, int32_t reassign, int32_t g0, int32_t g1, double * num,
                       double * mass);

#ifdef __cplusplus
}
#endif

#endif // CARVQ_ENCODE_H
