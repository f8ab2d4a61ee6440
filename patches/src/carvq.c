// carvq.c - decoder for CARVQ-compressed token embeddings (docs/FORMAT.md, versions 1 to 3).
// See carvq.h for the API. Build with -ffp-contract=off and without -ffast-math.

#include "carvq.h"

#include <assert.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

// The RVQ sum must be bit-exact with the NumPy reference (plain float32 adds, level 0
// first). It has no multiplies, so FMA contraction cannot apply today, but keep it off so a
// future edit cannot silently break the contract; fast-math could also fold 0.0f + x to x,
// which turns -0.0 into a different bit pattern than the reference's +0.0.
#if defined(__FAST_MATH__)
#error "carvq.c must not be compiled with -ffast-math (its decode is specified bit-exact)"
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize ("fp-contract=off")
#elif defined(_MSC_VER)
#pragma fp_contract (off)
#endif

// ---- SIMD selection (compile time) ----------------------------------------------------
// One vector ISA per build (see "per-ISA vector mapping" below). AArch64 only for NEON:
// ARMv7 NEON flushes subnormals to zero, which would break bit-exactness.
#if !defined(CARVQ_NO_SIMD)
#  if defined(__AVX__)
#    define CARVQ_AVX 1
#  elif defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
#    define CARVQ_SSE2 1
#  elif defined(__ARM_NEON) && defined(__aarch64__)
#    define CARVQ_NEON 1
#  endif
#  if defined(__F16C__) || (defined(_MSC_VER) && defined(__AVX2__)) // MSVC never defines __F16C__
#    define CARVQ_F16C 1
#  endif
#endif

#if defined(CARVQ_AVX) || defined(CARVQ_SSE2) || defined(CARVQ_F16C)
#include <immintrin.h>
#endif
#if defined(CARVQ_NEON)
#include <arm_neon.h>
#endif

static_assert(sizeof(float) == 4, "carvq needs IEEE binary32 float");
static_assert(sizeof(struct carvq_layout) == 120, "struct carvq_layout ABI changed");
static_assert(offsetof(struct carvq_layout, format_version) == 16, "struct carvq_layout ABI changed");
static_assert(offsetof(struct carvq_layout, adaptor_hidden) == 36, "struct carvq_layout ABI changed");
static_assert(offsetof(struct carvq_layout, hot_rows) == 40, "struct carvq_layout ABI changed");
static_assert(offsetof(struct carvq_layout, hot_levels) == 48, "struct carvq_layout ABI changed");
static_assert(offsetof(struct carvq_layout, hot_tiers) == 52, "struct carvq_layout ABI changed");
static_assert(offsetof(struct carvq_layout, hot_tier_rows) == 56, "struct carvq_layout ABI changed");
static_assert(sizeof(((struct carvq_layout *) 0)->hot_tier_rows) == CARVQ_MAX_HOT_TIERS * sizeof(int64_t),
              "hot_tier_rows holds CARVQ_MAX_HOT_TIERS entries");
static_assert(CARVQ_MAX_LEVELS <= 16 && CARVQ_MAX_CODEBOOK_SIZE <= 16, "codes are 4-bit nibbles");

// ---- helpers ---------------------------------------------------------------------------

static void carvq_err_set(char * err, size_t err_size, const char * fmt, ...) {
    if (err == NULL || err_size == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_size, fmt, ap);
    va_end(ap);
}

// a * b for a, b >= 0; non-zero on int64 overflow
static int carvq_mul_overflows(int64_t a, int64_t b, int64_t * r) {
    if (a != 0 && b > INT64_MAX / a) {
        return 1;
    }
    *r = a * b;
    return 0;
}

