// carvq-screen.c - screened output head (see carvq-screen.h and docs/SCREEN.md).
// Build with -ffp-contract=off and without -ffast-math: the tables are specified bit-exact.

#include "carvq-screen.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "carvq-screen.c must not be compiled with -ffast-math (its tables are specified bit-exact)"
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize ("fp-contract=off")
#endif

#if !defined(CARVQ_NO_SIMD)
#  if defined(__AVX2__)
#    define CARVQ_SCREEN_AVX2 1
#    include <immintrin.h>
#  elif defined(__ARM_NEON) && defined(__aarch64__)
#    define CARVQ_SCREEN_NEON 1
#    include <arm_neon.h>
#  endif
#endif

#define CARVQ_SCREEN_HALF (CARVQ_SCREEN_BLOCK / 2) // rows per nibble of a block byte

// the derived sizes the screen needs, from a valid layout
struct carvq_screen_geom {
    int64_t G, GL, GLp, GLh, Bh, block_bytes, n_blocks;
};

static int carvq_screen_geom_init(const struct carvq_layout * l, struct carvq_screen_geom * s) {
    if (carvq_layout_check(l, NULL, 0) != 0) {
        return 1;
    }
    s->G = l->n_embd / l->group_size;
    s->GL = s->G * l->levels;
    s->GLp = s->GL + (s->GL & 1);
    s->GLh = s->G * l->hot_levels;
    s->Bh = s->GLh / 2 + (s->GLh & 1);
    s->block_bytes = s->GLp * 16;
    s->n_blocks = (l->n_vocab + CARVQ_SCREEN_BLOCK - 1) / CARVQ_SCREEN_BLOCK;
    return 0;
}

static inline unsigned carvq_screen_code(const uint8_t * crow, int64_t j) {
    return (crow[j >> 1] >> ((j & 1) * 4)) & 15u;
}

// Where row r lives in the blocks: its byte of code position 0 (position j's is 16 * j bytes
// further), and the shift of its nibble there
static inline int64_t carvq_screen_row_offset(const struct carvq_screen_geom * s, int64_t r) {
    return (r / CARVQ_SCREEN_BLOCK) * s->block_bytes + r % CARVQ_SCREEN_HALF;
}

static inline int carvq_screen_row_shift(int64_t r) {
    return r % CARVQ_SCREEN_BLOCK < CARVQ_SCREEN_HALF ? 0 : 4;
}

int64_t carvq_screen_blocks_nbytes(const struct carvq_layout * l) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return -1;
    }
    // n_blocks * GLp * 16 <= (V/32 + 1) * (G*L + 1) * 16, about the codes' own size: no overflow
    // for a layout carvq_layout_check accepted
    return s.n_blocks * s.block_bytes;
}

void carvq_screen_relayout(const struct carvq_layout * l, const uint8_t * codes, uint8_t * blocks) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return;
    }
    memset(blocks, 0, (size_t) (s.n_blocks * s.block_bytes));
    carvq_screen_relayout_rows(l, codes, 0, l->n_vocab, blocks);
}

void carvq_screen_relayout_rows(const struct carvq_layout * l, const uint8_t * codes, int64_t r0, int64_t r1,
        uint8_t * blocks) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return;
    }
    const int64_t B = carvq_layout_code_row_bytes(l);
    for (int64_t r = r0 < 0 ? 0 : r0; r < r1 && r < l->n_vocab; ++r) {
        const uint8_t * crow = codes + r * B;
        uint8_t * p = blocks + carvq_screen_row_offset(&s, r);
        const int shift = carvq_screen_row_shift(r);
        for (int64_t j = 0; j < s.GL; ++j) {
            p[j * 16] |= (uint8_t) (carvq_screen_code(crow, j) << shift);
        }
    }
}

void carvq_screen_row_codes(const struct carvq_layout * l, const uint8_t * blocks, int64_t row, uint8_t * codes) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return;
    }
    const uint8_t * p = blocks + carvq_screen_row_offset(&s, row);
    const int shift = carvq_screen_row_shift(row);
    memset(codes, 0, (size_t) carvq_layout_code_row_bytes(l));
    for (int64_t j = 0; j < s.GL; ++j) {
        const unsigned c = (p[j * 16] >> shift) & 15u;
        codes[j >> 1] |= (uint8_t) (c << ((j & 1) * 4));
    }
}

