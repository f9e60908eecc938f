// A model with its routed experts in system memory and the rest on the GPU, run through
// libllama's C API: the prompt in batches of N_BATCH tokens, then greedy decoding one token a
// step. LLAMA_EXPERT_CACHE_MIB in the environment turns on the routed-expert cache (patch 0021),
// so one program gives the cached and the uncached run alike.
//
//   expert_cache MODEL PROMPT N_BATCH N_PREDICT LOGITS_OUT [EXPERTS_ON_GPU]
//
// EXPERTS_ON_GPU=1 leaves the experts on the GPU with the rest: the device's own rounding, the
// yardstick for the cached run's.
//
// Writes the logits of every prompt position and every decoded step (float32, rows x n_vocab)
// to LOGITS_OUT; prints the greedy tokens as one line of ids, then the cache's counters as
// `rows hits misses copies bytes n_layers n_slots` (`none` without a cache).

#include "exact.h"
#include "ggml-backend.h"
#include "llama.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static int argmax(const float * v, int n) {
    return (int) (std::max_element(v, v + n) - v);
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL PROMPT N_BATCH N_PREDICT LOGITS_OUT [EXPERTS_ON_GPU]\n", argv[0]);
        return 2;
    }
    const int n_batch   = atoi(argv[3]);
    const int n_predict = atoi(argv[4]);
    const bool on_gpu   = argc > 6 && atoi(argv[6]);

    llama_backend_init();
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    llama_model_tensor_buft_override experts_on_cpu[] = {
        { "_exps\\.weight$", ggml_backend_dev_buffer_type(cpu) },
        { nullptr, nullptr },
    };
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers          = 99;
    mp.tensor_buft_overrides = on_gpu ? nullptr : experts_on_cpu;
    mp.use_extra_bufts       = false;  // the cache copies experts in their file layout
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab   = llama_model_get_vocab(model);
    const int           n_vocab = llama_vocab_n_tokens(vocab);

    const std::vector<llama_token> tokens = prompt_tokens(vocab, argv[2]);
    const int n_prompt = (int) tokens.size();
    // a long prompt read a token a step needs its whole length
    llama_context * ctx = llama_init_from_model(model, exact_context_params(std::max(512, n_prompt + n_predict + 16), 512, 512));
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    FILE * f = fopen(argv[5], "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", argv[5]);
        return 1;
    }
    llama_batch batch = llama_batch_init(n_batch, 0, 1);
    for (int start = 0; start < n_prompt; start += n_batch) {
        batch.n_tokens = std::min(n_batch, n_prompt - start);
        for (int i = 0; i < batch.n_tokens; i++) {
            batch.token[i]     = tokens[start + i];
            batch.pos[i]       = start + i;
            batch.n_seq_id[i]  = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i]    = true;
        }
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "prompt decode failed at %d\n", start);
            return 1;
        }
        for (int i = 0; i < batch.n_tokens; i++) {
            fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
        }
    }
    llama_batch_free(batch);

    llama_token next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    for (int i = 0; i < n_predict; i++) {
        printf("%d%c", next, i + 1 < n_predict ? ' ' : '\n');
        llama_batch one = llama_batch_get_one(&next, 1);
        if (llama_decode(ctx, one) != 0) {
            fprintf(stderr, "decode failed at step %d\n", i);
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        fwrite(logits, sizeof(float), n_vocab, f);
        next = argmax(logits, n_vocab);
    }
    fclose(f);

    llama_expert_cache_stats s;
    if (llama_model_expert_cache_stats(model, &s)) {
        printf("%llu %llu %llu %llu %llu %d %d\n", (unsigned long long) s.rows, (unsigned long long) s.hits,
               (unsigned long long) s.misses, (unsigned long long) s.copies, (unsigned long long) s.bytes,
               s.n_layers, s.n_slots);
    } else {
        printf("none\n");
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
