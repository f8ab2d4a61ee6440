// llama-carvq.h - CARVQ token embeddings inside llama.cpp (docs/FORMAT.md of carvq).
//
// A CARVQ-GGUF has no token_embd.weight; its rows are decoded on the fly from
// token_embd.carvq.* tensors. This header is what the hooks in llama-model and
// llama-graph see; the work is in llama-carvq.cpp and the llama.cpp-free decoder carvq.c.
#pragma once

#include "carvq.h"
#include "llama-arch.h"
#include "ggml-backend.h"

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct llama_model_loader;
struct llama_model_base;
struct llama_model;

// What the screened head scans (docs/SCREEN.md): the output head's own index (format v3:
// output.carvq.*, fitted in the hidden states' metric, with its projection), else, for a tied
// source, the lookup's codes (projection null). Either way the codes re-laid in blocks.
struct llama_carvq_screen {
    carvq_layout layout = {};
    const ggml_tensor * codes         = nullptr;
    const ggml_tensor * codebooks     = nullptr;
    const ggml_tensor * hot_ids       = nullptr;
    const ggml_tensor * hot_codes     = nullptr;
    const ggml_tensor * hot_codebooks = nullptr;
    const ggml_tensor * projection    = nullptr; // F32 {n, n}: tables from h @ P
    std::vector<uint8_t> blocks, hot_blocks;

    bool enabled() const { return !blocks.empty(); }
};

struct llama_carvq {
    ggml_tensor * codes     = nullptr; // I8  {B, V}: packed 4-bit codes
    ggml_tensor * codebooks = nullptr; // F32/F16 {d, K, L, G}
    ggml_tensor * sigma0    = nullptr; // F32/F16 {m, V}     (adaptor only)
    ggml_tensor * up_w      = nullptr; // F32/F16 {m, h}
    ggml_tensor * up_b      = nullptr; // F32 {h}
    ggml_tensor * down_w    = nullptr; // F32/F16 {h, n}
    ggml_tensor * down_b    = nullptr; // F32 {n}
    ggml_tensor * hot_ids   = nullptr; // I32 {N}              (hot rows only, format v2)
    ggml_tensor * hot_codes = nullptr; // I8  {Bh, N}
    ggml_tensor * hot_codebooks = nullptr; // F32/F16 {d, K, Lh, G}

    carvq_layout layout = {};
    int activation = 0; // llama_carvq_act

    // carvq.head_copy: output.weight is the tied source's own matrix, so the codes index the
    // head too and can screen it (docs/SCREEN.md)
    bool head_copy = false;
    // the screen index's tensors as loaded (all null without one: output.carvq.*)
    ggml_tensor * screen_codes = nullptr, * screen_codebooks = nullptr, * screen_hot_ids = nullptr,
                * screen_hot_codes = nullptr, * screen_hot_codebooks = nullptr, * screen_projection = nullptr;
    carvq_layout screen_layout = {};
    llama_carvq_screen screen; // what the screened head reads (empty: no screened head)

    bool enabled() const { return codes != nullptr; }
};

enum llama_carvq_act { LLAMA_CARVQ_ACT_NONE, LLAMA_CARVQ_ACT_RELU, LLAMA_CARVQ_ACT_SILU, LLAMA_CARVQ_ACT_GELU };

// true when the file carries CARVQ metadata (then token_embd.weight is optional)
bool llama_carvq_present(const llama_model_loader & ml);

// create_tensor's flags for a CARVQ model: token_embd.weight not required (after checking the
// architecture against CARVQ_ARCHITECTURES), the head copy mapped lazily when it is on the CPU.
// May set ml.lazy.mode; the caller restores it after creating the tensor.
int llama_carvq_tensor_flags(llama_model_loader & ml, llm_tensor tensor, int flags, ggml_backend_dev_t dev_output);

// A context whose model borrows another context's input embedding (EAGLE3, DFlash drafts)
// cannot borrow a CARVQ one: throws with a message.
void llama_carvq_check_context(const llama_model & model, const llama_model * other);

// Reads carvq.* keys and creates the tensors through the model's create_tensor, checking
// every shape and type against the format. Throws std::runtime_error naming the key or tensor.
void llama_carvq_load_tensors(llama_model_base & model, llama_model_loader & ml, llama_carvq & carvq);

// After the data is loaded: every code < K, hot ids sorted and in range (throws
// std::runtime_error naming the first bad row); then, for a tied source, the codes re-laid
// for the screened head.
void llama_carvq_check_data(llama_carvq & carvq);

// The output head w (output.weight) times the hidden states cur (F32 [n_embd, n_outputs]),
// screened: every logit approximated from the codes, the k best computed exactly from w's
// rows. nullptr when the dense ggml_mul_mat should be used instead: not this model's screened
// head, too many outputs for "auto", or CARVQ_HEAD=dense. Environment: CARVQ_HEAD =
// auto (default: screened for at most LLAMA_CARVQ_SCREEN_MAX_OUTPUTS outputs, when k is at
// most 1/LLAMA_CARVQ_SCREEN_MIN_SHARE of the rows) | screened | dense; CARVQ_SCREEN_K =
// candidates computed exactly (default llama_carvq_screen_default_k).
#define LLAMA_CARVQ_SCREEN_MAX_OUTPUTS 4
// Measured on 2 x86 cores (bench/screen.py): Gemma-3-270M, k = V/16, generates 1.2x faster than
// its dense head; SmolLM2-135M, k = V/4, 0.97x. Auto screens from k <= V/8.
#define LLAMA_CARVQ_SCREEN_MIN_SHARE 8
// The default k: with the lookup's codes a quarter of the rows within 4096..8192; with the
// head's own index (format v3) V/16 within LLAMA_CARVQ_SCREEN_INDEX_K_MIN..MAX.
#define LLAMA_CARVQ_SCREEN_INDEX_K_MIN 2048
#define LLAMA_CARVQ_SCREEN_INDEX_K_MAX 4096
int64_t llama_carvq_screen_default_k(int64_t n_vocab, bool own_index);
ggml_tensor * llama_carvq_build_head(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * w, ggml_tensor * cur);

// The input embeddings of `tokens` (I32 [n_tokens]) as an F32 [n_embd, n_tokens] tensor:
// RVQ decode with hot rows (custom op) plus the adaptor MLP (ggml ops).
ggml_tensor * llama_carvq_build_lookup(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * tokens);
