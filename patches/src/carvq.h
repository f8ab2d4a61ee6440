// carvq.h - decoder for CARVQ-compressed token embeddings (docs/FORMAT.md, versions 1 to 7)
//
// Self-contained: C11 + libc only, no ggml / llama.cpp dependency, so it can be unit-tested
// on its own and called from a ggml custom op (each of nth threads decodes a slice of rows).
//
// Only the RVQ part of the decode lives here; the optional adaptor (sigma0 -> up -> act ->
// down) is two matrix multiplies that the caller does with ggml.
//
// Build requirements:
//   - compile carvq.c with -ffp-contract=off (the file also sets it with pragmas/attributes;
//     the flag makes it hold for every compiler), and never with -ffast-math: the RVQ sum
//     must be bit-exact with src/carvq/reference.py.
//   - SIMD paths are chosen at compile time: AVX (F32) / F16C (F16) on x86, SSE2 as the
//     x86-64 baseline, NEON on ARM (F16 on AArch64). Define CARVQ_NO_SIMD to build the
//     scalar path only.
//
// Typical use (a loader):
//   struct carvq_layout l = { V, n, CARVQ_FORMAT_VERSION, d, L, K, m, h };
//   if (carvq_layout_check(&l, err, sizeof(err))) -> refuse the file (err says why)
//   compare carvq_layout_codes_ne / carvq_layout_codebooks_ne with the tensors' ne
//   if (carvq_codes_check(&l, codes, err, sizeof(err))) -> refuse the file
//   with hot rows (l.hot_rows > 0), also carvq_layout_hot_*_ne and carvq_hot_check
// and per batch (a ggml custom op, thread ith of nth):
//   if (carvq_ids_check(&l, ids, n_ids, err, sizeof(err))) -> abort / report
//   carvq_rows_decode(&l, codes, codebooks, type, ids, n_ids, out, n, first, last)
//   carvq_rows_hot_add(&l, hot_ids, hot_codes, hot_codebooks, type, ids, n_ids, out, n, first, last)
//   with [first, last) this thread's slice of [0, n_ids).

#ifndef CARVQ_H
#define CARVQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CARVQ_FORMAT_VERSION     8 // newest version; every version from CARVQ_MIN_FORMAT_VERSION is read
                                   // (3 = 2 + the output head's optional screen index, docs/SCREEN.md;
                                   //  4 = 3 + hot rows in tiers; 5 = 4 + the screen correction;
                                   //  6 = 5 + the lookup transform; 7 = 6 + the hot map;
                                   //  8 = 7 + the coded head: a tied head read from the lookup's codes)
#define CARVQ_MIN_FORMAT_VERSION 1 // version 1 = version 2 without hot rows

// general.architecture values a CARVQ file may name (FORMAT.md "Architectures"): the graphs
// that read the input embedding only through llama.cpp's build_inp_embd and the head only
// through its lora-aware matmul; space-separated
#define CARVQ_ARCHITECTURES "llama qwen2 qwen3 gemma3 phi3"

// limits from FORMAT.md ("Metadata keys")
#define CARVQ_MAX_LEVELS          16
#define CARVQ_MIN_CODEBOOK_SIZE    2
#define CARVQ_MAX_CODEBOOK_SIZE   16
#define CARVQ_MAX_ADAPTOR_RANK  1024
#define CARVQ_MAX_ADAPTOR_HIDDEN 65536
#define CARVQ_MAX_HOT_TIERS        8

// Shape parameters of one CARVQ embedding. Field order is part of the ABI (120 bytes; checked
// with static_assert in carvq.c).
struct carvq_layout {
    int64_t n_vocab;         // V
    int64_t n_embd;          // n
    int32_t format_version;  // carvq.format_version, CARVQ_MIN_FORMAT_VERSION..CARVQ_FORMAT_VERSION
    int32_t group_size;      // d, n % d == 0
    int32_t levels;          // L, 1..16
    int32_t codebook_size;   // K, 2..16
    int32_t adaptor_rank;    // m, 0..1024
    int32_t adaptor_hidden;  // h, 0..65536, 0 iff m == 0
    int64_t hot_rows;        // N, 0..V: rows with extra levels (version 2; 0 in version 1)
    int32_t hot_levels;      // Lh, 0..16, 0 iff N == 0
    int32_t hot_tiers;       // T: 0 or 1 = the N hot rows are one tier; 2..8 (version 4): they are
                             // T consecutive tiers, tier t of hot_tier_rows[t] >= 1 rows (sum N),
                             // each with Lh levels and codebooks of its own
    int64_t hot_tier_rows[8]; // CARVQ_MAX_HOT_TIERS entries; only the first T are read
};

