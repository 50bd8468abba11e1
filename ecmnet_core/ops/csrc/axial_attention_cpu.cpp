// Axial (dual-direction) softmax attention on the CPU, fp32, behind a plain C ABI: the `cpp` backend of
// ecmnet_core/ops/axial_attention.py, used by the DDA module for inference.
//
// Built on first use by ecmnet_core/ops/attention_cpu.py (c++ -O3 -shared, loaded with ctypes) and called with raw
// fp32 pointers, so no torch or Python headers are needed. Needs GCC or Clang (vector extensions).
//
// Semantics, per batch b, with s = scale:
//     out_w[b, i, w', :] = sum_j softmax_j(s * q[b, i, w', :] . k[b, i, j, :]) v[b, i, j, :]   (along each row)
//     out_h[b, i, w', :] = sum_j softmax_j(s * q[b, i, w', :] . k[b, j, w', :]) v[b, j, w', :] (along each column)
//     out = out_w + out_h
// Layouts (contiguous fp32, channels last): q, k (batch, h, w, dk); v, out (batch, h, w, c). This is the memory of a
// channels_last (B, C, H, W) tensor, so a channels_last model needs no copies.
//
// Design: one task is one sequence (a row in the first phase, a column in the second; the second phase adds to the
// output of the first, with a barrier between them). Per sequence the task gathers q (pre-scaled by scale * log2 e),
// k transposed to (dk, S) and v to (S, c) into its workspace, then handles a block of queries at a time:
//   scores: SIMD over keys j (VL lanes), loop over dk;      softmax: row max subtracted, exp2 by a polynomial;
//   weighted sum: SIMD over channels (CV lanes), QB x NV vector accumulators (blocking_for), the probabilities broadcast;
//   the 1 / sum normalisation is applied once per output vector.
// Threads: up to `threads` (fewer for small maps). Built with -fopenmp (the loader's first choice) they are the
// process's OpenMP threads, i.e. PyTorch's; otherwise a per-call team of std::threads pulls tasks from atomic
// counters (1 thread: no spawn).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ecmnet_simd.h"

namespace {

using namespace ecmnet_simd;  // VL (key lanes), vf, vi, splat, vexp2, LOG2E, FlushDenormals

constexpr int ABI_VERSION = 3;

constexpr i64 CV = 8;  // channel lanes: DDA's channel counts are multiples of 8 (8..64), so no lane is wasted
constexpr i64 QB_MAX = 6;  // queries per block, at most (the probability rows of the workspace)

// Register blocking of the weighted sum: qb queries x nv channel vectors of accumulators, so each loaded value
// vector is used qb times and each broadcast probability nv times. Chosen by measurement per channel count
// (2 threads, the DDA shapes of a 360x480 input): with AVX-512's 32 registers (4, 4) everywhere (Zen 4); with
// AVX2's 16, (4, 4) for 17..32 channels and (6, 2) otherwise -- 12-28 % faster than (4, 4) for c = 8 and 64 (Zen 3).
struct Blocking {
    int qb, nv;
};

inline Blocking blocking_for(i64 c) {
#if defined(__AVX512F__)
    (void)c;
    return {4, 4};
#else
    return c > 16 && c <= 32 ? Blocking{4, 4} : Blocking{6, 2};
#endif
}

typedef float vc __attribute__((vector_size(CV * sizeof(float))));

template <class V>
inline V loadu(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));  // unaligned load; compiles to one vector move
    return v;
}

template <class V>
inline void storeu(float* p, V v) {
    std::memcpy(p, &v, sizeof(V));
}

inline vc splat_c(float x) {
    return x - vc{};
}

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------------
// Threads: a per-call team, two phases separated by a barrier. Denormals are flushed inside the team (tiny
// probabilities times values); the caller's mode is restored.

