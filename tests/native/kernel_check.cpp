// Checks step-gguf's x86 kernels (patches 0007, 0008, 0012) three ways:
//  - kernel: each SIMD kernel (ggml_step_gemv/gemm_*) against the portable C kernel of the same
//    repacked layout (ggml_gemv/gemm_*_generic), on the same quantized activations;
//  - op: MUL_MAT and MUL_MAT_ID with the weights in the CPU_REPACK buffer (our path) against the
//    same op with the weights in a plain CPU buffer (ggml's unpatched op: vec_dot, tiled or
//    llamafile), through the CPU backend with 2 threads;
//  - rows: plain (unrepacked) Q6_K at several activation rows (0012), the kernel against stock's
//    vec_dot row by row, and MUL_MAT on plain weights with our kernels on against the same with
//    them off (ggml_cpu_step_kernels_on, stock's loop).
// Inputs are random and adversarial: weights at every code of their type and at its largest
// codes (raw blocks, so every bit pattern a quantizer can write appears, scales at both ends of
// their range), activations with outlier channels (as real models have: one channel sets the
// row's scale) and rows quantized to the largest codes with one sign, so integer sums reach the
// limits of every intermediate width; shapes include the real experts (4096 x 1280, 1280 x 4096).
// Prints one line per case: "<level> <type> <what> <max |difference| / max |reference|>", and
// "layout <type> stock 0" for a type this build does not repack (stock's paths run it).
// The kernels are looked up by name, so a missing one is reported, not a link error.
//
//   kernel_check [--quick]     --quick: the random cases of the small shapes only

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "graph.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

typedef void (*kernel_t)(int n, float * s, size_t bs, const void * vx, const void * vy, int nr, int nc);
typedef void (*quant_row_t)(const float * x, void * y, int64_t k);
typedef void (*quant_pack_t)(const float * x, void * y, int64_t k);
typedef void (*rows_t)(int n, float * s, size_t bs, const void * vx, const void * vy, size_t by, int nr);
typedef void (*vec_dot_t)(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);

static std::mt19937                    rng(1234);
static std::normal_distribution<float> normal(0.0f, 1.0f);

// the CPU backend's library: with ggml's dynamic backends (one per x86 level) its symbols are
// not global, so they are looked up in the variant ggml loaded (GGML_CPU_VARIANT pins one)
static void * cpu_module = RTLD_DEFAULT;

static void * sym(const std::string & name) { return dlsym(cpu_module, name.c_str()); }

static void find_cpu_module(ggml_backend_reg_t reg) {
    Dl_info info;
    void *  fn = ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (fn && dladdr(fn, &info) && info.dli_fname) {
        if (void * h = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD)) {
            cpu_module = h;
        }
    }
}

static ggml_backend_buffer_type_t cpu_buft() {
    return ggml_backend_dev_buffer_type(ggml_backend_reg_dev_get(ggml_backend_reg_by_name("CPU"), 0));
}

static std::vector<float> randn(size_t n, float scale) {
    std::vector<float> v(n);
    for (auto & x : v) {
        x = normal(rng) * scale;
    }
    return v;
}

static double rel_diff(const float * got, const float * ref, size_t n) {
    double dmax = 0, rmax = 0;
    for (size_t i = 0; i < n; i++) {
        dmax = std::max(dmax, (double) std::fabs(got[i] - ref[i]));
        rmax = std::max(rmax, (double) std::fabs(ref[i]));
    }
    return dmax / (rmax > 0 ? rmax : 1);
}

static int failures = 0;

static ggml_backend_buffer_type_t repack_buft() {
    ggml_backend_reg_t reg  = ggml_backend_reg_by_name("CPU");
    ggml_backend_dev_t dev  = ggml_backend_reg_dev_get(reg, 0);
    auto get_extra = (ggml_backend_buffer_type_t * (*) (ggml_backend_dev_t))
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    for (auto * b = get_extra ? get_extra(dev) : nullptr; b && *b; b++) {
        if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK")) {
            return *b;
        }
    }
    return nullptr;
}

// quantized weights [n x k] of type t, in a buffer of buft (the repack buffer repacks them)
struct weights {
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_tensor *         t   = nullptr;

