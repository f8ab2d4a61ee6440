// llama-carvq.cpp - load CARVQ embedding tensors and build their lookup in the graph.
//
// Why a ggml custom op for the RVQ part rather than a new ggml op: the decode is one
// self-contained kernel (carvq.c) that only the CPU backend needs; ggml_custom_4d gives
// it ggml's thread pool (ith/nth) without touching ggml's op enum, its CPU dispatch
// tables or any backend, which keeps the patch series small. The adaptor is ordinary
// ggml ops (get_rows, mul_mat, add, tanh ...), so it runs on ggml's fast kernels.

#include "llama-carvq.h"

#include "llama-impl.h"
#include "llama-mmap.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include "carvq-screen.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>

#if !defined(_WIN32)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#define CARVQ_HEAD_ROWS_PREAD 1 // the head's rows read with pread (llama_carvq_head_rows)
#endif

static_assert(sizeof(carvq_layout) == 120, "carvq_layout is part of the decoder ABI");

// The carvq.* metadata keys of docs/FORMAT.md (src/carvq/format.py, class Key), in one place.
namespace carvq_key {
    constexpr const char * VERSION        = "carvq.format_version";
    constexpr const char * GROUP_SIZE     = "carvq.group_size";
    constexpr const char * LEVELS         = "carvq.levels";
    constexpr const char * CODEBOOK_SIZE  = "carvq.codebook_size";
    constexpr const char * ADAPTOR_RANK   = "carvq.adaptor_rank";
    constexpr const char * ADAPTOR_HIDDEN = "carvq.adaptor_hidden";
    constexpr const char * ACTIVATION     = "carvq.adaptor_activation";
    constexpr const char * HOT_ROWS       = "carvq.hot_rows";
    constexpr const char * HOT_LEVELS     = "carvq.hot_levels";
    constexpr const char * HOT_TIERS      = "carvq.hot_tiers";
    constexpr const char * HEAD_COPY      = "carvq.head_copy";
    constexpr const char * TRANSFORM      = "carvq.transform"; // version 6
    constexpr const char * HOT_MAP        = "carvq.hot_map";   // version 7
    constexpr const char * HEAD_CODES     = "carvq.head_codes"; // version 8
    // the output head's screen index (version 3)
    constexpr const char * SCREEN_GROUP_SIZE    = "carvq.screen.group_size";
    constexpr const char * SCREEN_LEVELS        = "carvq.screen.levels";
    constexpr const char * SCREEN_CODEBOOK_SIZE = "carvq.screen.codebook_size";
    constexpr const char * SCREEN_HOT_ROWS      = "carvq.screen.hot_rows";
    constexpr const char * SCREEN_HOT_LEVELS    = "carvq.screen.hot_levels";
    // the screen correction (version 5)
    constexpr const char * SCREEN_FIX_RANK      = "carvq.screen_fix.rank";
}

static uint32_t carvq_key_u32(const gguf_context * meta, const char * key) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) {
        throw std::runtime_error(format("CARVQ: metadata key %s is missing", key));
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_UINT32) {
        throw std::runtime_error(format("CARVQ: metadata key %s is not a UINT32", key));
    }
    return gguf_get_val_u32(meta, id);
}

// carvq.hot_tiers (version 4, optional): the hot rows' tier sizes into rows[], their count
// returned; 0 when the key is absent (one tier). carvq_layout_check checks the values.
static int32_t carvq_key_tiers(const gguf_context * meta, int32_t version, int64_t rows[CARVQ_MAX_HOT_TIERS]) {
    const int64_t id = gguf_find_key(meta, carvq_key::HOT_TIERS);
    if (id < 0) {
        return 0;
    }
    if (version < 4) {
        throw std::runtime_error(format("CARVQ: metadata key %s needs carvq.format_version 4, the file says %d",
                                        carvq_key::HOT_TIERS, version));
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, id) != GGUF_TYPE_UINT32) {
        throw std::runtime_error(format("CARVQ: metadata key %s is not an array of UINT32", carvq_key::HOT_TIERS));
    }
    const size_t n = gguf_get_arr_n(meta, id);
    if (n < 1 || n > CARVQ_MAX_HOT_TIERS) {
        throw std::runtime_error(format("CARVQ: metadata key %s has %zu entries, outside 1..%d", carvq_key::HOT_TIERS, n,
                                        CARVQ_MAX_HOT_TIERS));
    }
    const uint32_t * data = (const uint32_t *) gguf_get_arr_data(meta, id);
    for (size_t t = 0; t < n; ++t) {
        rows[t] = data[t];
    }
    return (int32_t) n;
}

static std::string carvq_key_str(const gguf_context * meta, const char * key) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0 || gguf_get_kv_type(meta, id) != GGUF_TYPE_STRING) {
        throw std::runtime_error(format("CARVQ: metadata key %s is missing or not a string", key));
    }
    return gguf_get_val_str(meta, id);
}

bool llama_carvq_present(const llama_model_loader & ml) {
    return gguf_find_key(ml.metadata, carvq_key::VERSION) >= 0;
}

static bool carvq_head_copy(const gguf_context * meta) {
    const int64_t id = gguf_find_key(meta, carvq_key::HEAD_COPY);
    return id >= 0 && gguf_get_kv_type(meta, id) == GGUF_TYPE_BOOL && gguf_get_val_bool(meta, id);
}

// An optional BOOL key of format version `since` on: carvq.transform (6, the codes decode in a
// frame of their own), carvq.hot_map (7, the hot rows' ids stored as nested bitmaps)
static bool carvq_key_flag(const gguf_context * meta, const char * key, int32_t since, int32_t version) {
    const int64_t id = gguf_find_key(meta, key);
    if (id < 0) {
        return false;
    }
    if (gguf_get_kv_type(meta, id) != GGUF_TYPE_BOOL) {
        throw std::runtime_error(format("CARVQ: metadata key %s is not a BOOL", key));
    }
    if (version < since) {
        throw std::runtime_error(format("CARVQ: metadata key %s needs carvq.format_version %d, the file says %d",
                                        key, since, version));
    }
    return gguf_get_val_bool(meta, id);
}

// carvq.head_codes (version 8): a tied source's head is the lookup's own rows, decoded from its
// codes; the file has no output.weight (FORMAT.md "Coded head")
static bool carvq_head_codes(const gguf_context * meta) {
    const int32_t version = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::VERSION), INT32_MAX);
    return carvq_key_flag(meta, carvq_key::HEAD_CODES, 8, version);
}

static bool carvq_has_screen_index(const gguf_context * meta) {
    return gguf_find_key(meta, carvq_key::SCREEN_LEVELS) >= 0;
}

// Other architectures read model.tok_embd directly (MTP heads, bitnet's head, qwen3vl's
// deepstack sizes) and would dereference the null dense table: refuse them at load.
static void carvq_check_arch(const llama_model_loader & ml) {
    const std::string archs = CARVQ_ARCHITECTURES;
    const std::string padded = " " + archs + " ";
    if (padded.find(" " + ml.arch_name + " ") == std::string::npos) {
        throw std::runtime_error(format("CARVQ: architecture '%s' is not supported with a CARVQ embedding "
                                        "(supported: %s)", ml.arch_name.c_str(), archs.c_str()));
    }
}

int llama_carvq_tensor_flags(llama_model_loader & ml, llm_tensor tensor, int flags, ggml_backend_dev_t dev_output) {
    if (!llama_carvq_present(ml)) {
        return flags;
    }
    if (tensor == LLM_TENSOR_TOKEN_EMBD && !(flags & llama_model_loader::TENSOR_DUPLICATED)) {
        carvq_check_arch(ml);
        return flags | llama_model_loader::TENSOR_NOT_REQUIRED; // token_embd.carvq.* stand in for the dense table
    }
    if (tensor == LLM_TENSOR_TOKEN_EMBD && carvq_head_codes(ml.metadata)) {
        // the tied head's fallback to the input embedding: a coded head has neither, so
        // model.output stays null and llama_carvq_build_head computes the logits from the codes
        return flags | llama_model_loader::TENSOR_NOT_REQUIRED;
    }
    // The screen re-lays the lookup's codes of a tied source at load and reads them from its blocks
    // after (llama_carvq::lookup_from_blocks): map the file's copy without prefetch, so that
    // carvq_relayout_codes can release it a slice at a time instead of holding both copies at once.
    if (tensor == LLM_TENSOR_CARVQ_CODES && ml.lazy.mode != LLAMA_LAZY_MODE_OFF && !carvq_has_screen_index(ml.metadata) &&
        (carvq_head_copy(ml.metadata) || carvq_head_codes(ml.metadata))) {
        ml.lazy.mode = LLAMA_LAZY_MODE_ON;
        return flags | llama_model_loader::TENSOR_READ_LAZY;
    }
    // The screened head reads k rows of the head copy per token: map it without prefetch, so
    // that only the rows it touches become resident. Only for a head on the CPU: a lazy tensor
    // is never offloaded, and a GPU head runs dense anyway. AUTO covers tensors over 4 GiB
    // only, so the caller's mode is raised to ON for this one tensor (OFF is respected).
    const bool head_on_cpu = dev_output == nullptr || ggml_backend_dev_type(dev_output) == GGML_BACKEND_DEVICE_TYPE_CPU;
    if (tensor == LLM_TENSOR_OUTPUT && !(flags & llama_model_loader::TENSOR_DUPLICATED) && head_on_cpu &&
        ml.lazy.mode != LLAMA_LAZY_MODE_OFF && (carvq_head_copy(ml.metadata) || carvq_has_screen_index(ml.metadata))) {
        ml.lazy.mode = LLAMA_LAZY_MODE_ON;
        return flags | llama_model_loader::TENSOR_READ_LAZY;
    }
    return flags;
}

void llama_carvq_check_context(const llama_model & model, const llama_model * other) {
    if (other != nullptr && other->carvq.enabled() && model.tok_embd == nullptr && !model.carvq.enabled()) {
        throw std::runtime_error(format("CARVQ: the target model's input embedding is CARVQ-compressed, so this %s "
                                        "draft cannot borrow it as a dense matrix; use a draft with its own "
                                        "token_embd.weight", model.arch_name().c_str()));
    }
}

static void carvq_expect_type(const ggml_tensor * t, bool allow_f16, bool is_codes = false) {
    const bool ok = is_codes ? t->type == GGML_TYPE_I8
                             : (t->type == GGML_TYPE_F32 || (allow_f16 && t->type == GGML_TYPE_F16));
    if (!ok) {
        throw std::runtime_error(format("CARVQ: tensor %s has type %s, expected %s", t->name, ggml_type_name(t->type),
                                        is_codes ? "i8" : (allow_f16 ? "f32 or f16" : "f32")));
    }
}

struct carvq_hot_tensors {
    llm_tensor ids, codes, codebooks;
};