// element type of token_embd.carvq.codebooks (values match nothing in ggml on purpose)
enum carvq_codebook_type {
    CARVQ_CODEBOOK_F32 = 0,
    CARVQ_CODEBOOK_F16 = 1,
};

// ---- layout -------------------------------------------------------------------------------

// 0 when the layout is valid (FORMAT.md "Validation": version, ranges, n % d, and every byte
// size below fits in int64_t and size_t); otherwise non-zero and a one-line message in err
// (err may be NULL; the message is truncated to err_size - 1 chars and NUL-terminated).
int carvq_layout_check(const struct carvq_layout * l, char * err, size_t err_size);

// Derived sizes. All return -1 when the layout fails carvq_layout_check.
int64_t carvq_layout_n_groups      (const struct carvq_layout * l);  // G = n / d
int64_t carvq_layout_code_row_bytes(const struct carvq_layout * l);  // B = ceil(G*L / 2)
int64_t carvq_layout_codes_nbytes  (const struct carvq_layout * l);  // V * B
int64_t carvq_layout_codebooks_nelements(const struct carvq_layout * l);  // G*L*K*d
int64_t carvq_layout_codebooks_nbytes(const struct carvq_layout * l, enum carvq_codebook_type type);

// Expected tensor shapes in ggml ne order (fastest axis first), for an exact shape compare:
// codes ne = { B, V }, codebooks ne = { d, K, L, G }. Return 0, or -1 (ne untouched) when
// the layout fails carvq_layout_check.
int carvq_layout_codes_ne    (const struct carvq_layout * l, int64_t ne[2]);
int carvq_layout_codebooks_ne(const struct carvq_layout * l, int64_t ne[4]);
// hot rows (only meaningful when N > 0): hot_ids ne = { N }, hot_codes ne = { Bh, N } with
// Bh = ceil(G*Lh / 2), hot_codebooks ne = { d, K, Lh, T*G } (T = 1 unless hot_tiers >= 2).
int carvq_layout_hot_codes_ne    (const struct carvq_layout * l, int64_t ne[2]);
int carvq_layout_hot_codebooks_ne(const struct carvq_layout * l, int64_t ne[4]);
// The hot tiers: T (1 when hot_tiers < 2), and N_t, the rows of tier t in 0..T-1 (N when
// hot_tiers < 2). Unchecked, for hot loops: the layout must have passed carvq_layout_check.
int64_t carvq_layout_hot_tier_count(const struct carvq_layout * l);
int64_t carvq_layout_hot_tier_rows (const struct carvq_layout * l, int64_t t);

// ---- data checks (the layout must have passed carvq_layout_check) ------------------------

// Scans all V rows of the packed codes (V * B bytes). Non-zero when a code is >= K or, for
// odd G*L, the padding nibble of a row's last byte is not zero; err names the first bad row.
int carvq_codes_check(const struct carvq_layout * l, const uint8_t * codes, char * err, size_t err_size);

// With N hot rows: non-zero unless each tier's hot_ids are strictly increasing ids in 0..V-1
// and every hot code (N * Bh bytes) is < K with zero padding nibbles; err names the first bad entry.
int carvq_hot_check(const struct carvq_layout * l, const int32_t * hot_ids, const uint8_t * hot_codes,
        char * err, size_t err_size);

// Format v7 (carvq.hot_map): the hot rows' ids stored as nested bitmaps (FORMAT.md "Hot map").
// Bytes of token_embd.carvq.hot_map, or -1 when the layout fails carvq_layout_check or has no hot rows.
int64_t carvq_layout_hot_map_nbytes(const struct carvq_layout * l);
// Expands hot_map (map_bytes bytes) into hot_ids (N entries, tier after tier, each tier strictly
// increasing), what a file of version <= 6 stores. Non-zero when map_bytes is not the layout's,
// a tier's bitmap does not mark exactly its rows, or a padding bit is set; err says which.
int carvq_hot_map_expand(const struct carvq_layout * l, const uint8_t * hot_map, int64_t map_bytes, int32_t * hot_ids,
        char * err, size_t err_size);