float carvq_fp16_to_fp32(uint16_t h) {
    // integer-only so it is exact whatever the FPU's denormal mode
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {            // inf / NaN (payload kept)
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {         // normal: rebias 15 -> 127
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {         // +-0
        bits = sign;
    } else {                       // subnormal half = normal float: normalize the mantissa
        exp = 113;                 // float exponent field of 2^-14
        while ((man & 0x400u) == 0) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

// ---- layout ----------------------------------------------------------------------------

// All derived sizes of a valid layout, computed once.
struct carvq_sizes {
    int64_t G;            // groups
    int64_t GL;           // codes per row
    int64_t B;            // code bytes per row
    int64_t codes_nbytes;
    int64_t cb_nel;       // codebook elements G*L*K*d
    int64_t GLh;          // hot codes per hot row
    int64_t Bh;           // hot code bytes per hot row
    int64_t hot_cb_nel;   // hot codebook elements of one tier G*Lh*K*d
    int64_t T;            // hot tiers (1 when hot_tiers is 0 or 1)
};

static int carvq_fits_size_t(int64_t x) {
#if SIZE_MAX < INT64_MAX
    return (uint64_t) x <= (uint64_t) SIZE_MAX;
#else
    (void) x;
    return 1;
#endif
}

// hot tiers of a layout whose hot_tiers is in 0..CARVQ_MAX_HOT_TIERS: 0 and 1 both mean one tier
int64_t carvq_layout_hot_tier_count(const struct carvq_layout * l) {
    return l->hot_tiers >= 2 ? l->hot_tiers : 1;
}

static int carvq_layout_sizes(const struct carvq_layout * l, struct carvq_sizes * s, char * err, size_t err_size) {
    if (l == NULL) {
        carvq_err_set(err, err_size, "no carvq layout");
        return 1;
    }
    if (l->format_version < CARVQ_MIN_FORMAT_VERSION || l->format_version > CARVQ_FORMAT_VERSION) {
        carvq_err_set(err, err_size, "unknown carvq.format_version %" PRId32 " (this decoder reads %d..%d)",
                l->format_version, CARVQ_MIN_FORMAT_VERSION, CARVQ_FORMAT_VERSION);
        return 1;
    }
    if (l->n_vocab < 1 || l->n_embd < 1) {
        carvq_err_set(err, err_size, "empty embedding %" PRId64 "x%" PRId64, l->n_vocab, l->n_embd);
        return 1;
    }
    if (l->group_size < 1 || l->n_embd % l->group_size != 0) {
        carvq_err_set(err, err_size, "carvq.group_size %" PRId32 " does not divide width %" PRId64,
                l->group_size, l->n_embd);
        return 1;
    }
    if (l->levels < 1 || l->levels > CARVQ_MAX_LEVELS) {
        carvq_err_set(err, err_size, "carvq.levels %" PRId32 " outside 1..%d", l->levels, CARVQ_MAX_LEVELS);
        return 1;
    }
    if (l->codebook_size < CARVQ_MIN_CODEBOOK_SIZE || l->codebook_size > CARVQ_MAX_CODEBOOK_SIZE) {
        carvq_err_set(err, err_size, "carvq.codebook_size %" PRId32 " outside %d..%d",
                l->codebook_size, CARVQ_MIN_CODEBOOK_SIZE, CARVQ_MAX_CODEBOOK_SIZE);
        return 1;
    }
    if (l->adaptor_rank < 0 || l->adaptor_rank > CARVQ_MAX_ADAPTOR_RANK) {
        carvq_err_set(err, err_size, "carvq.adaptor_rank %" PRId32 " outside 0..%d", l->adaptor_rank, CARVQ_MAX_ADAPTOR_RANK);
        return 1;
    }
    if (l->adaptor_hidden < 0 || l->adaptor_hidden > CARVQ_MAX_ADAPTOR_HIDDEN) {
        carvq_err_set(err, err_size, "carvq.adaptor_hidden %" PRId32 " outside 0..%d", l->adaptor_hidden, CARVQ_MAX_ADAPTOR_HIDDEN);
        return 1;
    }
    if ((l->adaptor_rank == 0) != (l->adaptor_hidden == 0)) {
        carvq_err_set(err, err_size, "carvq.adaptor_rank %" PRId32 " and carvq.adaptor_hidden %" PRId32
                " must both be zero or both non-zero", l->adaptor_rank, l->adaptor_hidden);
        return 1;
    }

    if (l->format_version < 2 && (l->hot_rows != 0 || l->hot_levels != 0)) {
        carvq_err_set(err, err_size, "hot rows need carvq.format_version 2, the file says %" PRId32, l->format_version);
        return 1;
    }
    if (l->hot_tiers < 0 || l->hot_tiers > CARVQ_MAX_HOT_TIERS) {
        carvq_err_set(err, err_size, "carvq.hot_tiers has %" PRId32 " entries, outside 1..%d", l->hot_tiers,
                CARVQ_MAX_HOT_TIERS);
        return 1;
    }
    // a row may be in every tier: N is at most T*V
    const int64_t tiers = carvq_layout_hot_tier_count(l);
    const int64_t max_hot = l->n_vocab > INT64_MAX / tiers ? INT64_MAX : l->n_vocab * tiers;
    if (l->hot_rows < 0 || l->hot_rows > max_hot) {
        carvq_err_set(err, err_size, "carvq.hot_rows %" PRId64 " outside 0..%" PRId64, l->hot_rows, max_hot);
        return 1;
    }
    if (l->hot_levels < 0 || l->hot_levels > CARVQ_MAX_LEVELS) {
        carvq_err_set(err, err_size, "carvq.hot_levels %" PRId32 " outside 0..%d", l->hot_levels, CARVQ_MAX_LEVELS);
        return 1;
    }
    if ((l->hot_rows == 0) != (l->hot_levels == 0)) {
        carvq_err_set(err, err_size, "carvq.hot_rows %" PRId64 " and carvq.hot_levels %" PRId32
                " must both be zero or both non-zero", l->hot_rows, l->hot_levels);
        return 1;
    }
    if (l->hot_tiers >= 2 && l->format_version < 4) {
        carvq_err_set(err, err_size, "hot tiers need carvq.format_version 4, the file says %" PRId32, l->format_version);
        return 1;
    }
    if (l->hot_tiers >= 1) {
        int64_t left = l->hot_rows; // counted down, so that no sum can overflow
        for (int32_t t = 0; t < l->hot_tiers; ++t) {
            if (l->hot_tier_rows[t] < 1 || l->hot_tier_rows[t] > l->n_vocab) {
                carvq_err_set(err, err_size, "carvq.hot_tiers[%" PRId32 "] = %" PRId64 " outside 1..%" PRId64, t,
                        l->hot_tier_rows[t], l->n_vocab);
                return 1;
            }
            if (l->hot_tier_rows[t] > left) {
                carvq_err_set(err, err_size, "carvq.hot_tiers sum to more than carvq.hot_rows %" PRId64, l->hot_rows);
                return 1;
            }
            left -= l->hot_tier_rows[t];
        }
        if (left != 0) {
            carvq_err_set(err, err_size, "carvq.hot_tiers sum to %" PRId64 " rows, carvq.hot_rows is %" PRId64,
                    l->hot_rows - left, l->hot_rows);
            return 1;
        }
    }

    const int64_t V = l->n_vocab, n = l->n_embd, m = l->adaptor_rank, h = l->adaptor_hidden;
    const int64_t G = n / l->group_size;
    int64_t GL, codes, cb_nel, t, x, GLh = 0, hot_codes = 0, hot_cb_nel = 0;
    // every byte size of FORMAT.md, F32 being the widest element type
    const char * what = NULL;
    if (carvq_mul_overflows(G, l->levels, &GL)) {
        what = "codes";
    } else if (carvq_mul_overflows(V, GL / 2 + (GL & 1), &codes) || !carvq_fits_size_t(codes)) {
        what = "codes";
    } else if (carvq_mul_overflows(GL, (int64_t) l->codebook_size * l->group_size, &cb_nel) ||
               carvq_mul_overflows(cb_nel, 4, &x) || !carvq_fits_size_t(x)) {
        what = "codebooks";
    } else if (carvq_mul_overflows(V, n, &t) || carvq_mul_overflows(t, 4, &x) || !carvq_fits_size_t(x)) {
        what = "the dense embedding";
    } else if (carvq_mul_overflows(V, m, &t) || carvq_mul_overflows(t, 4, &x) || !carvq_fits_size_t(x)) {
        what = "sigma0";
    } else if (carvq_mul_overflows(n, h, &t) || carvq_mul_overflows(t, 4, &x) || !carvq_fits_size_t(x)) {
        what = "down.weight";
    } else if (carvq_mul_overflows(G, l->hot_levels, &GLh) ||
               carvq_mul_overflows(l->hot_rows, GLh / 2 + (GLh & 1) + 4, &hot_codes) || !carvq_fits_size_t(hot_codes)) {
        what = "hot rows";
    } else if (carvq_mul_overflows(GLh, (int64_t) l->codebook_size * l->group_size, &hot_cb_nel) ||
               carvq_mul_overflows(hot_cb_nel, 4 * (int64_t) CARVQ_MAX_HOT_TIERS, &x) || !carvq_fits_size_t(x)) {
        what = "hot codebooks";
    }
    // up.weight is h*m*4 <= 2^16 * 2^10 * 4: cannot overflow
    if (what != NULL) {
        carvq_err_set(err, err_size, "byte size of %s overflows for V=%" PRId64 " n=%" PRId64 " d=%" PRId32
                " L=%" PRId32 " K=%" PRId32 " m=%" PRId32 " h=%" PRId32,
                what, V, n, l->group_size, l->levels, l->codebook_size, l->adaptor_rank, l->adaptor_hidden);
        return 1;
    }
    if (s != NULL) {
        s->G = G;
        s->GL = GL;
        s->B = GL / 2 + (GL & 1);
        s->codes_nbytes = codes;
        s->cb_nel = cb_nel;
        s->GLh = GLh;
        s->Bh = GLh / 2 + (GLh & 1);
        s->hot_cb_nel = hot_cb_nel;
        s->T = carvq_layout_hot_tier_count(l);
    }
    return 0;
}

int carvq_layout_check(const struct carvq_layout * l, char * err, size_t err_size) {
    return carvq_layout_sizes(l, NULL, err, err_size);
}

int64_t carvq_layout_n_groups(const struct carvq_layout * l) {
    struct carvq_sizes s;
    return carvq_layout_sizes(l, &s, NULL, 0) ? -1 : s.G;
}

int64_t carvq_layout_code_row_bytes(const struct carvq_layout * l) {
    struct carvq_sizes s;
    return carvq_layout_sizes(l, &s, NULL, 0) ? -1 : s.B;
}

int64_t carvq_layout_codes_nbytes(const struct carvq_layout * l) {
    struct carvq_sizes s;
    return carvq_layout_sizes(l, &s, NULL, 0) ? -1 : s.codes_nbytes;
}

int64_t carvq_layout_codebooks_nelements(const struct carvq_layout * l) {
    struct carvq_sizes s;
    return carvq_layout_sizes(l, &s, NULL, 0) ? -1 : s.cb_nel;
}

int64_t carvq_layout_codebooks_nbytes(const struct carvq_layout * l, enum carvq_codebook_type type) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, NULL, 0)) {
        return -1;
    }
    switch (type) {
        case CARVQ_CODEBOOK_F32: return s.cb_nel * 4; // checked in carvq_layout_sizes
        case CARVQ_CODEBOOK_F16: return s.cb_nel * 2;
    }
    return -1;
}

int carvq_layout_codes_ne(const struct carvq_layout * l, int64_t ne[2]) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, NULL, 0)) {
        return -1;
    }
    ne[0] = s.B;
    ne[1] = l->n_vocab;
    return 0;
}

