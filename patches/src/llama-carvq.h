// llama-carvq.h - CARVQ token embeddings inside llama.cpp (docs/FORMAT.md of carvq).
//
// A CARVQ-GGUF has no token_embd.weight; its rows are decoded on the fly from
// token_embd.carvq.* tensors. This header is what the hooks in llama-model and
// llama-graph see; the work is in llama-carvq.cpp and the llama.cpp-free decoder carvq.c.
#pragma once

#include "carvq.h"
#include "llama-arch.h"
#include "ggml-backend.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct llama_model_loader;
struct llama_model_base;
struct llama_model;

// The exact rows of a head mapped lazily, read with pread into a bounded cache (docs/SCREEN.md,
// "Resident memory"). Read through the mapping, each candidate faults in its page and, by the
// kernel's fault-around, up to 64 KiB beside it: after 256 tokens of Gemma-3-270M 90 of the
// head copy's 110 MiB were resident, though the candidates had touched a quarter of its rows.
// The cache holds whole rows. Each row keeps which of the last 8 aging periods (of
// LLAMA_CARVQ_HEAD_CACHE_AGE_SCANS screened tokens each) read it; when no slot is left, the next
// scan frees 1/LLAMA_CARVQ_HEAD_CACHE_FREE_SHARE of them, the rows read in the fewest periods first
// (the rows that many tokens' candidates share stay, a topic's one-off rows leave). SmolLM2, 256
// greedy tokens, cache of 5 x k rows: 62.8k rows read, 2.2x fewer than a clock with one reference
// bit (138.7k); 32.7k distinct rows (docs/SCREEN.md, "Resident memory"). Until a slot is free, a
// row that finds none is read into the caller's scratch. POSIX only (elsewhere: the mapping).
#define LLAMA_CARVQ_HEAD_CACHE_FREE_SHARE 16
#define LLAMA_CARVQ_HEAD_CACHE_AGE_SCANS 4
// File descriptions the row cache reads through: the graph's threads take them in turn. Threads
// reading through one share its reference count, which every pread takes and drops: with two
// threads reading misses at once, that cache line went back and forth between the cores.
#define LLAMA_CARVQ_HEAD_FDS 4
static_assert(LLAMA_CARVQ_HEAD_FDS == 4, "llama_carvq_head_rows::fd's initializer lists one -1 per description");

struct llama_carvq_head_rows {
    int     fd[LLAMA_CARVQ_HEAD_FDS] = { -1, -1, -1, -1 }; // fd[0] always open, the others where /proc allows
    size_t  offset    = 0; // of output.weight in the file
    size_t  row_bytes = 0;
    int64_t n_rows    = 0;
    int64_t capacity  = 0; // rows
    std::unique_ptr<uint8_t[]> slab;                  // capacity rows; untouched pages stay non-resident
    std::unique_ptr<std::atomic<int32_t>[]> slot_of;  // row -> slot, -1 when not cached
    std::unique_ptr<int32_t[]> row_of;                // slot -> row, -1 when free
    std::unique_ptr<std::atomic<uint8_t>[]> used;     // slot read since the last eviction
    std::unique_ptr<uint8_t[]> history;               // slot read in each of the last 8 periods (bit 7 the latest)
    std::unique_ptr<int32_t[]> free_slots;            // [0, n_free): slots to fill, in order
    int64_t n_free = 0;
    std::atomic<int64_t> next_free {0};               // free slots handed out
    std::atomic<int64_t> scans {0};                   // screened scans since the last aging of `history`
    std::shared_mutex mutex;                          // shared: reading and filling; exclusive: eviction

    llama_carvq_head_rows() = default;
    llama_carvq_head_rows(const llama_carvq_head_rows &) = delete;
    llama_carvq_head_rows & operator=(const llama_carvq_head_rows &) = delete;
    ~llama_carvq_head_rows();

    bool allocate(int64_t rows); // false (and no cache) when rows < 1
    // Row `id`'s bytes, from the cache or read into it (into `scratch`, row_bytes long, when no slot
    // is free); nullptr when the read fails. The caller holds `mutex` shared.
    // `lane` (the thread's index) picks the file description.
    const uint8_t * row(int64_t id, uint8_t * scratch, int lane);
    // Hints for a row about to be read: its slot entry, then (once that is in cache) its bytes.
    // A cached row's bytes sit at a random slot, so reading rows one after another waits on memory.
    void prefetch_slot(int64_t id) const;
    void prefetch_row(int64_t id) const;
    void evict_if_full(); // takes `mutex` exclusively when no slot is free
};