// Non-zero when some ids[i] is outside 0..V-1; err names the first such position and id.
int carvq_ids_check(const struct carvq_layout * l, const int32_t * ids, int64_t n_ids, char * err, size_t err_size);

// ---- decode -------------------------------------------------------------------------------

// Decodes the RVQ part of rows first..last-1 of the id list: for r in [first, last), writes
// the n floats of token ids[r] to out + r * out_row_stride (stride in floats, >= n). Only
// those n floats of those rows are written, so threads may share one out buffer.
// [first, last) is clamped to [0, n_ids); a stride below n writes nothing (rows would
// overlap). Preconditions (not checked here, for speed): the
// layout, codes and ids passed the checks above; codebooks holds G*L*K*d elements of
// cb_type; out does not overlap codes or codebooks.
// Bit-exact with src/carvq/reference.py decode_rvq: each element is ((0 + c_0) + c_1) + ... +
// c_{L-1} in float32, F16 codebook values converted exactly. This holds for every non-NaN
// result in the default FP environment (no flush-to-zero / denormals-are-zero). Where two
// NaNs meet, which payload survives depends on operand order, which neither C compilers nor
// NumPy fix for a commutative add; such a result is a NaN on every path.
// Reads stay inside the G*L*K*d codebook elements (no padding needed).
void carvq_rows_decode(
        const struct carvq_layout * l,
        const uint8_t  * codes,
        const void     * codebooks,
        enum carvq_codebook_type cb_type,
        const int32_t  * ids,
        int64_t          n_ids,
        float          * out,
        int64_t          out_row_stride,
        int64_t          first,
        int64_t          last);

// Same contract, always the portable scalar path (for tests and benchmarks).
void carvq_rows_decode_scalar(
        const struct carvq_layout * l,
        const uint8_t  * codes,
        const void     * codebooks,
        enum carvq_codebook_type cb_type,
        const int32_t  * ids,
        int64_t          n_ids,
        float          * out,
        int64_t          out_row_stride,
        int64_t          first,
        int64_t          last);

// Hot part of the decode, after carvq_rows_decode on the same rows: for each tier in order,
// each row r in [first, last) whose token is a row j of the tier (found by binary search in
// the tier's slice of hot_ids) continues its sums with the tier's levels:
// out = ((out + h_0) + h_1) + ... + h_{Lh-1}, in float32, bit-exact with
// src/carvq/reference.py add_hot. Other rows are left alone; a no-op when N == 0. Same
// preconditions as carvq_rows_decode, plus carvq_hot_check.
void carvq_rows_hot_add(
        const struct carvq_layout * l,
        const int32_t  * hot_ids,
        const uint8_t  * hot_codes,
        const void     * hot_codebooks,
        enum carvq_codebook_type cb_type,
        const int32_t  * ids,
        int64_t          n_ids,
        float          * out,
        int64_t          out_row_stride,
        int64_t          first,
        int64_t          last);

// carvq_rows_hot_add's sums for one row whose place is known: out (n floats) continues with the
// levels of hot row j (0 <= j < N, an index into hot_codes, not checked), a row of tier t, with
// that tier's codebooks. For a caller that finds a token's hot rows by its own index
// (llama-carvq.cpp's tier bitmaps) instead of a search of hot_ids.
void carvq_hot_row_add(
        const struct carvq_layout * l,
        int64_t          t,
        int64_t          j,
        const uint8_t  * hot_codes,
        const void     * hot_codebooks,
        enum carvq_codebook_type cb_type,
        float          * out);

// Dense products of decoded rows with states (a coded head's logits for many outputs):
// out[s * ld + r] = sum over i < n of rows[r * n + i] * hs[s * n + i], for r < n_rows, s < n_states;
// nothing when ld < n_rows. Each product is summed in one order whatever the batch (carvq.c
// names it): within a build, a logit does not depend on the rows or states beside it.
void carvq_rows_dot(const float * rows, int64_t n_rows, const float * hs, int64_t n_states, int64_t n, float * out,
        int64_t ld);

// Which path carvq_rows_decode takes for cb_type in this build:
// "avx", "f16c", "sse2", "neon" or "scalar".
const char * carvq_simd_name(enum carvq_codebook_type cb_type);

// Exact IEEE 754 binary16 -> binary32 conversion (all values, subnormals, inf; NaN payload kept).
float carvq_fp16_to_fp32(uint16_t h);

#ifdef __cplusplus
}
#endif

#endif // CARVQ_H
