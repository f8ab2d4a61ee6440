// carvq-encode.c - see carvq-encode.h

#include "carvq-encode.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define CARVQ_ENCODE_BLOCK_ROWS 64
// Sub-vectors searched side by side, one per lane of a GCC/Clang vector (carvq_lanes_f32: 8
// floats, one AVX register, two NEON ones): every step is the same arithmetic on 8 independent
// searches, and keeping the B best candidates is compares and blends, no branches. One search
// at a time spent about 1000 cycles a level in mispredicted branches, and plain lane loops
// were vectorized the wrong way round (along d, then summed lane by lane).
#define CARVQ_ENCODE_LANES 8

typedef float   carvq_lanes_f32 __attribute__((vector_size(4 * CARVQ_ENCODE_LANES)));
typedef int32_t carvq_lanes_i32 __attribute__((vector_size(4 * CARVQ_ENCODE_LANES)));

#define CARVQ_ENCODE_INLINE static inline __attribute__((always_inline))

// m ? a : b, lane by lane (m: all ones or all zeros per lane)
CARVQ_ENCODE_INLINE carvq_lanes_f32 carvq_lanes_select_f32(carvq_lanes_i32 m, carvq_lanes_f32 a, carvq_lanes_f32 b) {
    return (carvq_lanes_f32) (((carvq_lanes_i32) a & m) | ((carvq_lanes_i32) b & ~m));
}

CARVQ_ENCODE_INLINE carvq_lanes_i32 carvq_lanes_select_i32(carvq_lanes_i32 m, carvq_lanes_i32 a, carvq_lanes_i32 b) {
    return (a & m) | (b & ~m);
}

struct carvq_beam {
    carvq_lanes_f32 residual[2][CARVQ_ENCODE_MAX_BEAM][CARVQ_ENCODE_MAX_D];  // this level's paths, the next's
    // per level, each survivor's parent path and centroid: the codes are read back from the end
    uint8_t parent[CARVQ_ENCODE_MAX_LEVELS][CARVQ_ENCODE_MAX_BEAM][CARVQ_ENCODE_LANES];
    uint8_t code[CARVQ_ENCODE_MAX_LEVELS][CARVQ_ENCODE_MAX_BEAM][CARVQ_ENCODE_LANES];
};

// The search of CARVQ_ENCODE_LANES sub-vectors x[lane] (d floats each) through one group's
// codebooks cb (L, K, d); the codes of lane i go to out[i][0, L). K and d are constants where
// this is inlined for the common shapes.
CARVQ_ENCODE_INLINE void carvq_lanes_encode(const float * const * x, const float * cb, int32_t L, const int32_t K,
                                           const int32_t d, int32_t beam, struct carvq_beam * s, uint8_t * const * out) {
    enum { W = CARVQ_ENCODE_LANES };
    carvq_lanes_f32 (*cur)[CARVQ_ENCODE_MAX_D] = s->residual[0];
    carvq_lanes_f32 (*next)[CARVQ_ENCODE_MAX_D] = s->residual[1];
    for (int32_t j = 0; j < d; j++) {
        for (int32_t i = 0; i < W; i++) {
            cur[0][j][i] = x[i][j];
        }
    }
    int32_t n_paths = 1;
    for (int32_t l = 0; l < L; l++) {
        const float * level = cb + (size_t) l * K * d;
        const int32_t total = n_paths * K;
        const int32_t kept = beam < total ? beam : total;
        // the kept best candidates so far, ascending; candidate b*K + c is path b + centroid c
        carvq_lanes_f32 best[CARVQ_ENCODE_MAX_BEAM];
        carvq_lanes_i32 best_id[CARVQ_ENCODE_MAX_BEAM];
        for (int32_t k = 0; k < kept; k++) {
            best[k] = (carvq_lanes_f32) {0} + INFINITY;
            best_id[k] = (carvq_lanes_i32) {0};
        }
        for (int32_t b = 0; b < n_paths; b++) {
            for (int32_t c = 0; c < K; c++) {
                const float * centroid = level + (size_t) c * d;
                carvq_lanes_f32 e = {0};
                for (int32_t j = 0; j < d; j++) {
                    const carvq_lanes_f32 t = cur[b][j] - centroid[j];
                    e += t * t;
                }
                // insert by bubbling: strict <, so an equal error keeps the earlier candidate
                carvq_lanes_i32 id = (carvq_lanes_i32) {0} + (b * K + c);
                for (int32_t k = 0; k < kept; k++) {
                    const carvq_lanes_i32 lt = e < best[k];
                    const carvq_lanes_f32 out_e = carvq_lanes_select_f32(lt, best[k], e);
                    const carvq_lanes_i32 out_id = carvq_lanes_select_i32(lt, best_id[k], id);
                    best[k] = carvq_lanes_select_f32(lt, e, best[k]);
                    best_id[k] = carvq_lanes_select_i32(lt, id, best_id[k]);
                    e = out_e;
                    id = out_id;
                }
            }
        }
        for (int32_t k = 0; k < kept; k++) {
            for (int32_t i = 0; i < W; i++) {
                const int32_t b = best_id[k][i] / K, c = best_id[k][i] % K;
                s->parent[l][k][i] = (uint8_t) b;
                s->code[l][k][i] = (uint8_t) c;
                const float * centroid = level + (size_t) c * d;
                for (int32_t j = 0; j < d; j++) {
                    next[k][j][i] = cur[b][j][i] - centroid[j];
                }
            }
        }
        carvq_lanes_f32 (*swap)[CARVQ_ENCODE_MAX_D] = cur;
        cur = next;
        next = swap;
        n_paths = kept;
    }
    // path 0 is the least error: walk its parents back to the first level
    for (int32_t i = 0; i < W; i++) {
        int32_t slot = 0;
        for (int32_t l = L - 1; l >= 0; l--) {
            out[i][l] = s->code[l][slot][i];
            slot = s->parent[l][slot][i];
        }
    }
}