// A barrier whose size is known only after the team is started (starting a thread may fail).
class Barrier {
  public:
    void set_size(int n) {
        std::lock_guard<std::mutex> lock(mutex_);
        size_ = n;
        cv_.notify_all();
    }
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        ++arrived_;
        cv_.notify_all();
        cv_.wait(lock, [this] { return size_ > 0 && arrived_ >= size_; });
    }

  private:
    std::mutex mutex_;
    std::condition_variable cv_;
    int size_ = 0;
    int arrived_ = 0;
};

// Multiply-adds per thread below which one more thread does not pay for its start (~0.1 ms; a busy machine can
// take that long to schedule it, and small maps are common).
constexpr i64 WORK_PER_THREAD = i64(1) << 20;

struct Problem {
    const float* q;
    const float* k;
    const float* v;
    float* out;
    i64 batch, dk, c, h, w;
    float alpha;  // scale * log2(e): scores come out in log2 units, ready for exp2
    i64 ldqk, ldv;  // floats from one pixel's q (k) / v to the next's: dk / c, or more for slices of one tensor
    float* lse = nullptr;  // training: (2, batch, h, w) log2-sum-exp2 of each query's scores, rows then columns

    i64 cp() const { return (c + CV - 1) / CV * CV; }
};

// Per-thread buffers, sized for the longest sequence.
struct Workspace {
    std::vector<float> qs;   // (S, dk), pre-scaled queries
    std::vector<float> kt;   // (dk, Sp), keys transposed, zero padding
    std::vector<float> vb;   // (S, Cp), values, zero padding
    std::vector<float> p;    // (QB_MAX, Sp), scores, then unnormalised probabilities
    i64 sp = 0;

    void allocate(const Problem& pr) {
        const i64 s = std::max(pr.h, pr.w);
        sp = (s + VL - 1) / VL * VL;
        qs.assign(static_cast<size_t>(s * pr.dk), 0.0f);
        kt.assign(static_cast<size_t>(pr.dk * sp), 0.0f);
        vb.assign(static_cast<size_t>(s * pr.cp()), 0.0f);
        p.assign(static_cast<size_t>(QB_MAX * sp), 0.0f);
    }
};

// Weighted sum of the values for one block of QB queries and channels [cb, cb + NV * CV): acc[qi][n].
template <int QB, int NV_MAX, int NV>
inline void weighted_sum(const float* p, i64 sp, const float* vb, i64 cp, i64 cb, i64 s, vc (&acc)[QB][NV_MAX]) {
    vc a[QB][NV];
    for (i64 qi = 0; qi < QB; ++qi)
        for (int n = 0; n < NV; ++n) a[qi][n] = vc{};
    for (i64 j = 0; j < s; ++j) {
        vc vv[NV];
        for (int n = 0; n < NV; ++n) vv[n] = loadu<vc>(vb + j * cp + cb + n * CV);
        for (i64 qi = 0; qi < QB; ++qi) {
            const vc pj = splat_c(p[qi * sp + j]);
            for (int n = 0; n < NV; ++n) a[qi][n] += pj * vv[n];
        }
    }
    for (i64 qi = 0; qi < QB; ++qi)
        for (int n = 0; n < NV; ++n) acc[qi][n] = a[qi][n];
}