    weights(ggml_type type, int64_t k, int64_t n, int64_t n_expert, ggml_backend_buffer_type_t buft,
            const std::vector<uint8_t> & q) {
        ggml_init_params ip = { ggml_tensor_overhead() * 2, nullptr, true };
        ctx = ggml_init(ip);
        t   = n_expert > 1 ? ggml_new_tensor_3d(ctx, type, k, n, n_expert) : ggml_new_tensor_2d(ctx, type, k, n);
        buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        // a type the repack buffer does not repack has no traits there (t->extra), and setting
        // its data would crash: callers check t->extra and skip it
        if (t->extra != nullptr || strcmp(ggml_backend_buft_name(buft), "CPU_REPACK") != 0) {
            ggml_backend_tensor_set(t, q.data(), 0, q.size());
        }
    }
    ~weights() {
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
};

// Weight patterns. "random": random floats through ggml's quantizer. The others are raw blocks:
// "codes": uniformly random bytes (every code, every scale), "max": bytes 0xFF (Q4_K/Q5_K/Q6_K
// at their largest codes and scales, Q8_0 at -1), "min": bytes 0x00 (Q6_K at -32), "q8max":
// alternating 0x7F / 0x80 runs (Q8_0 at +127 and -128, Q6_K scales at both ends), "low": every
// value at its lowest code under the largest scales ("min" zeroes the scales too, so its products
// vanish): Q6_K at -32 with scales of +127, Q8_0 at -128, Q4_K/Q5_K at 0 with the largest mins.
// The fp16 super-block scales are then set to a small finite value, so no NaN or Inf enters.
static const char * const WEIGHTS[] = { "random", "codes", "max", "min", "q8max", "low" };

// byte range [first, last) of the sub-block scales of a block of `type`, and the byte "low" puts
// there (Q8_0: its values, at -128)
static void low_fields(ggml_type type, size_t & first, size_t & last, uint8_t & value) {
    switch (type) {
        case GGML_TYPE_Q8_0: first = 2;   last = 34;  value = 0x80; break;
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: first = 4;   last = 16;  value = 0xFF; break;
        case GGML_TYPE_Q6_K: first = 192; last = 208; value = 0x7F; break;
        default:             first = last = 0;        value = 0;    break;
    }
}

// byte offsets of the fp16 fields of a block of `type`
static std::vector<size_t> half_fields(ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q8_0: return { 0 };
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: return { 0, 2 };
        case GGML_TYPE_Q6_K: return { 208 };
        default: return {};
    }
}

static std::vector<uint8_t> quantize(ggml_type type, int64_t k, int64_t rows, const std::string & pattern = "random") {
    std::vector<uint8_t> q(ggml_row_size(type, k) * rows);
    if (pattern == "random") {
        std::vector<float> w = randn((size_t) k * rows, 0.05f);
        ggml_quantize_chunk(type, w.data(), q.data(), 0, rows, k, nullptr);
        return q;
    }
    std::uniform_int_distribution<int> byte(0, 255);
    for (size_t i = 0; i < q.size(); i++) {
        q[i] = pattern == "codes" ? (uint8_t) byte(rng)
             : pattern == "max"   ? 0xFF
             : pattern == "min" || pattern == "low" ? 0x00
             : ((i / 7) % 2 ? 0x80 : 0x7F);
    }
    const size_t bsize = ggml_type_size(type);
    const ggml_fp16_t d = ggml_fp32_to_fp16(pattern == "codes" ? 0.002f : 0.001f);
    size_t first, last;
    uint8_t low;
    low_fields(type, first, last, low);
    for (size_t b = 0; b < q.size(); b += bsize) {
        if (pattern == "low") {
            memset(q.data() + b + first, low, last - first);
        }
        for (size_t off : half_fields(type)) {
            memcpy(q.data() + b + off, &d, sizeof d);
        }
    }
    return q;
}

// Activation patterns: "randn"; "outliers": randn with every 97th channel 300x larger (the
// row's scale comes from them, the rest quantize small); "pos"/"neg": every value +1 / -1
// (every code -128 in Q8_K, +-127 in Q8_0: the largest integer sums); "alt": +1, +1, -1
// repeated (the largest codes of both signs, without sums that cancel to zero).
static const char * const ACTS[] = { "randn", "outliers", "pos", "neg", "alt" };

