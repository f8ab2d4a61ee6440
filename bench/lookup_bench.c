// carvq-lookup-bench: rows/s and bytes/s of the CARVQ decoder, next to a plain memcpy of the
// same rows and ggml's get_rows on Q8_0 and Q4_K copies of the same matrix, in one process.
//
//   carvq-lookup-bench [V n d L]      (default 32768 2048 8 3: n a multiple of 256 for Q4_K)
//
// The decoder and get_rows both run as ggml graphs on ggml's CPU thread pool, so thread
// dispatch costs the same for each. Prints one JSON object per measurement.

#include "carvq.h"
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
static uint32_t rng_u32(void) { // xorshift64*: reproducible, no libc rand() state
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t) ((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rng_f32(void) { return (float) rng_u32() / 4294967296.0f - 0.5f; }

// the same op as llama-carvq.cpp's: thread ith decodes its slice of rows
static void rvq_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct carvq_layout * l = userdata;
    const struct ggml_tensor * ids = dst->src[2];
    const int64_t n_ids = ids->ne[0];
    const int64_t per = (n_ids + nth - 1) / nth;
    const int64_t first = per * ith;
    const int64_t last = first + per < n_ids ? first + per : n_ids;
    if (first < last) {
        carvq_rows_decode(l, dst->src[0]->data, dst->src[1]->data, CARVQ_CODEBOOK_F16, ids->data, n_ids,
                          dst->data, (int64_t) (dst->nb[1] / sizeof(float)), first, last);
    }
}

// as in llama-carvq.cpp: rows are the unit of work, so a few rows go to one thread
static int carvq_rvq_tasks(int64_t n_rows) { return n_rows < 8 ? 1 : GGML_N_TASKS_MAX; }

// seconds per call of fn, repeated until at least min_s have passed
#define TIME_LOOP(result, min_s, body) do { \
        int64_t reps_ = 0; double t0_ = now_s(), el_ = 0; \
        do { body; reps_++; el_ = now_s() - t0_; } while (el_ < (min_s)); \
        (result) = el_ / reps_; } while (0)

static void report(const char * what, int64_t batch, int threads, double sec, int64_t n) {
    const double rows = batch / sec;
    printf("{\"what\": \"%s\", \"batch\": %lld, \"threads\": %d, \"rows_per_s\": %.1f, \"out_bytes_per_s\": %.1f}\n",
           what, (long long) batch, threads, rows, rows * n * sizeof(float));
    fflush(stdout);
}

int main(int argc, char ** argv) {
    const int64_t V = argc > 1 ? atoll(argv[1]) : 32768;
    const int64_t n = argc > 2 ? atoll(argv[2]) : 2048;
    const int32_t d = argc > 3 ? atoi(argv[3]) : 8;
    const int32_t L = argc > 4 ? atoi(argv[4]) : 3;
    struct carvq_layout l = { V, n, CARVQ_FORMAT_VERSION, d, L, 16, 0, 0 };
    char err[256];
    if (carvq_layout_check(&l, err, sizeof(err))) {
        fprintf(stderr, "carvq-lookup-bench: %s\n", err);
        return 1;
    }
    const int64_t B = carvq_layout_code_row_bytes(&l);
    const int64_t n_cb = carvq_layout_codebooks_nelements(&l);

    struct ggml_init_params ip = { (size_t) (V * n * 4 * 2 + V * B + n_cb * 2) + (size_t) 512 * 1024 * 1024, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * codes = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, B, V);
    struct ggml_tensor * cbook = ggml_new_tensor_1d(ctx, GGML_TYPE_F16, n_cb);
    struct ggml_tensor * dense = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, V);
    struct ggml_tensor * q8    = ggml_new_tensor_2d(ctx, GGML_TYPE_Q8_0, n, V);
    struct ggml_tensor * q4k   = n % 256 == 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_K, n, V) : NULL;

    const int G = (int) (n / d);
    uint8_t * c = codes->data;
    for (int64_t t = 0; t < V; t++) {
        for (int64_t j = 0; j < B; j++) {
            const int lo = (int) (rng_u32() & 15), hi = 2 * j + 1 < (int64_t) G * L ? (int) (rng_u32() & 15) : 0;
            c[t * B + j] = (uint8_t) (lo | hi << 4);
        }
    }
    ggml_fp16_t * cb = cbook->data;
    for (int64_t i = 0; i < n_cb; i++) {
        cb[i] = ggml_fp32_to_fp16(rng_f32() * 0.2f);
    }
    int32_t * all = malloc(sizeof(int32_t) * V);
    for (int64_t t = 0; t < V; t++) {
        all[t] = (int32_t) t;
    }
    carvq_rows_decode(&l, codes->data, cbook->data, CARVQ_CODEBOOK_F16, all, V, dense->data, n, 0, V);
    ggml_quantize_chunk(GGML_TYPE_Q8_0, dense->data, q8->data, 0, V, n, NULL);
    if (q4k) {
        ggml_quantize_chunk(GGML_TYPE_Q4_K, dense->data, q4k->data, 0, V, n, NULL);
    }
    fprintf(stderr, "carvq-lookup-bench: V=%lld n=%lld d=%d L=%d, decoder path %s\n", (long long) V, (long long) n, d, L,
            carvq_simd_name(CARVQ_CODEBOOK_F16));

    const int64_t batches[] = { 1, 32, 512 };
    float * sink = malloc(sizeof(float) * 512 * n);
    for (int bi = 0; bi < 3; bi++) {
        const int64_t batch = batches[bi];
        struct ggml_tensor * ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, batch);
        for (int64_t i = 0; i < batch; i++) {
            ((int32_t *) ids->data)[i] = (int32_t) (rng_u32() % V);
        }
        double sec;
        // memcpy of the same rows from the dense F32 matrix: the bandwidth yardstick
        TIME_LOOP(sec, 0.3, {
            for (int64_t i = 0; i < batch; i++) {
                memcpy(sink + i * n, (const float *) dense->data + (int64_t) ((int32_t *) ids->data)[i] * n, n * sizeof(float));
            }
        });
        report("memcpy_f32", batch, 1, sec, n);

        for (int threads = 1; threads <= 2; threads++) {
            // one thread pool and work buffer per setting, as llama.cpp keeps them across tokens
            struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
            struct ggml_threadpool * tp = ggml_threadpool_new(&tpp);
            struct ggml_tensor * args[3] = { codes, cbook, ids };
            struct ggml_tensor * ops[3] = {
                ggml_custom_4d(ctx, GGML_TYPE_F32, n, batch, 1, 1, args, 3, rvq_op, carvq_rvq_tasks(batch), &l),
                ggml_get_rows(ctx, q8, ids),
                q4k ? ggml_get_rows(ctx, q4k, ids) : NULL,
            };
            const char * names[3] = { "carvq", "get_rows_q8_0", "get_rows_q4_k" };
            for (int k = 0; k < 3; k++) {
                if (!ops[k]) {
                    continue;
                }
                struct ggml_cgraph * gf = ggml_new_graph(ctx);
                ggml_build_forward_expand(gf, ops[k]);
                struct ggml_cplan plan = ggml_graph_plan(gf, threads, tp);
                void * work = plan.work_size ? malloc(plan.work_size) : NULL;
                plan.work_data = work;
                ggml_graph_compute(gf, &plan); // warm-up
                TIME_LOOP(sec, 0.3, ggml_graph_compute(gf, &plan));
                report(names[k], batch, threads, sec, n);
                free(work);
            }
            ggml_threadpool_free(tp);
        }
    }
    free(sink);
    free(all);
    ggml_free(ctx);
    return 0;
}