#if defined(__GNUC__) || defined(__clang__)
#  define CARVQ_PREFETCH(p) __builtin_prefetch(p)
#else
#  define CARVQ_PREFETCH(p) ((void) (p))
#endif
#define CARVQ_ROWS_SUM_LANES 8 // rows summed side by side
#define CARVQ_ROWS_SUM_AHEAD 2 // groups of rows ahead whose bytes are prefetched

void carvq_screen_rows_sum(const struct carvq_layout * l, const uint8_t * blocks, const int32_t * rows, int64_t n,
        const float * tables, float * out) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return;
    }
    // A row's bytes lie 16 apart over GLp * 16 bytes (one byte in 32 of every cache line it
    // touches): memory-bound. Summing 8 rows side by side, while prefetching the rows two groups
    // ahead, keeps many lines in flight (2.3x one row at a time with Gemma-3's shape).
    enum { LANES = CARVQ_ROWS_SUM_LANES, AHEAD = CARVQ_ROWS_SUM_AHEAD * CARVQ_ROWS_SUM_LANES };
    for (int64_t i0 = 0; i0 < n; i0 += LANES) {
        const int64_t m = n - i0 < LANES ? n - i0 : LANES;
        const uint8_t * p[LANES];
        const uint8_t * next[LANES];
        int shift[LANES];
        float even[LANES], odd[LANES];
        for (int64_t r = 0; r < LANES; ++r) {
            const int64_t row = rows[i0 + (r < m ? r : 0)];
            p[r] = blocks + carvq_screen_row_offset(&s, row);
            shift[r] = carvq_screen_row_shift(row);
            even[r] = odd[r] = 0.0f;
            next[r] = blocks + carvq_screen_row_offset(&s, i0 + AHEAD + r < n ? rows[i0 + AHEAD + r] : row);
        }
        int64_t j = 0;
        for (; j + 1 < s.GL; j += 2) {
            if ((j & 3) == 0) { // a cache line holds 4 positions
                for (int64_t r = 0; r < LANES; ++r) {
                    CARVQ_PREFETCH(next[r] + j * 16);
                }
            }
            for (int64_t r = 0; r < LANES; ++r) {
                even[r] += tables[j * 16 + ((p[r][j * 16] >> shift[r]) & 15u)];
                odd[r] += tables[(j + 1) * 16 + ((p[r][(j + 1) * 16] >> shift[r]) & 15u)];
            }
        }
        if (j < s.GL) { // odd G*L: the last position
            for (int64_t r = 0; r < LANES; ++r) {
                even[r] += tables[j * 16 + ((p[r][j * 16] >> shift[r]) & 15u)];
            }
        }
        for (int64_t r = 0; r < m; ++r) {
            out[i0 + r] = even[r] + odd[r];
        }
    }
}

// The hot levels as a code table of their own: N rows of Lh levels (for the block layout)
static struct carvq_layout carvq_screen_hot_as_rows(const struct carvq_layout * l) {
    struct carvq_layout h = *l;
    h.n_vocab = l->hot_rows;
    h.levels = l->hot_levels;
    h.hot_rows = 0;
    h.hot_levels = 0;
    return h;
}

int64_t carvq_screen_hot_blocks_nbytes(const struct carvq_layout * l) {
    if (carvq_layout_check(l, NULL, 0) != 0) {
        return -1;
    }
    if (l->hot_rows == 0) {
        return 0;
    }
    const struct carvq_layout h = carvq_screen_hot_as_rows(l);
    return carvq_screen_blocks_nbytes(&h);
}

void carvq_screen_hot_relayout(const struct carvq_layout * l, const uint8_t * hot_codes, uint8_t * blocks) {
    if (l->hot_rows > 0) {
        const struct carvq_layout h = carvq_screen_hot_as_rows(l);
        carvq_screen_relayout(&h, hot_codes, blocks);
    }
}

int64_t carvq_screen_work_floats(const struct carvq_layout * l) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return -1;
    }
    return (s.GL + s.GLh) * (l->codebook_size + 1); // the tables, then their minima
}

// ---- tables ------------------------------------------------------------------------------