// Attention along one sequence of length s: element t of q/k starts at q0 + t * sq (dk floats), of v at
// v0 + t * sv and of out at o0 + t * so (c floats). add: accumulate into out (second phase) instead of storing.
// l0 (training, else null): query t's log2-sum-exp2 of its log2-unit scores goes to l0[t * sl] (the backward's
// softmax). QB x NV_MAX: the register blocking (blocking_for).
template <int QB, int NV_MAX>
void sequence(const Problem& pr, Workspace& ws, const float* q0, const float* k0, const float* v0, float* o0, i64 s,
              i64 sq, i64 sv, i64 so, bool add, float* l0, i64 sl) {
    const i64 dk = pr.dk, c = pr.c, cp = pr.cp(), sp = (s + VL - 1) / VL * VL;
    float* qs = ws.qs.data();
    float* kt = ws.kt.data();
    float* vb = ws.vb.data();
    float* p = ws.p.data();
    for (i64 t = 0; t < s; ++t) {
        for (i64 d = 0; d < dk; ++d) {
            qs[t * dk + d] = q0[t * sq + d] * pr.alpha;
            kt[d * sp + t] = k0[t * sq + d];
        }
        std::memcpy(vb + t * cp, v0 + t * sv, static_cast<size_t>(c) * sizeof(float));
        for (i64 ch = c; ch < cp; ++ch) vb[t * cp + ch] = 0.0f;
    }
    for (i64 d = 0; d < dk; ++d)
        for (i64 t = s; t < sp; ++t) kt[d * sp + t] = 0.0f;

    vf iota;
    for (i64 l = 0; l < VL; ++l) iota[l] = static_cast<float>(l);

    for (i64 i0 = 0; i0 < s; i0 += QB) {
        const i64 nq = std::min<i64>(QB, s - i0);
        // Rows past the end repeat the last query, so every row of the block holds a valid softmax.
        const float* qrow[QB];
        for (i64 qi = 0; qi < QB; ++qi) qrow[qi] = qs + std::min(i0 + qi, s - 1) * dk;

        // scores in log2 units, padding keys masked to -inf and the row maxima kept in registers (writing the
        // padding with scalar stores would stall the vector loads that follow: no store forwarding)
        vf mv[QB];
        for (i64 qi = 0; qi < QB; ++qi) mv[qi] = splat(NEG_INF);
        for (i64 jb = 0; jb < sp; jb += VL) {
            vf acc[QB] = {};
            for (i64 d = 0; d < dk; ++d) {
                const vf kv = loadu<vf>(kt + d * sp + jb);
                for (i64 qi = 0; qi < QB; ++qi) acc[qi] += splat(qrow[qi][d]) * kv;
            }
            if (jb + VL > s) {
                const vi valid = iota + static_cast<float>(jb) < static_cast<float>(s);
                for (i64 qi = 0; qi < QB; ++qi) acc[qi] = valid ? acc[qi] : splat(NEG_INF);
            }
            for (i64 qi = 0; qi < QB; ++qi) {
                mv[qi] = acc[qi] > mv[qi] ? acc[qi] : mv[qi];
                storeu(p + qi * sp + jb, acc[qi]);
            }
        }

        // softmax numerators exp2(score - max) (exactly 0 for padding keys) and their sums
        float inv[QB];
        for (i64 qi = 0; qi < QB; ++qi) {
            float* r = p + qi * sp;
            float m = mv[qi][0];
            for (i64 l = 1; l < VL; ++l) m = std::max(m, mv[qi][l]);
            vf sum{};
            for (i64 jb = 0; jb < sp; jb += VL) {
                vf e = vexp2(loadu<vf>(r + jb) - m);
                if (jb + VL > s) e = iota + static_cast<float>(jb) < static_cast<float>(s) ? e : vf{};
                storeu(r + jb, e);
                sum += e;
            }
            float total = 0.0f;
            for (i64 l = 0; l < VL; ++l) total += sum[l];
            inv[qi] = 1.0f / total;
            if (l0 && qi < nq) l0[(i0 + qi) * sl] = m + std::log2(total);
        }

        // weighted sum over channel blocks of up to NV_MAX vectors, normalised on the way out
        for (i64 cb = 0; cb < cp; cb += NV_MAX * CV) {
            const int nv = static_cast<int>(std::min<i64>(NV_MAX, (cp - cb) / CV));
            vc acc[QB][NV_MAX];
            switch (nv) {
                case 1: weighted_sum<QB, NV_MAX, 1>(p, sp, vb, cp, cb, s, acc); break;
                case 2: weighted_sum<QB, NV_MAX, (NV_MAX < 2 ? NV_MAX : 2)>(p, sp, vb, cp, cb, s, acc); break;
                case 3: weighted_sum<QB, NV_MAX, (NV_MAX < 3 ? NV_MAX : 3)>(p, sp, vb, cp, cb, s, acc); break;
                default: weighted_sum<QB, NV_MAX, NV_MAX>(p, sp, vb, cp, cb, s, acc); break;
            }
            for (i64 qi = 0; qi < nq; ++qi) {
                float* dst = o0 + (i0 + qi) * so + cb;
                const i64 n_ch = std::min<i64>(nv * CV, c - cb);
                if (n_ch == nv * CV) {
                    for (int n = 0; n < nv; ++n) {
                        vc val = acc[qi][n] * inv[qi];
                        if (add) val += loadu<vc>(dst + n * CV);
                        storeu(dst + n * CV, val);
                    }
                } else {  // channel count not a multiple of CV: the last vector is partial
                    float tmp[NV_MAX * CV];
                    for (int n = 0; n < nv; ++n) storeu(tmp + n * CV, acc[qi][n] * inv[qi]);
                    for (i64 ch = 0; ch < n_ch; ++ch) dst[ch] = add ? dst[ch] + tmp[ch] : tmp[ch];
                }
            }
        }
    }
}