// The hot rows' three tensors of an RVQ (the lookup's, or the screen index's) with layout l:
// created and type-checked when l.hot_rows > 0; refused when present while it is 0 (rows_key
// names the key that says so). hot_map (the lookup's only): where non-null, the ids are the
// file's token_embd.carvq.hot_map (format v7) when *hot_map_key, and the other is refused.
static void carvq_create_hot(llama_model_base & model, llama_model_loader & ml, const carvq_layout & l,
                             const carvq_hot_tensors & names, const char * rows_key, const ggml_tensor * codebooks,
                             ggml_tensor *& hot_ids, ggml_tensor *& hot_codes, ggml_tensor *& hot_codebooks,
                             const bool * hot_map_key = nullptr, ggml_tensor ** hot_map = nullptr) {
    const LLM_TN & tn = model.tn;
    const auto refuse = [&](llm_tensor t, const char * why) {
        if (ml.get_tensor_meta(tn(t).str().c_str()) != nullptr) {
            throw std::runtime_error(format("CARVQ: tensor %s present but %s", tn(t).str().c_str(), why));
        }
    };
    if (l.hot_rows == 0) {
        const std::string why = format("%s is 0", rows_key);
        for (const llm_tensor t : { names.ids, names.codes, names.codebooks }) {
            refuse(t, why.c_str());
        }
        if (hot_map != nullptr) {
            refuse(LLM_TENSOR_CARVQ_HOT_MAP, why.c_str());
        }
        return;
    }
    int64_t hot_codes_ne[2];
    int64_t hot_cb_ne[4];
    carvq_layout_hot_codes_ne(&l, hot_codes_ne);
    carvq_layout_hot_codebooks_ne(&l, hot_cb_ne);
    if (hot_map != nullptr && *hot_map_key) {
        refuse(names.ids, "the hot rows' ids are the hot map's (carvq.hot_map)");
        *hot_map = model.create_tensor(tn(LLM_TENSOR_CARVQ_HOT_MAP), {carvq_layout_hot_map_nbytes(&l)}, 0);
        if ((*hot_map)->type != GGML_TYPE_I8) {
            throw std::runtime_error(format("CARVQ: tensor %s has type %s, expected i8", (*hot_map)->name,
                                            ggml_type_name((*hot_map)->type)));
        }
    } else {
        if (hot_map != nullptr) {
            refuse(LLM_TENSOR_CARVQ_HOT_MAP, "the file has no true carvq.hot_map key");
        }
        hot_ids = model.create_tensor(tn(names.ids), {l.hot_rows}, 0);
        if (hot_ids->type != GGML_TYPE_I32) {
            throw std::runtime_error(format("CARVQ: tensor %s has type %s, expected i32", hot_ids->name,
                                            ggml_type_name(hot_ids->type)));
        }
    }
    hot_codes     = model.create_tensor(tn(names.codes), {hot_codes_ne[0], hot_codes_ne[1]}, 0);
    hot_codebooks = model.create_tensor(tn(names.codebooks), {hot_cb_ne[0], hot_cb_ne[1], hot_cb_ne[2], hot_cb_ne[3]}, 0);
    carvq_expect_type(hot_codes, false, true);
    carvq_expect_type(hot_codebooks, true);
    if (hot_codebooks->type != codebooks->type) {
        throw std::runtime_error(format("CARVQ: tensor %s must have the type of the codebooks (%s)", hot_codebooks->name,
                                        ggml_type_name(codebooks->type)));
    }
}

// Optional tensors whose key is absent: none of them may be present (refused, not ignored).
static void carvq_refuse_without_key(const llama_model_base & model, const llama_model_loader & ml,
                                     std::initializer_list<llm_tensor> tensors, const char * key) {
    for (const llm_tensor t : tensors) {
        if (ml.get_tensor_meta(model.tn(t).str().c_str()) != nullptr) {
            throw std::runtime_error(format("CARVQ: tensor %s present but the file has no %s key",
                                            model.tn(t).str().c_str(), key));
        }
    }
}

// The output head's screen index (docs/SCREEN.md, version 3): an RVQ of the head's rows with
// hot rows and no adaptor, and the projection of the hidden states into its metric. Absent
// when the file has no carvq.screen.levels key; then none of its tensors may be present.
static void carvq_load_screen_index(llama_model_base & model, llama_model_loader & ml, llama_carvq & carvq) {
    const gguf_context * meta = ml.metadata;
    const LLM_TN & tn = model.tn;
    if (!carvq_has_screen_index(meta)) {
        carvq_refuse_without_key(model, ml, { LLM_TENSOR_CARVQ_SCREEN_CODES, LLM_TENSOR_CARVQ_SCREEN_CODEBOOKS,
                                              LLM_TENSOR_CARVQ_SCREEN_HOT_IDS, LLM_TENSOR_CARVQ_SCREEN_HOT_CODES,
                                              LLM_TENSOR_CARVQ_SCREEN_HOT_CODEBOOKS, LLM_TENSOR_CARVQ_SCREEN_PROJECTION },
                                 carvq_key::SCREEN_LEVELS);
        return;
    }
    const carvq_layout & lk = carvq.layout;
    if (lk.format_version < 3) {
        throw std::runtime_error(format("CARVQ: a screen index (%s) needs carvq.format_version 3, the file says %d",
                                        carvq_key::SCREEN_LEVELS, lk.format_version));
    }
    carvq_layout & l = carvq.screen_layout;
    l.n_vocab        = lk.n_vocab;
    l.n_embd         = lk.n_embd;
    l.format_version = lk.format_version;
    l.group_size     = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::SCREEN_GROUP_SIZE),    INT32_MAX);
    l.levels         = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::SCREEN_LEVELS),        INT32_MAX);
    l.codebook_size  = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::SCREEN_CODEBOOK_SIZE), INT32_MAX);
    l.hot_rows       = carvq_key_u32(meta, carvq_key::SCREEN_HOT_ROWS);
    l.hot_levels     = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::SCREEN_HOT_LEVELS),    INT32_MAX);
    char err[256];
    if (carvq_layout_check(&l, err, sizeof(err)) != 0) {
        throw std::runtime_error(format("CARVQ: screen index: %s", err));
    }
    int64_t codes_ne[2];
    int64_t cb_ne[4];
    carvq_layout_codes_ne(&l, codes_ne);
    carvq_layout_codebooks_ne(&l, cb_ne);
    carvq.screen_codes      = model.create_tensor(tn(LLM_TENSOR_CARVQ_SCREEN_CODES), {codes_ne[0], codes_ne[1]}, 0);
    carvq.screen_codebooks  = model.create_tensor(tn(LLM_TENSOR_CARVQ_SCREEN_CODEBOOKS), {cb_ne[0], cb_ne[1], cb_ne[2], cb_ne[3]}, 0);
    carvq.screen_projection = model.create_tensor(tn(LLM_TENSOR_CARVQ_SCREEN_PROJECTION), {l.n_embd, l.n_embd}, 0);
    carvq_expect_type(carvq.screen_codes, false, true);
    carvq_expect_type(carvq.screen_codebooks, true);
    carvq_expect_type(carvq.screen_projection, false);
    carvq_create_hot(model, ml, l, { LLM_TENSOR_CARVQ_SCREEN_HOT_IDS, LLM_TENSOR_CARVQ_SCREEN_HOT_CODES,
                                     LLM_TENSOR_CARVQ_SCREEN_HOT_CODEBOOKS },
                     carvq_key::SCREEN_HOT_ROWS, carvq.screen_codebooks, carvq.screen_hot_ids, carvq.screen_hot_codes,
                     carvq.screen_hot_codebooks);
    LLAMA_LOG_INFO("%s: CARVQ screen index: d=%d L=%d K=%d, %lld hot rows +%d levels\n", __func__, l.group_size,
                   l.levels, l.codebook_size, (long long) l.hot_rows, l.hot_levels);
}

// The screen correction (docs/FORMAT.md "Screen correction", version 5): per-row int8
// coefficients of r directions of the hidden state, added to what the scan scores. Absent
// without carvq.screen_fix.rank; then neither tensor may be present.
static void carvq_load_screen_fix(llama_model_base & model, llama_model_loader & ml, llama_carvq & carvq) {
    const gguf_context * meta = ml.metadata;
    const LLM_TN & tn = model.tn;
    if (gguf_find_key(meta, carvq_key::SCREEN_FIX_RANK) < 0) {
        carvq_refuse_without_key(model, ml, { LLM_TENSOR_CARVQ_SCREEN_FIX, LLM_TENSOR_CARVQ_SCREEN_FIX_DIRS },
                                 carvq_key::SCREEN_FIX_RANK);
        return;
    }
    const carvq_layout & l = carvq.layout;
    if (l.format_version < 5) {
        throw std::runtime_error(format("CARVQ: a screen correction (%s) needs carvq.format_version 5, the file says %d",
                                        carvq_key::SCREEN_FIX_RANK, l.format_version));
    }
    const uint32_t rank = carvq_key_u32(meta, carvq_key::SCREEN_FIX_RANK);
    if (rank < 1 || rank > CARVQ_SCREEN_FIX_MAX_RANK) {
        throw std::runtime_error(format("CARVQ: %s is %u, expected 1..%d", carvq_key::SCREEN_FIX_RANK, rank,
                                        CARVQ_SCREEN_FIX_MAX_RANK));
    }
    carvq.screen_fix_rank = (int32_t) rank;
    carvq.screen_fix      = model.create_tensor(tn(LLM_TENSOR_CARVQ_SCREEN_FIX),      {l.n_vocab, (int64_t) rank}, 0);
    carvq.screen_fix_dirs = model.create_tensor(tn(LLM_TENSOR_CARVQ_SCREEN_FIX_DIRS), {l.n_embd, (int64_t) rank}, 0);
    carvq_expect_type(carvq.screen_fix, false, true);
    carvq_expect_type(carvq.screen_fix_dirs, false);
}

// ---- the head's exact rows, read with pread (llama_carvq_head_rows) ------------------------

llama_carvq_head_rows::~llama_carvq_head_rows() {
#if defined(CARVQ_HEAD_ROWS_PREAD)
    for (int f : fd) {
        if (f >= 0) {
            close(f);
        }
    }
#endif
}

bool llama_carvq_head_rows::allocate(int64_t rows) {
    capacity = std::min(rows, n_rows);
    if (fd[0] < 0 || capacity < 1 || row_bytes == 0) {
        capacity = 0;
        return false;
    }
    // new[] without an initializer: the kernel backs the slab's pages only when a row is stored
    slab.reset(new uint8_t[(size_t) capacity * row_bytes]);
    slot_of.reset(new std::atomic<int32_t>[(size_t) n_rows]);
    for (int64_t i = 0; i < n_rows; ++i) {
        slot_of[i].store(-1, std::memory_order_relaxed);
    }
    row_of.reset(new int32_t[(size_t) capacity]);
    used.reset(new std::atomic<uint8_t>[(size_t) capacity]);
    history.reset(new uint8_t[(size_t) capacity]());
    free_slots.reset(new int32_t[(size_t) capacity]);
    for (int64_t s = 0; s < capacity; ++s) {
        row_of[s] = -1;
        used[s].store(0, std::memory_order_relaxed);
        free_slots[s] = (int32_t) s;
    }
    n_free = capacity;
    next_free.store(0, std::memory_order_relaxed);
    return true;
}

#if defined(CARVQ_HEAD_ROWS_PREAD)
static bool carvq_pread_all(int fd, uint8_t * dst, size_t n, size_t offset) {
    while (n > 0) {
        const ssize_t r = pread(fd, dst, n, (off_t) offset);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return false;
        }
        dst += r;
        offset += (size_t) r;
        n -= (size_t) r;
    }
    return true;
}
#endif

const uint8_t * llama_carvq_head_rows::row(int64_t id, uint8_t * scratch, int lane) {
#if defined(CARVQ_HEAD_ROWS_PREAD)
    const int32_t slot = slot_of[id].load(std::memory_order_acquire);
    if (slot >= 0) {
        if (!used[slot].load(std::memory_order_relaxed)) {
            used[slot].store(1, std::memory_order_relaxed);
        }
        return slab.get() + (size_t) slot * row_bytes;
    }
    const int64_t i = next_free.fetch_add(1, std::memory_order_relaxed);
    const int32_t mine = i < n_free ? free_slots[i] : -1;
    uint8_t * dst = mine >= 0 ? slab.get() + (size_t) mine * row_bytes : scratch;
    const int f = fd[lane % LLAMA_CARVQ_HEAD_FDS] >= 0 ? fd[lane % LLAMA_CARVQ_HEAD_FDS] : fd[0];
    if (!carvq_pread_all(f, dst, row_bytes, offset + (size_t) id * row_bytes)) {
        return nullptr; // the slot stays free (row_of -1): the next eviction hands it out again
    }
    if (mine >= 0) {
        row_of[mine] = (int32_t) id;
        used[mine].store(1, std::memory_order_relaxed);
        slot_of[id].store(mine, std::memory_order_release); // published after its bytes
    }
    return dst;
#else
    (void) id;
    (void) scratch;
    (void) lane;
    return nullptr;
#endif
}

static void carvq_prefetch_bytes(const void * p, size_t n) {
#if defined(__GNUC__)
    for (size_t i = 0; i < n; i += 64) {
        __builtin_prefetch((const char *) p + i);
    }
#else
    (void) p;
    (void) n;
#endif
}

void llama_carvq_head_rows::prefetch_slot(int64_t id) const {
    carvq_prefetch_bytes(&slot_of[id], 1);
}