// t[j][k] for the `levels` tables of one codebook tensor (G, levels, K, d), j = g*levels + l
static void carvq_screen_dots(const struct carvq_layout * l, const void * cb, enum carvq_codebook_type type,
        int64_t levels, const float * h, float * t) {
    const int64_t d = l->group_size, K = l->codebook_size, G = l->n_embd / d;
    for (int64_t j = 0; j < G * levels; ++j) {
        const float * hg = h + (j / levels) * d;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t e = (j * K + k) * d;
            float acc = 0.0f;
            for (int64_t i = 0; i < d; ++i) {
                const float c = type == CARVQ_CODEBOOK_F16 ? carvq_fp16_to_fp32(((const uint16_t *) cb)[e + i])
                                                           : ((const float *) cb)[e + i];
                acc = acc + hg[i] * c;
            }
            t[j * K + k] = acc;
        }
    }
}

// per table: its minimum into lo[j]; returns the largest max - min over the tables
static float carvq_screen_ranges(const float * t, int64_t n_tables, int64_t K, float * lo, float R) {
    for (int64_t j = 0; j < n_tables; ++j) {
        float mn = t[j * K], mx = t[j * K];
        for (int64_t k = 1; k < K; ++k) {
            mn = t[j * K + k] < mn ? t[j * K + k] : mn;
            mx = t[j * K + k] > mx ? t[j * K + k] : mx;
        }
        lo[j] = mn;
        const float r = mx - mn;
        R = r > R ? r : R; // a NaN range never wins; a NaN table is caught by !isfinite below
    }
    return R;
}

static uint8_t carvq_screen_quant(float x, float inv, int32_t qmax) {
    const float v = nearbyintf(x * inv); // default rounding: to nearest, ties to even (np.rint)
    if (!(v > 0.0f)) {
        return 0; // negative, zero or NaN
    }
    return v >= (float) qmax ? (uint8_t) qmax : (uint8_t) v;
}

static void carvq_screen_quantize(const float * t, const float * lo, int64_t n_tables, int64_t K, float inv,
        int32_t qmax, uint8_t * q) {
    for (int64_t j = 0; j < n_tables; ++j) {
        for (int64_t k = 0; k < 16; ++k) {
            q[j * 16 + k] = k < K ? carvq_screen_quant(t[j * K + k] - lo[j], inv, qmax) : 0;
        }
    }
}

static float carvq_screen_sum(const float * x, int64_t n) {
    float s = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        s = s + x[j];
    }
    return s;
}

void carvq_screen_tables_build(const struct carvq_layout * l, const void * codebooks, const void * hot_codebooks,
        enum carvq_codebook_type cb_type, const float * h, float * work, uint8_t * q, uint8_t * qh,
        struct carvq_screen_tables * t) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return;
    }
    const int64_t K = l->codebook_size;
    float * ts = work;                         // GL * K
    float * th = ts + s.GL * K;                // GLh * K
    float * lo = th + s.GLh * K;               // GL + GLh minima
    carvq_screen_dots(l, codebooks, cb_type, l->levels, h, ts);
    if (s.GLh > 0) {
        carvq_screen_dots(l, hot_codebooks, cb_type, l->hot_levels, h, th);
    }
    const int32_t qmax = (int32_t) (65535 / s.GLp < 255 ? 65535 / s.GLp : 255);
    float R = carvq_screen_ranges(ts, s.GL, K, lo, 0.0f);
    R = carvq_screen_ranges(th, s.GLh, K, lo + s.GL, R);
    const float inv = R > 0.0f && isfinite(R) ? (float) qmax / R : 0.0f;
    carvq_screen_quantize(ts, lo, s.GL, K, inv, qmax, q);
    if (s.GLp > s.GL) {
        memset(q + s.GL * 16, 0, 16);
    }
    if (s.GLh > 0) {
        carvq_screen_quantize(th, lo + s.GL, s.GLh, K, inv, qmax, qh);
        if (s.GLh & 1) {
            memset(qh + s.GLh * 16, 0, 16); // the padding table of the hot blocks
        }
    }
    t->qmax = qmax;
    t->scale = inv > 0.0f ? R / (float) qmax : 0.0f;
    t->bias = carvq_screen_sum(lo, s.GL);
    const float off = nearbyintf(carvq_screen_sum(lo + s.GL, s.GLh) * inv);
    // a hot bias huge against R (almost constant tables) is clamped; NaN counts as 0
    t->hot_offset = (int32_t) (off > 1e9f ? 1e9f : off < -1e9f ? -1e9f : (off == off ? off : 0.0f));
}