// Phase 0: row (b, i), along the width; phase 1: column (b, j), along the height.
template <int QB, int NV_MAX>
void row_task(const Problem& pr, Workspace& ws, i64 task) {
    const i64 base = task * pr.w;  // (b * h + i) * w
    sequence<QB, NV_MAX>(pr, ws, pr.q + base * pr.ldqk, pr.k + base * pr.ldqk, pr.v + base * pr.ldv,
                         pr.out + base * pr.c, pr.w, pr.ldqk, pr.ldv, pr.c, false, pr.lse ? pr.lse + base : nullptr,
                         1);
}

template <int QB, int NV_MAX>
void column_task(const Problem& pr, Workspace& ws, i64 task) {
    const i64 b = task / pr.w, j = task % pr.w;
    const i64 base = b * pr.h * pr.w + j;
    sequence<QB, NV_MAX>(pr, ws, pr.q + base * pr.ldqk, pr.k + base * pr.ldqk, pr.v + base * pr.ldv,
                         pr.out + base * pr.c, pr.h, pr.w * pr.ldqk, pr.w * pr.ldv, pr.w * pr.c, true,
                         pr.lse ? pr.lse + pr.batch * pr.h * pr.w + base : nullptr, pr.w);
}

template <int QB, int NV_MAX>
int run_blocked(const Problem& pr, int threads) {
    const i64 rows = pr.batch * pr.h, columns = pr.batch * pr.w;
    const i64 work = pr.batch * pr.h * pr.w * (pr.h + pr.w) * (pr.dk + pr.c + 16);  // ~16 for the exp
    const i64 wanted = std::min<i64>(std::max(threads, 1), std::max<i64>(1, work / WORK_PER_THREAD));
    const int team = static_cast<int>(std::min(wanted, std::max(rows, columns)));
    std::vector<Workspace> spaces;
    try {
        spaces.resize(static_cast<size_t>(team));
        for (auto& ws : spaces) ws.allocate(pr);
    } catch (...) {
        return 5;
    }
#ifdef _OPENMP
    // Built with -fopenmp, the library shares the process's OpenMP runtime (soname libgomp.so.1), i.e. PyTorch's
    // intra-op threads: right after a PyTorch op they are still spinning, and threads of our own would compete with
    // them for the cores. The implicit barrier after the first loop orders rows before columns.
#pragma omp parallel num_threads(team)
    {
        FlushDenormals ftz;
        Workspace& ws = spaces[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < rows; ++t) row_task<QB, NV_MAX>(pr, ws, t);
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < columns; ++t) column_task<QB, NV_MAX>(pr, ws, t);
    }
