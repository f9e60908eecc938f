// RMS norm on the first GPU device (llvmpipe under test: GGML_VK_VISIBLE_DEVICES=0) against
// the CPU backend, alone and fused with the multiply by its weight, over row widths on both
// sides of the point where patch 0023 switches workgroup width (256) and inputs that stress a
// sum of squares. Prints one line a case: "rms_norm cols=N rows=R x=PATTERN mul=0|1 REL", REL
// the largest difference over the largest magnitude of the CPU's output.

#include "ggml.h"
#include "ggml-backend.h"
#include "graph.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static std::vector<float> inputs(size_t n, int64_t cols, const std::string & pattern) {
    std::mt19937                    rng(42);
    std::normal_distribution<float> randn(0.0f, 1.0f);
    std::vector<float>              x(n);
    for (size_t i = 0; i < n; i++) {
        x[i] = randn(rng);
        if (pattern == "outliers" && i % cols == 3 % cols) {
            x[i] = 1e4f;  // one channel 10^4 times the rest (a "massive activation")
        } else if (pattern == "tiny") {
            x[i] *= 1e-4f;  // squares near eps: the epsilon decides the scale
        } else if (pattern == "constant") {
            x[i] = -3.0f;
        }
    }
    return x;
}

static std::vector<float> run(ggml_backend_t be, int64_t cols, int64_t rows, bool mul, const std::vector<float> & x,
                              const std::vector<float> & w) {
    ggml_init_params ip  = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
    ggml_context *   ctx = ggml_init(ip);
    ggml_tensor *    xt  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, cols, rows, 2);  // per-head: heads x tokens
    ggml_tensor *    wt  = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, cols);
    ggml_tensor *    out = ggml_rms_norm(ctx, xt, 1e-6f);
    if (mul) {
        out = ggml_mul(ctx, out, wt);  // the norm's weight: fused into one dispatch on Vulkan
    }
    return compute(be, ctx, out, { { xt, x.data() }, { mul ? wt : nullptr, w.data() } });
}

int main() {
    ggml_backend_load_all();
    ggml_backend_t gpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!gpu || !cpu) {
        printf("no %s device\n", gpu ? "CPU" : "GPU");
        return 1;
    }
    printf("device %s\n", ggml_backend_name(gpu));
    for (int64_t cols : { 1, 7, 31, 32, 33, 64, 128, 200, 255, 256, 257, 512, 4096 }) {
        for (const char * pattern : { "randn", "outliers", "tiny", "constant" }) {
            const int64_t            rows = 6;
            const std::vector<float> x    = inputs((size_t) cols * rows * 2, cols, pattern);
            std::vector<float>       w(cols);
            for (int64_t i = 0; i < cols; i++) {
                w[i] = 0.5f + (float) (i % 7) / 4.0f;
            }
            for (bool mul : { false, true }) {
                const std::vector<float> got = run(gpu, cols, rows, mul, x, w);
                const std::vector<float> ref = run(cpu, cols, rows, mul, x, w);
                float diff = 0.0f, scale = 0.0f;
                for (size_t i = 0; i < ref.size(); i++) {
                    diff  = std::max(diff, std::isfinite(got[i]) ? std::fabs(got[i] - ref[i]) : INFINITY);
                    scale = std::max(scale, std::fabs(ref[i]));
                }
                printf("rms_norm cols=%lld rows=%lld x=%s mul=%d %.3g\n", (long long) cols, (long long) rows, pattern,
                       (int) mul, diff / scale);
            }
        }
    }
    ggml_backend_free(gpu);
    ggml_backend_free(cpu);
    return 0;
}
