// The adaptive draft length (patch 0013, common/draft-policy.cpp) on simulated machines and heads:
// each round asks the policy for a draft length, draws which drafted tokens a head of the given
// accuracy gets right (the same draws for every contender), and feeds back the times a machine
// with the given costs would take. As in llama.cpp's chained MTP heads, head j's step decodes
// the tokens produced since it last stepped (at most what the history holds: HISTORY to twice
// that, less one) and its own j + 1 chained rows, so deeper steps, and steps after more accepted
// tokens or after idle rounds, are wider and cost more. A shared machine's costs drift. Printed
// per scenario, one line per contender ("adaptive" and each fixed length 0..3): the tokens per
// second of simulated time over the rounds after the first WARMUP, and the share of those
// rounds by the length actually drafted.
//
//   scenario  contender  rate  share0 share1 share2 share3

#include "draft-policy.h"

#include <algorithm>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <vector>

namespace {

constexpr int ROUNDS  = 2000;
constexpr int WARMUP  = 100;
constexpr int N_MAX   = 3;
constexpr int HISTORY = 16;  // rows a head can catch up from: 16 to 31, as in llama.cpp's driver

struct machine {
    double t1, per_token;   // µs: a decode of one token, each token more
    double step, per_row;   // µs: a draft step, each row it decodes
    // a machine shared with others: every cost is slower by this factor in every other stretch
    // of DRIFT_ROUNDS rounds, and each time varies by up to +-noise around it
    double slow  = 1.0;
    double noise = 0.0;
    double verify(int n) const { return t1 + per_token * (n - 1); }
    double draft(int rows) const { return step + per_row * rows; }
};

constexpr int DRIFT_ROUNDS = 150;

struct heads {
    double accuracy;  // each head right on this share of its inputs
    float  p_right;   // the probability the head gives its token when right
    float  p_wrong;   // and when wrong
};

void run(const char * scenario, const machine & m, const heads & h, unsigned seed) {
    for (int fixed = -1; fixed <= N_MAX; ++fixed) {
        std::mt19937                     rng(seed);  // the same draws for every contender
        std::uniform_real_distribution<> u(0.0, 1.0);
        std::mt19937                     noise_rng(seed + 1);
        std::uniform_real_distribution<> noise(1.0 - m.noise, 1.0 + m.noise);
        common_draft_policy              policy;
        policy.init(1, N_MAX, 3 * HISTORY / 2);
        double tokens = 0, time = 0;
        int    by_len[N_MAX + 1] = {};
        int    unseen[N_MAX]     = {};  // tokens produced since each head last stepped
        int    history           = 0;   // rows kept to catch up from
        for (int r = 0; r < ROUNDS; ++r) {
            const double speed = (r / DRIFT_ROUNDS) % 2 ? m.slow : 1.0;
            const auto   took  = [&](double t) { return t * speed * noise(noise_rng); };
            int k = fixed < 0 ? policy.choose(0, N_MAX) : fixed;
            // the head's draws for this round, whether drafted or not
            bool right[N_MAX];
            for (bool & x : right) {
                x = u(rng) < h.accuracy;
            }
            // each step runs, then its token is kept or drafting ends
            int    kept    = 0;
            double t_draft = 0;
            for (int j = 0; j < k; ++j) {
                const int    rows = std::min(unseen[j], history) + j + 1;
                const double t    = took(m.draft(rows));
                t_draft += t;
                unseen[j] = 0;
                if (fixed < 0) {
                    policy.observe_draft(rows, (int64_t) t);
                }
                const float p = right[j] ? h.p_right : h.p_wrong;
                if (fixed < 0 && !policy.keep(0, j, p)) {
                    break;
                }
                kept++;
            }
            int accepted = 0;
            while (accepted < kept && right[accepted]) {
                accepted++;
            }
            for (int & u : unseen) {
                u += 1 + accepted;
            }
            history += 1 + accepted;
            if (history >= 2 * HISTORY) {
                history = HISTORY;
            }
            const double t_verify = took(m.verify(1 + kept));
            const double t        = t_verify + t_draft;
            if (fixed < 0) {
                policy.observe_decode(1 + kept, (int64_t) t_verify);
                if (kept > 0) {
                    policy.accept(0, accepted);
                }
            }
            if (r >= WARMUP) {
                tokens += 1 + accepted;
                time += t;
                by_len[kept]++;
            }
        }
        std::printf("%s %s %.6f", scenario, fixed < 0 ? "adaptive" : std::to_string(fixed).c_str(), tokens / time * 1e6);
        for (int n : by_len) {
            std::printf(" %.4f", (double) n / (ROUNDS - WARMUP));
        }
        std::printf("\n");
    }
}

// `run` on machine m at each head accuracy, confident whether right or wrong: "<name>-<accuracy>"
void sweep(const char * name, const machine & m, std::initializer_list<double> accuracies) {
    for (double acc : accuracies) {
        char scenario[64];
        std::snprintf(scenario, sizeof scenario, "%s-%.1f", name, acc);
        run(scenario, m, { acc, 0.99f, 0.99f }, 7);
    }
}

}  // namespace

int main() {
    // a CPU like ours (`wide` on plain AVX2, measured): verifying 4 tokens costs ~1.8 of one, a
    // draft step over one row ~0.2, each row more 0.03
    const machine cpu = { 37000, 10000, 7700, 1100 };
    // the same CPU and heads under a deep trunk (the real model: 45 layers to a head's one)
    const machine deep = { 120000, 30000, 7700, 1100 };
    // a GPU with experts on the CPU, compute bound: every token verified costs nearly a step
    const machine bound = { 35000, 30000, 7700, 1100 };
    sweep("cpu", cpu, { 0.0, 0.3, 0.6, 0.9, 1.0 });
    // the CPU shared with other work, as ours is: 1.45x slower in every other stretch, each time
    // +-10% (measured: a 2-token decode took 54 ms to 80 ms within minutes)
    machine shared = cpu;
    shared.slow    = 1.45;
    shared.noise   = 0.1;
    sweep("shared", shared, { 0.0, 0.6, 0.9, 1.0 });
    run("deep-1.0", deep, { 1.0, 0.99f, 0.99f }, 7);
    run("bound-1.0", bound, { 1.0, 0.99f, 0.99f }, 7);
    // the same accuracy, with a head whose confidence tells right from wrong, and without
    run("calibrated-0.5", cpu, { 0.5, 0.9f, 0.2f }, 11);
    run("uncalibrated-0.5", cpu, { 0.5, 0.9f, 0.9f }, 11);
    return 0;
}