void llama_carvq_head_rows::prefetch_row(int64_t id) const {
    const int32_t slot = slot_of[id].load(std::memory_order_relaxed);
    if (slot >= 0) {
        carvq_prefetch_bytes(slab.get() + (size_t) slot * row_bytes, row_bytes);
    }
}

// bits set in each byte value: counted by a loop, the eviction's passes over the cache branched
// once per set bit, at random (Gemma-3, tg256: 82 -> 39 us a token on the thread that evicts)
static constexpr std::array<uint8_t, 256> carvq_bits_in_byte = [] {
    std::array<uint8_t, 256> t{};
    for (int i = 1; i < 256; ++i) {
        t[i] = (uint8_t) ((i & 1) + t[i / 2]);
    }
    return t;
}();

// A cached row's claim to stay: the aging periods it was read in, twice, and one more when this one
// is among them (0..17)
static int carvq_head_row_claim(uint8_t history, bool used) {
    return 2 * carvq_bits_in_byte[history] + (used ? 1 : 0);
}

void llama_carvq_head_rows::evict_if_full() {
    const bool age = scans.fetch_add(1, std::memory_order_relaxed) + 1 >= LLAMA_CARVQ_HEAD_CACHE_AGE_SCANS;
    if (!age && next_free.load(std::memory_order_relaxed) < n_free) {
        return;
    }
    std::unique_lock<std::shared_mutex> lock(mutex); // no exact op of any context is reading now
    if (age && scans.load(std::memory_order_relaxed) >= LLAMA_CARVQ_HEAD_CACHE_AGE_SCANS) {
        scans.store(0, std::memory_order_relaxed);
        for (int64_t s = 0; s < capacity; ++s) {
            history[s] = (uint8_t) ((history[s] >> 1) | (used[s].load(std::memory_order_relaxed) ? 0x80 : 0));
            used[s].store(0, std::memory_order_relaxed);
        }
    }
    if (next_free.load(std::memory_order_relaxed) < n_free) {
        return;
    }
    constexpr int n_claims = 18;
    int64_t by_claim[n_claims] = {0};
    int64_t empty = 0;
    for (int64_t s = 0; s < capacity; ++s) {
        if (row_of[s] < 0) {
            ++empty;
        } else {
            ++by_claim[carvq_head_row_claim(history[s], used[s].load(std::memory_order_relaxed))];
        }
    }
    // free the rows of a claim below `claim`, and `at_claim` of those with exactly that claim
    int64_t need = std::max<int64_t>(1, capacity / LLAMA_CARVQ_HEAD_CACHE_FREE_SHARE) - empty;
    int claim = 0;
    while (claim < n_claims - 1 && need > by_claim[claim]) {
        need -= by_claim[claim++];
    }
    int64_t at_claim = std::max<int64_t>(need, 0);
    int64_t n = 0;
    for (int64_t s = 0; s < capacity; ++s) {
        if (row_of[s] >= 0) {
            const int c = carvq_head_row_claim(history[s], used[s].load(std::memory_order_relaxed));
            if (c > claim || (c == claim && at_claim <= 0)) {
                continue;
            }
            at_claim -= c == claim;
            slot_of[row_of[s]].store(-1, std::memory_order_relaxed);
            row_of[s] = -1;
            history[s] = 0;
            used[s].store(0, std::memory_order_relaxed);
        }
        free_slots[n++] = (int32_t) s;
    }
    n_free = n;
    next_free.store(0, std::memory_order_relaxed);
}

// A lazily mapped output.weight (llama_carvq_tensor_flags) gets a file descriptor of its own for
// the screened head's pread: new open file descriptions where /proc allows it (else a dup), so
// that their random-access advice does not change the loader's sequential one, and so that the
// graph's threads do not share one (LLAMA_CARVQ_HEAD_FDS).
static void carvq_open_head_rows(llama_model_loader & ml, llama_carvq & carvq) {
#if defined(CARVQ_HEAD_ROWS_PREAD)
    const ggml_tensor * meta = ml.get_tensor_meta("output.weight");
    const llama_model_loader::llama_tensor_weight * w = ml.get_weight("output.weight");
    if (meta == nullptr || w == nullptr || !ml.lazy.has(meta) || w->idx >= ml.files.size()) {
        return;
    }
    const int src = ml.files[w->idx]->file_id();
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", src);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fd = fcntl(src, F_DUPFD_CLOEXEC, 0);
    }
    if (fd < 0) {
        return; // the mapping serves the rows
    }
    auto rows = std::make_unique<llama_carvq_head_rows>();
    rows->fd[0] = fd;
    for (int i = 1; i < LLAMA_CARVQ_HEAD_FDS; ++i) {
        rows->fd[i] = open(path, O_RDONLY | O_CLOEXEC); // -1 where /proc is not there: fd[0] serves
    }
    rows->offset = w->offs;
    rows->row_bytes = ggml_row_size(meta->type, meta->ne[0]);
    rows->n_rows = meta->ne[1];
#if defined(POSIX_FADV_RANDOM)
    for (int f : rows->fd) {
        if (f >= 0) {
            posix_fadvise(f, (off_t) w->offs, (off_t) ggml_nbytes(meta), POSIX_FADV_RANDOM);
        }
    }
#endif
    carvq.screen.head_rows = std::move(rows);
#else
    (void) ml;
    (void) carvq;
#endif
}

// The screen's blocks from its codes. Where the lookup then decodes from the blocks too
// (llama_carvq::lookup_from_blocks), the file's copy of the codes (Gemma-3-270M: 30-32 MiB) is
// read no more: when it lies in a file mapping (mapped lazily, so not yet resident), it is
// re-laid a slice at a time and each slice's pages leave the process after it (MADV_DONTNEED on
// a read-only file mapping only unmaps them: a later read faults the same bytes back in), so
// both copies are never resident together.
#define CARVQ_RELAYOUT_SLICE (4u << 20) // bytes of codes re-laid between two releases

static void carvq_relayout_codes(const llama_carvq & carvq, const llama_model_loader & ml, llama_carvq_screen & sc) {
    const carvq_layout & l = sc.layout;
    const uint8_t * codes = (const uint8_t *) sc.codes->data;
    sc.blocks.assign((size_t) carvq_screen_blocks_nbytes(&l), 0);
    bool mapped = false;
#if defined(__linux__)
    // only pages of a file mapping: the same call on a heap copy (--no-mmap without lazy tensors,
    // a buffer the loader copied into) would zero it
    const uintptr_t lo = (uintptr_t) codes, hi = lo + ggml_nbytes(sc.codes);
    for (const auto & m : ml.mappings) {
        const uintptr_t a = m ? (uintptr_t) m->addr() : 0;
        mapped = mapped || (m && lo >= a && hi <= a + m->size());
    }
    mapped = mapped && carvq.lookup_from_blocks();
#else
    (void) carvq;
    (void) ml;
#endif
    if (!mapped) {
        carvq_screen_relayout_rows(&l, codes, 0, l.n_vocab, sc.blocks.data());
        return;
    }
#if defined(__linux__)
    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
    const int64_t B = carvq_layout_code_row_bytes(&l);
    const int64_t slice = std::max<int64_t>(1, CARVQ_RELAYOUT_SLICE / B);
    uintptr_t released = (lo + page - 1) / page * page; // pages before this one are gone (or not ours)
    for (int64_t r0 = 0; r0 < l.n_vocab; r0 += slice) {
        const int64_t r1 = std::min<int64_t>(l.n_vocab, r0 + slice);
        // the tensor is mapped with POSIX_MADV_RANDOM (no readahead): ask for the slice in one go
        const uintptr_t a = (lo + r0 * B) / page * page, b = std::min<uintptr_t>(hi, lo + r1 * B);
        posix_madvise((void *) a, b - a, POSIX_MADV_WILLNEED);
        carvq_screen_relayout_rows(&l, codes, r0, r1, sc.blocks.data());
        // whole pages of this tensor that every later slice lies beyond (the last one only if it ends the tensor)
        const uintptr_t upto = (r1 == l.n_vocab ? hi : lo + r1 * B) / page * page;
        if (upto > released) {
            madvise((void *) released, upto - released, MADV_DONTNEED);
            released = upto;
        }
    }
#endif
}

// llama_carvq_screen::scan_work: a block costs its code bytes (G*L rounded up to even, 16 bytes
// each); a hot row costs its share of a hot block's bytes and its scattered add to the scores
static void carvq_screen_work_index(llama_carvq_screen & sc) {
    const carvq_layout & l = sc.layout;
    const int64_t G = l.n_embd / l.group_size, GL = G * l.levels, GLh = G * l.hot_levels;
    const int64_t block_work = (GL + (GL & 1)) * 16, hot_row_work = (GLh + (GLh & 1)) * 16 / CARVQ_SCREEN_BLOCK + 8;
    const int64_t n_blocks = (l.n_vocab + CARVQ_SCREEN_BLOCK - 1) / CARVQ_SCREEN_BLOCK;
    const int32_t * hot_ids = l.hot_rows > 0 ? sc.hot_ids : nullptr;
    sc.scan_work.assign((size_t) n_blocks + 1, 0);
    int64_t j = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
        int64_t hot = 0;
        for (; hot_ids && j < l.hot_rows && hot_ids[j] < (b + 1) * CARVQ_SCREEN_BLOCK; ++j) {
            ++hot;
        }
        sc.scan_work[(size_t) b + 1] = sc.scan_work[(size_t) b] + block_work + hot * hot_row_work;
    }
}

static const char * carvq_env(const char * name, const char * fallback) {
    const char * v = getenv(name);
    return v && *v ? v : fallback;
}

// Candidates per output: CARVQ_SCREEN_K (read whenever a graph is built) or the default, at most V
static long long carvq_screen_k(const llama_carvq_screen & screen, bool warn) {
    const carvq_layout & l = screen.layout;
    const long long k_default = llama_carvq_screen_default_k(l.n_vocab, screen.projection != nullptr,
                                                             screen.fix != nullptr ? screen.fix_rank : 0, screen.coded_head);
    char * end = nullptr;
    const char * k_env = carvq_env("CARVQ_SCREEN_K", "");
    long long k = *k_env ? strtoll(k_env, &end, 10) : k_default;
    if (*k_env && (end == k_env || *end != '\0' || k < 1)) {
        if (warn) {
            LLAMA_LOG_WARN("%s: CARVQ_SCREEN_K=%s is not a positive integer; using %lld\n", __func__, k_env, k_default);
        }
        k = k_default;
    }
    return std::min<long long>(k, l.n_vocab);
}

static int64_t carvq_head_cache_rows(const llama_carvq_head_rows & rows, long long k) {
    const char * env = getenv("CARVQ_HEAD_CACHE_MIB");
    if (env != nullptr && *env) {
        char * end = nullptr;
        const double mib = strtod(env, &end);
        if (end != env && *end == '\0' && mib >= 0 && std::isfinite(mib)) {
            return (int64_t) (mib * 1024.0 * 1024.0 / (double) rows.row_bytes);
        }
        LLAMA_LOG_WARN("%s: CARVQ_HEAD_CACHE_MIB=%s is not a size in MiB; using the default\n", __func__, env);
    }
    // rows that stay candidates (frequent tokens) outlive the churn of a few tokens' candidates
    return std::max<int64_t>(rows.n_rows / LLAMA_CARVQ_HEAD_CACHE_SHARE, LLAMA_CARVQ_HEAD_CACHE_ROUNDS * k);
}

