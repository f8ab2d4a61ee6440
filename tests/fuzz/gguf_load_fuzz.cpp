// Whole files through the patched llama.cpp loader (issue 12, item 10): each input is a GGUF
// file that llama_model_load_from_file loads from a memfd; a model that loads gets a context
// and decodes its first tokens through the CARVQ lookup (and the screened head, forced). Any
// crash, sanitizer report or hang is a finding; a refused file is the expected outcome.
//
// Seed it with the hostile corpus and good CARVQ files (tests/fuzz/run_gguf_fuzz.sh does it):
//   clang++ -O1 -g -fsanitize=fuzzer,address -Iinclude -Iggml/include gguf_load_fuzz.cpp \
//       -Lbuild/bin -lllama -lggml -lggml-base -Wl,-rpath,build/bin -o gguf_load_fuzz
//   ./gguf_load_fuzz CORPUS_DIR SEED_DIR -max_total_time=3600
// Build libllama itself with -fsanitize=address,fuzzer-no-link so that the loader is covered.

#include "llama.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

static void quiet_log(enum ggml_log_level, const char *, void *) {}

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    setenv("CARVQ_HEAD", "screened", 1);  // the screen's tables and exact rows on every input
    setenv("CARVQ_SCREEN_K", "7", 1);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    const int fd = memfd_create("gguf", 0);
    if (fd < 0) {
        return 0;
    }
    size_t done = 0;
    while (done < size) {
        const ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) {
            close(fd);
            return 0;
        }
        done += (size_t) w;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(path, mp);
    if (model != nullptr) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 32;
        cp.n_batch = 32;
        cp.n_threads = 1;
        cp.n_threads_batch = 1;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (ctx != nullptr) {
            const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
            llama_token tokens[3] = { 0, n_vocab > 1 ? 1 : 0, n_vocab > 2 ? n_vocab - 1 : 0 };
            llama_batch batch = llama_batch_get_one(tokens, n_vocab > 0 ? 3 : 0);
            if (n_vocab > 0) {
                (void) llama_decode(ctx, batch);
            }
            llama_free(ctx);
        }
        llama_model_free(model);
    }
    close(fd);
    return 0;
}