// ---- scan --------------------------------------------------------------------------------

// one block, scalar: out[i] for its 32 rows
static void carvq_screen_block_scalar(const uint8_t * blk, const uint8_t * q, int64_t GLp, int32_t * out) {
    for (int64_t i = 0; i < CARVQ_SCREEN_BLOCK; ++i) {
        const int shift = i < CARVQ_SCREEN_HALF ? 0 : 4;
        int32_t acc = 0;
        for (int64_t j = 0; j < GLp; ++j) {
            acc += q[j * 16 + ((blk[j * 16 + (i % CARVQ_SCREEN_HALF)] >> shift) & 15)];
        }
        out[i] = acc;
    }
}

#if defined(CARVQ_SCREEN_AVX2)
// One block, AVX2: two code positions per step. A 32-byte load holds positions j and j+1 in
// its two lanes, and so do the two tables; pshufb looks up the low nibbles (rows 0..15) and
// the high nibbles (rows 16..31). The byte results are summed as 16-bit words (a word = even
// row + 256 * odd row, wrapping) and, shifted right by 8, as the odd rows alone; at the end
// even = words - (odd << 8). Exact because every row's sum is below 65536 (qmax).
static void carvq_screen_block_avx2(const uint8_t * blk, const uint8_t * q, int64_t GLp, int32_t * out) {
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256i lo_w = _mm256_setzero_si256(), lo_odd = _mm256_setzero_si256();
    __m256i hi_w = _mm256_setzero_si256(), hi_odd = _mm256_setzero_si256();
    for (int64_t j = 0; j < GLp; j += 2) {
        const __m256i x = _mm256_loadu_si256((const __m256i *) (const void *) (blk + j * 16));
        const __m256i t = _mm256_loadu_si256((const __m256i *) (const void *) (q + j * 16));
        const __m256i r_lo = _mm256_shuffle_epi8(t, _mm256_and_si256(x, nib));
        const __m256i r_hi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(x, 4), nib));
        lo_w   = _mm256_add_epi16(lo_w, r_lo);
        lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16(r_lo, 8));
        hi_w   = _mm256_add_epi16(hi_w, r_hi);
        hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16(r_hi, 8));
    }
    const __m256i acc[2][2] = { { lo_w, lo_odd }, { hi_w, hi_odd } };
    for (int half = 0; half < 2; ++half) {
        const __m256i even = _mm256_sub_epi16(acc[half][0], _mm256_slli_epi16(acc[half][1], 8));
        // the two lanes are positions j and j+1 of the same rows: add them
        const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
        const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(acc[half][1]), _mm256_extracti128_si256(acc[half][1], 1));
        const __m128i rows_0_7  = _mm_unpacklo_epi16(e, o); // rows 0..7 of this half, 16-bit
        const __m128i rows_8_15 = _mm_unpackhi_epi16(e, o);
        int32_t * o32 = out + half * CARVQ_SCREEN_HALF;
        _mm256_storeu_si256((__m256i *) (void *) o32,       _mm256_cvtepu16_epi32(rows_0_7));
        _mm256_storeu_si256((__m256i *) (void *) (o32 + 8), _mm256_cvtepu16_epi32(rows_8_15));
    }
}
#define carvq_screen_block carvq_screen_block_avx2
#define CARVQ_SCREEN_SIMD_NAME "avx2"
#elif defined(CARVQ_SCREEN_NEON)
// One block, NEON: per code position, tbl looks up the low nibbles (rows 0..15) and the high
// nibbles (rows 16..31); widening adds keep four 8-row 16-bit sums (each below 65536).
static void carvq_screen_block_neon(const uint8_t * blk, const uint8_t * q, int64_t GLp, int32_t * out) {
    const uint8x16_t nib = vdupq_n_u8(0x0f);
    uint16x8_t a0 = vdupq_n_u16(0), a1 = vdupq_n_u16(0), a2 = vdupq_n_u16(0), a3 = vdupq_n_u16(0);
    for (int64_t j = 0; j < GLp; ++j) {
        const uint8x16_t x = vld1q_u8(blk + j * 16);
        const uint8x16_t t = vld1q_u8(q + j * 16);
        const uint8x16_t r_lo = vqtbl1q_u8(t, vandq_u8(x, nib));
        const uint8x16_t r_hi = vqtbl1q_u8(t, vshrq_n_u8(x, 4));
        a0 = vaddw_u8(a0, vget_low_u8(r_lo));
        a1 = vaddw_high_u8(a1, r_lo);
        a2 = vaddw_u8(a2, vget_low_u8(r_hi));
        a3 = vaddw_high_u8(a3, r_hi);
    }
    const uint16x8_t acc[4] = { a0, a1, a2, a3 };
    for (int k = 0; k < 4; ++k) {
        vst1q_s32(out + 8 * k,     vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(acc[k]))));
        vst1q_s32(out + 8 * k + 4, vreinterpretq_s32_u32(vmovl_high_u16(acc[k])));
    }
}
#define carvq_screen_block carvq_screen_block_neon
#define CARVQ_SCREEN_SIMD_NAME "neon"
#else
#define carvq_screen_block carvq_screen_block_scalar
#define CARVQ_SCREEN_SIMD_NAME "scalar"
#endif