// What the screened head scans (docs/SCREEN.md): the output head's own index (format v3:
// output.carvq.*, fitted in the hidden states' metric, with its projection), else, for a tied
// source, the lookup's codes (projection null). Either way the codes re-laid in blocks.
struct llama_carvq_screen {
    carvq_layout layout = {};
    const ggml_tensor * codes         = nullptr;
    const ggml_tensor * codebooks     = nullptr;
    const int32_t     * hot_ids       = nullptr; // N ids, tier after tier (the lookup's maybe expanded from its map)
    const ggml_tensor * hot_codes     = nullptr;
    const ggml_tensor * hot_codebooks = nullptr;
    const ggml_tensor * projection    = nullptr; // F32 {n, n}: tables from h @ P
    // the screen correction (format v5): I8 {V, r} coefficients (a plane per direction), F32 {n, r} directions
    const ggml_tensor * fix           = nullptr;
    const ggml_tensor * fix_dirs      = nullptr;
    int32_t fix_rank = 0;
    bool coded_head = false; // the head it screens is the lookup's codes (format v8): a smaller default k
    std::vector<uint8_t> blocks, hot_blocks;
    // the codebooks as F32 when stored as F16: converted once at load, not at every token's tables
    std::vector<float> codebooks_f32, hot_codebooks_f32;
    // the lookup's transform (format v6) as F32 {n, n}, where the scan reads the lookup's codes:
    // tables from h @ transform, as from h @ P for an index (empty: none)
    std::vector<float> transform_f32;
    // scan_work[b]: the scan's work for blocks [0, b) (code bytes, the hot rows' included), so
    // that threads split the scan by work, not by blocks: frequent tokens, the hot rows, have low ids
    std::vector<int64_t> scan_work;
    std::unique_ptr<llama_carvq_head_rows> head_rows; // null: the head's rows are read through its mapping

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
    ggml_tensor * hot_map   = nullptr; // I8 {map bytes}: the ids as nested bitmaps instead (format v7)
    bool hot_map_key = false;          // carvq.hot_map
    std::vector<int32_t> hot_map_ids;  // hot_map expanded at load (llama_carvq_check_data)
    // a coded head's hot tiers as bitmaps with ranks (built at load): whether row v is in tier t,
    // and its position there, in O(1) (carvq_tier_find) instead of a search of the tier's ids
    int64_t tier_words = 0;            // 64-bit words a tier: ceil(V / 64)
    std::vector<uint64_t> tier_bits;   // T * tier_words: bit v of tier t set when v is one of its rows
    std::vector<uint32_t> tier_rank;   // T * tier_words: tier t's rows below word w's first id
    ggml_tensor * hot_codes = nullptr; // I8  {Bh, N}
    ggml_tensor * hot_codebooks = nullptr; // F32/F16 {d, K, Lh, G}
    ggml_tensor * transform = nullptr; // F32/F16 {n, n}: row = transform @ the codes' sum (format v6)

    carvq_layout layout = {};
    int activation = 0; // llama_carvq_act

