// carvq-screen.h - screened output head: approximate logits of every row from its 4-bit
// codes (a "fast-scan" of byte tables), then the exact top-k (docs/SCREEN.md).
//
// Self-contained like carvq.h (C11 + libc, no ggml). For one hidden state h:
//   1. carvq_screen_tables_build: per code position j = g*L + l, the 16-entry table of
//      h_g . C[g][l][k], quantized to bytes with one scale for all tables;
//   2. carvq_screen_scan: every row's integer score = the sum of its codes' table bytes,
//      over rows re-laid in blocks of CARVQ_SCREEN_BLOCK (carvq_screen_relayout);
//   3. carvq_screen_hot_add: hot rows add their hot levels' table bytes;
//   4. carvq_screen_select / carvq_screen_topk: the k best rows, exactly (ties: lower id first).
// A row's approximate logit is score * scale + bias (struct carvq_screen_tables). All
// integer steps are exact, so every path (scalar, AVX2, NEON) gives identical scores, and
// src/carvq/screen.py (NumPy) reproduces them bit for bit.

#ifndef CARVQ_SCREEN_H
#define CARVQ_SCREEN_H

#include "carvq.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CARVQ_SCREEN_BLOCK 32 // rows per interleaved block

// Bytes of the re-laid codes: ceil(V / 32) blocks of GLp * 16 bytes, GLp = G*L rounded up
// to even. -1 when the layout fails carvq_layout_check.
int64_t carvq_screen_blocks_nbytes(const struct carvq_layout * l);

// Re-lays the packed codes (V * B bytes, FORMAT.md) into blocks: block b holds, for each
// code position j in 0..GLp-1, 16 bytes whose byte i is code(32b + i, j) | code(32b + 16 + i, j) << 4.
// Rows past V and the padding position j = G*L (odd G*L) hold code 0.
void carvq_screen_relayout(const struct carvq_layout * l, const uint8_t * codes, uint8_t * blocks);

// carvq_screen_relayout for rows [r0, r1) only, into blocks zeroed beforehand (every row is
// OR-ed into its block). Re-laying a large table a slice at a time lets the caller release each
// slice of the source as it goes (llama-carvq.cpp drops the file's mapped pages).
void carvq_screen_relayout_rows(const struct carvq_layout * l, const uint8_t * codes, int64_t r0, int64_t r1,
        uint8_t * blocks);

// The packed codes of one row (B bytes, as in the file) read back from the blocks: the inverse
// of carvq_screen_relayout for row `row` (0 <= row < V, not checked). Lets the lookup decode from
// the blocks, so that the file's copy of the codes need not stay resident beside them.
void carvq_screen_row_codes(const struct carvq_layout * l, const uint8_t * blocks, int64_t row, uint8_t * codes);

// out[i] = the sum over j of tables[j * 16 + code(rows[i], j)], for n rows (0 <= rows[i] < V, not
// checked) read from the blocks: with float tables t[j][c] = h_g . C[g][l][c] a coded head's exact
// logits (FORMAT.md "Coded head") without the file's copy of the codes. Order: two partial sums,
// s[j % 2] += t[j][code] in order of j, then s0 + s1, all float32.
void carvq_screen_rows_sum(const struct carvq_layout * l, const uint8_t * blocks, const int32_t * rows, int64_t n,
        const float * tables, float * out);

struct carvq_screen_tables {
    float   scale;      // logits per score unit
    float   bias;       // approximate logit = score * scale + bias
    int32_t hot_offset; // added to a hot row's score with its hot levels' bytes
    int32_t qmax;       // largest table byte: min(255, 65535 / GLp), so a row's sum fits 16 bits
};

// Floats of work space carvq_screen_tables_build needs: (G*L + G*Lh) * (K + 1).
int64_t carvq_screen_work_floats(const struct carvq_layout * l);

// Tables for hidden state h (n floats). q: GLp * 16 bytes (shared levels), qh: GLhp * 16 bytes
// (hot levels, G*Lh rounded up to even; unused when N == 0). Entries k >= K and the padding
// tables are 0.
// The arithmetic, which src/carvq/screen.py follows exactly:
//   t[j][k]  = sum over i = 0..d-1, in that order, of h[g*d + i] * C[g][l][k][i] (float32, no FMA)
//   lo_j     = min_k t[j][k]; R = max over every table (hot ones too) of max_k t[j][k] - lo_j
//   inv      = qmax / R (float32; 0 when R is 0 or not finite)
//   q[j][k]  = rint((t[j][k] - lo_j) * inv), clamped to 0..qmax (round half to even)
//   scale    = R / qmax; bias = lo_0 + lo_1 + ... (float32, in order of j)
//   hot_offset = rint(hot biases summed the same way * inv)
void carvq_screen_tables_build(const struct carvq_layout * l, const void * codebooks, const void * hot_codebooks,
        enum carvq_codebook_type cb_type, const float * h, float * work, uint8_t * q, uint8_t * qh,
        struct carvq_screen_tables * t);

