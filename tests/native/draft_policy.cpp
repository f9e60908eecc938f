// The adaptive draft length (patch 0013, common/draft-policy.cpp) on simulated machines and heads:
// each round asks the policy for a draft length, draws which drafted tokens a head of the given
// accuracy gets right (the same draws for every contender), and feeds back the times a machine
// with the given costs would take. Printed per scenario, one line per contender ("adaptive" and
// each fixed length 0..3): the tokens per second of simulated time over the rounds after the
// first WARMUP, and the share of those rounds by the length actually drafted.
//
//   scenario  contender  rate  share0 share1 share2 share3

#include "draft-policy.h"

#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr int ROUNDS = 2000;
constexpr int WARMUP = 100;
constexpr int N_MAX  = 3;

struct machine {
    double t1, per_token, step;  // µs: a decode of one token, each token more, one draft step
    double verify(int n) const { return t1 + per_token * (n - 1); }
};

struct heads {
    double accuracy;  // each head right on this share of its inputs
    float  p_right;   // the probability the head gives its token when right
    float  p_wrong;   // and when wrong
};

void run(const char * scenario, const machine & m, const heads & h, unsigned seed) {
    for (int fixed = -1; fixed <= N_MAX; ++fixed) {
        std::mt19937                     rng(seed);  // the same draws for every contender
        std::uniform_real_distribution<> u(0.0, 1.0);
        common_draft_policy              policy;
        policy.init(1, N_MAX);
        double tokens = 0, time = 0;
        int    by_len[N_MAX + 1] = {};
        for (int r = 0; r < ROUNDS; ++r) {
            int k = fixed < 0 ? policy.choose(0, N_MAX) : fixed;
            // the head's draws for this round, whether drafted or not
            bool right[N_MAX];
            for (bool & x : right) {
                x = u(rng) < h.accuracy;
            }
            int kept = 0;
            for (int j = 0; j < k; ++j) {
                const float p = right[j] ? h.p_right : h.p_wrong;
                if (fixed < 0 && !policy.keep(0, j, p)) {
                    break;
                }
                kept++;
            }
            if (fixed < 0 && kept > 0) {
                policy.observe_draft(kept, (int64_t) (m.step * kept));
            }
            int accepted = 0;
            while (accepted < kept && right[accepted]) {
                accepted++;
            }
            const double t = m.verify(1 + kept) + m.step * (fixed < 0 ? kept : k);
            if (fixed < 0) {
                policy.observe_decode(1 + kept, (int64_t) m.verify(1 + kept));
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

}  // namespace

int main() {
    // a CPU like ours: verifying 4 tokens costs ~1.9 of one (plain AVX2), a draft step ~0.25
    const machine cpu = { 35000, 10000, 8000 };
    // a GPU with experts on the CPU, compute bound: every token verified costs nearly a step
    const machine bound = { 35000, 30000, 8000 };
    for (double acc : { 0.0, 0.3, 0.6, 0.9, 1.0 }) {
        char name[64];
        std::snprintf(name, sizeof name, "cpu-%.1f", acc);
        run(name, cpu, { acc, 0.99f, 0.99f }, 7);  // confident whether right or wrong
    }
    run("bound-1.0", bound, { 1.0, 0.99f, 0.99f }, 7);
    // the same accuracy, with a head whose confidence tells right from wrong, and without
    run("calibrated-0.5", cpu, { 0.5, 0.9f, 0.2f }, 11);
    run("uncalibrated-0.5", cpu, { 0.5, 0.9f, 0.9f }, 11);
    return 0;
}
