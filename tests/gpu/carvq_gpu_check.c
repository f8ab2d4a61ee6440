// carvq_gpu_check.c - a CARVQ model in a GPU build of the patched llama.cpp (issue 12, item 3).
//
//   carvq_gpu_check MODEL cpu|gpu|override LOGITS_OUT
//
// cpu: every layer on the CPU; gpu: every layer offloaded (the CARVQ tensors stay on the CPU
// as input-layer tensors, the head goes to the GPU and runs dense); override: gpu plus
// --override-tensor of token_embd.carvq.* to the GPU's buffer type, which the loader must
// refuse with a message. Prints the greedy tokens of a fixed prompt and writes the first
// position's logits (float32) to LOGITS_OUT. Exit 0 on success, 2 when the model is refused.

#include "llama.h"
#include "ggml-backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL cpu|gpu|override LOGITS_OUT\n", argv[0]);
        return 1;
    }
    const char * mode = argv[2];
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = strcmp(mode, "cpu") == 0 ? 0 : 999;
    struct llama_model_tensor_buft_override ot[2] = { { NULL, NULL }, { NULL, NULL } };
    if (strcmp(mode, "override") == 0) {
        ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (gpu == NULL) {
            fprintf(stderr, "no GPU device\n");
            return 1;
        }
        ot[0].pattern = "token_embd\\.carvq\\..*";
        ot[0].buft = ggml_backend_dev_buffer_type(gpu);
        mp.tensor_buft_overrides = ot;
    }
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == NULL) {
        fprintf(stderr, "carvq_gpu_check: model refused\n");
        return 2;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 128;
    cp.n_batch = 128;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        fprintf(stderr, "carvq_gpu_check: context refused\n");
        return 2;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    llama_token prompt[64];
    const char * text = "the history of the city";
    const int n_prompt = llama_tokenize(vocab, text, (int32_t) strlen(text), prompt, 64, true, false);
    if (n_prompt <= 0) {
        fprintf(stderr, "tokenize failed\n");
        return 1;
    }
    struct llama_sampler * greedy = llama_sampler_init_greedy();
    llama_token tok = 0;
    struct llama_batch batch = llama_batch_get_one(prompt, n_prompt);
    printf("tokens:");
    for (int i = 0; i < 16; ++i) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        if (i == 0) {
            FILE * f = fopen(argv[3], "wb");
            fwrite(llama_get_logits_ith(ctx, -1), sizeof(float), (size_t) llama_vocab_n_tokens(vocab), f);
            fclose(f);
        }
        tok = llama_sampler_sample(greedy, ctx, -1);
        printf(" %d", tok);
        batch = llama_batch_get_one(&tok, 1);
    }
    printf("\n");
    llama_sampler_free(greedy);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