static std::vector<float> activations(size_t n, const std::string & pattern) {
    std::vector<float> x = randn(n, 1.0f);
    for (size_t i = 0; i < n; i++) {
        if (pattern == "outliers" && i % 97 == 13) {
            x[i] *= 300.0f;
        } else if (pattern == "pos" || pattern == "neg") {
            x[i] = pattern == "pos" ? 1.0f : -1.0f;
        } else if (pattern == "alt") {
            x[i] = i % 3 == 2 ? -1.0f : 1.0f;
        }
    }
    return x;
}

// kernel level: SIMD against portable C on one repacked [n x k] matrix, weights and activations
// of the given patterns
static void check_kernels(ggml_type type, int64_t k, int64_t n, const std::string & wpat, const std::string & xpat,
                          ggml_backend_buffer_type_t repack) {
    const char * tn    = ggml_type_name(type);
    const bool   q8_0  = type == GGML_TYPE_Q8_0;
    const char * act   = q8_0 ? "q8_0" : "q8_K";
    const std::string layout = std::string(tn) + "_8x8_" + act;
    auto step_gemv = (kernel_t) sym("ggml_step_gemv_" + layout);
    auto step_gemm = (kernel_t) sym("ggml_step_gemm_" + layout);
    // on x86 the portable Q5_K/Q6_K kernels carry the plain name (arch-fallback.h)
    auto c_gemv = (kernel_t) (sym("ggml_gemv_" + layout + "_generic") ?: sym("ggml_gemv_" + layout));
    auto c_gemm = (kernel_t) (sym("ggml_gemm_" + layout + "_generic") ?: sym("ggml_gemm_" + layout));
    auto q_row  = (quant_row_t) sym(q8_0 ? "quantize_row_q8_0" : "quantize_row_q8_K");
    auto q_pack = (quant_pack_t) sym(q8_0 ? "ggml_quantize_mat_q8_0_4x8" : "ggml_quantize_mat_q8_K_4x8");
    if (!step_gemv || !step_gemm || !c_gemv || !c_gemm || !q_row || !q_pack) {
        printf("missing kernel %s\n", layout.c_str());
        failures++;
        return;
    }
    weights w(type, k, n, 1, repack, quantize(type, k, n, wpat));
    if (w.t->extra == nullptr) {  // this build leaves the type unrepacked: stock's paths run it
        printf("layout %s stock 0\n", tn);
        return;
    }

    const int max_rows = 17;
    const int packs    = (max_rows + 3) / 4;
    std::vector<float> x = activations((size_t) packs * 4 * k, xpat);
    const size_t row_size = ggml_row_size(q8_0 ? GGML_TYPE_Q8_0 : GGML_TYPE_Q8_K, k);
    std::vector<uint8_t> rows((size_t) max_rows * row_size), pack((size_t) packs * 4 * row_size);
    for (int r = 0; r < max_rows; r++) {
        q_row(x.data() + (size_t) r * k, rows.data() + r * row_size, k);
    }
    for (int p = 0; p < packs; p++) {
        q_pack(x.data() + (size_t) p * 4 * k, pack.data() + p * 4 * row_size, k);
    }
    char what[160];
    snprintf(what, sizeof what, "%s k=%lld n=%lld w=%s x=%s", tn, (long long) k, (long long) n, wpat.c_str(), xpat.c_str());

    std::vector<float> got((size_t) max_rows * n), ref((size_t) packs * 4 * n);
    double worst = 0;
    for (int r = 0; r < max_rows; r += (n > 256 ? 4 : 1)) {
        c_gemv((int) k, ref.data(), n, w.t->data, rows.data() + r * row_size, 1, (int) n);
        step_gemv((int) k, got.data(), n, w.t->data, rows.data() + r * row_size, 1, (int) n);
        worst = std::max(worst, rel_diff(got.data(), ref.data(), n));
    }
    printf("kernel %s gemv rows=1 %.3g\n", what, worst);

    c_gemm((int) k, ref.data(), n, w.t->data, pack.data(), packs * 4, (int) n);
    for (int nr : { 1, 2, 3, 4, 5, 7, 8, 9, 17 }) {
        std::fill(got.begin(), got.end(), NAN);
        step_gemm((int) k, got.data(), n, w.t->data, pack.data(), nr, (int) n);
        printf("kernel %s gemm rows=%d %.3g\n", what, nr, rel_diff(got.data(), ref.data(), (size_t) nr * n));
    }
}

