// Differential check of the screened head's scan (patches/src/carvq-screen.c): on random
// layouts, codes and hidden states, carvq_screen_scan (AVX2 or NEON when compiled in) must
// give exactly the scores of carvq_screen_scan_scalar, and write nothing past the last row.
// Standalone, so that it also runs as a static aarch64 binary under qemu (the NEON path).
//
//   cc -O2 -ffp-contract=off -Ipatches/src tests/fuzz/screen_check.c patches/src/carvq-screen.c
//      patches/src/carvq.c -lm -o screen_check && ./screen_check [iterations [seed]]

#include "carvq-screen.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "splitmix.h"

static float rng_f32(void) { return (float) (rng_next() >> 40) / 16777216.0f - 0.5f; }

int main(int argc, char ** argv) {
    const long iters = argc > 1 ? atol(argv[1]) : 300;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    const int32_t SENTINEL = -123456789;
    for (long it = 0; it < iters; ++it) {
        struct carvq_layout l = {0};
        l.format_version = 2;
        l.n_vocab = 1 + (int64_t) (rng_next() % 200);
        l.group_size = 1 + (int32_t) (rng_next() % 16);
        l.n_embd = l.group_size * (1 + (int64_t) (rng_next() % 40));
        l.levels = 1 + (int32_t) (rng_next() % 8);
        l.codebook_size = 2 + (int32_t) (rng_next() % 15);
        if (carvq_layout_check(&l, NULL, 0) != 0) {
            fprintf(stderr, "screen_check: bad layout from the generator\n");
            return 1;
        }
        const int64_t V = l.n_vocab, B = carvq_layout_code_row_bytes(&l), G = l.n_embd / l.group_size;
        const int64_t GL = G * l.levels, n_cb = carvq_layout_codebooks_nelements(&l);
        uint8_t * codes = malloc((size_t) (V * B));
        for (int64_t r = 0; r < V; ++r) {
            memset(codes + r * B, 0, (size_t) B);
            for (int64_t j = 0; j < GL; ++j) {
                codes[r * B + j / 2] |= (uint8_t) ((rng_next() % (uint64_t) l.codebook_size) << (4 * (j & 1)));
            }
        }
        float * cb = malloc((size_t) n_cb * sizeof(float));
        float * h = malloc((size_t) l.n_embd * sizeof(float));
        for (int64_t i = 0; i < n_cb; ++i) cb[i] = rng_f32();
        for (int64_t i = 0; i < l.n_embd; ++i) h[i] = rng_f32() * 8.0f;
        uint8_t * blocks = malloc((size_t) carvq_screen_blocks_nbytes(&l));
        carvq_screen_relayout(&l, codes, blocks);
        uint8_t * q = malloc((size_t) (GL + 1) * 16);
        float * work = malloc((size_t) carvq_screen_work_floats(&l) * sizeof(float));
        struct carvq_screen_tables t;
        carvq_screen_tables_build(&l, cb, NULL, CARVQ_CODEBOOK_F32, h, work, q, NULL, &t);
        int32_t * got = malloc((size_t) (V + 4) * sizeof(int32_t));
        int32_t * want = malloc((size_t) (V + 4) * sizeof(int32_t));
        for (int64_t i = 0; i < V + 4; ++i) got[i] = want[i] = SENTINEL;
        const int64_t n_blocks = (V + CARVQ_SCREEN_BLOCK - 1) / CARVQ_SCREEN_BLOCK;
        carvq_screen_scan(&l, blocks, q, 0, n_blocks, got);
        carvq_screen_scan_scalar(&l, blocks, q, 0, n_blocks, want);
        for (int64_t i = 0; i < V + 4; ++i) {
            if (got[i] != want[i] || (i >= V && got[i] != SENTINEL)) {
                fprintf(stderr, "screen_check: %s scan differs at row %" PRId64 " (V=%" PRId64 " n=%" PRId64
                        " d=%d L=%d K=%d): %d vs %d\n", carvq_screen_simd_name(), i, V, l.n_embd, l.group_size,
                        l.levels, l.codebook_size, got[i], want[i]);
                return 1;
            }
        }
        free(codes); free(cb); free(h); free(blocks); free(q); free(work); free(got); free(want);
    }
    printf("screen_check: scan=%s, %ld passed, 0 failed\n", carvq_screen_simd_name(), iters);
    return 0;
}
