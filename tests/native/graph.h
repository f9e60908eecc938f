// What the op-level test programs share: one output computed on one backend.
#pragma once

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <utility>
#include <vector>

// `out`'s values computed on `be`: the graph's tensors are allocated in the backend's default
// buffer, each input (a tensor and its data, or none) is set, then `ctx` is freed
static std::vector<float> compute(ggml_backend_t be, ggml_context * ctx, ggml_tensor * out,
                                  std::vector<std::pair<ggml_tensor *, const void *>> inputs) {
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
    ggml_gallocr_alloc_graph(ga, gf);
    for (const auto & [t, data] : inputs) {
        if (t) {
            ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
        }
    }
    ggml_backend_graph_compute(be, gf);
    std::vector<float> y(ggml_nelements(out));
    ggml_backend_tensor_get(out, y.data(), 0, ggml_nbytes(out));
    ggml_gallocr_free(ga);
    ggml_free(ctx);
    return y;
}