int carvq_layout_codebooks_ne(const struct carvq_layout * l, int64_t ne[4]) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, NULL, 0)) {
        return -1;
    }
    ne[0] = l->group_size;
    ne[1] = l->codebook_size;
    ne[2] = l->levels;
    ne[3] = s.G;
    return 0;
}

int carvq_layout_hot_codes_ne(const struct carvq_layout * l, int64_t ne[2]) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, NULL, 0)) {
        return -1;
    }
    ne[0] = s.Bh;
    ne[1] = l->hot_rows;
    return 0;
}

int carvq_layout_hot_codebooks_ne(const struct carvq_layout * l, int64_t ne[4]) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, NULL, 0)) {
        return -1;
    }
    ne[0] = l->group_size;
    ne[1] = l->codebook_size;
    ne[2] = l->hot_levels;
    ne[3] = s.T * s.G;
    return 0;
}

// ---- data checks -----------------------------------------------------------------------

// rows x B packed bytes of GL codes (levels per group): non-zero at the first code >= K or
// non-zero padding nibble; `what` names the tensor in the message.
static int carvq_codes_scan(const uint8_t * codes, int64_t rows, int64_t GL, int64_t B, int64_t levels, unsigned K,
        const char * what, char * err, size_t err_size) {
    const int odd = (int) (GL & 1);
    if (K == 16 && !odd) {
        return 0; // every nibble is a valid code
    }
    // one table lookup per byte instead of two nibble compares
    uint8_t bad[256];
    for (unsigned b = 0; b < 256; ++b) {
        bad[b] = (uint8_t) ((b & 15u) >= K || (b >> 4) >= K);
    }
    const int64_t full = B - odd; // bytes holding two codes
    for (int64_t row = 0; row < rows; ++row) {
        const uint8_t * r = codes + row * B;
        unsigned acc = 0;
        for (int64_t b = 0; b < full; ++b) {
            acc |= bad[r[b]];
        }
        if (odd) {
            acc |= (unsigned) ((r[full] & 15u) >= K) | (unsigned) ((r[full] >> 4) != 0);
        }
        if (acc == 0) {
            continue;
        }
        // slow path, once: find the first bad code of this row for the message
        for (int64_t j = 0; j < GL; ++j) {
            const unsigned c = (r[j >> 1] >> ((j & 1) * 4)) & 15u;
            if (c >= K) {
                carvq_err_set(err, err_size, "%s row %" PRId64 ": code %" PRId64 " (group %" PRId64
                        ", level %" PRId64 ") is %u, outside 0..%u",
                        what, row, j, j / levels, j % levels, c, K - 1);
                return 1;
            }
        }
        carvq_err_set(err, err_size, "%s row %" PRId64 ": padding nibble of the last byte is %u, must be 0",
                what, row, (unsigned) (r[full] >> 4));
        return 1;
    }
    return 0;
}

int carvq_codes_check(const struct carvq_layout * l, const uint8_t * codes, char * err, size_t err_size) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, err, err_size)) {
        return 1;
    }
    return carvq_codes_scan(codes, l->n_vocab, s.GL, s.B, l->levels, (unsigned) l->codebook_size, "codes", err, err_size);
}