typedef void (*carvq_screen_block_fn)(const uint8_t * blk, const uint8_t * q, int64_t GLp, int32_t * out);

static void carvq_screen_run(carvq_screen_block_fn fn, const struct carvq_layout * l, const uint8_t * blocks,
        const uint8_t * q, int64_t b0, int64_t b1, int32_t * scores) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s)) {
        return;
    }
    if (b0 < 0) b0 = 0;
    if (b1 > s.n_blocks) b1 = s.n_blocks;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * CARVQ_SCREEN_BLOCK;
        if (r0 + CARVQ_SCREEN_BLOCK <= l->n_vocab) {
            fn(blocks + b * s.block_bytes, q, s.GLp, scores + r0);
        } else { // the last, partial block: rows past V are not written
            int32_t tmp[CARVQ_SCREEN_BLOCK];
            fn(blocks + b * s.block_bytes, q, s.GLp, tmp);
            memcpy(scores + r0, tmp, (size_t) (l->n_vocab - r0) * sizeof(int32_t));
        }
    }
}

void carvq_screen_scan(const struct carvq_layout * l, const uint8_t * blocks, const uint8_t * q,
        int64_t b0, int64_t b1, int32_t * scores) {
    carvq_screen_run(carvq_screen_block, l, blocks, q, b0, b1, scores);
}

void carvq_screen_scan_scalar(const struct carvq_layout * l, const uint8_t * blocks, const uint8_t * q,
        int64_t b0, int64_t b1, int32_t * scores) {
    carvq_screen_run(carvq_screen_block_scalar, l, blocks, q, b0, b1, scores);
}

void carvq_screen_project(int64_t n, const float * projection, const float * h, float * out) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = 0.0f;
    }
    // i innermost over a contiguous row of P: the compiler vectorizes it, and every out[i]
    // still adds its terms in order of j, one rounding each (built with -ffp-contract=off)
    for (int64_t j = 0; j < n; ++j) {
        const float hj = h[j];
        const float * row = projection + j * n;
        for (int64_t i = 0; i < n; ++i) {
            out[i] = out[i] + row[i] * hj;
        }
    }
}

void carvq_screen_fix_weights(int64_t rank, int64_t n, const float * dirs, const float * h, float scale, int32_t * m) {
    for (int64_t j = 0; j < rank; ++j) {
        float a = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
            a = a + dirs[j * n + i] * h[i];
        }
        const float v = scale > 0.0f ? nearbyintf(a / scale * 256.0f) : 0.0f;
        const float lim = (float) CARVQ_SCREEN_FIX_MAX;
        m[j] = v != v ? 0 : v > lim ? CARVQ_SCREEN_FIX_MAX : v < -lim ? -CARVQ_SCREEN_FIX_MAX : (int32_t) v;
    }
}