void llama_carvq_load_tensors(llama_model_base & model, llama_model_loader & ml, llama_carvq & carvq) {
    const gguf_context * meta = ml.metadata;
    carvq_layout & l = carvq.layout;
    l.n_vocab        = model.vocab.n_tokens();
    l.n_embd         = model.hparams.n_embd;
    l.format_version = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::VERSION),        INT32_MAX);
    l.group_size     = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::GROUP_SIZE),     INT32_MAX);
    l.levels         = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::LEVELS),         INT32_MAX);
    l.codebook_size  = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::CODEBOOK_SIZE),  INT32_MAX);
    l.adaptor_rank   = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::ADAPTOR_RANK),   INT32_MAX);
    l.adaptor_hidden = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::ADAPTOR_HIDDEN), INT32_MAX);
    if (l.format_version >= 2) {
        l.hot_rows   = carvq_key_u32(meta, carvq_key::HOT_ROWS);
        l.hot_levels = (int32_t) std::min<uint32_t>(carvq_key_u32(meta, carvq_key::HOT_LEVELS), INT32_MAX);
        l.hot_tiers  = carvq_key_tiers(meta, l.format_version, l.hot_tier_rows);
    }

    char err[256];
    if (carvq_layout_check(&l, err, sizeof(err)) != 0) {
        throw std::runtime_error(format("CARVQ: %s", err));
    }

    carvq.head_copy = carvq_head_copy(meta);
    carvq.head_codes = carvq_head_codes(meta);
    if (carvq.head_codes) {
        if (carvq.head_copy) {
            throw std::runtime_error(format("CARVQ: metadata keys %s and %s are both true: the head is either "
                                            "a copy in output.weight or the codes", carvq_key::HEAD_CODES, carvq_key::HEAD_COPY));
        }
        if (ml.get_tensor_meta("output.weight") != nullptr || model.output != nullptr) {
            throw std::runtime_error(format("CARVQ: metadata key %s says the head is read from the codes, but the "
                                            "file has an output.weight too", carvq_key::HEAD_CODES));
        }
        if (l.adaptor_rank > 0) {
            throw std::runtime_error(format("CARVQ: metadata key %s needs carvq.adaptor_rank 0 (the head's rows "
                                            "are the codes' sums), the file says %d", carvq_key::HEAD_CODES, l.adaptor_rank));
        }
        if (carvq_has_screen_index(meta)) {
            throw std::runtime_error(format("CARVQ: metadata key %s: a coded head is screened by the lookup's own "
                                            "codes, but the file has a screen index (output.carvq.*) too", carvq_key::HEAD_CODES));
        }
    }

    const std::string act = carvq_key_str(meta, carvq_key::ACTIVATION);
    if (l.adaptor_rank == 0) {
        carvq.activation = LLAMA_CARVQ_ACT_NONE;
    } else if (act == "relu") {
        carvq.activation = LLAMA_CARVQ_ACT_RELU;
    } else if (act == "silu") {
        carvq.activation = LLAMA_CARVQ_ACT_SILU;
    } else if (act == "gelu") {
        carvq.activation = LLAMA_CARVQ_ACT_GELU;
    } else {
        throw std::runtime_error(format("CARVQ: unknown adaptor activation '%s'", act.c_str()));
    }

    int64_t codes_ne[2];
    int64_t cb_ne[4];
    carvq_layout_codes_ne(&l, codes_ne);
    carvq_layout_codebooks_ne(&l, cb_ne);

    // create_tensor checks each shape exactly and names the tensor when it differs
    const LLM_TN & tn = model.tn;
    carvq.codes     = model.create_tensor(tn(LLM_TENSOR_CARVQ_CODES),     {codes_ne[0], codes_ne[1]}, 0);
    carvq.codebooks = model.create_tensor(tn(LLM_TENSOR_CARVQ_CODEBOOKS), {cb_ne[0], cb_ne[1], cb_ne[2], cb_ne[3]}, 0);
    carvq_expect_type(carvq.codes, false, true);
    carvq_expect_type(carvq.codebooks, true);

    carvq.hot_map_key = carvq_key_flag(meta, carvq_key::HOT_MAP, 7, l.format_version);
    if (carvq.hot_map_key && l.hot_rows == 0) {
        throw std::runtime_error(format("CARVQ: metadata key %s is true but %s is 0", carvq_key::HOT_MAP,
                                        carvq_key::HOT_ROWS));
    }
    carvq_create_hot(model, ml, l, { LLM_TENSOR_CARVQ_HOT_IDS, LLM_TENSOR_CARVQ_HOT_CODES, LLM_TENSOR_CARVQ_HOT_CODEBOOKS },
                     carvq_key::HOT_ROWS, carvq.codebooks, carvq.hot_ids, carvq.hot_codes, carvq.hot_codebooks,
                     &carvq.hot_map_key, &carvq.hot_map);

    if (l.adaptor_rank > 0) {
        const int64_t m = l.adaptor_rank, h = l.adaptor_hidden, n = l.n_embd, V = l.n_vocab;
        carvq.sigma0 = model.create_tensor(tn(LLM_TENSOR_CARVQ_SIGMA0),            {m, V}, 0);
        carvq.up_w   = model.create_tensor(tn(LLM_TENSOR_CARVQ_UP, "weight"),      {m, h}, 0);
        carvq.up_b   = model.create_tensor(tn(LLM_TENSOR_CARVQ_UP, "bias"),        {h},    0);
        carvq.down_w = model.create_tensor(tn(LLM_TENSOR_CARVQ_DOWN, "weight"),    {h, n}, 0);
        carvq.down_b = model.create_tensor(tn(LLM_TENSOR_CARVQ_DOWN, "bias"),      {n},    0);
        carvq_expect_type(carvq.sigma0, true);
        carvq_expect_type(carvq.up_w, true);
        carvq_expect_type(carvq.up_b, false);
        carvq_expect_type(carvq.down_w, true);
        carvq_expect_type(carvq.down_b, false);
    } else {
        // tensors of an adaptor that the metadata says is absent: refuse, do not ignore
        const std::string absent[] = {
            tn(LLM_TENSOR_CARVQ_SIGMA0).str(),
            tn(LLM_TENSOR_CARVQ_UP, "weight").str(), tn(LLM_TENSOR_CARVQ_UP, "bias").str(),
            tn(LLM_TENSOR_CARVQ_DOWN, "weight").str(), tn(LLM_TENSOR_CARVQ_DOWN, "bias").str(),
        };
        for (const std::string & name : absent) {
            if (ml.get_tensor_meta(name.c_str()) != nullptr) {
                throw std::runtime_error(format("CARVQ: tensor %s present but carvq.adaptor_rank is 0", name.c_str()));
            }
        }
    }
    if (carvq_key_flag(meta, carvq_key::TRANSFORM, 6, l.format_version)) {
        carvq.transform = model.create_tensor(tn(LLM_TENSOR_CARVQ_TRANSFORM), {l.n_embd, l.n_embd}, 0);
        carvq_expect_type(carvq.transform, true);
    } else if (ml.get_tensor_meta(tn(LLM_TENSOR_CARVQ_TRANSFORM).str().c_str()) != nullptr) {
        throw std::runtime_error(format("CARVQ: tensor %s present but the file has no true %s key",
                                        tn(LLM_TENSOR_CARVQ_TRANSFORM).str().c_str(), carvq_key::TRANSFORM));
    }
    carvq_load_screen_index(model, ml, carvq);
    carvq_load_screen_fix(model, ml, carvq);
    carvq_open_head_rows(ml, carvq);
    LLAMA_LOG_INFO("%s: CARVQ embedding v%d: d=%d L=%d K=%d, adaptor m=%d h=%d (%s), %lld hot rows +%d levels "
                   "in %d tier(s), decoder path %s\n", __func__,
                   l.format_version, l.group_size, l.levels, l.codebook_size, l.adaptor_rank, l.adaptor_hidden,
                   l.adaptor_rank ? act.c_str() : "none", (long long) l.hot_rows, l.hot_levels,
                   l.hot_tiers >= 2 ? l.hot_tiers : 1,
                   carvq_simd_name(carvq.codebooks->type == GGML_TYPE_F16 ? CARVQ_CODEBOOK_F16 : CARVQ_CODEBOOK_F32));
}

// Every code of an RVQ (the lookup's or the screen index's) below K, and its hot ids sorted and
// in range: throws naming the tensor, or `hot_what` for the hot rows.
static void carvq_check_codes(const carvq_layout & l, const ggml_tensor * codes, const int32_t * hot_ids,
                              const ggml_tensor * hot_codes, const char * hot_what) {
    char err[256];
    if (carvq_codes_check(&l, (const uint8_t *) codes->data, err, sizeof(err)) != 0) {
        throw std::runtime_error(format("CARVQ: tensor %s: %s", codes->name, err));
    }
    if (l.hot_rows > 0 && carvq_hot_check(&l, hot_ids, (const uint8_t *) hot_codes->data, err, sizeof(err)) != 0) {
        throw std::runtime_error(format("CARVQ: %s: %s", hot_what, err));
    }
}

static inline int carvq_popcount64(uint64_t x) {
#if defined(_MSC_VER) && !defined(__clang__)
    return (int) __popcnt64(x);
#else
    return __builtin_popcountll(x);
#endif
}

// llama_carvq::tier_bits / tier_rank from the checked hot ids (each tier sorted, in range):
// Gemma-3's 262144 rows cost 40 KiB a tier, SmolLM2's 49152 7.5 KiB
static void carvq_tier_index_build(llama_carvq & carvq) {
    const carvq_layout & l = carvq.layout;
    const int64_t T = l.hot_rows == 0 ? 0 : carvq_layout_hot_tier_count(&l);
    const int64_t W = (l.n_vocab + 63) / 64;
    const int32_t * ids = carvq.hot_id_data();
    carvq.tier_words = W;
    carvq.tier_bits.assign((size_t) (T * W), 0);
    carvq.tier_rank.assign((size_t) (T * W), 0);
    for (int64_t t = 0, start = 0; t < T; start += carvq_layout_hot_tier_rows(&l, t), ++t) {
        uint64_t * bits = carvq.tier_bits.data() + t * W;
        for (int64_t j = start; j < start + carvq_layout_hot_tier_rows(&l, t); ++j) {
            bits[ids[j] / 64] |= 1ull << (ids[j] % 64);
        }
        uint32_t * rank = carvq.tier_rank.data() + t * W;
        for (int64_t w = 0, below = 0; w < W; below += carvq_popcount64(bits[w]), ++w) {
            rank[w] = (uint32_t) below;
        }
    }
}

