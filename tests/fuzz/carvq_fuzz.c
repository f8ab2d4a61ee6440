// Fuzz / differential harness for patches/src/carvq.c.
//
// Each input is turned into a layout plus codes, codebooks, hot rows and ids (mostly valid,
// sometimes not). The harness runs carvq_layout_check / carvq_codes_check / carvq_hot_check /
// carvq_ids_check, and only when they pass decodes the rows twice: carvq_rows_decode (SIMD
// when compiled in) and carvq_rows_decode_scalar, the one scalar reference (which
// tests/test_c_decoder.py checks against the NumPy reference), each followed by
// carvq_rows_hot_add. Both must be bit-identical and must not write outside their rows. A
// stride below n (which must write nothing) comes up in one input in four. A
// second mode feeds raw 64-bit shapes to the layout checks and verifies (with 128-bit
// arithmetic) that every accepted layout has byte sizes that fit in int64_t.
//
// NaN results are compared as "both NaN": when both operands of an add are NaN, which
// payload survives depends on operand order, and compilers may swap the operands of a
// commutative add (in C and in NumPy alike), so FORMAT.md's bit-exactness excludes NaN
// payloads. Every non-NaN result must match bit for bit.
//
// libFuzzer:  clang -O1 -g -ffp-contract=off -fsanitize=fuzzer,address,undefined -march=native
//                 -Ipatches/src tests/fuzz/carvq_fuzz.c patches/src/carvq.c -o carvq_fuzz
//             ./carvq_fuzz -max_total_time=60
// standalone: cc -O2 -ffp-contract=off -DCARVQ_FUZZ_STANDALONE -Ipatches/src
//                 tests/fuzz/carvq_fuzz.c patches/src/carvq.c -o carvq_fuzz
//             ./carvq_fuzz [iterations [seed]]     random inputs, prints "carvq_fuzz: N passed, 0 failed"
//             ./carvq_fuzz FILE...                 replays inputs (e.g. a libFuzzer crash file)
// (the standalone build is how the NEON path is checked under qemu-aarch64)

#include "carvq.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define FUZZ_FAIL(...) do { fprintf(stderr, "carvq_fuzz: " __VA_ARGS__); fputc('\n', stderr); abort(); } while (0)

struct reader {
    const uint8_t * p;
    size_t n, i;
};

static uint8_t rd_u8(struct reader * r) {
    return r->i < r->n ? r->p[r->i++] : 0;
}

static uint64_t rd_u64(struct reader * r) {
    uint64_t x = 0;
    for (int k = 0; k < 8; ++k) {
        x |= (uint64_t) rd_u8(r) << (8 * k);
    }
    return x;
}

// 128-bit products: the harness's own overflow arithmetic, independent of carvq.c
static int fits(unsigned __int128 x) {
    return x <= (unsigned __int128) INT64_MAX;
}