// rows of hot tier t of a checked layout (the one tier of N rows when hot_tiers < 2)
int64_t carvq_layout_hot_tier_rows(const struct carvq_layout * l, int64_t t) {
    return l->hot_tiers >= 2 ? l->hot_tier_rows[t] : l->hot_rows;
}

int carvq_hot_check(const struct carvq_layout * l, const int32_t * hot_ids, const uint8_t * hot_codes,
        char * err, size_t err_size) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, err, err_size)) {
        return 1;
    }
    for (int64_t t = 0, j = 0, start = 0; t < s.T; start += carvq_layout_hot_tier_rows(l, t), ++t) {
        for (; j < start + carvq_layout_hot_tier_rows(l, t); ++j) {
            if (hot_ids[j] < 0 || hot_ids[j] >= l->n_vocab || (j > start && hot_ids[j] <= hot_ids[j - 1])) {
                carvq_err_set(err, err_size, "hot_ids[%" PRId64 "] = %" PRId32 ": hot ids must increase strictly "
                        "within 0..%" PRId64 " in each tier", j, hot_ids[j], l->n_vocab - 1);
                return 1;
            }
        }
    }
    return carvq_codes_scan(hot_codes, l->hot_rows, s.GLh, s.Bh, l->hot_levels, (unsigned) l->codebook_size,
            "hot_codes", err, err_size);
}

int64_t carvq_layout_hot_map_nbytes(const struct carvq_layout * l) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, NULL, 0) || l->hot_rows == 0) {
        return -1;
    }
    // tier 0's bitmap over the V tokens, tier t's over the rows of tier t - 1, each in whole bytes
    int64_t bytes = (l->n_vocab + 7) / 8;
    for (int64_t t = 0; t + 1 < s.T; ++t) {
        bytes += (carvq_layout_hot_tier_rows(l, t) + 7) / 8;
    }
    return bytes;
}

int carvq_hot_map_expand(const struct carvq_layout * l, const uint8_t * hot_map, int64_t map_bytes, int32_t * hot_ids,
        char * err, size_t err_size) {
    struct carvq_sizes s;
    if (carvq_layout_sizes(l, &s, err, err_size)) {
        return 1;
    }
    const int64_t expect = carvq_layout_hot_map_nbytes(l);
    if (expect < 0 || map_bytes != expect) {
        carvq_err_set(err, err_size, "hot_map has %" PRId64 " bytes, the layout needs %" PRId64, map_bytes, expect);
        return 1;
    }
    // tier t's ids are written at its offset in hot_ids; bit i of its bitmap is row i of tier t - 1
    // (for tier 0: token i), so each tier is expanded from the ids just written before it
    const int32_t * parent = NULL; // NULL: the tokens 0..V-1
    int64_t parent_rows = l->n_vocab, out = 0;
    for (int64_t t = 0; t < s.T; ++t) {
        const int64_t rows = carvq_layout_hot_tier_rows(l, t), start = out;
        for (int64_t i = 0; i < parent_rows; ++i) {
            if ((hot_map[i >> 3] >> (i & 7)) & 1) {
                if (out - start == rows) {
                    carvq_err_set(err, err_size, "hot_map: tier %" PRId64 "'s bitmap marks more than its %" PRId64
                            " rows", t, rows);
                    return 1;
                }
                hot_ids[out++] = parent ? parent[i] : (int32_t) i;
            }
        }
        const int64_t nbytes = (parent_rows + 7) / 8;
        if ((parent_rows & 7) && (hot_map[nbytes - 1] >> (parent_rows & 7)) != 0) {
            carvq_err_set(err, err_size, "hot_map: tier %" PRId64 "'s bitmap sets a padding bit", t);
            return 1;
        }
        if (out - start != rows) {
            carvq_err_set(err, err_size, "hot_map: tier %" PRId64 "'s bitmap marks %" PRId64 " rows, the layout says %"
                    PRId64, t, out - start, rows);
            return 1;
        }
        hot_map += nbytes;
        parent = hot_ids + start;
        parent_rows = rows;
    }
    return 0;
}

int carvq_ids_check(const struct carvq_layout * l, const int32_t * ids, int64_t n_ids, char * err, size_t err_size) {
    if (carvq_layout_check(l, err, err_size)) {
        return 1;
    }
    for (int64_t i = 0; i < n_ids; ++i) {
        if (ids[i] < 0 || ids[i] >= l->n_vocab) {
            carvq_err_set(err, err_size, "token id %" PRId32 " at position %" PRId64 " outside 0..%" PRId64,
                    ids[i], i, l->n_vocab - 1);
            return 1;
        }
    }
    return 0;
}

// ---- decode ----------------------------------------------------------------------------
//
// Codebooks are (G, L, K, d): the d values of code c at (g, l) start at element
// g*L*K*d + l*K*d + c*d. A group of output row t is thus L contiguous vector loads and adds,
// no gathers. Codes are walked with j = g*L + l. Element type: F32 or F16 (`f16` below, a
// compile-time constant wherever it is passed to an inline function, so each type gets its
// own specialised code).

#if defined(__GNUC__)
#define CARVQ_INLINE static inline __attribute__((always_inline))
#else
#define CARVQ_INLINE static inline
#endif

struct carvq_geom {
    int64_t n, d, G, L, KD, LKD, B;
    int64_t g_fast;    // leading groups safe for the CARVQ_W-wide over-read path (d < CARVQ_W)
};

static inline unsigned carvq_code(const uint8_t * crow, int64_t j) {
    return (crow[j >> 1] >> ((j & 1) * 4)) & 15u;
}

// When d < W, a group is decoded with W-wide loads/stores: the extra W-d lanes read the
// following codebook values and write garbage into the following groups' outputs, which the
// next (later) group store overwrites. That is safe for group g while its store stays inside
// the row, g*d + W <= n, i.e. W - d <= (G-1-g)*d; its loads then stay inside the codebook
// buffer too, as they need only W - d <= (G-1-g)*L*K*d. The bound holds for a prefix of
// groups; the rest (at most ceil(W/d) - 1) go through the scalar reference.
static int64_t carvq_fast_groups(int64_t n, int64_t d, int64_t G, int64_t W) {
    if (d >= W) {
        return G;
    }
    const int64_t gs = n >= W ? (n - W) / d + 1 : 0;
    return gs < G ? gs : G;
}

