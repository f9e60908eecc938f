// What the test programs share: a prompt as tokens, and a context whose logits differ only where
// the matrix products under test differ.
#pragma once

#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// the prompt's tokens (special ones parsed); the program ends, status 1, when it has none
static std::vector<llama_token> prompt_tokens(const llama_vocab * vocab, const std::string & prompt) {
    std::vector<llama_token> tokens(prompt.size() + 8);
    const int n = llama_tokenize(vocab, prompt.c_str(), (int) prompt.size(), tokens.data(), (int) tokens.size(), true, true);
    if (n <= 0) {
        fprintf(stderr, "cannot tokenize the prompt\n");
        exit(1);
    }
    tokens.resize(n);
    return tokens;
}

// exact attention: the CPU's flash attention rounds K, V and Q to f16, and an f16 cache rounds K
// and V, so a last-bit difference upstream could flip a rounding and move the logits by far more
// than the matrix products under test differ
static llama_context_params exact_context_params(uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = n_ctx;
    cp.n_batch         = n_batch;
    cp.n_ubatch        = n_ubatch;
    cp.type_k          = GGML_TYPE_F32;
    cp.type_v          = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    return cp;
}
