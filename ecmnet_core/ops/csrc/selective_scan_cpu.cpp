// Selective scan (Mamba S6) on the CPU: forward and backward kernels behind a plain C ABI.
//
// Built on first use by ecmnet_core/ops/scan_cpu.py (c++ -O3 -shared, loaded with ctypes) and called with raw fp32
// pointers, so the build needs no torch or Python headers and takes a few seconds. Needs GCC or Clang (vector
// extensions).
//
// Semantics per batch b, channel d (group g = d / (dim / groups)) and state n:
//     dt    = softplus(delta + delta_bias)       (when softplus; threshold 20 as torch.nn.functional.softplus)
//     h_t   = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * u_t * B[b, g, t, n]
//     y_t   = sum_n C[b, g, t, n] * h_t[n] + D[d] * u_t
//     out_t = y_t * silu(z_t)                    (when z is given)
// Layouts (contiguous fp32): u, delta, z, out (batch, dim, L); A (dim, N); B, C time-major (batch, groups, L, N);
// D, delta_bias (dim,).
//
// Vectorisation: a vector holds VL channels of one group (which share B and C), VL = the target's native float
// width (16 with AVX-512, 8 with AVX, else 4); time and the N states are loops. All arithmetic in the hot loops is
// then element-wise on vectors (no horizontal sums), written with the GCC/Clang vector extension. Per chunk of T
// steps, each tile of VL (channel, time) rows is transposed into a (time, lane) tile in L1 and back.
//
// The forward optionally stores the state at the start of every chunk, (batch, dim, n_chunks, N); the backward walks
// the chunks in reverse, recomputes each chunk's states from its stored start and runs the reverse-time recurrence.
// It processes all tiles of a (batch, group, part) task chunk by chunk in lockstep, so the per-lane dB/dC
// contributions of a chunk are summed over channels once per chunk rather than once per step.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ecmnet_simd.h"