// levels: L for the shared codes, Lh for the hot codes (same d, K and groups)
static void carvq_geom_init(struct carvq_geom * gm, const struct carvq_layout * l, int64_t levels, int64_t W) {
    gm->n   = l->n_embd;
    gm->d   = l->group_size;
    gm->G   = l->n_embd / l->group_size;
    gm->L   = levels;
    gm->KD  = (int64_t) l->codebook_size * l->group_size;
    gm->LKD = gm->L * gm->KD;
    const int64_t GL = gm->G * gm->L;
    gm->B   = GL / 2 + (GL & 1);
    gm->g_fast = carvq_fast_groups(gm->n, gm->d, gm->G, W);
}

CARVQ_INLINE float carvq_cb_value(const void * cb, int64_t e, int f16) {
    return f16 ? carvq_fp16_to_fp32(((const uint16_t *) cb)[e]) : ((const float *) cb)[e];
}

// The scalar reference: groups [g0, G) of one row, each element summed level 0 first from
// 0.0f (not from the first value: 0.0f + -0.0f is +0.0f, as in NumPy), or, with `cont`,
// continuing from the value already in `out` (the hot levels after the shared ones).
CARVQ_INLINE void carvq_groups_scalar(const struct carvq_geom * gm, const uint8_t * crow, const void * cb,
        float * out, int64_t g0, int f16, int cont) {
    const int64_t d = gm->d, L = gm->L;
    int64_t base[CARVQ_MAX_LEVELS];
    for (int64_t g = g0; g < gm->G; ++g) {
        for (int64_t l = 0; l < L; ++l) {
            base[l] = g * gm->LKD + l * gm->KD + carvq_code(crow, g * L + l) * d;
        }
        float * o = out + g * d;
        for (int64_t i = 0; i < d; ++i) {
            float acc = cont ? o[i] : 0.0f;
            for (int64_t l = 0; l < L; ++l) {
                acc = acc + carvq_cb_value(cb, base[l] + i, f16);
            }
            o[i] = acc;
        }
    }
}

static void carvq_row_f32_scalar(const struct carvq_geom * gm, const uint8_t * crow, const void * cb, float * out) {
    carvq_groups_scalar(gm, crow, cb, out, 0, 0, 0);
}

static void carvq_row_f16_scalar(const struct carvq_geom * gm, const uint8_t * crow, const void * cb, float * out) {
    carvq_groups_scalar(gm, crow, cb, out, 0, 1, 0);
}