    // carvq.head_copy: output.weight is the tied source's own matrix, so the codes index the
    // head too and can screen it (docs/SCREEN.md)
    bool head_copy = false;
    // carvq.head_codes (format v8): no output.weight; the tied head is the lookup's rows, its
    // logits computed from the codes (llama_carvq_build_head with a null head)
    bool head_codes = false;
    // the screen index's tensors as loaded (all null without one: output.carvq.*)
    ggml_tensor * screen_codes = nullptr, * screen_codebooks = nullptr, * screen_hot_ids = nullptr,
                * screen_hot_codes = nullptr, * screen_hot_codebooks = nullptr, * screen_projection = nullptr;
    carvq_layout screen_layout = {};
    // the screen correction (format v5, output.carvq.fix*; null without one)
    ggml_tensor * screen_fix = nullptr, * screen_fix_dirs = nullptr;
    int32_t screen_fix_rank = 0;
    llama_carvq_screen screen; // what the screened head reads (empty: no screened head)
    // the lookup, and a coded head's exact rows, decode from screen.blocks (the same codes, re-laid)
    // instead of `codes`, whose mapped pages then leave the process: a row of the blocks spans one
    // byte in 16 of G*L*16 bytes, a row of `codes` two cache lines, but a second copy of the codes
    // costs more memory (Gemma-3: 30 MiB) than the reads cost time (about 0.3 ms of a 9 ms token,
    // within the host's noise in A/B runs: docs/RESULTS.md, session 32)
    bool lookup_from_blocks() const { return screen.enabled() && screen.codes == codes; }
    // the hot rows' ids, tier after tier: the file's hot_ids, or its hot map expanded
    const int32_t * hot_id_data() const {
        return hot_map != nullptr ? hot_map_ids.data() : hot_ids != nullptr ? (const int32_t *) hot_ids->data : nullptr;
    }

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
// for the screened head, the file's mapped copy of them dropped, and the head's row cache.
void llama_carvq_check_data(llama_carvq & carvq, const llama_model_loader & ml);

// Rows of the head the screened head's cache holds: 1/LLAMA_CARVQ_HEAD_CACHE_SHARE of them but
// at least LLAMA_CARVQ_HEAD_CACHE_ROUNDS x k (k as at load), or CARVQ_HEAD_CACHE_MIB (read at load;
// 0 reads every row through the mapping). Gemma-3-270M at k = 8192: 62k distinct candidate rows
// in 256 generated tokens, 98k in 512 tokens of Britannica. 5 x k rows: SmolLM2 at k = 4096 (7.7
// MiB) peaks at 0.92x the stock file's RSS (8 x k: 0.93x) for about 120 rows read again a token.
#define LLAMA_CARVQ_HEAD_CACHE_SHARE 4
#define LLAMA_CARVQ_HEAD_CACHE_ROUNDS 5

// The output head w (output.weight) times the hidden states cur (F32 [n_embd, n_outputs]),
// screened: every logit approximated from the codes, the k best computed exactly from w's
// rows. nullptr when the dense ggml_mul_mat should be used instead: not this model's screened
// head, too many outputs for "auto", or CARVQ_HEAD=dense. Environment: CARVQ_HEAD =
// auto (default: screened for at most LLAMA_CARVQ_SCREEN_MAX_OUTPUTS outputs, when k is at
// most 1/LLAMA_CARVQ_SCREEN_MIN_SHARE of the rows) | screened | dense; CARVQ_SCREEN_K =
// candidates computed exactly (default llama_carvq_screen_default_k).
#define LLAMA_CARVQ_SCREEN_MAX_OUTPUTS 4
// Measured on 2 x86 cores (bench/screen.py): Gemma-3-270M, k = V/32, generates 1.76x faster than
// its dense head; SmolLM2-135M, k = V/6, 1.04x (3 rounds of 3 x 128 tokens; 0.97x at V/4 before
// the hot rows' SIMD scan). Auto screens from k <= V/5.
#define LLAMA_CARVQ_SCREEN_MIN_SHARE 5
// The default k: with the lookup's codes a quarter of the rows within 4096..8192 (within
// 4096..6144 with a screen correction, format v5, and V/12 within 4096..6144 with a correction
// of rank at least LLAMA_CARVQ_SCREEN_FIX_RANK_K); with the head's own index (format v3) V/16
// within LLAMA_CARVQ_SCREEN_INDEX_K_MIN..MAX.
#define LLAMA_CARVQ_SCREEN_FIX_RANK_K 4
#define LLAMA_CARVQ_SCREEN_INDEX_K_MIN 2048
#define LLAMA_CARVQ_SCREEN_INDEX_K_MAX 4096
// A coded head (format v8) scores a candidate by summing its codes' table entries, up to 10 levels,
// where a head copy reads one row: fewer candidates pay. Gemma-3 at 3.0 bpw (docs/RESULTS.md,
// session 31): KLD added by screening +0.0073 at 2048 (+0.0019 at 6144), generation 1.68-1.84x the
// stock file against 1.34-1.42x; SmolLM2 +0.0064.
#define LLAMA_CARVQ_CODED_HEAD_K 2048
int64_t llama_carvq_screen_default_k(int64_t n_vocab, bool own_index, int32_t fix_rank, bool coded_head);
// A coded head (format v8) has no w: the logits come from the codes, screened as above or, for
// many outputs or CARVQ_HEAD=dense, every row decoded a block at a time (never nullptr then).
ggml_tensor * llama_carvq_build_head(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * w, ggml_tensor * cur);

// The input embeddings of `tokens` (I32 [n_tokens]) as an F32 [n_embd, n_tokens] tensor:
// RVQ decode with hot rows (custom op) plus the adaptor MLP (ggml ops).
ggml_tensor * llama_carvq_build_lookup(ggml_context * ctx, const llama_carvq & carvq, ggml_tensor * tokens);
