// fuzz_load.h - what both loader fuzz targets do with a file: load it through the patched
// llama.cpp and, when it loads, decode three tokens (first, last, middle of the vocabulary)
// through the CARVQ lookup and the screened head.
#pragma once

#include "llama.h"

static inline void fuzz_load_and_decode(const char * path) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(path, mp);
    if (model == nullptr) {
        return;  // refused: the expected outcome for most inputs
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 32;
    cp.n_batch = 32;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx != nullptr) {
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
        if (n_vocab > 0) {
            llama_token tokens[3] = { 0, n_vocab - 1, n_vocab / 2 };
            (void) llama_decode(ctx, llama_batch_get_one(tokens, 3));
        }
        llama_free(ctx);
    }
    llama_model_free(model);
}