// The rows [r0, r1) of group g, CARVQ_ENCODE_LANES at a time (a short last batch repeats its
// last row in the spare lanes and writes only its own). The shapes the converter uses get
// their own compiled loop.
static void carvq_group_encode(const float * x, int64_t r0, int64_t r1, int64_t x_row_stride, const float * cb,
                               int32_t L, int32_t K, int32_t d, int32_t beam, struct carvq_beam * s,
                               uint8_t * codes, int64_t c_row_stride) {
    enum { W = CARVQ_ENCODE_LANES };
    uint8_t spare[W][CARVQ_ENCODE_MAX_LEVELS];
    for (int64_t r = r0; r < r1; r += W) {
        const float * xs[W];
        uint8_t * outs[W];
        for (int32_t i = 0; i < W; i++) {
            const int64_t row = r + i < r1 ? r + i : r1 - 1;
            xs[i] = x + row * x_row_stride;
            outs[i] = r + i < r1 ? codes + row * c_row_stride : spare[i];
        }
        if (K == 16 && d == 8) {
            carvq_lanes_encode(xs, cb, L, 16, 8, beam, s, outs);
        } else if (K == 16 && d == 4) {
            carvq_lanes_encode(xs, cb, L, 16, 4, beam, s, outs);
        } else if (K == 16 && d == 16) {
            carvq_lanes_encode(xs, cb, L, 16, 16, beam, s, outs);
        } else {
            carvq_lanes_encode(xs, cb, L, K, d, beam, s, outs);
        }
    }
}

int32_t carvq_rows_encode(const float * x, int64_t n_rows, int64_t x_row_stride, int64_t x_group_stride,
                          const float * codebooks, int32_t n_groups, int32_t n_levels, int32_t k, int32_t d,
                          int32_t beam, uint8_t * codes, int64_t c_row_stride, int64_t c_group_stride) {
    if (n_rows < 0 || n_groups < 1 || n_levels < 1 || n_levels > CARVQ_ENCODE_MAX_LEVELS || k < 1 ||
        k > CARVQ_ENCODE_MAX_K || d < 1 || d > CARVQ_ENCODE_MAX_D || beam < 1 || beam > CARVQ_ENCODE_MAX_BEAM) {
        return -1;
    }
    // aligned for the vectors (malloc's 16 bytes are not enough for 32-byte lanes)
    const size_t align = 64, size = (sizeof(struct carvq_beam) + align - 1) / align * align;
    struct carvq_beam * s = aligned_alloc(align, size);
    if (s == NULL) {
        return -1;
    }
    const size_t per_group = (size_t) n_levels * k * d;
    // a block of rows one group at a time: the group's codebooks stay in L1 while the block's
    // sub-vectors (CARVQ_ENCODE_BLOCK_ROWS rows, a few hundred KiB at most) stay in L2
    for (int64_t r0 = 0; r0 < n_rows; r0 += CARVQ_ENCODE_BLOCK_ROWS) {
        const int64_t r1 = r0 + CARVQ_ENCODE_BLOCK_ROWS < n_rows ? r0 + CARVQ_ENCODE_BLOCK_ROWS : n_rows;
        for (int32_t g = 0; g < n_groups; g++) {
            carvq_group_encode(x + g * x_group_stride, r0, r1, x_row_stride, codebooks + g * per_group, n_levels, k, d,
                               beam, s, codes + g * c_group_stride, c_row_stride);
        }
    }
    free(s);
    return 0;
}

