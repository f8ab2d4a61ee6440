// carvq-screen-bench: the screened head's scan against its physical limit (a memcpy of the
// same code bytes) and against the dense head it replaces (ggml's mul_mat of one hidden
// state by a Q8_0 and a Q5_0 head), all on one thread, in one process; plus the table build
// and the top-k.
//
//   carvq-screen-bench [V n d L]      (default 262144 640 16 6: Gemma-3-270M at 1.6 bpw)
//
// Prints one JSON object per measurement.

#include "carvq.h"
#include "carvq-screen.h"
#include "ggml.h"
#include "ggml-cpu.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rng_u32(void) { // xorshift64*
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t) ((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rng_f32(void) { return (float) rng_u32() / 4294967296.0f - 0.5f; }

// seconds per run of body, repeated until at least min_s have passed
#define TIME_LOOP(result, min_s, body) do { \
        int64_t reps_ = 0; double t0_ = now_s(), el_ = 0; \
        do { body; reps_++; el_ = now_s() - t0_; } while (el_ < (min_s)); \
        (result) = el_ / reps_; } while (0)

static void report(const char * what, double sec, double bytes, int64_t V) {
    printf("{\"what\": \"%s\", \"seconds\": %.6g, \"bytes\": %.0f, \"bytes_per_s\": %.4g, \"rows_per_s\": %.4g}\n",
           what, sec, bytes, bytes / sec, V / sec);
    fflush(stdout);
}

static double dense_head(enum ggml_type type, int64_t V, int64_t n, const float * h) {
    const size_t row = ggml_row_size(type, n);
    struct ggml_init_params ip = { row * (size_t) V + (size_t) n * 8 + (size_t) V * 8 + (size_t) 64 * 1024 * 1024, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * w = ggml_new_tensor_2d(ctx, type, n, V);
    struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, 1);
    float * tmp = malloc((size_t) n * V * sizeof(float));
    for (int64_t i = 0; i < n * V; ++i) tmp[i] = rng_f32();
    ggml_quantize_chunk(type, tmp, w->data, 0, V, n, NULL);
    free(tmp);
    memcpy(x->data, h, (size_t) n * sizeof(float));
    struct ggml_tensor * y = ggml_mul_mat(ctx, w, x);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
    double sec;
    TIME_LOOP(sec, 0.5, ggml_graph_compute_with_ctx(ctx, gf, 1));
    report(type == GGML_TYPE_Q8_0 ? "dense_head_q8_0" : "dense_head_q5_0", sec, (double) row * V, V);
    ggml_free(ctx);
    return sec;
}

int main(int argc, char ** argv) {
    const int64_t V = argc > 1 ? atoll(argv[1]) : 262144;
    const int64_t n = argc > 2 ? atoll(argv[2]) : 640;
    const int32_t d = argc > 3 ? atoi(argv[3]) : 16;
    const int32_t L = argc > 4 ? atoi(argv[4]) : 6;
    struct carvq_layout l = { V, n, CARVQ_FORMAT_VERSION, d, L, 16, 0, 0, 0, 0 };
    char err[256];
    if (carvq_layout_check(&l, err, sizeof(err))) {
        fprintf(stderr, "carvq-screen-bench: %s\n", err);
        return 1;
    }
    const int64_t B = carvq_layout_code_row_bytes(&l), n_cb = carvq_layout_codebooks_nelements(&l);
    uint8_t * codes = malloc((size_t) (V * B));
    for (int64_t i = 0; i < V * B; ++i) codes[i] = (uint8_t) rng_u32();
    float * cb = malloc((size_t) n_cb * sizeof(float));
    for (int64_t i = 0; i < n_cb; ++i) cb[i] = rng_f32();
    float * h = malloc((size_t) n * sizeof(float));
    for (int64_t i = 0; i < n; ++i) h[i] = rng_f32() * 4.0f;
    const int64_t nbytes = carvq_screen_blocks_nbytes(&l);
    uint8_t * blocks = malloc((size_t) nbytes);
    uint8_t * copy = malloc((size_t) nbytes);
    carvq_screen_relayout(&l, codes, blocks);
    const int64_t G = n / d, GLp = G * L + (G * L) % 2;
    uint8_t * q = malloc((size_t) GLp * 16);
    float * work = malloc((size_t) carvq_screen_work_floats(&l) * sizeof(float));
    int32_t * scores = malloc((size_t) V * sizeof(int32_t));
    int32_t * ids = malloc((size_t) V * sizeof(int32_t));
    uint32_t * hist = malloc((size_t) CARVQ_SCREEN_HIST * sizeof(uint32_t));
    struct carvq_screen_tables t;
    const int64_t n_blocks = (V + CARVQ_SCREEN_BLOCK - 1) / CARVQ_SCREEN_BLOCK;

    printf("{\"what\": \"config\", \"V\": %lld, \"n\": %lld, \"d\": %d, \"L\": %d, \"scan_path\": \"%s\"}\n",
           (long long) V, (long long) n, d, L, carvq_screen_simd_name());
    double sec;
    TIME_LOOP(sec, 0.3, carvq_screen_tables_build(&l, cb, NULL, CARVQ_CODEBOOK_F32, h, work, q, NULL, &t));
    report("tables", sec, (double) n_cb * 4, V);
    TIME_LOOP(sec, 1.0, carvq_screen_scan(&l, blocks, q, 0, n_blocks, scores));
    report("scan", sec, (double) nbytes, V);
    TIME_LOOP(sec, 0.5, carvq_screen_scan_scalar(&l, blocks, q, 0, n_blocks, scores));
    report("scan_scalar", sec, (double) nbytes, V);
    TIME_LOOP(sec, 1.0, memcpy(copy, blocks, (size_t) nbytes));
    report("memcpy_codes", sec, (double) nbytes, V);
    const int64_t ks[] = { 64, 1024, 4096 };
    for (int i = 0; i < 3; ++i) {
        TIME_LOOP(sec, 0.3, carvq_screen_select(scores, V, ks[i], ids, hist));
        char what[32];
        snprintf(what, sizeof(what), "select_%lld", (long long) ks[i]);
        report(what, sec, (double) V * 4, V);
    }
    dense_head(GGML_TYPE_Q8_0, V, n, h);
    dense_head(GGML_TYPE_Q5_0, V, n, h);
    free(codes); free(cb); free(h); free(blocks); free(copy); free(q); free(work); free(scores); free(ids); free(hist);
    return 0;
}
