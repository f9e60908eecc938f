// Prompt logits and greedy decoding through libllama's C API, so that two builds of llama.cpp
// (stock and ours) can be compared on one GGUF by the same program.
//
//   step_greedy MODEL PROMPT N_PREDICT LOGITS_OUT [N_UBATCH] [N_THREADS]
//
// Writes the logits of every prompt position (float32, n_prompt x n_vocab) to LOGITS_OUT and
// prints the N_PREDICT greedy tokens as one line of ids.

#include "exact.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static int argmax(const float * v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (v[i] > v[best]) {
            best = i;
        }
    }
    return best;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL PROMPT N_PREDICT LOGITS_OUT [N_UBATCH] [N_THREADS]\n", argv[0]);
        return 2;
    }
    const int n_predict = atoi(argv[3]);
    const int n_ubatch  = argc > 5 ? atoi(argv[5]) : 512;
    const int n_threads = argc > 6 ? atoi(argv[6]) : 2;

    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = exact_context_params(1024, 1024, n_ubatch);
    cp.n_threads       = n_threads;
    cp.n_threads_batch = n_threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const llama_vocab * vocab   = llama_model_get_vocab(model);
    const int           n_vocab = llama_vocab_n_tokens(vocab);

    const std::vector<llama_token> tokens = prompt_tokens(vocab, argv[2]);
    const int n_prompt = (int) tokens.size();

    llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = true;
    }
    batch.n_tokens = n_prompt;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "prompt decode failed\n");
        return 1;
    }
    FILE * f = fopen(argv[4], "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", argv[4]);
        return 1;
    }
    for (int i = 0; i < n_prompt; i++) {
        fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    }
    fclose(f);
    llama_batch_free(batch);

    llama_token next = argmax(llama_get_logits_ith(ctx, n_prompt - 1), n_vocab);
    for (int i = 0; i < n_predict; i++) {
        printf("%d%c", next, i + 1 < n_predict ? ' ' : '\n');
        llama_batch one = llama_batch_get_one(&next, 1);
        if (llama_decode(ctx, one) != 0) {
            fprintf(stderr, "decode failed at step %d\n", i);
            return 1;
        }
        next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