static void fuzz_huge(struct reader * r) {
    struct carvq_layout l = {0}; // no hot rows: this harness covers the version-1 paths
    l.n_vocab = (int64_t) rd_u64(r);
    l.n_embd = (int64_t) rd_u64(r);
    l.format_version = 1;
    l.group_size = (int32_t) (uint32_t) rd_u64(r);
    l.levels = (int32_t) (rd_u8(r) % 20) - 1;
    l.codebook_size = (int32_t) (rd_u8(r) % 20) - 1;
    l.adaptor_rank = (int32_t) (uint32_t) rd_u64(r) % 2000;
    l.adaptor_hidden = l.adaptor_rank ? (int32_t) ((uint32_t) rd_u64(r) % 70000) : 0;
    char err[256] = "";
    const int rc = carvq_layout_check(&l, err, sizeof(err));
    if (rc != 0) {
        if (err[0] == '\0' || strchr(err, '\n')) FUZZ_FAIL("bad message for a rejected layout");
        if (carvq_layout_codes_nbytes(&l) != -1 || carvq_layout_codebooks_nbytes(&l, CARVQ_CODEBOOK_F32) != -1)
            FUZZ_FAIL("size of a rejected layout is not -1");
        return;
    }
    const unsigned __int128 V = (uint64_t) l.n_vocab, n = (uint64_t) l.n_embd, d = (uint64_t) l.group_size;
    const unsigned __int128 G = n / d, GL = G * (uint64_t) l.levels, B = (GL + 1) / 2;
    const unsigned __int128 cb = GL * (uint64_t) l.codebook_size * d;
    if (l.n_vocab < 1 || l.n_embd < 1 || l.group_size < 1 || n % d != 0) FUZZ_FAIL("accepted a bad shape");
    if (!fits(V * B) || !fits(cb * 4) || !fits(V * n * 4) || !fits(V * (uint64_t) l.adaptor_rank * 4) ||
        !fits(n * (uint64_t) l.adaptor_hidden * 4)) {
        FUZZ_FAIL("accepted a layout whose byte sizes overflow: V=%" PRId64 " n=%" PRId64, l.n_vocab, l.n_embd);
    }
    if ((unsigned __int128) carvq_layout_codes_nbytes(&l) != V * B ||
        (unsigned __int128) carvq_layout_codebooks_nbytes(&l, CARVQ_CODEBOOK_F32) != cb * 4 ||
        (unsigned __int128) carvq_layout_codebooks_nbytes(&l, CARVQ_CODEBOOK_F16) != cb * 2 ||
        (unsigned __int128) carvq_layout_code_row_bytes(&l) != B) {
        FUZZ_FAIL("wrong sizes");
    }
}

static const uint32_t SENTINEL = 0x7fbadbadu;
static long n_decoded;     // inputs that reached the decode (reported by the standalone driver)
static long n_decoded_hot; // ... of them with hot rows

// rows x B packed bytes of GL codes from the input: valid (codes < K, zero padding) unless raw
static void fill_codes(struct reader * r, uint8_t * codes, int64_t rows, int64_t B, int64_t GL, int64_t K, int raw) {
    for (int64_t t = 0; t < rows; ++t) {
        for (int64_t b = 0; b < B; ++b) {
            uint8_t x = rd_u8(r);
            if (!raw) {
                const unsigned lo = (x & 15u) % (unsigned) K;
                unsigned hi = (unsigned) (x >> 4) % (unsigned) K;
                if (2 * b + 1 >= GL) hi = 0;
                x = (uint8_t) (lo | (hi << 4));
            }
            codes[t * B + b] = x;
        }
    }
}

// the format's rule for packed codes, written here independently of carvq_codes_check
static int codes_valid(const uint8_t * codes, int64_t rows, int64_t B, int64_t GL, int64_t K) {
    for (int64_t k = 0; k < rows * B; ++k) {
        const int64_t b = k % B;
        const unsigned lo = codes[k] & 15u, hi = codes[k] >> 4;
        if (lo >= (unsigned) K || (2 * b + 1 < GL ? hi >= (unsigned) K : hi != 0)) return 0;
    }
    return 1;
}

static int same_bits(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y || ((x & 0x7fffffffu) > 0x7f800000u && (y & 0x7fffffffu) > 0x7f800000u);
}