void carvq_screen_fix_add(int64_t rank, int64_t n_vocab, const int8_t * fix, const int32_t * m, int64_t v0, int64_t v1,
        int32_t * scores) {
    // planes of n_vocab coefficients, one per direction: each pass is a contiguous
    // multiply-add the compiler vectorizes; the shift applies to the whole sum
    enum { CHUNK = 256 };
    int32_t acc[CHUNK];
    for (int64_t a = v0; a < v1; a += CHUNK) {
        const int64_t len = v1 - a < CHUNK ? v1 - a : CHUNK;
        for (int64_t i = 0; i < len; ++i) {
            acc[i] = 0;
        }
        for (int64_t j = 0; j < rank; ++j) {
            const int8_t * f = fix + j * n_vocab + a;
            const int32_t mj = m[j];
            for (int64_t i = 0; i < len; ++i) {
                acc[i] += f[i] * mj;
            }
        }
        for (int64_t i = 0; i < len; ++i) {
            scores[a + i] += acc[i] >> 8;
        }
    }
}

const char * carvq_screen_simd_name(void) {
    return CARVQ_SCREEN_SIMD_NAME;
}

void carvq_screen_hot_add(const struct carvq_layout * l, const int32_t * hot_ids, const uint8_t * hot_codes,
        const uint8_t * qh, int32_t hot_offset, int64_t j0, int64_t j1, int32_t * scores) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s) || l->hot_rows <= 0) {
        return;
    }
    if (j0 < 0) j0 = 0;
    if (j1 > l->hot_rows) j1 = l->hot_rows;
    for (int64_t j = j0; j < j1; ++j) {
        const uint8_t * crow = hot_codes + j * s.Bh;
        int32_t acc = hot_offset;
        for (int64_t c = 0; c < s.GLh; ++c) {
            acc += qh[c * 16 + carvq_screen_code(crow, c)];
        }
        scores[hot_ids[j]] += acc;
    }
}

void carvq_screen_hot_scan(const struct carvq_layout * l, const uint8_t * hot_blocks, const uint8_t * qh,
        int32_t hot_offset, const int32_t * hot_ids, int64_t j0, int64_t j1, int32_t * scores) {
    struct carvq_screen_geom s;
    if (carvq_screen_geom_init(l, &s) || l->hot_rows <= 0) {
        return;
    }
    if (j0 < 0) j0 = 0;
    if (j1 > l->hot_rows) j1 = l->hot_rows;
    const int64_t GLhp = s.GLh + (s.GLh & 1);
    int32_t tmp[CARVQ_SCREEN_BLOCK];
    for (int64_t b = j0 / CARVQ_SCREEN_BLOCK; b * CARVQ_SCREEN_BLOCK < j1; ++b) {
        carvq_screen_block(hot_blocks + b * GLhp * 16, qh, GLhp, tmp);
        const int64_t lo = b * CARVQ_SCREEN_BLOCK > j0 ? b * CARVQ_SCREEN_BLOCK : j0;
        const int64_t hi = (b + 1) * CARVQ_SCREEN_BLOCK < j1 ? (b + 1) * CARVQ_SCREEN_BLOCK : j1;
        for (int64_t j = lo; j < hi; ++j) {
            scores[hot_ids[j]] += tmp[j - b * CARVQ_SCREEN_BLOCK] + hot_offset;
        }
    }
}

// ---- top-k ------------------------------------------------------------------------------

// The lowest and highest score of every stride-th row, and the shift that fits their span into
// `bins` bins (inline: each caller's constant stride keeps its loop simple)
static inline int carvq_screen_span(const int32_t * scores, int64_t n, int64_t stride, int64_t bins,
        int32_t * mn_out, int32_t * mx_out) {
    int32_t mn = scores[0], mx = scores[0];
    for (int64_t r = stride; r < n; r += stride) {
        mn = scores[r] < mn ? scores[r] : mn;
        mx = scores[r] > mx ? scores[r] : mx;
    }
    int shift = 0;
    while ((((int64_t) mx - mn) >> shift) >= bins) {
        ++shift;
    }
    *mn_out = mn;
    *mx_out = mx;
    return shift;
}

