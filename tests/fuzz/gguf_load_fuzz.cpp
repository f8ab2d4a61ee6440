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

#include "fuzz_load.h"
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

    fuzz_load_and_decode(path);
    close(fd);
    return 0;
}