// carvq_rows_dot: each product the same bits whatever the tile around it (every row and state
// at once against one pair at a time), and nothing written between a state's n_rows outputs and
// the next state's (ld > n_rows)
static void check_rows_dot(const float * rows, int64_t n_rows, const float * hs, int64_t n_states, int64_t n) {
    const int64_t ld = n_rows + 3;
    float * all = malloc((size_t) (n_states * ld) * sizeof(float) + 1);
    for (int64_t e = 0; e < n_states * ld; ++e) memcpy(&all[e], &SENTINEL, 4);
    carvq_rows_dot(rows, n_rows, hs, n_states, n, all, ld);
    for (int64_t s = 0; s < n_states; ++s) {
        for (int64_t r = 0; r < ld; ++r) {
            if (r >= n_rows) {
                uint32_t got;
                memcpy(&got, &all[s * ld + r], 4);
                if (got != SENTINEL) FUZZ_FAIL("rows_dot wrote past its rows (state %" PRId64 ")", s);
                continue;
            }
            float one = 0.0f;
            carvq_rows_dot(rows + r * n, 1, hs + s * n, 1, n, &one, 1);
            if (!same_bits(one, all[s * ld + r])) {
                FUZZ_FAIL("rows_dot depends on its tile: n=%" PRId64 " rows=%" PRId64 " states=%" PRId64 " (%" PRId64
                          ", %" PRId64 ")", n, n_rows, n_states, r, s);
            }
        }
    }
    free(all);
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    struct reader r = { data, size, 0 };
    const uint8_t flags = rd_u8(&r);
    if (flags & 0x10) {
        fuzz_huge(&r);
        return 0;
    }
    // small shapes, so that buffers can be allocated and filled
    struct carvq_layout l = {0};
    l.format_version = (flags & 3) == 3 ? (int32_t) rd_u8(&r) : (flags & 3) == 2 ? 2 : 1;
    l.n_vocab = 1 + rd_u8(&r);
    l.group_size = rd_u8(&r) % 34;
    const int64_t G = rd_u8(&r) % 32;
    const uint8_t mis = rd_u8(&r);
    l.n_embd = G * l.group_size + ((mis & 0x80) ? (mis & 7) : 0);
    l.levels = rd_u8(&r) % 18;
    l.codebook_size = rd_u8(&r) % 18;
    const uint8_t m = rd_u8(&r), h = rd_u8(&r);
    l.adaptor_rank = (m & 3) ? m * 5 : 0;
    l.adaptor_hidden = (h & 3) ? h * 300 : 0;
    const int f16 = (flags >> 2) & 1, raw_codes = (flags >> 3) & 1, wild_ids = (flags >> 5) & 1;
    const int64_t pad = (flags >> 6) * 3;
    const int64_t n_ids = rd_u8(&r);
    const uint8_t fa = rd_u8(&r), fb = rd_u8(&r);
    const uint8_t hn = rd_u8(&r), hl = rd_u8(&r);
    if (l.format_version >= 2) {
        l.hot_rows = hn % (l.n_vocab + 1);
        l.hot_levels = l.hot_rows ? 1 + hl % 16 : 0;
    }

    char err[256] = "";
    if (carvq_layout_check(&l, err, sizeof(err)) != 0) {
        if (err[0] == '\0') FUZZ_FAIL("rejected layout without a message");
        return 0;
    }
    const int64_t V = l.n_vocab, n = l.n_embd, K = l.codebook_size;
    const int64_t B = carvq_layout_code_row_bytes(&l);
    const int64_t GL = (n / l.group_size) * l.levels;
    const int64_t cb_nel = carvq_layout_codebooks_nelements(&l);
    const size_t esize = f16 ? 2 : 4;
    if (carvq_layout_codebooks_nbytes(&l, f16 ? CARVQ_CODEBOOK_F16 : CARVQ_CODEBOOK_F32) != cb_nel * (int64_t) esize)
        FUZZ_FAIL("codebooks_nbytes");

    // exactly-sized heap buffers so that ASan sees any over-read / over-write
    const int64_t N = l.hot_rows, GLh = (n / l.group_size) * l.hot_levels, Bh = (GLh + 1) / 2;
    const int64_t hot_cb_nel = GLh * K * l.group_size;
    uint8_t * codes = malloc((size_t) (V * B) + 1);
    uint8_t * cb = malloc((size_t) cb_nel * esize + 1);
    int32_t * ids = malloc((size_t) n_ids * sizeof(int32_t) + 1);
    int32_t * hot_ids = malloc((size_t) N * sizeof(int32_t) + 1);
    uint8_t * hot_codes = malloc((size_t) (N * Bh) + 1);
    uint8_t * hot_cb = malloc((size_t) hot_cb_nel * esize + 1);
    fill_codes(&r, codes, V, B, GL, K, raw_codes);
    fill_codes(&r, hot_codes, N, Bh, GLh, K, raw_codes);
    for (int64_t j = 0; j < N; ++j) {
        hot_ids[j] = (int32_t) (j * V / N); // strictly increasing for N <= V
    }
    if (wild_ids && N > 1) { // out of order: carvq_hot_check must refuse
        hot_ids[0] = hot_ids[N - 1];
    }
    // codebook values: the input's bytes as raw bit patterns (NaN, inf, subnormals, -0 ...),
    // cycled when the input is shorter
    const size_t rest = r.n - r.i;
    for (size_t k = 0; k < (size_t) cb_nel * esize; ++k) {
        cb[k] = rest ? r.p[r.i + k % rest] : (uint8_t) k;
    }
    for (size_t k = 0; k < (size_t) hot_cb_nel * esize; ++k) {
        hot_cb[k] = rest ? r.p[r.i + (k * 7 + 3) % rest] : (uint8_t) (k * 7);
    }
    for (int64_t k = 0; k < n_ids; ++k) {
        const uint8_t x = rest ? r.p[r.i + (size_t) k % rest] : (uint8_t) k;
        ids[k] = wild_ids ? (int32_t) x - 8 : (int32_t) (x % V);
    }

    const int codes_ok = codes_valid(codes, V, B, GL, K);
    if ((carvq_codes_check(&l, codes, err, sizeof(err)) == 0) != codes_ok) FUZZ_FAIL("codes_check disagrees");
    const int hot_ok = codes_valid(hot_codes, N, Bh, GLh, K) && !(wild_ids && N > 1);
    if (N > 0 && (carvq_hot_check(&l, hot_ids, hot_codes, err, sizeof(err)) == 0) != hot_ok) {
        FUZZ_FAIL("hot_check disagrees");
    }
    int ids_ok = 1;
    for (int64_t k = 0; k < n_ids; ++k) {
        if (ids[k] < 0 || ids[k] >= V) ids_ok = 0;
    }
    if ((carvq_ids_check(&l, ids, n_ids, err, sizeof(err)) == 0) != ids_ok) FUZZ_FAIL("ids_check disagrees");

    if (codes_ok && ids_ok && (N == 0 || hot_ok)) {
        // a stride below n (one input in four with n > 1) must write nothing at all
        const int short_stride = pad == 9 && n > 1;
        const int64_t stride = short_stride ? n / 2 : n + pad;
        const int64_t first = n_ids ? (fa % (n_ids + 1)) : 0;
        const int64_t last = n_ids ? first + (fb % (n_ids - first + 1)) : 0;
        const size_t out_nel = (size_t) (n_ids * stride);
        float * out[2];
        for (int k = 0; k < 2; ++k) {
            out[k] = malloc(out_nel * sizeof(float) + 1);
            for (size_t e = 0; e < out_nel; ++e) memcpy(&out[k][e], &SENTINEL, 4);
        }
        const enum carvq_codebook_type type = f16 ? CARVQ_CODEBOOK_F16 : CARVQ_CODEBOOK_F32;
        n_decoded++;
        n_decoded_hot += N > 0;
        carvq_rows_decode(&l, codes, cb, type, ids, n_ids, out[0], stride, first, last);
        carvq_rows_decode_scalar(&l, codes, cb, type, ids, n_ids, out[1], stride, first, last);
        for (int k = 0; k < 2; ++k) {
            carvq_rows_hot_add(&l, hot_ids, hot_codes, hot_cb, type, ids, n_ids, out[k], stride, first, last);
        }
        for (int64_t row = 0; row < n_ids; ++row) {
            const int inside = !short_stride && row >= first && row < last;
            for (int64_t e = 0; e < stride; ++e) {
                uint32_t got, want;
                memcpy(&got, &out[0][row * stride + e], 4);
                memcpy(&want, &out[1][row * stride + e], 4);
                if (inside && e < n) {
                    if (!same_bits(out[0][row * stride + e], out[1][row * stride + e])) {
                        FUZZ_FAIL("%s decode differs from the scalar reference: V=%" PRId64 " n=%" PRId64 " d=%d L=%d "
                                "K=%d N=%" PRId64 " Lh=%d f16=%d row %" PRId64 " elem %" PRId64 ": %08x vs %08x",
                                carvq_simd_name(type), V, n, l.group_size, l.levels, l.codebook_size, N, l.hot_levels,
                                f16, row, e, got, want);
                    }
                } else if (got != SENTINEL || want != SENTINEL) {
                    FUZZ_FAIL("decode wrote outside its rows (row %" PRId64 ", elem %" PRId64 ")", row, e);
                }
            }
        }
        if (!short_stride && last > first && n > 0) {
            // carvq_hot_row_add (SIMD where W | d) continues the same sums as carvq_rows_hot_add
            float * alone = malloc((size_t) ((last - first) * n) * sizeof(float) + 1);
            carvq_rows_decode(&l, codes, cb, type, ids + first, last - first, alone, n, 0, last - first);
            for (int64_t row = first; row < last; ++row) {
                for (int64_t j = 0; j < N; ++j) {
                    if (hot_ids[j] == ids[row]) {
                        carvq_hot_row_add(&l, 0, j, hot_codes, hot_cb, type, alone + (row - first) * n);
                    }
                }
                for (int64_t e = 0; e < n; ++e) {
                    if (!same_bits(alone[(row - first) * n + e], out[1][row * stride + e])) {
                        FUZZ_FAIL("%s hot_row_add differs from rows_hot_add: n=%" PRId64 " d=%d Lh=%d f16=%d row %" PRId64,
                                  carvq_simd_name(type), n, l.group_size, l.hot_levels, f16, row);
                    }
                }
            }
            // the decoded rows times themselves as states (values of every kind: NaN, inf, subnormals)
            const int64_t n_rows = last - first, n_states = n_rows < 7 ? n_rows : 7;
            check_rows_dot(alone, n_rows, alone + (n_rows - n_states) * n, n_states, n);
            free(alone);
        }
        free(out[0]);
        free(out[1]);
    }
    free(codes);
    free(cb);
    free(ids);
    free(hot_ids);
    free(hot_codes);
    free(hot_cb);
    return 0;
}