// ---- per-ISA vector mapping ---------------------------------------------------------------
// CARVQ_W floats per vector and five operations; the SIMD row decoder below is written once
// over them. F16 loads exist where the ISA converts halves exactly (subnormals included).
#if defined(CARVQ_AVX)
#define CARVQ_W 8
typedef __m256 carvq_vec;
CARVQ_INLINE carvq_vec carvq_vec_zero(void) { return _mm256_setzero_ps(); }
CARVQ_INLINE carvq_vec carvq_vec_add(carvq_vec a, carvq_vec b) { return _mm256_add_ps(a, b); }
CARVQ_INLINE void carvq_vec_store(float * p, carvq_vec v) { _mm256_storeu_ps(p, v); }
CARVQ_INLINE carvq_vec carvq_vec_load_f32(const float * p) { return _mm256_loadu_ps(p); }
CARVQ_INLINE carvq_vec carvq_vec_mul(carvq_vec a, carvq_vec b) { return _mm256_mul_ps(a, b); }
#if defined(__FMA__)
#define CARVQ_VEC_FMA 1
CARVQ_INLINE carvq_vec carvq_vec_fma(carvq_vec a, carvq_vec b, carvq_vec c) { return _mm256_fmadd_ps(a, b, c); }
#endif
#if defined(CARVQ_F16C)
#define CARVQ_VEC_F16 1
CARVQ_INLINE carvq_vec carvq_vec_load_f16(const uint16_t * p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (const void *) p));
}
#endif
#define CARVQ_SIMD_NAME_F32 "avx"
#define CARVQ_SIMD_NAME_F16 "f16c"
#elif defined(CARVQ_SSE2)
#define CARVQ_W 4
typedef __m128 carvq_vec;
CARVQ_INLINE carvq_vec carvq_vec_zero(void) { return _mm_setzero_ps(); }
CARVQ_INLINE carvq_vec carvq_vec_add(carvq_vec a, carvq_vec b) { return _mm_add_ps(a, b); }
CARVQ_INLINE void carvq_vec_store(float * p, carvq_vec v) { _mm_storeu_ps(p, v); }
CARVQ_INLINE carvq_vec carvq_vec_load_f32(const float * p) { return _mm_loadu_ps(p); }
CARVQ_INLINE carvq_vec carvq_vec_mul(carvq_vec a, carvq_vec b) { return _mm_mul_ps(a, b); }
#if defined(CARVQ_F16C)
#define CARVQ_VEC_F16 1
CARVQ_INLINE carvq_vec carvq_vec_load_f16(const uint16_t * p) {
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *) (const void *) p));
}
#endif
#define CARVQ_SIMD_NAME_F32 "sse2"
#define CARVQ_SIMD_NAME_F16 "f16c"
#elif defined(CARVQ_NEON)
#define CARVQ_W 4
typedef float32x4_t carvq_vec;
CARVQ_INLINE carvq_vec carvq_vec_zero(void) { return vdupq_n_f32(0.0f); }
CARVQ_INLINE carvq_vec carvq_vec_add(carvq_vec a, carvq_vec b) { return vaddq_f32(a, b); }
CARVQ_INLINE void carvq_vec_store(float * p, carvq_vec v) { vst1q_f32(p, v); }
CARVQ_INLINE carvq_vec carvq_vec_load_f32(const float * p) { return vld1q_f32(p); }
CARVQ_INLINE carvq_vec carvq_vec_mul(carvq_vec a, carvq_vec b) { return vmulq_f32(a, b); }
#define CARVQ_VEC_FMA 1
CARVQ_INLINE carvq_vec carvq_vec_fma(carvq_vec a, carvq_vec b, carvq_vec c) { return vfmaq_f32(c, a, b); }
#define CARVQ_VEC_F16 1
CARVQ_INLINE carvq_vec carvq_vec_load_f16(const uint16_t * p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
#define CARVQ_SIMD_NAME_F32 "neon"
#define CARVQ_SIMD_NAME_F16 "neon"
#else
#define CARVQ_W 1 // scalar only: the row decoders below are not built
#define CARVQ_SIMD_NAME_F32 "scalar"
#endif
#if !defined(CARVQ_VEC_F16)
#undef CARVQ_SIMD_NAME_F16
#define CARVQ_SIMD_NAME_F16 "scalar"
#endif

#if CARVQ_W > 1
#if defined(CARVQ_VEC_F16)
CARVQ_INLINE carvq_vec carvq_vec_load(const void * cb, int64_t e, int f16) {
    return f16 ? carvq_vec_load_f16((const uint16_t *) cb + e) : carvq_vec_load_f32((const float *) cb + e);
}
#else
CARVQ_INLINE carvq_vec carvq_vec_load(const void * cb, int64_t e, int f16) {
    (void) f16; // F16 codebooks take the scalar reference in this build
    return carvq_vec_load_f32((const float *) cb + e);
}
#endif

// Nibble q of the bytes at b (q is a constant once carvq_row_pairs is inlined, so this folds).
CARVQ_INLINE unsigned carvq_nib(const uint8_t * b, int q) {
    return (unsigned) (b[q >> 1] >> ((q & 1) * 4)) & 15u;
}

// d <= W, L = LC in 1..4 (a constant): groups g, g+1 (g even) of the over-read prefix take
// their 2*LC codes from exactly the LC bytes at byte g*LC/2, so every nibble position is a
// compile-time constant and the level loop unrolls; ~1.25x faster than the generic loop at
// d = 8, L = 3. Levels are still added 0, 1, 2, 3 in that order, from zero. Returns the
// first group it did not decode.
CARVQ_INLINE int64_t carvq_row_pairs(const struct carvq_geom * gm, const uint8_t * crow, const void * cb,
        float * out, int LC, int f16) {
    const int64_t d = gm->d, KD = gm->KD, LKD = gm->LKD;
    int64_t g = 0;
    for (; g + 2 <= gm->g_fast; g += 2) {
        const uint8_t * b = crow + g * LC / 2;
        const int64_t p0 = g * LKD, p1 = p0 + LKD;
        carvq_vec v0 = carvq_vec_zero(), v1 = carvq_vec_zero();
        for (int l = 0; l < LC; ++l) {
            v0 = carvq_vec_add(v0, carvq_vec_load(cb, p0 + l * KD + carvq_nib(b, l) * d, f16));
            v1 = carvq_vec_add(v1, carvq_vec_load(cb, p1 + l * KD + carvq_nib(b, LC + l) * d, f16));
        }
        carvq_vec_store(out + g * d, v0);
        carvq_vec_store(out + (g + 1) * d, v1); // after v0: overwrites v0's spill-over lanes
    }
    return g;
}

// d > W: W-wide chunks at 0, W, 2W, ... of each group and, when W does not divide d, a last
// chunk at d - W overlapping the previous one (recomputing equal values). Nothing is read or
// written outside the group.
CARVQ_INLINE void carvq_row_chunks(const struct carvq_geom * gm, const uint8_t * crow, const void * cb,
        float * out, int64_t L, int f16) {
    const int64_t d = gm->d;
    int64_t base[CARVQ_MAX_LEVELS];
    for (int64_t g = 0; g < gm->G; ++g) {
        for (int64_t l = 0; l < L; ++l) {
            base[l] = g * gm->LKD + l * gm->KD + carvq_code(crow, g * L + l) * d;
        }
        float * o = out + g * d;
        for (int64_t i = 0;;) {
            carvq_vec v = carvq_vec_zero();
            for (int64_t l = 0; l < L; ++l) {
                v = carvq_vec_add(v, carvq_vec_load(cb, base[l] + i, f16));
            }
            carvq_vec_store(o + i, v);
            if (i + CARVQ_W == d) break;
            i += CARVQ_W;
            if (i + CARVQ_W > d) i = d - CARVQ_W;
        }
    }
}

// One row, SIMD. L <= 4 is dispatched to constant-L copies of the loops (unrolled levels).
CARVQ_INLINE void carvq_row_simd(const struct carvq_geom * gm, const uint8_t * crow, const void * cb, float * out,
        int f16) {
    const int64_t d = gm->d, L = gm->L;
    if (d > CARVQ_W) {
        switch (L) {
            case 1:  carvq_row_chunks(gm, crow, cb, out, 1, f16); return;
            case 2:  carvq_row_chunks(gm, crow, cb, out, 2, f16); return;
            case 3:  carvq_row_chunks(gm, crow, cb, out, 3, f16); return;
            case 4:  carvq_row_chunks(gm, crow, cb, out, 4, f16); return;
            default: carvq_row_chunks(gm, crow, cb, out, L, f16); return;
        }
    }
    int64_t g = 0;
    switch (L) {
        case 1:  g = carvq_row_pairs(gm, crow, cb, out, 1, f16); break;
        case 2:  g = carvq_row_pairs(gm, crow, cb, out, 2, f16); break;
        case 3:  g = carvq_row_pairs(gm, crow, cb, out, 3, f16); break;
        case 4:  g = carvq_row_pairs(gm, crow, cb, out, 4, f16); break;
        default: break;
    }
    for (; g < gm->g_fast; ++g) { // the over-read prefix, any L
        carvq_vec v = carvq_vec_zero();
        const int64_t p = g * gm->LKD;
        for (int64_t l = 0; l < L; ++l) {
            v = carvq_vec_add(v, carvq_vec_load(cb, p + l * gm->KD + carvq_code(crow, g * L + l) * d, f16));
        }
        carvq_vec_store(out + g * d, v);
    }
    carvq_groups_scalar(gm, crow, cb, out, gm->g_fast, f16, 0);
}

static void carvq_row_f32_simd(const struct carvq_geom * gm, const uint8_t * crow, const void * cb, float * out) {
    carvq_row_simd(gm, crow, cb, out, 0);
}

#if defined(CARVQ_VEC_F16)
static void carvq_row_f16_simd(const struct carvq_geom * gm, const uint8_t * crow, const void * cb, float * out) {
    carvq_row_simd(gm, crow, cb, out, 1);
}
#endif
#endif // CARVQ_W > 1

typedef void (*carvq_row_fn)(const struct carvq_geom * gm, const uint8_t * crow, const void * cb, float * out);

static carvq_row_fn carvq_row_fn_select(enum carvq_codebook_type type) {
    if (type == CARVQ_CODEBOOK_F16) {
#if defined(CARVQ_VEC_F16)
        return carvq_row_f16_simd;
#else
        return carvq_row_f16_scalar;
#endif
    }
#if CARVQ_W > 1
    return carvq_row_f32_simd;
#else
    return carvq_row_f32_scalar;
#endif
}

const char * carvq_simd_name(enum carvq_codebook_type cb_type) {
    return cb_type == CARVQ_CODEBOOK_F16 ? CARVQ_SIMD_NAME_F16 : CARVQ_SIMD_NAME_F32;
}

#define CARVQ_PREFETCH_ROWS 2

static void carvq_rows_run(carvq_row_fn fn, const struct carvq_layout * l, const uint8_t * codes,
        const void * codebooks, const int32_t * ids, int64_t n_ids, float * out, int64_t out_row_stride,
        int64_t first, int64_t last) {
    if (first < 0) first = 0;
    if (last > n_ids) last = n_ids;
    if (first >= last || out_row_stride < l->n_embd) {
        return; // a stride below n would make rows overlap and the last one run past out
    }
    struct carvq_geom gm;
    carvq_geom_init(&gm, l, l->levels, CARVQ_W);
    for (int64_t r = first; r < last; ++r) {
#if defined(__GNUC__)
        // code rows are scattered over V*B bytes (MBs): fetch a later row's while decoding
        if (r + CARVQ_PREFETCH_ROWS < last) {
            const uint8_t * next = codes + (int64_t) ids[r + CARVQ_PREFETCH_ROWS] * gm.B;
            for (int64_t b = 0; b < gm.B; b += 64) {
                __builtin_prefetch(next + b);
            }
            __builtin_prefetch(next + gm.B - 1);
        }
#endif
        fn(&gm, codes + (int64_t) ids[r] * gm.B, codebooks, out + r * out_row_stride);
    }
}

void carvq_rows_decode(const struct carvq_layout * l, const uint8_t * codes, const void * codebooks,
        enum carvq_codebook_type cb_type, const int32_t * ids, int64_t n_ids, float * out,
        int64_t out_row_stride, int64_t first, int64_t last) {
    carvq_rows_run(carvq_row_fn_select(cb_type), l, codes, codebooks, ids, n_ids, out, out_row_stride, first, last);
}

void carvq_rows_decode_scalar(const struct carvq_layout * l, const uint8_t * codes, const void * codebooks,
        enum carvq_codebook_type cb_type, const int32_t * ids, int64_t n_ids, float * out,
        int64_t out_row_stride, int64_t first, int64_t last) {
    carvq_rows_run(cb_type == CARVQ_CODEBOOK_F16 ? carvq_row_f16_scalar : carvq_row_f32_scalar, l, codes,
            codebooks, ids, n_ids, out, out_row_stride, first, last);
}

// index of token t in the sorted hot ids, or -1
static int64_t carvq_hot_find(const int32_t * hot_ids, int64_t n_hot, int32_t t) {
    int64_t lo = 0, hi = n_hot;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (hot_ids[mid] < t) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < n_hot && hot_ids[lo] == t ? lo : -1;
}

// Tier t's codebooks: (G, Lh, K, d) each, tier after tier
static const void * carvq_hot_tier_codebooks(const struct carvq_geom * gm, const void * hot_codebooks, int64_t t,
        enum carvq_codebook_type cb_type) {
    return (const uint8_t *) hot_codebooks + t * gm->G * gm->LKD * (cb_type == CARVQ_CODEBOOK_F16 ? 2 : 4);
}

// Hot rows are few and the adds are Lh per element: the scalar reference, continuing each
// element's sum from the value carvq_rows_decode stored (a float32, so the sum is the same
// as one uninterrupted accumulation). Geometry once per call, element type once per row.
void carvq_rows_hot_add(const struct carvq_layout * l, const int32_t * hot_ids, const uint8_t * hot_codes,
        const void * hot_codebooks, enum carvq_codebook_type cb_type, const int32_t * ids, int64_t n_ids,
        float * out, int64_t out_row_stride, int64_t first, int64_t last) {
    if (l->hot_rows <= 0 || out_row_stride < l->n_embd) {
        return;
    }
    if (first < 0) first = 0;
    if (last > n_ids) last = n_ids;
    struct carvq_geom gm;
    carvq_geom_init(&gm, l, l->hot_levels, 1);
    for (int64_t t = 0, start = 0; t < carvq_layout_hot_tier_count(l); start += carvq_layout_hot_tier_rows(l, t), ++t) {
        const int64_t rows = carvq_layout_hot_tier_rows(l, t);
        const void * cb = carvq_hot_tier_codebooks(&gm, hot_codebooks, t, cb_type);
        for (int64_t r = first; r < last; ++r) {
            const int64_t j = carvq_hot_find(hot_ids + start, rows, ids[r]);
            if (j < 0) {
                continue;
            }
            const uint8_t * crow = hot_codes + (start + j) * gm.B;
            float * o = out + r * out_row_stride;
            carvq_groups_scalar(&gm, crow, cb, o, 0, cb_type == CARVQ_CODEBOOK_F16, 1);
        }
    }
}

#if CARVQ_W > 1
// carvq_groups_scalar's sums with `cont`, W lanes at a time: each element still continues from
// out and adds the levels in order, so the bits are the scalar path's. Needs W | d.
CARVQ_INLINE void carvq_groups_cont_simd(const struct carvq_geom * gm, const uint8_t * crow, const void * cb,
        float * out, int f16) {
    const int64_t d = gm->d, L = gm->L;
    int64_t base[CARVQ_MAX_LEVELS];
    for (int64_t g = 0; g < gm->G; ++g) {
        for (int64_t l = 0; l < L; ++l) {
            base[l] = g * gm->LKD + l * gm->KD + carvq_code(crow, g * L + l) * d;
        }
        float * o = out + g * d;
        for (int64_t i = 0; i < d; i += CARVQ_W) {
            carvq_vec v = carvq_vec_load_f32(o + i);
            for (int64_t l = 0; l < L; ++l) {
                v = carvq_vec_add(v, carvq_vec_load(cb, base[l] + i, f16));
            }
            carvq_vec_store(o + i, v);
        }
    }
}
#endif

void carvq_hot_row_add(const struct carvq_layout * l, int64_t t, int64_t j, const uint8_t * hot_codes,
        const void * hot_codebooks, enum carvq_codebook_type cb_type, float * out) {
    struct carvq_geom gm;
    carvq_geom_init(&gm, l, l->hot_levels, 1);
    const uint8_t * crow = hot_codes + j * gm.B;
    const void * cb = carvq_hot_tier_codebooks(&gm, hot_codebooks, t, cb_type);
#if CARVQ_W > 1
    // a dense coded head adds every hot row of every tier here (scalar: 10 % of a Gemma-3 llama-perplexity run)
    if (gm.d % CARVQ_W == 0 && cb_type == CARVQ_CODEBOOK_F32) {
        carvq_groups_cont_simd(&gm, crow, cb, out, 0);
        return;
    }
#endif
    carvq_groups_scalar(&gm, crow, cb, out, 0, cb_type == CARVQ_CODEBOOK_F16, 1);
}

// ---- dense products (a coded head's logits for many outputs) ------------------------------
//
// Every (row, state) pair is summed the same way whichever tile it falls in, so a logit does
// not depend on the batch around it: CARVQ_W lane sums (lane k takes i = k, k + W, ... below
// n - n % W, fused multiply-adds where the build has them), the lanes added in order, then the tail's
// products in order. A tile of 4 rows by 3 states keeps 12 lane sums in registers and reads each
// row and state once per step instead of once per product.

#define CARVQ_DOT_ROWS 4
#define CARVQ_DOT_STATES 3

#if CARVQ_W > 1
CARVQ_INLINE float carvq_vec_lanes_sum(carvq_vec v) {
    float t[CARVQ_W];
    carvq_vec_store(t, v);
    float s = 0.0f;
    for (int k = 0; k < CARVQ_W; ++k) {
        s += t[k];
    }
    return s;
}
#endif

// TR rows (rows + r * n) by TS states (hs + s * n); out[s * ld + r]. TR, TS constants once inlined.
CARVQ_INLINE void carvq_dot_tile(const float * rows, const float * hs, int64_t n, float * out, int64_t ld,
        int TR, int TS) {
    const int64_t nw = n - n % CARVQ_W;
    float acc_s[CARVQ_DOT_ROWS][CARVQ_DOT_STATES];
#if CARVQ_W > 1
    carvq_vec acc[CARVQ_DOT_ROWS][CARVQ_DOT_STATES];
    for (int r = 0; r < TR; ++r) {
        for (int s = 0; s < TS; ++s) {
            acc[r][s] = carvq_vec_zero();
        }
    }
    for (int64_t i = 0; i < nw; i += CARVQ_W) {
        carvq_vec h[CARVQ_DOT_STATES];
        for (int s = 0; s < TS; ++s) {
            h[s] = carvq_vec_load_f32(hs + s * n + i);
        }
        for (int r = 0; r < TR; ++r) {
            const carvq_vec x = carvq_vec_load_f32(rows + r * n + i);
            for (int s = 0; s < TS; ++s) {
#if defined(CARVQ_VEC_FMA)
                acc[r][s] = carvq_vec_fma(x, h[s], acc[r][s]);
#else
                acc[r][s] = carvq_vec_add(acc[r][s], carvq_vec_mul(x, h[s]));
#endif
            }
        }
    }
    for (int r = 0; r < TR; ++r) {
        for (int s = 0; s < TS; ++s) {
            acc_s[r][s] = carvq_vec_lanes_sum(acc[r][s]);
        }
    }
#else
    for (int r = 0; r < TR; ++r) {
        for (int s = 0; s < TS; ++s) {
            float a = 0.0f;
            for (int64_t i = 0; i < nw; ++i) {
                a += rows[r * n + i] * hs[s * n + i];
            }
            acc_s[r][s] = a;
        }
    }
#endif
    for (int r = 0; r < TR; ++r) {
        for (int s = 0; s < TS; ++s) {
            float tail = 0.0f;
            for (int64_t i = nw; i < n; ++i) {
                tail += rows[r * n + i] * hs[s * n + i];
            }
            out[s * ld + r] = acc_s[r][s] + tail;
        }
    }
}

// One band of up to CARVQ_DOT_STATES states against every row, TS = ts a constant below
CARVQ_INLINE void carvq_dot_band(const float * rows, int64_t n_rows, const float * hs, int64_t n, float * out,
        int64_t ld, int TS) {
    int64_t r = 0;
    for (; r + CARVQ_DOT_ROWS <= n_rows; r += CARVQ_DOT_ROWS) {
        carvq_dot_tile(rows + r * n, hs, n, out + r, ld, CARVQ_DOT_ROWS, TS);
    }
    for (; r < n_rows; ++r) {
        carvq_dot_tile(rows + r * n, hs, n, out + r, ld, 1, TS);
    }
}

void carvq_rows_dot(const float * rows, int64_t n_rows, const float * hs, int64_t n_states, int64_t n, float * out,
        int64_t ld) {
    if (n_rows <= 0 || n_states <= 0 || n <= 0 || ld < n_rows) {
        return;
    }
    // a band of states stays in L1 while the rows (the caller's block, sized for L2) stream past
    for (int64_t s = 0; s < n_states; s += CARVQ_DOT_STATES) {
        const float * h = hs + s * n;
        float * o = out + s * ld;
        switch (n_states - s) {
            case 1:  carvq_dot_band(rows, n_rows, h, n, o, ld, 1); break;
            case 2:  carvq_dot_band(rows, n_rows, h, n, o, ld, 2); break;
            default: carvq_dot_band(rows, n_rows, h, n, o, ld, CARVQ_DOT_STATES); break;
        }
    }
}