namespace {

using namespace ecmnet_simd;  // VL, vf, vi, splat, vexp2, LOG2E, FlushDenormals

inline float lane_sum(vf v) {
    float s = 0.0f;
    for (i64 j = 0; j < VL; ++j) s += v[j];
    return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Element-wise functions on vectors (Cephes-style polynomials, ~1 ulp in the range that matters).

inline vf vexp(vf x) {
    return vexp2(x * LOG2E);
}

inline vf vabs(vf x) {
    return x < 0.0f ? -x : x;
}

// log1p(e) for e in [0, 1] as 2*atanh(s), s = e / (2 + e) <= 1/3: no cancellation for tiny e.
inline vf log1p_unit(vf e) {
    vf s = e / (e + 2.0f);
    vf s2 = s * s;
    vf p = s2 * (1.0f / 17.0f) + 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

inline vf sigmoid(vf x) {
    vf e = vexp(-vabs(x));
    vf inv = 1.0f / (e + 1.0f);
    return x >= 0.0f ? inv : e * inv;
}

// softplus with torch's threshold (x > 20 -> x), and its derivative sigmoid(x) (1 above the threshold).
inline void softplus_grad(vf x, vf& sp, vf& sig) {
    vf e = vexp(-vabs(x));
    vf inv = 1.0f / (e + 1.0f);
    vf pos = x > 0.0f ? x : vf{};
    sp = x > 20.0f ? x : pos + log1p_unit(e);
    sig = x > 20.0f ? splat(1.0f) : (x >= 0.0f ? inv : e * inv);
}

// ---------------------------------------------------------------------------------------------------------------
// Threads: a per-call team pulling task indices from an atomic counter. Denormals are flushed inside the team
// (decaying states and gradients would otherwise hit the slow denormal path); the caller's mode is restored.

// Tile-steps (one step of one tile, all N states) that make starting one more thread worth it: about a millisecond.
// A busy machine can take that long just to schedule a new thread, and small calls (tests, small images) are common.
constexpr i64 TILE_STEPS_PER_THREAD = 8192;

// Runs body(task, workspace) for every task on up to nthreads threads, fewer when `work` (tile-steps) is small.
// Returns false if a task failed (out of memory); no exception may cross the C ABI or leave a std::thread.
template <class Body>
bool run_tasks(i64 ntasks, int nthreads, i64 work, const Body& body) {
    std::atomic<i64> next{0};
    std::atomic<bool> failed{false};
    auto worker = [&]() noexcept {
        FlushDenormals ftz;
        try {
            typename Body::Workspace ws;
            for (i64 task = next.fetch_add(1); task < ntasks && !failed; task = next.fetch_add(1)) body(task, ws);
        } catch (...) {
            failed = true;
        }
    };
    const i64 wanted = std::min<i64>(std::max(nthreads, 1), work / TILE_STEPS_PER_THREAD);
    const int team = static_cast<int>(std::max<i64>(1, std::min(wanted, ntasks)));
#ifdef _OPENMP
    // Built with -fopenmp the library shares the process's OpenMP runtime, i.e. PyTorch's intra-op threads: right
    // after a PyTorch op they are still spinning, and a team of our own would compete with them for the cores.
    if (team > 1) {
#pragma omp parallel num_threads(team)
        worker();
        return !failed;
    }
#endif
    std::vector<std::thread> threads;
    try {
        for (int i = 1; i < team; ++i) threads.emplace_back(worker);
    } catch (...) {  // no more threads: the ones running take the remaining tasks
    }
    worker();
    for (auto& t : threads) t.join();
    return !failed;
}

struct Args {
    const float* u;
    const float* delta;
    const float* A;
    const float* B;
    const float* C;
    const float* Dskip;       // nullable
    const float* z;           // nullable
    const float* delta_bias;  // nullable
    int softplus;
    i64 batch, dim, groups, length, nstate, chunk;

    i64 group_dim() const { return dim / groups; }
    i64 tiles_per_group() const { return (group_dim() + VL - 1) / VL; }
    i64 n_chunks() const { return (length + chunk - 1) / chunk; }
};

// Up to VL channels [d0, d0 + nl) of one batch element and group; row = b * dim + d0 indexes (batch, dim) rows.
struct Tile {
    i64 b, g, d0, nl, row;
};

inline Tile make_tile(const Args& a, i64 b, i64 g, i64 index) {
    const i64 d0 = g * a.group_dim() + index * VL;
    return {b, g, d0, std::min(VL, (g + 1) * a.group_dim() - d0), b * a.dim + d0};
}

// rows (channel, time) -> tile (time, lane); lanes >= nl are zero. Also prefetches [pf0, pf1) of the rows, the
// chunk that will be loaded next: VL interleaved (and in the backward, descending) streams defeat the hardware
// prefetcher.
inline void load_tile(const float* rows, i64 L, i64 t0, i64 steps, i64 nl, vf* tile, i64 pf0, i64 pf1) {
    float* t = reinterpret_cast<float*>(tile);
    for (i64 j = 0; j < nl; ++j) {
        const float* src = rows + j * L;
        for (i64 i = 0; i < steps; ++i) t[i * VL + j] = src[t0 + i];
        for (i64 i = std::max<i64>(pf0, 0); i < pf1; i += 16) __builtin_prefetch(src + i);
    }
    // Padding lanes by memset: GCC 12 with -march=sapphirerapids vectorised the plain loop with aligned 256-bit
    // stores at t + nl (t is a vf array, 64-byte aligned, but t + nl is not) and crashed where nl < VL.
    if (nl < VL)
        for (i64 i = 0; i < steps; ++i) std::memset(t + i * VL + nl, 0, static_cast<size_t>(VL - nl) * sizeof(float));
}

// tile (time, lane) -> rows (channel, time), lanes < nl only.
inline void store_tile(const vf* tile, i64 L, i64 t0, i64 steps, i64 nl, float* rows) {
    const float* t = reinterpret_cast<const float*>(tile);
    for (i64 j = 0; j < nl; ++j) {
        float* dst = rows + j * L + t0;
        for (i64 i = 0; i < steps; ++i) dst[i] = t[i * VL + j];
    }
}

// Per-tile constants as vectors: A as N vectors, delta_bias and D. Padding lanes are zero.
struct TileConstants {
    std::vector<vf> A, A2;  // A2 = A * log2(e): exp(dt A) = exp2(dt A2)
    vf bias, D;

    void load(const Args& a, const Tile& tl, i64 n) {
        A.assign(static_cast<size_t>(n), vf{});
        bias = vf{};
        D = vf{};
        for (i64 j = 0; j < tl.nl; ++j) {
            const i64 d = tl.d0 + j;
            for (i64 k = 0; k < n; ++k) A[k][j] = a.A[d * n + k];
            if (a.delta_bias) bias[j] = a.delta_bias[d];
            if (a.Dskip) D[j] = a.Dskip[d];
        }
        A2.resize(A.size());
        for (i64 k = 0; k < n; ++k) A2[k] = A[k] * LOG2E;
    }
};

// In place on tiles: raw delta -> dt (after bias and softplus); sig = d dt / d raw; dtu = dt * u.
inline void prepare_dt(const Args& a, i64 steps, const TileConstants& k, const vf* uu, vf* dt, vf* sig, vf* dtu) {
    for (i64 i = 0; i < steps; ++i) {
        if (a.softplus) {
            softplus_grad(dt[i] + k.bias, dt[i], sig[i]);
        } else {
            dt[i] += k.bias;
            sig[i] = splat(1.0f);
        }
        dtu[i] = dt[i] * uu[i];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward. One task = one tile.

struct Forward {
    const Args& a;
    float* out;
    float* last_state;    // (batch, dim, N), nullable
    float* chunk_states;  // (batch, dim, n_chunks, N), nullable

    struct Workspace {
        std::vector<vf> buf;
        TileConstants k;
    };

    void operator()(i64 task, Workspace& ws) const {
        const i64 n = a.nstate;
        const i64 T = a.chunk, L = a.length, n_chunks = a.n_chunks(), tpg = a.tiles_per_group();
        const Tile tl = make_tile(a, task / (a.groups * tpg), (task / tpg) % a.groups, task % tpg);
        ws.k.load(a, tl, n);
        const vf* A2 = ws.k.A2.data();

        ws.buf.assign(static_cast<size_t>(5 * T + n), vf{});
        vf* dt = ws.buf.data();
        vf* sig = dt + T;
        vf* dtu = sig + T;
        vf* uu = dtu + T;
        vf* y = uu + T;
        vf* h = y + T;  // (N) state vectors

        const float* Bg = a.B + (tl.b * a.groups + tl.g) * L * n;
        const float* Cg = a.C + (tl.b * a.groups + tl.g) * L * n;
        for (i64 c = 0; c < n_chunks; ++c) {
            const i64 t0 = c * T, steps = std::min(T, L - t0);
            if (chunk_states) {
                for (i64 j = 0; j < tl.nl; ++j)
                    for (i64 k = 0; k < n; ++k) chunk_states[((tl.row + j) * n_chunks + c) * n + k] = h[k][j];
            }
            load_tile(a.delta + tl.row * L, L, t0, steps, tl.nl, dt, t0 + T, std::min(t0 + 2 * T, L));
            load_tile(a.u + tl.row * L, L, t0, steps, tl.nl, uu, t0 + T, std::min(t0 + 2 * T, L));
            prepare_dt(a, steps, ws.k, uu, dt, sig, dtu);
            for (i64 i = 0; i < steps; ++i) {
                const float* Bt = Bg + (t0 + i) * n;
                const float* Ct = Cg + (t0 + i) * n;
                const vf dti = dt[i], dui = dtu[i];
                vf yi = ws.k.D * uu[i];
                for (i64 k = 0; k < n; ++k) {
                    h[k] = vexp2(dti * A2[k]) * h[k] + dui * Bt[k];
                    yi += h[k] * Ct[k];
                }
                y[i] = yi;
            }
            if (a.z) {
                vf* zz = dt;  // dt is not needed any more in this chunk
                load_tile(a.z + tl.row * L, L, t0, steps, tl.nl, zz, t0 + T, std::min(t0 + 2 * T, L));
                for (i64 i = 0; i < steps; ++i) y[i] *= zz[i] * sigmoid(zz[i]);
            }
            store_tile(y, L, t0, steps, tl.nl, out + tl.row * L);
        }
        if (last_state) {
            for (i64 j = 0; j < tl.nl; ++j)
                for (i64 k = 0; k < n; ++k) last_state[(tl.row + j) * n + k] = h[k][j];
        }
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Backward. One task = (batch, group, part): a contiguous range of the group's tiles, processed chunk by chunk in
// reverse time. dB and dC of the part go to its own (L, N) buffers, summed over parts by the caller, so no two threads
// write the same element.

struct Grads {
    const float* chunk_states;  // from the forward
    const float* dout;          // (batch, dim, L)
    float* du;                  // (batch, dim, L)
    float* ddelta;              // (batch, dim, L), gradient w.r.t. the raw delta (before bias and softplus)
    double* dA;                 // (batch, dim, N), summed over batch by the caller
    float* dB;                  // (batch, groups, parts, L, N)
    float* dC;                  // (batch, groups, parts, L, N)
    double* dD;                 // (batch, dim), nullable
    double* dbias;              // (batch, dim), nullable
    float* dz;                  // (batch, dim, L), nullable
    i64 parts;
};

struct Backward {
    const Args& a;
    const Grads& gr;

    struct Workspace {
        std::vector<vf> buf;
        std::vector<double> acc;
        TileConstants k;
    };

    void operator()(i64 task, Workspace& ws) const {
        const i64 n = a.nstate;
        const i64 T = a.chunk, L = a.length, n_chunks = a.n_chunks(), tpg = a.tiles_per_group();
        const i64 p = task % gr.parts, bg = task / gr.parts;
        const i64 b = bg / a.groups, g = bg % a.groups;
        const i64 tile0 = p * tpg / gr.parts, ntiles = (p + 1) * tpg / gr.parts - tile0;

        ws.buf.assign(static_cast<size_t>(9 * T + 4 * T * n + n * (2 + ntiles)), vf{});
        // (T) tiles: inputs and per-step results of one tile.
        vf* dt = ws.buf.data();
        vf* sig = dt + T;
        vf* dtu = sig + T;
        vf* uu = dtu + T;
        vf* dy = uu + T;  // gradient w.r.t. the scan output (the output stage undone)
        vf* zz = dy + T;
        vf* y = zz + T;  // recomputed output (with z only), then dz
        vf* du_t = y + T;
        vf* dd_t = du_t + T;
        // (T, N): states, decays exp(dt A), and the per-lane dB/dC contributions of all tiles of the part.
        vf* hs = dd_t + T;
        vf* dec = hs + T * n;
        vf* laneB = dec + T * n;
        vf* laneC = laneB + T * n;
        vf* h0 = laneC + T * n;        // (N) state at the start of the chunk
        vf* dA_chunk = h0 + n;         // (N)
        vf* carry = dA_chunk + n;      // (ntiles, N): exp(dt_{t+1} A) * grad_h[t+1], flowing into step t
        // Per-tile totals over time in double: dA (ntiles, N, VL), dD and dbias (ntiles, VL).
        const i64 NV = n * VL;
        ws.acc.assign(static_cast<size_t>(ntiles * (NV + 2 * VL)), 0.0);
        double* dA_acc = ws.acc.data();
        double* dD_acc = dA_acc + ntiles * NV;
        double* db_acc = dD_acc + ntiles * VL;

        float* dBp = gr.dB + (bg * gr.parts + p) * L * n;
        float* dCp = gr.dC + (bg * gr.parts + p) * L * n;
        const float* Bg = a.B + bg * L * n;
        const float* Cg = a.C + bg * L * n;

        for (i64 c = n_chunks - 1; c >= 0; --c) {
            const i64 t0 = c * T, steps = std::min(T, L - t0);
            std::fill(laneB, laneB + steps * n, vf{});
            std::fill(laneC, laneC + steps * n, vf{});
            for (i64 q = 0; q < ntiles; ++q) {
                const Tile tl = make_tile(a, b, g, tile0 + q);
                ws.k.load(a, tl, n);
                const vf* At = ws.k.A.data();
                const vf* A2 = ws.k.A2.data();
                const vf Dd = ws.k.D;
                load_tile(a.delta + tl.row * L, L, t0, steps, tl.nl, dt, t0 - T, t0);
                load_tile(a.u + tl.row * L, L, t0, steps, tl.nl, uu, t0 - T, t0);
                load_tile(gr.dout + tl.row * L, L, t0, steps, tl.nl, dy, t0 - T, t0);
                prepare_dt(a, steps, ws.k, uu, dt, sig, dtu);
                for (i64 k = 0; k < n; ++k) {
                    h0[k] = vf{};
                    for (i64 j = 0; j < tl.nl; ++j) h0[k][j] = gr.chunk_states[((tl.row + j) * n_chunks + c) * n + k];
                }

                // Recompute the chunk's states (and y when the z gate needs it).
                for (i64 i = 0; i < steps; ++i) {
                    const float* Bt = Bg + (t0 + i) * n;
                    const float* Ct = Cg + (t0 + i) * n;
                    const vf dti = dt[i], dui = dtu[i];
                    const vf* hp = i > 0 ? hs + (i - 1) * n : h0;
                    vf* hi = hs + i * n;
                    vf* ei = dec + i * n;
                    vf yi = Dd * uu[i];
                    for (i64 k = 0; k < n; ++k) {
                        const vf e = vexp2(dti * A2[k]);
                        ei[k] = e;
                        hi[k] = e * hp[k] + dui * Bt[k];
                        yi += hi[k] * Ct[k];
                    }
                    y[i] = yi;
                }
                // Undo the output stage: out = (y + D u) * silu(z).
                if (a.z) {
                    load_tile(a.z + tl.row * L, L, t0, steps, tl.nl, zz, t0 - T, t0);
                    for (i64 i = 0; i < steps; ++i) {
                        const vf sz = sigmoid(zz[i]);
                        y[i] = dy[i] * y[i] * sz * (zz[i] * (1.0f - sz) + 1.0f);  // dz
                        dy[i] *= zz[i] * sz;
                    }
                    store_tile(y, L, t0, steps, tl.nl, gr.dz + tl.row * L);
                }
                vf* carry_q = carry + q * n;
                std::fill(dA_chunk, dA_chunk + n, vf{});
                vf dD_chunk{}, db_chunk{};
                // Reverse time: grad_h[t] = dy_t C_t + exp(dt_{t+1} A) grad_h[t+1].
                for (i64 i = steps - 1; i >= 0; --i) {
                    const float* Bt = Bg + (t0 + i) * n;
                    const float* Ct = Cg + (t0 + i) * n;
                    const vf dyi = dy[i], dti = dt[i], dui = dtu[i];
                    const vf* hi = hs + i * n;
                    const vf* hp = i > 0 ? hs + (i - 1) * n : h0;
                    const vf* ei = dec + i * n;
                    vf* lB = laneB + i * n;
                    vf* lC = laneC + i * n;
                    vf s{}, qa{};  // sum_n grad_h B and sum_n d(dt A) A
                    for (i64 k = 0; k < n; ++k) {
                        const vf gh = dyi * Ct[k] + carry_q[k];
                        lC[k] += dyi * hi[k];
                        lB[k] += gh * dui;
                        s += gh * Bt[k];
                        const vf gd = gh * hp[k] * ei[k];  // d loss / d (dt * A)
                        qa += gd * At[k];
                        dA_chunk[k] += gd * dti;
                        carry_q[k] = ei[k] * gh;
                    }
                    du_t[i] = dti * s + Dd * dyi;
                    const vf gdt = (qa + uu[i] * s) * sig[i];
                    dd_t[i] = gdt;
                    db_chunk += gdt;
                    dD_chunk += dyi * uu[i];
                }
                store_tile(du_t, L, t0, steps, tl.nl, gr.du + tl.row * L);
                store_tile(dd_t, L, t0, steps, tl.nl, gr.ddelta + tl.row * L);
                for (i64 j = 0; j < VL; ++j) {
                    for (i64 k = 0; k < n; ++k) dA_acc[(q * n + k) * VL + j] += dA_chunk[k][j];
                    dD_acc[q * VL + j] += dD_chunk[j];
                    db_acc[q * VL + j] += db_chunk[j];
                }
            }
            // Sum the lanes: every step of this chunk gets its dB/dC from all tiles of the part at once.
            for (i64 i = 0; i < steps; ++i) {
                for (i64 k = 0; k < n; ++k) {
                    dBp[(t0 + i) * n + k] = lane_sum(laneB[i * n + k]);
                    dCp[(t0 + i) * n + k] = lane_sum(laneC[i * n + k]);
                }
            }
        }
        for (i64 q = 0; q < ntiles; ++q) {
            const Tile tl = make_tile(a, b, g, tile0 + q);
            for (i64 j = 0; j < tl.nl; ++j) {
                for (i64 k = 0; k < n; ++k) gr.dA[(tl.row + j) * n + k] = dA_acc[(q * n + k) * VL + j];
                if (gr.dD) gr.dD[tl.row + j] = dD_acc[q * VL + j];
                if (gr.dbias) gr.dbias[tl.row + j] = db_acc[q * VL + j];
            }
        }
    }
};


// Error codes of the C functions.
enum : int { OK = 0, BAD_SIZES = 1, BAD_GROUPS = 2, BAD_PARTS = 3, MISSING_DZ = 4, OUT_OF_MEMORY = 5 };

template <class Kernel>
int dispatch(i64 ntasks, int nthreads, const Args& a, const Kernel& kernel) {
    const i64 work = a.batch * a.groups * a.tiles_per_group() * a.length;
    return run_tasks(ntasks, nthreads, work, kernel) ? OK : OUT_OF_MEMORY;
}

int check(const Args& a) {
    if (a.batch < 0 || a.dim < 0 || a.groups <= 0 || a.length < 0 || a.nstate < 0 || a.chunk <= 0) return BAD_SIZES;
    if (a.dim % a.groups) return BAD_GROUPS;
    return OK;
}

}  // namespace

extern "C" {

int ecmnet_scan_abi_version() { return 3; }

// Channels per tile: the backward's `parts` must not exceed the tiles of a group, ceil(dim / groups / lanes).
int ecmnet_scan_lanes() { return static_cast<int>(VL); }

// Both return OK (0) or one of the error codes above.
int ecmnet_scan_fwd(const float* u, const float* delta, const float* A, const float* B, const float* C,
                    const float* Dskip, const float* z, const float* delta_bias, int softplus, i64 batch, i64 dim,
                    i64 groups, i64 length, i64 nstate, i64 chunk, float* out, float* last_state,
                    float* chunk_states, int nthreads) {
    const Args a{u, delta, A, B, C, Dskip, z, delta_bias, softplus, batch, dim, groups, length, nstate, chunk};
    if (int err = check(a)) return err;
    return dispatch(batch * groups * a.tiles_per_group(), nthreads, a, Forward{a, out, last_state, chunk_states});
}

int ecmnet_scan_bwd(const float* u, const float* delta, const float* A, const float* B, const float* C,
                    const float* Dskip, const float* z, const float* delta_bias, int softplus, i64 batch, i64 dim,
                    i64 groups, i64 length, i64 nstate, i64 chunk, const float* chunk_states, const float* dout,
                    float* du, float* ddelta, double* dA, float* dB, float* dC, double* dD, double* dbias, float* dz,
                    i64 parts, int nthreads) {
    const Args a{u, delta, A, B, C, Dskip, z, delta_bias, softplus, batch, dim, groups, length, nstate, chunk};
    if (int err = check(a)) return err;
    if (parts <= 0 || parts > std::max<i64>(1, a.tiles_per_group())) return BAD_PARTS;
    if (z && !dz) return MISSING_DZ;
    const Grads gr{chunk_states, dout, du, ddelta, dA, dB, dC, dD, dbias, dz, parts};
    return dispatch(batch * groups * parts, nthreads, a, Backward{a, gr});
}

}  // extern "C"