void llama_carvq_check_data(llama_carvq & carvq, const llama_model_loader & ml) {
    if (!carvq.enabled()) {
        return;
    }
    // the decoder and the screen read the tensors' bytes on the CPU: an --override-tensor to a
    // device buffer must be refused here, before anything dereferences device memory
    const ggml_tensor * all[] = { carvq.codes, carvq.codebooks, carvq.sigma0, carvq.up_w, carvq.up_b, carvq.down_w,
                                  carvq.down_b, carvq.hot_ids, carvq.hot_map, carvq.hot_codes, carvq.hot_codebooks,
                                  carvq.screen_codes, carvq.screen_codebooks, carvq.screen_hot_ids,
                                  carvq.screen_hot_codes, carvq.screen_hot_codebooks, carvq.screen_projection,
                                  carvq.screen_fix, carvq.screen_fix_dirs, carvq.transform };
    for (const ggml_tensor * t : all) {
        if (t != nullptr && (t->buffer == nullptr || !ggml_backend_buffer_is_host(t->buffer))) {
            throw std::runtime_error(format("CARVQ: tensor %s was placed in buffer %s, which is not host memory; "
                                            "CARVQ tensors are decoded on the CPU (do not override their placement)",
                                            t->name, t->buffer ? ggml_backend_buffer_name(t->buffer) : "(none)"));
        }
    }
    // the float tensors decode into every row: one inf or NaN would poison every token using it
    for (const ggml_tensor * t : all) {
        if (t != nullptr && (t->type == GGML_TYPE_F32 || t->type == GGML_TYPE_F16)) {
            const int64_t n = ggml_nelements(t);
            for (int64_t i = 0; i < n; ++i) {
                const float x = t->type == GGML_TYPE_F32 ? ((const float *) t->data)[i]
                                                         : ggml_fp16_to_fp32(((const ggml_fp16_t *) t->data)[i]);
                if (!std::isfinite(x)) {
                    throw std::runtime_error(format("CARVQ: tensor %s holds a non-finite value at element %lld",
                                                    t->name, (long long) i));
                }
            }
        }
    }
    if (carvq.hot_map != nullptr) {
        // format v7: the ids as the decoder and the screen read them, expanded once (4 bytes a hot row)
        char err[256];
        carvq.hot_map_ids.resize((size_t) carvq.layout.hot_rows);
        if (carvq_hot_map_expand(&carvq.layout, (const uint8_t *) carvq.hot_map->data, ggml_nbytes(carvq.hot_map),
                                 carvq.hot_map_ids.data(), err, sizeof(err)) != 0) {
            throw std::runtime_error(format("CARVQ: tensor %s: %s", carvq.hot_map->name, err));
        }
    }
    carvq_check_codes(carvq.layout, carvq.codes, carvq.hot_id_data(), carvq.hot_codes, "hot rows");
    if (carvq.head_codes) {
        carvq_tier_index_build(carvq);
    }
    llama_carvq_screen & sc = carvq.screen;
    if (carvq.screen_codes != nullptr) {
        // the screen index: host memory and finite floats checked above with the lookup
        const carvq_layout & l = carvq.screen_layout;
        carvq_check_codes(l, carvq.screen_codes, carvq.screen_hot_ids ? (const int32_t *) carvq.screen_hot_ids->data : nullptr,
                          carvq.screen_hot_codes, "screen index hot rows");
        sc.layout = l;
        sc.codes = carvq.screen_codes;
        sc.codebooks = carvq.screen_codebooks;
        sc.hot_ids = carvq.screen_hot_ids ? (const int32_t *) carvq.screen_hot_ids->data : nullptr;
        sc.hot_codes = carvq.screen_hot_codes;
        sc.hot_codebooks = carvq.screen_hot_codebooks;
        sc.projection = carvq.screen_projection;
    } else if (carvq.head_copy || carvq.head_codes) {
        // no index of its own: a tied source's head is the embedding, which the lookup's codes index
        // (a coded head is those very rows, so the screen ranks it with the lookup's codes too)
        sc.layout = carvq.layout;
        sc.coded_head = carvq.head_codes;
        sc.codes = carvq.codes;
        sc.codebooks = carvq.codebooks;
        sc.hot_ids = carvq.hot_id_data();
        sc.hot_codes = carvq.hot_codes;
        sc.hot_codebooks = carvq.hot_codebooks;
        if (carvq.transform != nullptr) {
            // the codes sum to rows in their own frame: the tables come from h projected by the
            // transform (FORMAT.md "Lookup transform"), converted to F32 once here
            sc.transform_f32.resize((size_t) ggml_nelements(carvq.transform));
            if (carvq.transform->type == GGML_TYPE_F16) {
                ggml_fp16_to_fp32_row((const ggml_fp16_t *) carvq.transform->data, sc.transform_f32.data(),
                                      ggml_nelements(carvq.transform));
            } else {
                memcpy(sc.transform_f32.data(), carvq.transform->data, ggml_nbytes(carvq.transform));
            }
        }
        if (sc.layout.hot_tiers >= 2) {
            // the scan reads one sorted hot set: the first tier (first in hot_ids, hot_codes and
            // hot_codebooks), whose rows the converter's nesting makes the largest; deeper tiers
            // refine rows the exact candidates then score anyway
            sc.layout.hot_rows = sc.layout.hot_tier_rows[0];
            sc.layout.hot_tiers = 0;
        }
    } else {
        sc.head_rows.reset();
        if (carvq.screen_fix != nullptr) {
            throw std::runtime_error(format("CARVQ: tensor %s corrects a screen, but the file has none (no head copy, "
                                            "no screen index)", carvq.screen_fix->name));
        }
        return; // an untied source's head is its own matrix: the lookup's codes do not index it
    }
    if (carvq.screen_fix != nullptr && std::string(carvq_env("CARVQ_SCREEN_FIX", "1")) != "0") {
        // CARVQ_SCREEN_FIX=0 leaves the correction out (bench/screen.py measures what it buys)
        sc.fix = carvq.screen_fix;
        sc.fix_dirs = carvq.screen_fix_dirs;
        sc.fix_rank = carvq.screen_fix_rank;
    }
    if (sc.codebooks->type == GGML_TYPE_F16) {
        const auto to_f32 = [](const ggml_tensor * t, std::vector<float> & out) {
            out.resize((size_t) ggml_nelements(t));
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) t->data, out.data(), ggml_nelements(t));
        };
        to_f32(sc.codebooks, sc.codebooks_f32);
        if (sc.hot_codebooks != nullptr) {
            to_f32(sc.hot_codebooks, sc.hot_codebooks_f32);
        }
    }
    carvq_relayout_codes(carvq, ml, sc);
    if (sc.layout.hot_rows > 0) {
        sc.hot_blocks.resize((size_t) carvq_screen_hot_blocks_nbytes(&sc.layout));
        carvq_screen_hot_relayout(&sc.layout, (const uint8_t *) sc.hot_codes->data, sc.hot_blocks.data());
    }
    carvq_screen_work_index(sc);
    if (sc.head_rows && !sc.head_rows->allocate(carvq_head_cache_rows(*sc.head_rows, carvq_screen_k(sc, false)))) {
        sc.head_rows.reset();
    }
    if (sc.head_rows) {
        LLAMA_LOG_INFO("%s: CARVQ screened head: exact rows read with pread, cache of %lld rows (%.1f MiB)\n",
                       __func__, (long long) sc.head_rows->capacity,
                       sc.head_rows->capacity * (double) sc.head_rows->row_bytes / (1024.0 * 1024.0));
    }
}

// dst = RVQ rows of ids; src[0] codes, src[1] codebooks, src[2] ids, and with hot rows
// src[3] hot_ids or hot_map (the ids read from carvq.hot_id_data()), src[4] hot_codes, src[5] hot_codebooks. Thread ith decodes a contiguous
// slice of rows, after checking that slice's ids itself: llama_batch_allocr already refuses
// out-of-range tokens, so this only turns a broken invariant into an abort, never a read
// outside the codes.
static void carvq_rvq_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const llama_carvq & carvq = *(const llama_carvq *) userdata;
    const carvq_layout * l = &carvq.layout;
    const ggml_tensor * codes = dst->src[0];
    const ggml_tensor * cb    = dst->src[1];
    const ggml_tensor * ids   = dst->src[2];
    const int64_t n_ids = ids->ne[0];

    const int64_t per   = (n_ids + nth - 1) / nth;
    const int64_t first = per * ith;
    const int64_t last  = std::min(n_ids, first + per);
    if (first >= last) {
        return;
    }
    char err[160];
    if (carvq_ids_check(l, (const int32_t *) ids->data + first, last - first, err, sizeof(err)) != 0) {
        GGML_ABORT("CARVQ lookup, rows %lld..%lld: %s", (long long) first, (long long) last - 1, err);
    }
    const carvq_codebook_type cb_type = cb->type == GGML_TYPE_F16 ? CARVQ_CODEBOOK_F16 : CARVQ_CODEBOOK_F32;
    const int64_t stride = (int64_t) (dst->nb[1] / sizeof(float));
    if (carvq.lookup_from_blocks()) {
        // the same codes from the screen's blocks, a row at a time (carvq_relayout_codes)
        static thread_local std::vector<uint8_t> packed;
        packed.resize((size_t) carvq_layout_code_row_bytes(l));
        uint8_t * row = packed.data();
        const int32_t zero = 0;
        for (int64_t r = first; r < last; ++r) {
            carvq_screen_row_codes(l, carvq.screen.blocks.data(), ((const int32_t *) ids->data)[r], row);
            carvq_rows_decode(l, row, cb->data, cb_type, &zero, 1, (float *) dst->data + r * stride, stride, 0, 1);
        }
    } else {
        carvq_rows_decode(l, (const uint8_t *) codes->data, cb->data, cb_type, (const int32_t *) ids->data, n_ids,
                          (float *) dst->data, stride, first, last);
    }
    if (l->hot_rows > 0) {
        carvq_rows_hot_add(l, carvq.hot_id_data(), (const uint8_t *) dst->src[4]->data,
                           dst->src[5]->data, cb_type, (const int32_t *) ids->data, n_ids, (float *) dst->data,
                           stride, first, last);
    }
}

// ---- screened output head (docs/SCREEN.md) ----------------------------------------------

// per-thread scratch of one hidden state's tables
struct carvq_screen_scratch {
    std::vector<float>   work;
    std::vector<uint8_t> q, qh;
    std::vector<int32_t> ids;
    std::vector<uint32_t> hist = std::vector<uint32_t>(CARVQ_SCREEN_HIST);
    std::vector<uint8_t> hq; // the hidden state in the head's vec_dot type
    std::vector<float> exact, approx; // the candidates' logits
    std::vector<uint8_t> row; // a head row read past a full cache

    std::vector<float> hp; // the hidden state projected into a screen index's metric
    std::vector<float> rows_f32;   // a coded head's rows, decoded (carvq_coded_head_row)
    std::vector<float> hps;        // the dense coded head's hidden states, projected
    std::vector<float> coded_t, coded_th, coded_single; // a coded head's tables (carvq_coded_tables_single, _pairs)

    carvq_screen_tables build(const llama_carvq_screen & s, const float * h) {
        const carvq_layout & l = s.layout;
        const int64_t G = l.n_embd / l.group_size, GL = G * l.levels;
        work.resize((size_t) carvq_screen_work_floats(&l));
        q.resize((size_t) (GL + (GL & 1)) * 16);
        const int64_t GLh = G * l.hot_levels;
        qh.resize((size_t) std::max<int64_t>(2, GLh + (GLh & 1)) * 16);
        const float * P = s.projection != nullptr ? (const float *) s.projection->data
                        : !s.transform_f32.empty() ? s.transform_f32.data() : nullptr;
        if (P != nullptr) {
            hp.resize((size_t) l.n_embd);
            carvq_screen_project(l.n_embd, P, h, hp.data());
            h = hp.data();
        }
        carvq_screen_tables t;
        // F32 either way: F16 codebooks were converted at load (exactly; llama_carvq_check_data)
        const bool converted = !s.codebooks_f32.empty();
        const void * cb = converted ? (const void *) s.codebooks_f32.data() : s.codebooks->data;
        const void * hot_cb = converted ? (const void *) s.hot_codebooks_f32.data()
                                        : (s.hot_codebooks ? s.hot_codebooks->data : nullptr);
        carvq_screen_tables_build(&l, cb, hot_cb, CARVQ_CODEBOOK_F32, h, work.data(), q.data(), qh.data(), &t);
        return t;
    }
};

static thread_local carvq_screen_scratch carvq_scratch;

static const float * carvq_column(const ggml_tensor * t, int64_t p) {
    return (const float *) ((const char *) t->data + p * t->nb[1]);
}

// dst (I32 [V + CARVQ_SCORES_TRAILER, n_out]) = every row's screen score, then the tables' scale
// and bias; src[0] the hidden states. Thread ith scans
// a contiguous range of blocks, an nth of the work, and adds the hot levels of the hot rows inside it.
// The scores tensor holds V scores, then CARVQ_SCORES_TRAILER int32 with the bits of the tables'
// scale and bias (approximate logit = score * scale + bias), so that the logits op does not
// build the tables again.
#define CARVQ_SCORES_TRAILER 2

static void carvq_scores_trailer_put(int32_t * trailer, const carvq_screen_tables & t) {
    memcpy(trailer, &t.scale, sizeof(float));
    memcpy(trailer + 1, &t.bias, sizeof(float));
}

static void carvq_scores_trailer_get(const int32_t * trailer, float * scale, float * bias) {
    memcpy(scale, trailer, sizeof(float));
    memcpy(bias, trailer + 1, sizeof(float));
}