// Histogram threshold: the score S of the k-th best row and how many rows score above it.
// Rounds of a histogram of at most 2^bits bins (hist): the first over the whole range of scores
// (shifted right until it fits), each next one inside the bin of the round before that holds the
// k-th row, until a bin is one score wide. Two rounds at most with 16 bits (int32 scores).
// inline: each of its two callers has its own constant `bits` (not inlined, the fast path took
// 109 us instead of 93)
static inline void carvq_screen_threshold(const int32_t * scores, int64_t n, int64_t k, uint32_t * hist, int bits,
        int32_t * s_out, int64_t * above_out) {
    int32_t mn, mx;
    int shift = carvq_screen_span(scores, n, 1, (int64_t) 1 << bits, &mn, &mx);
    // the k-th best row scores in [lo, lo + width)
    int64_t lo = mn, width = ((int64_t) mx - mn) + 1, above = 0;
    for (;;) {
        const int64_t bins = ((width - 1) >> shift) + 1;
        memset(hist, 0, (size_t) bins * sizeof(uint32_t));
        for (int64_t r = 0; r < n; ++r) {
            const int64_t x = (int64_t) scores[r] - lo;
            if (x >= 0 && x < width) {
                hist[x >> shift]++;
            }
        }
        int64_t b = bins - 1;
        while (above + (int64_t) hist[b] < k) {
            above += hist[b--];
        }
        lo += b << shift;
        width = (int64_t) 1 << shift;
        if (shift == 0) {
            break;
        }
        shift = shift > bits ? shift - bits : 0;
    }
    *s_out = (int32_t) lo;
    *above_out = above;
}

// The k rows scoring above S, or at S up to k (ties: the lower id first, as the ids come in
// increasing order); above: how many score above S. row_ids[i] is the id of scores[i], or i
// where row_ids is NULL. Returns their count.
static int64_t carvq_screen_keep(const int32_t * scores, const uint32_t * row_ids, int64_t n, int64_t k,
        int32_t S, int64_t above, int32_t * ids) {
    int64_t m = 0, ties = k - above;
    for (int64_t i = 0; i < n && m < k; ++i) {
        if (scores[i] > S || (scores[i] == S && ties-- > 0)) {
            ids[m++] = row_ids ? (int32_t) row_ids[i] : (int32_t) i;
        }
    }
    return m;
}

// bins of the full path's histogram (all of hist) and of the fast path's (hist's room for its
// lists starts after them)
#define CARVQ_SCREEN_HIST_BITS 16
static_assert((1 << CARVQ_SCREEN_HIST_BITS) == CARVQ_SCREEN_HIST, "CARVQ_SCREEN_HIST is 2^CARVQ_SCREEN_HIST_BITS bins");
#define CARVQ_SCREEN_COARSE_BITS 11
#define CARVQ_SCREEN_COARSE_BINS (1 << CARVQ_SCREEN_COARSE_BITS)

// The ids of rows with score >= t, in increasing order, into out (room for cap + 8); returns
// how many, or -1 past cap. The AVX2 path compresses 8 rows at a time without a branch per
// row: a row passes at random (a few percent of them), which a branch would mispredict.
static int64_t carvq_screen_collect_ge(const int32_t * scores, int64_t n, int32_t t, uint32_t * out, int64_t cap) {
    int64_t c = 0, r = 0;
#if defined(CARVQ_SCREEN_AVX2)
    uint32_t lanes[256]; // mask -> the set lanes' indices, 4 bits each, lowest first
    for (int mask = 0; mask < 256; ++mask) {
        uint32_t v = 0;
        int m = 0;
        for (int j = 0; j < 8; ++j) {
            if (mask >> j & 1) {
                v |= (uint32_t) j << (4 * m++);
            }
        }
        lanes[mask] = v;
    }
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i seven = _mm256_set1_epi32(7), step = _mm256_set1_epi32(8);
    const __m256i tm1 = _mm256_set1_epi32(t - 1); // t > INT32_MIN (carvq_screen_collect_cut)
    __m256i row = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; r + 8 <= n; r += 8, row = _mm256_add_epi32(row, step)) {
        const __m256i x = _mm256_loadu_si256((const __m256i *) (scores + r));
        const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(x, tm1)));
        if (mask == 0) {
            continue;
        }
        if (c > cap) {
            return -1;
        }
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int) lanes[mask]), shifts), seven);
        _mm256_storeu_si256((__m256i *) (out + c), _mm256_permutevar8x32_epi32(row, idx));
        c += __builtin_popcount((unsigned) mask);
    }
#endif
    for (; r < n; ++r) {
        if (scores[r] >= t) {
            if (c >= cap) {
                return -1;
            }
            out[c++] = (uint32_t) r;
        }
    }
    return c > cap ? -1 : c;
}