#if defined(CARVQ_FUZZ_STANDALONE)
#include "splitmix.h"

int main(int argc, char ** argv) {
    if (argc > 1 && (argv[1][0] < '0' || argv[1][0] > '9')) { // replay files
        for (int a = 1; a < argc; ++a) {
            FILE * f = fopen(argv[a], "rb");
            if (!f) { perror(argv[a]); return 1; }
            static uint8_t buf[1 << 20];
            const size_t len = fread(buf, 1, sizeof(buf), f);
            fclose(f);
            LLVMFuzzerTestOneInput(buf, len);
        }
        printf("carvq_fuzz: %d passed, 0 failed\n", argc - 1);
        return 0;
    }
    const long iters = argc > 1 ? atol(argv[1]) : 10000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    static uint8_t buf[4096];
    for (long it = 0; it < iters; ++it) {
        const size_t len = 12 + (size_t) (rng_next() % (sizeof(buf) - 12));
        for (size_t k = 0; k < len; ++k) buf[k] = (uint8_t) rng_next();
        // bias towards decodable inputs: version 1 or 2 (hot rows), no huge mode, valid codes and ids
        if (it % 4 != 0) {
            buf[0] &= (uint8_t) ~(0x10 | 0x08 | 0x20);
            if ((buf[0] & 3) == 3) buf[0] &= (uint8_t) ~1;
            buf[2] = (uint8_t) (1 + buf[2] % 33);               // d >= 1
            buf[4] &= 0x7f;                                     // n % d == 0
            buf[5] = (uint8_t) (1 + buf[5] % 16);               // L
            buf[6] = (uint8_t) (2 + buf[6] % 15);               // K
            buf[7] &= (uint8_t) ~3;                             // m = 0
            buf[8] &= (uint8_t) ~3;                             // h = 0
        }
        LLVMFuzzerTestOneInput(buf, len);
    }
    printf("carvq_fuzz: simd=%s/%s, %ld of %ld inputs decoded, %ld with hot rows\n", carvq_simd_name(CARVQ_CODEBOOK_F32),
            carvq_simd_name(CARVQ_CODEBOOK_F16), n_decoded, iters, n_decoded_hot);
    printf("carvq_fuzz: %ld passed, 0 failed\n", iters);
    return 0;
}
#endif