static void carvq_screen_scan_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const llama_carvq_screen & c = *(const llama_carvq_screen *) userdata;
    const carvq_layout & l = c.layout;
    const ggml_tensor * cur = dst->src[0];
    const int64_t n_blocks = (l.n_vocab + CARVQ_SCREEN_BLOCK - 1) / CARVQ_SCREEN_BLOCK;
    // equal shares of the work (llama_carvq_screen::scan_work), in whole blocks
    const int64_t * work = c.scan_work.data();
    const auto share_start = [&](int64_t t) {
        return t >= nth ? n_blocks : (int64_t) (std::lower_bound(work, work + n_blocks, work[n_blocks] * t / nth) - work);
    };
    const int64_t b0 = share_start(ith), b1 = share_start(ith + 1);
    if (ith == 0 && c.head_rows) {
        c.head_rows->evict_if_full(); // before the exact op, which reads the cache with this graph's threads
    }
    if (b0 >= b1 && ith != 0) {
        return; // thread 0 always builds the tables: it writes their scale and bias after the scores
    }
    const int32_t * hot_ids = l.hot_rows > 0 ? c.hot_ids : nullptr;
    const int64_t j0 = hot_ids ? std::lower_bound(hot_ids, hot_ids + l.hot_rows, (int32_t) (b0 * CARVQ_SCREEN_BLOCK)) - hot_ids : 0;
    const int64_t j1 = hot_ids ? std::lower_bound(hot_ids, hot_ids + l.hot_rows,
                                                  (int32_t) std::min<int64_t>(l.n_vocab, b1 * CARVQ_SCREEN_BLOCK)) - hot_ids : 0;
    for (int64_t p = 0; p < dst->ne[1]; ++p) {
        const carvq_screen_tables t = carvq_scratch.build(c, carvq_column(cur, p));
        int32_t * scores = (int32_t *) ((char *) dst->data + p * dst->nb[1]);
        if (ith == 0) {
            carvq_scores_trailer_put(scores + l.n_vocab, t);
        }
        if (b0 >= b1) {
            continue;
        }
        carvq_screen_scan(&l, c.blocks.data(), carvq_scratch.q.data(), b0, b1, scores);
        if (j1 > j0) {
            carvq_screen_hot_scan(&l, c.hot_blocks.data(), carvq_scratch.qh.data(), t.hot_offset, hot_ids,
                                  j0, j1, scores);
        }
        if (c.fix != nullptr) {
            int32_t m[CARVQ_SCREEN_FIX_MAX_RANK];
            carvq_screen_fix_weights(c.fix_rank, l.n_embd, (const float *) c.fix_dirs->data, carvq_column(cur, p),
                                     t.scale, m);
            carvq_screen_fix_add(c.fix_rank, l.n_vocab, (const int8_t *) c.fix->data, m, b0 * CARVQ_SCREEN_BLOCK,
                                 std::min<int64_t>(l.n_vocab, b1 * CARVQ_SCREEN_BLOCK), scores);
        }
    }
}

// The tail's logits from the candidates: least squares exact = a + b * approx over the k
// candidates (chosen by approx, which leaves that regression unbiased), and the residual
// variance s2 added as s2 / 2, so that exp() of a noisy logit keeps its expected mass (log-
// normal). Measured on SmolLM2, k = 4096: KLD 0.051 -> 0.042 against the plain approximation.
struct carvq_tail_fit {
    double a = 0.0, b = 1.0, s2 = 0.0;
};

static carvq_tail_fit carvq_fit_tail(const float * approx, const float * exact, int64_t m) {
    carvq_tail_fit f;
    if (m < 32) {
        return f; // too few points to fit: the plain approximation
    }
    double sx = 0, sy = 0;
    for (int64_t i = 0; i < m; ++i) {
        sx += approx[i];
        sy += exact[i];
    }
    const double mx = sx / m, my = sy / m;
    double sxx = 0, sxy = 0;
    for (int64_t i = 0; i < m; ++i) {
        sxx += (approx[i] - mx) * (approx[i] - mx);
        sxy += (approx[i] - mx) * (exact[i] - my);
    }
    if (!(sxx > 0) || !std::isfinite(sxy)) {
        return f;
    }
    const double b = sxy / sxx;
    if (!(b > 0.0 && b < 4.0)) {
        return f; // a degenerate fit (ties, overflow): keep the approximation
    }
    double ss = 0;
    for (int64_t i = 0; i < m; ++i) {
        const double r = exact[i] - (my + b * (approx[i] - mx));
        ss += r * r;
    }
    f.b = b;
    f.a = my - b * mx;
    f.s2 = ss / (double) (m - 2);
    return f;
}

// The candidates' plane of the exact op's output: their ids, as int32 (see carvq_screen_exact_op)
static char * carvq_candidate_ids(const ggml_tensor * exact_t, int64_t p) {
    return (char *) exact_t->data + exact_t->nb[2] + p * exact_t->nb[1];
}

// dst (F32 [k, n_out, 2]): plane 0 the exact logits of the k candidates of each position,
// through ggml-cpu's vec_dot of the head's own type (as its dense mul_mat does); plane 1 the
// candidates' ids (int32 bits, increasing), for the logits op. src[0] the scores, src[1] the
// hidden states, src[2] the head. Every thread selects the same k rows (the selection is exact
// and deterministic, and cheaper than a barrier) and computes an nth of them; thread 0 stores
// the ids.
#define CARVQ_EXACT_RUN 64 // candidates a thread takes at a time

static void carvq_screen_exact_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const llama_carvq_screen & screen = *(const llama_carvq_screen *) userdata;
    llama_carvq_head_rows * rows = screen.head_rows.get();
    const ggml_tensor * scores_t = dst->src[0];
    const ggml_tensor * cur = dst->src[1];
    const ggml_tensor * w = dst->src[2];
    const int64_t n = cur->ne[0], k = dst->ne[0];
    const ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(w->type);
    carvq_screen_scratch & sc = carvq_scratch;
    const int64_t V = scores_t->ne[0] - CARVQ_SCORES_TRAILER;
    sc.ids.resize((size_t) k); // k <= V (llama_carvq_build_head), so the selection has k rows
    if (rows != nullptr && (rows->row_bytes != w->nb[1] || rows->n_rows != w->ne[1])) {
        rows = nullptr; // not the tensor the cache was opened for
    }
    std::shared_lock<std::shared_mutex> lock;
    if (rows != nullptr) {
        lock = std::shared_lock<std::shared_mutex>(rows->mutex);
        sc.row.resize(rows->row_bytes);
    }
    for (int64_t p = 0; p < dst->ne[1]; ++p) {
        const int32_t * scores = (const int32_t *) ((const char *) scores_t->data + p * scores_t->nb[1]);
        const int64_t m = carvq_screen_select(scores, V, k, sc.ids.data(), sc.hist.data());
        if (ith == 0) {
            memcpy(carvq_candidate_ids(dst, p), sc.ids.data(), (size_t) m * sizeof(int32_t));
        }
        const float * h = carvq_column(cur, p);
        const void * hv = h;
        if (tr->vec_dot_type != GGML_TYPE_F32) {
            sc.hq.resize(ggml_row_size(tr->vec_dot_type, n));
            ggml_get_type_traits_cpu(tr->vec_dot_type)->from_float(h, sc.hq.data(), n);
            hv = sc.hq.data();
        }
        float * out = (float *) ((char *) dst->data + p * dst->nb[1]);
        // the candidates in runs of CARVQ_EXACT_RUN dealt out in turn: a thread writes whole
        // cache lines of logits, and each gets its share of the rare rows, which the row cache
        // misses more often (read with pread). The rows are hinted ahead in the thread's own
        // order: slot entries 16 candidates ahead, the rows' bytes 8 ahead.
        const int32_t * ids = sc.ids.data();
        const auto nth_own = [&](int64_t j) { // the thread's j-th candidate
            return (ith + (j / CARVQ_EXACT_RUN) * nth) * CARVQ_EXACT_RUN + j % CARVQ_EXACT_RUN;
        };
        for (int64_t j = 0;; ++j) {
            const int64_t i = nth_own(j);
            if (i >= m) {
                break;
            }
            const int64_t i8 = nth_own(j + 8), i16 = nth_own(j + 16);
            if (rows != nullptr) {
                if (i16 < m) {
                    rows->prefetch_slot(ids[i16]);
                }
                if (i8 < m) {
                    rows->prefetch_row(ids[i8]);
                }
            } else if (i8 < m) {
                carvq_prefetch_bytes((const char *) w->data + ids[i8] * w->nb[1], w->nb[1]);
            }
            const uint8_t * cached = rows != nullptr ? rows->row(ids[i], sc.row.data(), ith) : nullptr;
            const char * row = cached != nullptr ? (const char *) cached : (const char *) w->data + ids[i] * w->nb[1];
            tr->vec_dot((int) n, out + i, 0, row, 0, hv, 0, 1);
        }
    }
}

// dst (F32 [V, n_out]) = the logits: every row from its score through the tail fit
// (carvq_fit_tail), then the candidates' exact logits. src[0] the scores, src[1] the hidden
// states, src[2] the exact op's output (the candidates' logits and ids). Thread ith fills a
// contiguous slice of rows.
static void carvq_screen_logits_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const ggml_tensor * scores_t = dst->src[0];
    const ggml_tensor * exact_t = dst->src[2];
    const int64_t V = dst->ne[0], k = exact_t->ne[0];
    const int64_t per = (V + nth - 1) / nth, v0 = per * ith, v1 = std::min(V, v0 + per);
    if (v0 >= v1) {
        return;
    }
    carvq_screen_scratch & sc = carvq_scratch;
    for (int64_t p = 0; p < dst->ne[1]; ++p) {
        const int64_t m = k;
        sc.ids.resize((size_t) m);
        memcpy(sc.ids.data(), carvq_candidate_ids(exact_t, p), (size_t) m * sizeof(int32_t));
        const int32_t * scores = (const int32_t *) ((const char *) scores_t->data + p * scores_t->nb[1]);
        carvq_screen_tables t = {};
        carvq_scores_trailer_get(scores + V, &t.scale, &t.bias);
        const float * exact = (const float *) ((const char *) exact_t->data + p * exact_t->nb[1]);
        sc.approx.resize((size_t) m);
        for (int64_t i = 0; i < m; ++i) {
            sc.approx[(size_t) i] = (float) scores[sc.ids[(size_t) i]] * t.scale + t.bias;
        }
        const carvq_tail_fit f = m < V ? carvq_fit_tail(sc.approx.data(), exact, m) : carvq_tail_fit();
        // tail logit = a + b * (score * scale + bias) + s2 / 2: one affine map of the score
        const float mul = (float) (f.b * t.scale), add = (float) (f.a + f.b * t.bias + f.s2 / 2);
        float * out = (float *) ((char *) dst->data + p * dst->nb[1]);
        for (int64_t v = v0; v < v1; ++v) {
            out[v] = (float) scores[v] * mul + add;
        }
        const int32_t * lo = std::lower_bound(sc.ids.data(), sc.ids.data() + m, (int32_t) v0);
        for (const int32_t * it = lo; it < sc.ids.data() + m && *it < v1; ++it) {
            out[*it] = exact[it - sc.ids.data()];
        }
    }
}

// ---- the coded head (format v8): the tied head's logits from the lookup's codes ------------

// The codebooks as F32 (the screen converted F16 ones at load; the hot levels' scalar adds would
// otherwise convert every value they read)
static const float * carvq_coded_head_codebooks(const llama_carvq & carvq, bool hot) {
    const llama_carvq_screen & sc = carvq.screen;
    if (hot) {
        return !sc.hot_codebooks_f32.empty() ? sc.hot_codebooks_f32.data() : (const float *) carvq.hot_codebooks->data;
    }
    return !sc.codebooks_f32.empty() ? sc.codebooks_f32.data() : (const float *) carvq.codebooks->data;
}

// Row v's position among tier t's rows (0-based, in id order), or -1 when v is not one of them
static inline int64_t carvq_tier_find(const llama_carvq & carvq, int64_t t, int32_t v) {
    const int64_t w = t * carvq.tier_words + v / 64;
    const uint64_t word = carvq.tier_bits[(size_t) w], bit = 1ull << (v % 64);
    return (word & bit) ? (int64_t) carvq.tier_rank[(size_t) w] + carvq_popcount64(word & (bit - 1)) : -1;
}

// out (n floats) += row `id`'s hot levels, tier after tier (carvq_rows_hot_add's sums), its tiers
// found by carvq_tier_find: the decoder's search of each tier's ids, once per row of a dense
// head, took 88 % of Gemma-3's
static void carvq_coded_hot_add(const llama_carvq & carvq, int32_t id, float * out) {
    const carvq_layout & l = carvq.layout;
    for (int64_t t = 0, start = 0; t < carvq_layout_hot_tier_count(&l); start += carvq_layout_hot_tier_rows(&l, t), ++t) {
        const int64_t at = carvq_tier_find(carvq, t, id);
        if (at >= 0) {
            carvq_hot_row_add(&l, t, start + at, (const uint8_t *) carvq.hot_codes->data,
                              carvq_coded_head_codebooks(carvq, true), CARVQ_CODEBOOK_F32, out);
        }
    }
}