// The rows that score at least a cut t, in increasing id order, into rows (room for cap + 8).
// t comes from a histogram of every 64th row (their own span: the scores are read once, by the
// collection itself), as the score about 1.1 k rows reach (plus 3 sigma of the sample's noise),
// lowered a bin at a time while fewer than k reach it. Returns their count (at least k), or -1
// when no cut within cap was found in a few tries (the caller then takes the full histogram).
static int64_t carvq_screen_collect_cut(const int32_t * scores, int64_t n, int64_t k, int64_t cap,
        uint32_t * hist, uint32_t * rows) {
    enum { STRIDE = 64, BINS = CARVQ_SCREEN_COARSE_BINS }; // one row in four cache lines
    if (n < 64 * STRIDE || k * 2 > cap) {
        return -1;
    }
    int32_t mn, mx;
    const int shift = carvq_screen_span(scores, n, STRIDE, BINS, &mn, &mx);
    memset(hist, 0, BINS * sizeof(uint32_t));
    for (int64_t r = 0; r < n; r += STRIDE) {
        hist[(uint32_t) ((int64_t) scores[r] - mn) >> shift]++;
    }
    const double expect = (double) k / STRIDE;
    const int64_t want = (int64_t) (1.1 * expect + 3.0 * sqrt(expect)) + 2;
    int64_t b = (((int64_t) mx - mn) >> shift), seen = 0;
    for (; b > 0 && seen + hist[b] < want; --b) {
        seen += hist[b];
    }
    for (int tries = 0; tries < 4 && b >= 0; ++tries, --b) {
        const int64_t t = (int64_t) mn + (b << shift);
        if (t <= INT32_MIN) {
            return -1; // collect_ge compares with t - 1
        }
        const int64_t c = carvq_screen_collect_ge(scores, n, (int32_t) t, rows, cap);
        if (c < 0 || c >= k) {
            return c;
        }
    }
    return -1;
}

int64_t carvq_screen_select(const int32_t * scores, int64_t n, int64_t k, int32_t * ids, uint32_t * hist) {
    if (k > n) k = n;
    if (k <= 0) {
        return 0;
    }
    // Fast path: the rows at or above an estimated cut (a superset of the k best, in id order)
    // and their scores into hist's space, and the exact threshold among those alone. Same rows
    // as the full path below; it reads the scores once, where the full path reads them four to
    // five times with a random-access histogram (Gemma-3, k = 8192: 410 -> about 100 us with
    // three reads; one read since session 29).
    const int64_t cap = (CARVQ_SCREEN_HIST - CARVQ_SCREEN_COARSE_BINS) / 2 - 8;
    uint32_t * rows = hist + CARVQ_SCREEN_COARSE_BINS, * kept = rows + cap + 8;
    const int64_t c = carvq_screen_collect_cut(scores, n, k, cap, hist, rows);
    int32_t S;
    int64_t above;
    if (c >= k) {
        int32_t * sub = (int32_t *) kept;
        for (int64_t i = 0; i < c; ++i) {
            sub[i] = scores[rows[i]];
        }
        carvq_screen_threshold(sub, c, k, hist, CARVQ_SCREEN_COARSE_BITS, &S, &above);
        return carvq_screen_keep(sub, rows, c, k, S, above, ids);
    }
    carvq_screen_threshold(scores, n, k, hist, CARVQ_SCREEN_HIST_BITS, &S, &above);
    return carvq_screen_keep(scores, NULL, n, k, S, above, ids);
}

// (score, id) as one sortable key: higher score first, then lower id
static int carvq_screen_key_cmp(const void * a, const void * b) {
    const int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
    return (x > y) - (x < y);
}

int64_t carvq_screen_topk(const int32_t * scores, int64_t n, int64_t k, int32_t * ids, uint32_t * hist,
        int64_t * keys) {
    const int64_t m = carvq_screen_select(scores, n, k, ids, hist);
    for (int64_t i = 0; i < m; ++i) {
        keys[i] = (-(int64_t) scores[ids[i]]) * ((int64_t) 1 << 32) + ids[i];
    }
    qsort(keys, (size_t) m, sizeof(int64_t), carvq_screen_key_cmp);
    for (int64_t i = 0; i < m; ++i) {
        ids[i] = (int32_t) (keys[i] & 0xffffffff);
    }
    return m;
}