// op level: the same graph on repacked and on plain weights
static std::vector<float> run_op(ggml_backend_t be, ggml_type type, int64_t k, int64_t n, int64_t n_expert,
                                 int tokens, bool broadcast, const std::vector<uint8_t> & q,
                                 ggml_backend_buffer_type_t buft, const std::vector<float> & x,
                                 const std::vector<int32_t> & ids) {
    weights w(type, k, n, n_expert, buft, q);
    ggml_init_params ip = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
    ggml_context *   ctx = ggml_init(ip);
    ggml_tensor *    out;
    ggml_tensor *    xt;
    ggml_tensor *    it = nullptr;
    if (n_expert > 1) {
        const int used = (int) (ids.size() / tokens);
        xt  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, k, broadcast ? 1 : used, tokens);
        it  = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, used, tokens);
        out = ggml_mul_mat_id(ctx, w.t, xt, it);
    } else {
        xt  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, tokens);
        out = ggml_mul_mat(ctx, w.t, xt);
    }
    return compute(be, ctx, out, { { xt, x.data() }, { it, ids.data() } });
}

static void check_ops(ggml_backend_t be, ggml_type type, const std::string & wpat, const std::string & xpat,
                      ggml_backend_buffer_type_t repack) {
    const std::string tn = std::string(ggml_type_name(type)) + " w=" + wpat + " x=" + xpat;
    const int64_t k = 512, n = 256, n_expert = 16, used = 8;
    {
        weights probe(type, k, n, 1, repack, quantize(type, k, n));
        if (probe.t->extra == nullptr) {  // not repacked on this build: both sides are stock's
            return;
        }
    }
    {
        const std::vector<uint8_t> q = quantize(type, k, n, wpat);
        for (int tokens : { 1, 2, 3, 4, 5, 8, 17, 64 }) {
            const std::vector<float> x   = activations((size_t) k * tokens, xpat);
            const std::vector<float> got = run_op(be, type, k, n, 1, tokens, false, q, repack, x, {});
            const std::vector<float> ref = run_op(be, type, k, n, 1, tokens, false, q, cpu_buft(), x, {});
            printf("op %s mul_mat tokens=%d %.3g\n", tn.c_str(), tokens, rel_diff(got.data(), ref.data(), got.size()));
        }
    }
    const std::vector<uint8_t> q = quantize(type, k, n * n_expert, wpat);
    for (bool broadcast : { true, false }) {  // gate/up (one row per token) and down (one per slot)
        for (int tokens : { 1, 2, 4, 5, 16, 33 }) {
            std::vector<int32_t> ids;
            for (int t = 0; t < tokens; t++) {
                std::vector<int32_t> e(n_expert);
                for (int i = 0; i < n_expert; i++) {
                    e[i] = i;
                }
                std::shuffle(e.begin(), e.end(), rng);
                ids.insert(ids.end(), e.begin(), e.begin() + used);
            }
            const std::vector<float> x   = activations((size_t) k * (broadcast ? 1 : used) * tokens, xpat);
            const std::vector<float> got = run_op(be, type, k, n, n_expert, tokens, broadcast, q, repack, x, ids);
            const std::vector<float> ref = run_op(be, type, k, n, n_expert, tokens, broadcast, q, cpu_buft(), x, ids);
            printf("op %s mul_mat_id%s tokens=%d %.3g\n", tn.c_str(), broadcast ? "_bcast" : "", tokens,
                   rel_diff(got.data(), ref.data(), got.size()));
        }
    }
}

// rows level, kernel: our Q6_K rows kernel against stock's vec_dot, one weight row at a time
static void check_rows_kernel(int64_t k, int64_t n, const std::string & wpat, const std::string & xpat) {
    auto rows    = (rows_t) sym("ggml_step_vec_dot_rows_q6_K_q8_K");
    auto vec_dot = (vec_dot_t) sym("ggml_vec_dot_q6_K_q8_K");
    auto q_row   = (quant_row_t) sym("quantize_row_q8_K");
    if (!rows || !vec_dot || !q_row) {
        printf("missing kernel q6_K rows\n");
        failures++;
        return;
    }
    const std::vector<uint8_t> w = quantize(GGML_TYPE_Q6_K, k, n, wpat);
    const std::vector<float>   x = activations((size_t) 4 * k, xpat);
    const size_t wrow = ggml_row_size(GGML_TYPE_Q6_K, k), xrow = ggml_row_size(GGML_TYPE_Q8_K, k);
    std::vector<uint8_t> a(4 * xrow);
    for (int r = 0; r < 4; r++) {
        q_row(x.data() + (size_t) r * k, a.data() + r * xrow, k);
    }
    for (int nr = 1; nr <= 4; nr++) {
        std::vector<float> got((size_t) nr * n, NAN), ref((size_t) nr * n);
        for (int64_t i = 0; i < n; i++) {
            rows((int) k, got.data() + i, (size_t) n, w.data() + i * wrow, a.data(), xrow, nr);
            for (int r = 0; r < nr; r++) {
                vec_dot((int) k, ref.data() + r * n + i, 0, w.data() + i * wrow, 0, a.data() + r * xrow, 0, 1);
            }
        }
        printf("rows q6_K kernel k=%lld n=%lld w=%s x=%s rows=%d %.3g\n", (long long) k, (long long) n, wpat.c_str(),
               xpat.c_str(), nr, rel_diff(got.data(), ref.data(), got.size()));
    }
}