// Row `id` of the lookup before its transform (the RVQ levels, then the hot tiers' levels) into
// out (n floats): what carvq_rvq_op writes for that token, so a logit is this row times the
// hidden state projected by the transform (carvq_coded_head_state), as the screen's tables are.
// The codes come from the screen's blocks (llama_carvq::lookup_from_blocks); packed: B bytes of scratch.
static void carvq_coded_head_row(const llama_carvq & carvq, int32_t id, uint8_t * packed, float * out) {
    const carvq_layout * l = &carvq.layout;
    const int32_t zero = 0;
    carvq_screen_row_codes(l, carvq.screen.blocks.data(), id, packed);
    carvq_rows_decode(l, packed, carvq_coded_head_codebooks(carvq, false), CARVQ_CODEBOOK_F32, &zero, 1, out,
                      l->n_embd, 0, 1);
    if (l->hot_rows > 0) {
        carvq_coded_hot_add(carvq, id, out);
    }
}

// Per-token tables of the coded head's exact op: per code position j = g*L + l of a row, the 16
// entries hp_g . C[g][l][c] (the codebooks' order: {d, K, L, G}; entries c >= K zero), as
// carvq_screen_rows_sum reads them for the lookup's levels. single: GL * 16 floats.
static void carvq_coded_tables_single(const float * cb, int64_t GL, int64_t L, int64_t K, int64_t d, const float * hp,
                                      float * single) {
    for (int64_t j = 0; j < GL; ++j) {
        const float * h = hp + (j / L) * d;
        const float * v = cb + j * K * d;
        // the 16 entries side by side (each still summed in order of i), so that they vectorize
        float acc[16] = {};
        for (int64_t i = 0; i < d; ++i) {
            for (int64_t c = 0; c < K; ++c) {
                acc[c] += h[i] * v[c * d + i];
            }
        }
        memcpy(single + j * 16, acc, sizeof(acc));
    }
}

// The hot tiers' tables (their codes are packed rows, {d, K, Lh, G} a tier after the tiers before
// it): per packed byte of a row (positions 2i and 2i + 1), the 256 sums of its two entries, so
// that a hot row adds one lookup a byte, G*Lh/2 adds. pairs: n_sets * B * 256 floats.
static void carvq_coded_tables_pairs(const float * cb, int64_t n_sets, int64_t GL, int64_t L, int64_t K, int64_t d,
                                     const float * hp, std::vector<float> & single, std::vector<float> & pairs) {
    const int64_t B = (GL + 1) / 2;
    single.resize((size_t) (GL * 16));
    pairs.resize((size_t) (n_sets * B * 256));
    for (int64_t set = 0; set < n_sets; ++set) {
        carvq_coded_tables_single(cb + set * GL * K * d, GL, L, K, d, hp, single.data());
        float * out = pairs.data() + set * B * 256;
        for (int64_t b = 0; b < B; ++b) {
            const float * lo = single.data() + (2 * b) * 16;
            const bool has_hi = 2 * b + 1 < GL; // an odd G*L leaves the last byte's high nibble as padding
            for (int64_t x_hi = 0; x_hi < 16; ++x_hi) {
                const float hi = has_hi ? lo[16 + x_hi] : 0.0f;
                for (int64_t x_lo = 0; x_lo < 16; ++x_lo) {
                    out[b * 256 + x_hi * 16 + x_lo] = lo[x_lo] + hi;
                }
            }
        }
    }
}

// acc[r] += the sum of row r's bytes' entries in a set of byte tables, for n rows of B bytes
static void carvq_coded_sums(const uint8_t * const * rows, int64_t n, const float * pairs, int64_t B, float * acc) {
    for (int64_t b = 0; b < B; ++b) {
        const float * table = pairs + b * 256;
        for (int64_t r = 0; r < n; ++r) {
            acc[r] += table[rows[r][b]];
        }
    }
}

// The hidden state h as the rows above meet it: h @ transform (format v6), else h itself
static const float * carvq_coded_head_state(const llama_carvq & carvq, const float * h, float * projected) {
    const std::vector<float> & t = carvq.screen.transform_f32;
    if (t.empty()) {
        return h;
    }
    carvq_screen_project(carvq.layout.n_embd, t.data(), h, projected);
    return projected;
}

// Candidates a thread of the coded head's exact op takes at a time: carvq_screen_rows_sum
// prefetches rows 16 ahead within a run, so a longer run leaves fewer rows unprefetched (Gemma-3's
// shape, 1024 rows a thread: 0.43-0.56 ms in runs of 64, 0.36 ms in runs of 256)
#define CARVQ_CODED_RUN 256

// Per-token tables of a coded head for hidden state h: the lookup's levels' singles into
// sc.coded_t, the hot tiers' pair tables into sc.coded_th. Every thread builds them (a few
// hundred thousand multiply-adds; no barrier inside an op).
static void carvq_coded_tables(const llama_carvq & carvq, carvq_screen_scratch & sc, const float * h) {
    const carvq_layout & l = carvq.layout;
    const int64_t G = l.n_embd / l.group_size, GL = G * l.levels, GLh = G * l.hot_levels, K = l.codebook_size;
    sc.coded_t.resize((size_t) (GL * 16));
    carvq_coded_tables_single(carvq_coded_head_codebooks(carvq, false), GL, l.levels, K, l.group_size, h, sc.coded_t.data());
    if (l.hot_rows > 0) {
        carvq_coded_tables_pairs(carvq_coded_head_codebooks(carvq, true), carvq_layout_hot_tier_count(&l), GLh,
                                 l.hot_levels, K, l.group_size, h, sc.coded_single, sc.coded_th);
    }
}

// out[r] = the logit of row ids[r] (nr <= CARVQ_CODED_RUN increasing ids) from the tables of
// carvq_coded_tables. It sums the rows' lookup levels from the screen's blocks (the tables,
// G*L*64 bytes, stay in L1), then finds each hot tier's rows among its own (a bit and a rank:
// carvq_tier_find; the search of the tier's ids it replaced took a third of the exact op) and
// adds them up a byte position at a time over all of them: that position's table (1 KiB) stays
// in L1, and the scattered hot rows are fetched side by side, not one after another.
static void carvq_coded_run_logits(const llama_carvq & carvq, const carvq_screen_scratch & sc, const int32_t * ids,
                                   int64_t nr, float * out) {
    const carvq_layout & l = carvq.layout;
    const int64_t Bh = (l.n_embd / l.group_size * l.hot_levels + 1) / 2;
    carvq_screen_rows_sum(&l, carvq.screen.blocks.data(), ids, nr, sc.coded_t.data(), out);
    const int64_t n_tiers = l.hot_rows == 0 ? 0 : carvq_layout_hot_tier_count(&l);
    for (int64_t t = 0, start = 0; t < n_tiers; start += carvq_layout_hot_tier_rows(&l, t), ++t) {
        const uint8_t * hot[CARVQ_CODED_RUN];
        float hot_acc[CARVQ_CODED_RUN];
        int64_t of[CARVQ_CODED_RUN], n_hot = 0;
        for (int64_t r = 0; r < nr; ++r) {
            const int64_t at = carvq_tier_find(carvq, t, ids[r]);
            if (at >= 0) {
                hot[n_hot] = (const uint8_t *) carvq.hot_codes->data + (start + at) * Bh;
                hot_acc[n_hot] = 0.0f;
                of[n_hot++] = r;
            }
        }
        carvq_coded_sums(hot, n_hot, sc.coded_th.data() + t * Bh * 256, Bh, hot_acc);
        for (int64_t j = 0; j < n_hot; ++j) {
            out[of[j]] += hot_acc[j];
        }
    }
}

// dst (F32 [k, n_out, 2]) as carvq_screen_exact_op's, the candidates' logits summed from their
// codes by tables (a coded head has no output.weight to read). src[0] the scores, src[1] the
// hidden states.
static void carvq_coded_head_exact_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const llama_carvq & carvq = *(const llama_carvq *) userdata;
    const ggml_tensor * scores_t = dst->src[0];
    const ggml_tensor * cur = dst->src[1];
    const int64_t n = cur->ne[0], k = dst->ne[0];
    const int64_t V = scores_t->ne[0] - CARVQ_SCORES_TRAILER;
    carvq_screen_scratch & sc = carvq_scratch;
    sc.ids.resize((size_t) k);
    sc.hp.resize((size_t) n);
    for (int64_t p = 0; p < dst->ne[1]; ++p) {
        const int32_t * scores = (const int32_t *) ((const char *) scores_t->data + p * scores_t->nb[1]);
        const int64_t m = carvq_screen_select(scores, V, k, sc.ids.data(), sc.hist.data());
        if (ith == 0) {
            memcpy(carvq_candidate_ids(dst, p), sc.ids.data(), (size_t) m * sizeof(int32_t));
        }
        carvq_coded_tables(carvq, sc, carvq_coded_head_state(carvq, carvq_column(cur, p), sc.hp.data()));
        float * out = (float *) ((char *) dst->data + p * dst->nb[1]);
        // runs of CARVQ_CODED_RUN candidates dealt out in turn, as in carvq_screen_exact_op
        for (int64_t run = ith; run * CARVQ_CODED_RUN < m; run += nth) {
            const int64_t i0 = run * CARVQ_CODED_RUN;
            carvq_coded_run_logits(carvq, sc, sc.ids.data() + i0, std::min(m, i0 + CARVQ_CODED_RUN) - i0, out + i0);
        }
    }
}

// Rows a thread of the dense coded head decodes before it multiplies them by every hidden state:
// 64 rows of Gemma-3 are 160 KiB, in L2 while the states stream past in bands of 3
#define CARVQ_DENSE_ROWS 64

// dst (F32 [V, n_out]) = every logit of a coded head: thread ith decodes a contiguous slice of
// the rows, CARVQ_DENSE_ROWS at a time, and multiplies each block by every output's hidden state
// (for prompts and llama-perplexity; nothing of the head stays in memory between calls).
static void carvq_coded_head_dense_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const llama_carvq & carvq = *(const llama_carvq *) userdata;
    const ggml_tensor * cur = dst->src[0];
    const int64_t n = cur->ne[0], n_out = cur->ne[1], V = dst->ne[0];
    const int64_t per = (V + nth - 1) / nth, v0 = per * ith, v1 = std::min(V, v0 + per);
    if (v0 >= v1) {
        return;
    }
    carvq_screen_scratch & sc = carvq_scratch;
    if (n_out <= LLAMA_CARVQ_SCREEN_MAX_OUTPUTS) {
        // a few outputs (generation with CARVQ_HEAD=dense): every row's logit by the exact op's
        // tables, not by decoding it to n floats first (Gemma-3: 3.45 -> 18.7 tokens/s, 2 threads)
        sc.hp.resize((size_t) n);
        int32_t ids[CARVQ_CODED_RUN];
        for (int64_t p = 0; p < n_out; ++p) {
            carvq_coded_tables(carvq, sc, carvq_coded_head_state(carvq, carvq_column(cur, p), sc.hp.data()));
            float * out = (float *) ((char *) dst->data + p * dst->nb[1]);
            for (int64_t b = v0; b < v1; b += CARVQ_CODED_RUN) {
                const int64_t nr = std::min<int64_t>(CARVQ_CODED_RUN, v1 - b);
                for (int64_t r = 0; r < nr; ++r) {
                    ids[r] = (int32_t) (b + r);
                }
                carvq_coded_run_logits(carvq, sc, ids, nr, out + b);
            }
        }
        return;
    }
    // the states side by side (projected by the transform where the file has one), then each block
    // of decoded rows times all of them (carvq_rows_dot: tiles of 4 rows by 3 states)
    sc.hps.resize((size_t) (n * n_out));
    for (int64_t p = 0; p < n_out; ++p) {
        const float * h = carvq_coded_head_state(carvq, carvq_column(cur, p), sc.hps.data() + p * n);
        if (h != sc.hps.data() + p * n) {
            memcpy(sc.hps.data() + p * n, h, (size_t) n * sizeof(float));
        }
    }
    sc.rows_f32.resize((size_t) (n * CARVQ_DENSE_ROWS));
    sc.row.resize((size_t) carvq_layout_code_row_bytes(&carvq.layout));
    const int64_t ld = dst->nb[1] / (int64_t) sizeof(float);
    for (int64_t b = v0; b < v1; b += CARVQ_DENSE_ROWS) {
        const int64_t rows = std::min<int64_t>(CARVQ_DENSE_ROWS, v1 - b);
        for (int64_t r = 0; r < rows; ++r) {
            carvq_coded_head_row(carvq, (int32_t) (b + r), sc.row.data(), sc.rows_f32.data() + r * n);
        }
        carvq_rows_dot(sc.rows_f32.data(), rows, sc.hps.data(), n_out, n, (float *) dst->data + b, ld);
    }
}

