// Structure-aware fuzzing of the CARVQ part of the patched loader (issue 12, item 10).
//
// Whole-file fuzzing (gguf_load_fuzz.cpp) spends most of its time in llama.cpp's own GGUF and
// vocabulary parsers, and stops at their first abort. This target keeps the file well-formed
// and mutates only what carvq owns: each input is a list of edits to a good CARVQ file (set a
// carvq.* key, or general.architecture / the embedding width, to any type and value, remove
// it, or overwrite bytes of a CARVQ tensor or the head copy). The edited file is written with
// ggml's gguf writer to a memfd and loaded with llama_model_load_from_file; a model that loads
// decodes a few tokens through the lookup and the screened head. A refusal is the expected
// outcome; a crash, a sanitizer report or a hang is a finding.
//
//   CARVQ_FUZZ_BASE=good.carvq.gguf ./carvq_load_fuzz CORPUS -max_total_time=1800
// (build: tests/fuzz/run_gguf_fuzz.sh, which builds both targets)

#include "fuzz_load.h"
#include "llama.h"
#include "ggml.h"
#include "gguf.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static const char * g_base = nullptr;
static std::string g_arch;

static const char * const KEYS[] = {
    "carvq.format_version", "carvq.group_size", "carvq.levels", "carvq.codebook_size", "carvq.adaptor_rank",
    "carvq.adaptor_hidden", "carvq.adaptor_activation", "carvq.hot_rows", "carvq.hot_levels", "carvq.head_copy",
    "carvq.hot_map", "general.architecture", nullptr /* {arch}.embedding_length */,
};
static const char * const TENSORS[] = {
    "token_embd.carvq.codes", "token_embd.carvq.codebooks", "token_embd.carvq.sigma0", "token_embd.carvq.up.weight",
    "token_embd.carvq.up.bias", "token_embd.carvq.down.weight", "token_embd.carvq.down.bias",
    "token_embd.carvq.hot_ids", "token_embd.carvq.hot_codes", "token_embd.carvq.hot_codebooks", "output.weight",
    "token_embd.carvq.hot_map", // a tiered base file (format v7)
};

static void quiet_log(enum ggml_log_level, const char *, void *) {}

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    g_base = getenv("CARVQ_FUZZ_BASE");
    if (g_base == nullptr) {
        fprintf(stderr, "set CARVQ_FUZZ_BASE to a good CARVQ-GGUF\n");
        exit(1);
    }
    gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ nullptr };
    gguf_context * meta = gguf_init_from_file(g_base, params);
    if (meta == nullptr) {
        fprintf(stderr, "cannot read %s\n", g_base);
        exit(1);
    }
    g_arch = gguf_get_val_str(meta, gguf_find_key(meta, "general.architecture"));
    gguf_free(meta);
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    setenv("CARVQ_HEAD", "screened", 1);
    setenv("CARVQ_SCREEN_K", "7", 1);
    return 0;
}

struct input {
    const uint8_t * p;
    size_t n, i = 0;
    uint8_t u8() { return i < n ? p[i++] : 0; }
    uint32_t u32() { uint32_t x = 0; for (int k = 0; k < 4; ++k) x |= (uint32_t) u8() << (8 * k); return x; }
};

static void edit_key(gguf_context * g, input & in) {
    const size_t n_keys = sizeof(KEYS) / sizeof(KEYS[0]);
    const size_t which = in.u8() % n_keys;
    const std::string key = KEYS[which] ? KEYS[which] : g_arch + ".embedding_length";
    const uint8_t kind = in.u8() % 6;
    const uint32_t v = in.u32();
    switch (kind) {
        case 0: gguf_set_val_u32(g, key.c_str(), v % 4 == 0 ? v : v % 70); break; // small values matter most
        case 1: gguf_set_val_i32(g, key.c_str(), (int32_t) v); break;
        case 2: { float f; memcpy(&f, &v, 4); gguf_set_val_f32(g, key.c_str(), f); } break;
        case 3: {
            static const char * const strs[] = { "relu", "silu", "gelu", "none", "", "llama", "gemma3", "bitnet", "qwen3vl" };
            gguf_set_val_str(g, key.c_str(), strs[v % 9]);
        } break;
        case 4: gguf_set_val_bool(g, key.c_str(), v & 1); break;
        default: gguf_remove_key(g, key.c_str()); break;
    }
}

static void edit_tensor(ggml_context * data, input & in) {
    const char * name = TENSORS[in.u8() % (sizeof(TENSORS) / sizeof(TENSORS[0]))];
    ggml_tensor * t = ggml_get_tensor(data, name);
    const uint32_t off = in.u32();
    const uint8_t len = in.u8() % 17;
    if (t == nullptr || ggml_nbytes(t) == 0) {
        return;
    }
    uint8_t * bytes = (uint8_t *) t->data;
    for (uint8_t k = 0; k < len; ++k) {
        bytes[(off + k) % ggml_nbytes(t)] = in.u8();
    }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * p, size_t size) {
    ggml_context * data = nullptr;
    gguf_init_params params = { /*no_alloc =*/ false, /*ctx =*/ &data };
    gguf_context * base = gguf_init_from_file(g_base, params);
    if (base == nullptr) {
        return 0;
    }
    gguf_context * out = gguf_init_empty();
    gguf_set_kv(out, base);
    input in{ p, size };
    const int n_edits = 1 + in.u8() % 4;
    for (int e = 0; e < n_edits; ++e) {
        if (in.u8() & 1) {
            edit_key(out, in);
        } else {
            edit_tensor(data, in);
        }
    }
    for (int64_t i = 0; i < gguf_get_n_tensors(base); ++i) {
        gguf_add_tensor(out, ggml_get_tensor(data, gguf_get_tensor_name(base, i)));
    }
    const int fd = memfd_create("carvq", 0);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    const bool written = fd >= 0 && gguf_write_to_file(out, path, false);
    gguf_free(out);
    gguf_free(base);
    ggml_free(data);
    if (written) {
        fuzz_load_and_decode(path);
    }
    if (fd >= 0) {
        close(fd);
    }
    return 0;
}