#else
    std::atomic<i64> next_row{0}, next_column{0};
    Barrier barrier;
    auto worker = [&](Workspace& ws) noexcept {
        FlushDenormals ftz;
        for (i64 t = next_row.fetch_add(1); t < rows; t = next_row.fetch_add(1))
            row_task<QB, NV_MAX>(pr, ws, t);
        barrier.arrive_and_wait();  // the columns add to what the rows wrote
        for (i64 t = next_column.fetch_add(1); t < columns; t = next_column.fetch_add(1))
            column_task<QB, NV_MAX>(pr, ws, t);
    };
    std::vector<std::thread> pool;
    try {
        for (int i = 1; i < team; ++i) pool.emplace_back(worker, std::ref(spaces[static_cast<size_t>(i)]));
    } catch (...) {  // no more threads: the ones running take the remaining tasks
    }
    barrier.set_size(static_cast<int>(pool.size()) + 1);
    worker(spaces[0]);
    for (auto& t : pool) t.join();
#endif
    return 0;
}

int run(const Problem& pr, int threads) {
    const Blocking b = blocking_for(pr.c);
    return b.qb == 6 ? run_blocked<6, 2>(pr, threads) : run_blocked<4, 4>(pr, threads);
}

// The entry points' checks (1: invalid sizes, 2: null pointer; an empty problem is done), then the run.
// needs_lse: the training forward, whose lse output must be given.
int checked_run(const Problem& pr, bool needs_lse, int threads) {
    if (pr.batch < 0 || pr.h < 0 || pr.w < 0 || pr.dk < 1 || pr.c < 1 || pr.ldqk < pr.dk || pr.ldv < pr.c) return 1;
    if (pr.batch == 0 || pr.h == 0 || pr.w == 0) return 0;
    if (!pr.q || !pr.k || !pr.v || !pr.out || (needs_lse && !pr.lse)) return 2;
    return run(pr, threads);
}

}  // namespace

extern "C" {

int ecmnet_axial_attention_strided(const float* q, const float* k, const float* v, float* out, int64_t batch,
                                   int64_t dk, int64_t c, int64_t h, int64_t w, int64_t ldqk, int64_t ldv,
                                   float scale, int threads);

int ecmnet_attn_abi_version() {
    return ABI_VERSION;
}

// Lanes of the key vectors of this build (16 with AVX-512, 8 with AVX, else 4): tests cover partial vectors with it.
int ecmnet_attn_lanes() {
    return static_cast<int>(VL);
}

// out = out_w + out_h as described at the top. Returns 0 on success, 1 for invalid sizes (batch, h, w < 0 or
// dk, c < 1), 2 for a null pointer with a non-empty problem, 5 when the workspaces cannot be allocated.
// threads: at most this many threads (fewer for small problems); < 1 counts as 1.
int ecmnet_axial_attention(const float* q, const float* k, const float* v, float* out, int64_t batch, int64_t dk,
                           int64_t c, int64_t h, int64_t w, float scale, int threads) {
    return ecmnet_axial_attention_strided(q, k, v, out, batch, dk, c, h, w, dk, c, scale, threads);
}

// The same with pixel strides: pixel p's q (k) starts at q + p * ldqk (k + p * ldqk), its v at v + p * ldv
// (ldqk >= dk, ldv >= c), e.g. q, k, v as channel slices of one channels-last (B, 2 dk + c, H, W) tensor.
int ecmnet_axial_attention_strided(const float* q, const float* k, const float* v, float* out, int64_t batch,
                                   int64_t dk, int64_t c, int64_t h, int64_t w, int64_t ldqk, int64_t ldv,
                                   float scale, int threads) {
    return checked_run({q, k, v, out, batch, dk, c, h, w, scale * LOG2E, ldqk, ldv}, false, threads);
}

// Training forward: ecmnet_axial_attention, and lse (2, batch, h, w) written with each query's log2-sum-exp2 of its
// scores in log2 units (scale * log2(e) * q . k), rows' pass first: what the backward
// (axial_attention_backward_cpu.cpp) needs to rebuild the softmax.
int ecmnet_axial_attention_lse(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                               int64_t dk, int64_t c, int64_t h, int64_t w, float scale, int threads) {
    return checked_run({q, k, v, out, batch, dk, c, h, w, scale * LOG2E, dk, c, lse}, true, threads);
}

}  // extern "C"