// one row's kept levels of group g, level `skip` left out, summed in level order from zero
static void carvq_group_levels_sum(const uint8_t * row_codes, int32_t depth, const float * group_cb, int32_t k,
                                   int32_t d, int32_t skip, float * acc) {
    for (int32_t j = 0; j < d; j++) {
        acc[j] = 0.0f;
    }
    for (int32_t l = 0; l < depth; l++) {
        if (l == skip) {
            continue;
        }
        const float * c = group_cb + ((size_t) l * k + row_codes[l]) * d;
        for (int32_t j = 0; j < d; j++) {
            acc[j] += c[j];
        }
    }
}

void carvq_rows_levels_sum(const uint8_t * codes, const int32_t * depth, int64_t n_rows, const float * codebooks,
                           int32_t n_groups, int32_t n_levels, int32_t k, int32_t d, int32_t skip, int32_t g0,
                           int32_t g1, float * out) {
    const size_t per_group = (size_t) n_levels * k * d;
    for (int64_t r = 0; r < n_rows; r++) {
        const int32_t keep = depth[r] < n_levels ? depth[r] : n_levels;
        for (int32_t g = g0; g < g1; g++) {
            carvq_group_levels_sum(codes + ((size_t) r * n_groups + g) * n_levels, keep, codebooks + g * per_group, k,
                                   d, skip, out + ((size_t) r * n_groups + g) * d);
        }
    }
}

void carvq_level_refit(const float * x, uint8_t * codes, const int32_t * depth, const double * w, int64_t n_rows,
                       const float * codebooks, int32_t n_groups, int32_t n_levels, int32_t k, int32_t d,
                       int32_t level, int32_t reassign, int32_t g0, int32_t g1, double * num, double * mass) {
    const size_t per_group = (size_t) n_levels * k * d;
    float acc[CARVQ_ENCODE_MAX_D];
    float left[CARVQ_ENCODE_MAX_D];
    for (int64_t r = 0; r < n_rows; r++) {
        const int32_t keep = depth[r] < n_levels ? depth[r] : n_levels;
        if (keep <= level) {
            continue;
        }
        for (int32_t g = g0; g < g1; g++) {
            uint8_t * row_codes = codes + ((size_t) r * n_groups + g) * n_levels;
            const float * group_cb = codebooks + g * per_group;
            const float * xg = x + ((size_t) r * n_groups + g) * d;
            carvq_group_levels_sum(row_codes, keep, group_cb, k, d, level, acc);
            for (int32_t j = 0; j < d; j++) {
                left[j] = xg[j] - acc[j];
            }
            const float * level_cb = group_cb + (size_t) level * k * d;
            if (reassign) {  // the nearest centroid: the encoder's distance, the first of equals
                int32_t best = 0;
                float best_e = INFINITY;
                for (int32_t c = 0; c < k; c++) {
                    float e = 0.0f;
                    for (int32_t j = 0; j < d; j++) {
                        const float t = left[j] - level_cb[(size_t) c * d + j];
                        e += t * t;
                    }
                    if (e < best_e) {
                        best_e = e;
                        best = c;
                    }
                }
                row_codes[level] = (uint8_t) best;
            }
            const int32_t c = row_codes[level];
            double * sums = num + ((size_t) g * k + c) * d;
            for (int32_t j = 0; j < d; j++) {
                sums[j] += w[r] * (double) left[j];
            }
            mass[(size_t) g * k + c] += w[r];
        }
    }
}