// rows level, op: MUL_MAT on plain Q6_K weights, our kernels on against off
static void check_rows_op(ggml_backend_t be, const std::string & wpat, const std::string & xpat) {
    auto * on = (bool *) sym("ggml_cpu_step_kernels_on");
    if (!on) {
        printf("missing kernel switch\n");
        failures++;
        return;
    }
    const int64_t k = 512, n = 256;
    const std::vector<uint8_t> q = quantize(GGML_TYPE_Q6_K, k, n, wpat);
    for (int tokens : { 1, 2, 3, 4, 5, 8, 17, 64 }) {
        const std::vector<float> x = activations((size_t) k * tokens, xpat);
        *on = true;
        const std::vector<float> got = run_op(be, GGML_TYPE_Q6_K, k, n, 1, tokens, false, q, cpu_buft(), x, {});
        *on = false;
        const std::vector<float> ref = run_op(be, GGML_TYPE_Q6_K, k, n, 1, tokens, false, q, cpu_buft(), x, {});
        *on = true;
        printf("rows q6_K op w=%s x=%s tokens=%d %.3g\n", wpat.c_str(), xpat.c_str(), tokens,
               rel_diff(got.data(), ref.data(), got.size()));
    }
}

int main(int argc, char ** argv) {
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    ggml_backend_load_all();
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
    if (!reg) {
        printf("no CPU backend loaded\n");
        return 1;
    }
    find_cpu_module(reg);
    ggml_backend_buffer_type_t repack = repack_buft();
    if (!repack) {
        printf("no CPU_REPACK buffer type\n");
        return 1;
    }
    ggml_backend_t     be  = ggml_backend_dev_init(ggml_backend_reg_dev_get(reg, 0), nullptr);
    auto set_threads = (void (*)(ggml_backend_t, int)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    set_threads(be, 2);
    for (ggml_type t : { GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_0 }) {
        for (int64_t k : { 256, 4096 }) {
            check_kernels(t, k, 64, "random", "randn", repack);
        }
        check_ops(be, t, "random", "randn", repack);
        if (quick) {
            continue;
        }
        // every weight pattern against every activation pattern, one superblock row deep enough
        // that a sum over all of k would show a wrapped intermediate
        for (const char * wp : WEIGHTS) {
            for (const char * xp : ACTS) {
                check_kernels(t, 1024, 64, wp, xp, repack);
            }
        }
        // the real expert shapes: gate/up (4096 in, 1280 out) and down (1280 in, 4096 out)
        for (const char * xp : { "outliers", "pos" }) {
            check_kernels(t, 4096, 1280, "codes", xp, repack);
            check_kernels(t, 1280, 4096, "max", xp, repack);
        }
        check_ops(be, t, "codes", "outliers", repack);
        check_ops(be, t, "max", "pos", repack);
    }
    check_rows_kernel(4096, 64, "random", "randn");
    check_rows_op(be, "random", "randn");
    if (!quick) {
        for (const char * wp : WEIGHTS) {
            for (const char * xp : ACTS) {
                check_rows_kernel(1024, 32, wp, xp);
            }
        }
        check_rows_kernel(4096, 1280, "codes", "outliers");
        check_rows_kernel(1280, 512, "max", "pos");
        check_rows_op(be, "codes", "outliers");
        check_rows_op(be, "max", "pos");
    }
    ggml_backend_free(be);
    return failures ? 1 : 0;
}