// scores[r] for the rows r of blocks [b0, b1) (r < V): the sum over j of q[j][code(r, j)].
void carvq_screen_scan(const struct carvq_layout * l, const uint8_t * blocks, const uint8_t * q,
        int64_t b0, int64_t b1, int32_t * scores);
// Same, always the portable scalar path.
void carvq_screen_scan_scalar(const struct carvq_layout * l, const uint8_t * blocks, const uint8_t * q,
        int64_t b0, int64_t b1, int32_t * scores);

// The hot codes in the same block layout (as N rows of Lh levels), for carvq_screen_hot_scan:
// 0 bytes without hot rows, -1 for a bad layout.
int64_t carvq_screen_hot_blocks_nbytes(const struct carvq_layout * l);
void carvq_screen_hot_relayout(const struct carvq_layout * l, const uint8_t * hot_codes, uint8_t * blocks);

// For hot rows j in [j0, j1): scores[hot_ids[j]] += hot_offset + sum over hot codes of qh.
// carvq_screen_hot_scan reads the re-laid hot codes with the scan's SIMD path (qh then needs
// the padding table: (G*Lh rounded up to even) * 16 bytes); carvq_screen_hot_add the packed
// ones, scalar. Both give the same scores.
void carvq_screen_hot_scan(const struct carvq_layout * l, const uint8_t * hot_blocks, const uint8_t * qh,
        int32_t hot_offset, const int32_t * hot_ids, int64_t j0, int64_t j1, int32_t * scores);
void carvq_screen_hot_add(const struct carvq_layout * l, const int32_t * hot_ids, const uint8_t * hot_codes,
        const uint8_t * qh, int32_t hot_offset, int64_t j0, int64_t j1, int32_t * scores);

#define CARVQ_SCREEN_HIST 65536 // bins of the work histogram carvq_screen_select needs

// The min(k, n) rows of highest score, ties broken by lower id, into ids in increasing id
// order; returns their count. O(n): a few passes over the scores and a histogram of CARVQ_SCREEN_HIST
// uint32 (hist, scratch).
int64_t carvq_screen_select(const int32_t * scores, int64_t n, int64_t k, int32_t * ids, uint32_t * hist);

// The same rows, best first (highest score, then lower id). keys: k int64 (scratch).
int64_t carvq_screen_topk(const int32_t * scores, int64_t n, int64_t k, int32_t * ids, uint32_t * hist,
        int64_t * keys);

// A screen index's projection (version 3): out[i] = sum over j = 0..n-1, in that order, of
// projection[j * n + i] * h[j] (float32, no FMA), i.e. out = h @ P with P stored row-major.
// The tables are then built from out, with the index's codebooks.
void carvq_screen_project(int64_t n, const float * projection, const float * h, float * out);

// The screen correction (version 5, FORMAT.md "Screen correction"): rank r directions D (r x n,
// row-major) and int8 coefficients F (r x V, row-major: one plane of V per direction); row v's
// approximate logit gains sum over j of F[j][v] * (D[j] . h). In the scan's integer units:
//   a_j = sum over i = 0..n-1, in that order, of D[j * n + i] * h[i]   (float32, no FMA)
//   m_j = rint(a_j / scale * 256) (float32, round half to even), clamped to +-CARVQ_SCREEN_FIX_MAX
//         (0 when scale is 0 or a_j is not finite)
// carvq_screen_fix_weights writes m (r int32); carvq_screen_fix_add adds, for rows v in
// [v0, v1), (sum over j of F[j][v] * m_j) >> 8 (arithmetic shift: floor) to scores[v].
#define CARVQ_SCREEN_FIX_MAX_RANK 8
#define CARVQ_SCREEN_FIX_MAX 1048576 // 2^20: 8 * 127 * 2^20 < 2^31, the sum fits int32
void carvq_screen_fix_weights(int64_t rank, int64_t n, const float * dirs, const float * h, float scale, int32_t * m);
void carvq_screen_fix_add(int64_t rank, int64_t n_vocab, const int8_t * fix, const int32_t * m, int64_t v0, int64_t v1,
        int32_t * scores);
// "avx2", "neon" or "scalar": the path carvq_screen_scan takes in this build.
const char * carvq_screen_simd_name(void);

#ifdef __cplusplus
}
#endif

#endif // CARVQ_SCREEN_H