int64_t llama_carvq_screen_default_k(int64_t n_vocab, bool own_index, int32_t fix_rank, bool coded_head) {
    if (coded_head) {
        return std::min<int64_t>(n_vocab, LLAMA_CARVQ_CODED_HEAD_K);
    }
    if (own_index) {
        // the head's own index ranks about 4x better than the lookup's codes: SmolLM2 at k = 2048
        // keeps the dense top-40 set inside the candidates at 99.6 % of positions, KLD 0.015
        return std::min<int64_t>(n_vocab, std::max<int64_t>(LLAMA_CARVQ_SCREEN_INDEX_K_MIN,
                                                            std::min<int64_t>(LLAMA_CARVQ_SCREEN_INDEX_K_MAX, n_vocab / 16)));
    }
    if (fix_rank >= LLAMA_CARVQ_SCREEN_FIX_RANK_K) {
        // a correction of rank 4 ranks as well at 4096 as rank 1 at 6144: SmolLM2's dense top-40
        // set inside the candidates at 99.6 % against 99.7 % (docs/RESULTS.md, session 20)
        return std::min<int64_t>(n_vocab, std::max<int64_t>(4096, std::min<int64_t>(6144, n_vocab / 12)));
    }
    if (fix_rank > 0) {
        // the screen correction (format v5) ranks better: at k = 6144 KLD of screening 0.0065 on
        // Gemma-3 (0.0054 uncorrected at 8192), the dense top-40 set inside the candidates at 100 %
        // of 512 SmolLM2 positions (99.4 % uncorrected; docs/RESULTS.md, session 17)
        return std::min<int64_t>(n_vocab, std::max<int64_t>(4096, std::min<int64_t>(6144, n_vocab / 4)));
    }
    // a quarter of the rows, within [4096, 8192]: the plausible next tokens do not grow with V.
    // Gemma-3 (V = 262144), k = 8192: every top-1 and every dense top-40 set inside the
    // candidates at 256 positions, KLD 0.0087, 20/20 greedy runs unchanged (bench/screen_sets.py)
    return std::min<int64_t>(n_vocab, std::max<int64_t>(4096, std::min<int64_t>(8192, n_vocab / 4)));
}

// CARVQ_HEAD for a batch of n_out outputs: screened (true, k its candidates), or dense. "auto"
// screens at most LLAMA_CARVQ_SCREEN_MAX_OUTPUTS outputs, where k is at most a
// 1/LLAMA_CARVQ_SCREEN_MIN_SHARE of the rows (reading k exact rows as well as the codes does not
// pay above that, bench/screen.py)
static bool carvq_head_screens(const llama_carvq_screen & screen, int64_t n_out, long long * k) {
    const std::string mode = carvq_env("CARVQ_HEAD", "auto");
    if (mode == "dense" || (mode != "screened" && n_out > LLAMA_CARVQ_SCREEN_MAX_OUTPUTS)) {
        return false;
    }
    *k = carvq_screen_k(screen, true);
    return mode == "screened" || *k * LLAMA_CARVQ_SCREEN_MIN_SHARE <= screen.layout.n_vocab;
}

// The screened head's three ops, because each needs all of the previous one: the scan (threads
// over blocks of rows), the candidates' exact logits (threads over candidates; `exact_op` with
// src {scores, cur, w...}), the logits (threads over rows)
static ggml_tensor * carvq_build_screened(ggml_context * ctx, const llama_carvq_screen & screen, ggml_tensor * cur, int64_t k,
                                          ggml_custom_op_t exact_op, ggml_tensor * w, void * exact_userdata) {
    const carvq_layout & l = screen.layout;
    ggml_tensor * scan_args[1] = { cur };
    ggml_tensor * scores = ggml_custom_4d(ctx, GGML_TYPE_I32, l.n_vocab + CARVQ_SCORES_TRAILER, cur->ne[1], 1, 1, scan_args, 1,
                                          carvq_screen_scan_op, GGML_N_TASKS_MAX, (void *) &screen);
    ggml_set_name(scores, "carvq_screen_scores");
    ggml_tensor * exact_args[3] = { scores, cur, w };
    ggml_tensor * exact = ggml_custom_4d(ctx, GGML_TYPE_F32, k, cur->ne[1], 2, 1, exact_args, w != nullptr ? 3 : 2,
                                         exact_op, GGML_N_TASKS_MAX, exact_userdata);
    ggml_set_name(exact, "carvq_screen_exact");
    ggml_tensor * logits_args[3] = { scores, cur, exact };
    ggml_tensor * logits = ggml_custom_4d(ctx, GGML_TYPE_F32, l.n_vocab, cur->ne[1], 1, 1, logits_args, 3,
                                          carvq_screen_logits_op, GGML_N_TASKS_MAX, (void *) &screen);
    ggml_set_name(logits, "carvq_screen_logits");
    return logits;
}

// The coded head (format v8): screened like a head copy, its candidates' logits from their codes
// (carvq_coded_head_exact_op); otherwise every row decoded (carvq_coded_head_dense_op)
static ggml_tensor * carvq_build_coded_head(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * cur) {
    const llama_carvq_screen & screen = carvq.screen;
    const carvq_layout & l = carvq.layout;
    if (cur->type != GGML_TYPE_F32 || cur->ne[0] != l.n_embd || cur->ne[2] != 1 || cur->ne[3] != 1) {
        GGML_ABORT("CARVQ coded head: hidden states of type %s and shape %lld x %lld x %lld x %lld, expected F32 %lld x n",
                   ggml_type_name(cur->type), (long long) cur->ne[0], (long long) cur->ne[1], (long long) cur->ne[2],
                   (long long) cur->ne[3], (long long) l.n_embd);
    }
    long long k = 0;
    if (screen.enabled() && cur->ne[1] >= 1 && carvq_head_screens(screen, cur->ne[1], &k)) {
        return carvq_build_screened(ctx, screen, cur, k, carvq_coded_head_exact_op, nullptr, (void *) &carvq);
    }
    ggml_tensor * args[1] = { cur };
    ggml_tensor * logits = ggml_custom_4d(ctx, GGML_TYPE_F32, l.n_vocab, cur->ne[1], 1, 1, args, 1,
                                          carvq_coded_head_dense_op, GGML_N_TASKS_MAX, (void *) &carvq);
    ggml_set_name(logits, "carvq_head_dense");
    return logits;
}

ggml_tensor * llama_carvq_build_head(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * w, ggml_tensor * cur) {
    if (w == nullptr) {
        return carvq.head_codes ? carvq_build_coded_head(ctx, carvq, cur) : nullptr;
    }
    const llama_carvq_screen & screen = carvq.screen;
    const carvq_layout & l = screen.layout;
    if (!screen.enabled() || strcmp(ggml_get_name(w), "output.weight") != 0 ||
        w->ne[0] != l.n_embd || w->ne[1] != l.n_vocab || !ggml_is_contiguous(w) ||
        // rows read in the stored layout on the CPU: not a GPU head, not a CPU-repacked one
        w->buffer == nullptr || !ggml_backend_buffer_is_host(w->buffer) ||
        cur->type != GGML_TYPE_F32 || cur->ne[0] != l.n_embd || cur->ne[1] < 1 || cur->ne[2] != 1 || cur->ne[3] != 1) {
        return nullptr;
    }
    const ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(w->type);
    if (tr == nullptr || tr->vec_dot == nullptr || (tr->vec_dot_type != GGML_TYPE_F32 &&
                                                    ggml_get_type_traits_cpu(tr->vec_dot_type)->from_float == nullptr)) {
        return nullptr;
    }
    long long k = 0;
    if (!carvq_head_screens(screen, cur->ne[1], &k)) {
        return nullptr;
    }
    return carvq_build_screened(ctx, screen, cur, k, carvq_screen_exact_op, w, (void *) &screen);
}

static ggml_tensor * carvq_as_f32(ggml_context * ctx, ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 ? t : ggml_cast(ctx, t, GGML_TYPE_F32);
}

// GELU, tanh form, composed from exact f32 ops: ggml_gelu rounds its input to f16 for a
// table lookup, which would break the format's float32 contract.
static ggml_tensor * carvq_gelu_tanh(ggml_context * ctx, ggml_tensor * x) {
    const float c = 0.7978845608028654f; // sqrt(2/pi)
    ggml_tensor * x3    = ggml_mul(ctx, ggml_sqr(ctx, x), x);
    ggml_tensor * inner = ggml_scale(ctx, ggml_add(ctx, x, ggml_scale(ctx, x3, 0.044715f)), c);
    ggml_tensor * one_t = ggml_scale_bias(ctx, ggml_tanh(ctx, inner), 1.0f, 1.0f);
    return ggml_mul(ctx, ggml_scale(ctx, x, 0.5f), one_t);
}

ggml_tensor * llama_carvq_build_lookup(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * tokens) {
    const carvq_layout & l = carvq.layout;
    // (the hot ids are read from carvq.hot_id_data(): src[3] is the tensor they come from, ids or map)
    ggml_tensor * args[6] = { carvq.codes, carvq.codebooks, tokens, carvq.hot_map ? carvq.hot_map : carvq.hot_ids,
                              carvq.hot_codes, carvq.hot_codebooks };
    const int n_args = l.hot_rows > 0 ? 6 : 3;
    // rows are the unit of work: a few rows (generation) decode on one thread, which
    // spares the other threads' wake-up (measured in bench/lookup_bench.c)
    const int n_tasks = tokens->ne[0] < 8 ? 1 : GGML_N_TASKS_MAX;
    ggml_tensor * cur = ggml_custom_4d(ctx, GGML_TYPE_F32, l.n_embd, tokens->ne[0], 1, 1, args, n_args,
                                       carvq_rvq_op, n_tasks, (void *) &carvq);
    if (carvq.transform != nullptr) {
        // format v6: the codes' sum is in a frame of its own; row = transform @ sum
        ggml_set_name(cur, "carvq_codes_sum");
        cur = ggml_mul_mat(ctx, carvq_as_f32(ctx, carvq.transform), cur);
    }
    // build_inp_embd names the lookup's result "embd" (the node the runtime's embedding_rows()
    // reads back); the names here only label the nodes inside the lookup in graph dumps
    if (l.adaptor_rank == 0) {
        ggml_set_name(cur, "carvq_embd");
        return cur;
    }
    ggml_set_name(cur, "carvq_rvq");
    ggml_tensor * z = ggml_get_rows(ctx, carvq.sigma0, tokens);                      // [m, T]
    ggml_tensor * u = ggml_add(ctx, ggml_mul_mat(ctx, carvq_as_f32(ctx, carvq.up_w), z), carvq.up_b);
    switch (carvq.activation) {
        case LLAMA_CARVQ_ACT_RELU: u = ggml_relu(ctx, u);        break;
        case LLAMA_CARVQ_ACT_SILU: u = ggml_silu(ctx, u);        break;
        case LLAMA_CARVQ_ACT_GELU: u = carvq_gelu_tanh(ctx, u);  break;
        default: GGML_ABORT("CARVQ: bad activation");
    }
    ggml_tensor * y = ggml_add(ctx, ggml_mul_mat(ctx, carvq_as_f32(ctx, carvq.down_w), u), carvq.down_b); // [n, T]
    cur = ggml_add(ctx, cur, y);
    ggml_set_name(cur, "carvq_embd");
    return cur;
}
