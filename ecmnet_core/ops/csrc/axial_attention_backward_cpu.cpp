// Backward of DDA's axial softmax attention on the CPU, fp32, channels-last, behind a plain C ABI: the training path
// of ecmnet_core/ops/attention_train_cpu.py. The forward is axial_attention_cpu.cpp's ecmnet_axial_attention_lse,
// which also leaves each query's log-sum-exp, so the softmax is rebuilt here instead of being kept: PyTorch's
// batched-matmul attention keeps and re-reads the (sequences, S, S) score and probability tensors, which made it
// about a fifth of a training step at 360x480.
//
// Per pass (rows, then columns) and sequence, with s = scale, P_ij = exp2(alpha q_i . k_j - lse_i) for
// alpha = s * log2(e), and dO the gradient of out = O_w + O_h (the same for both passes):
//     dP_ij = dO_i . v_j;  D_i = sum_j P_ij dP_ij;  dS_ij = P_ij (dP_ij - D_i)
//     dq_i = s sum_j dS_ij k_j;  dk_j = s sum_i dS_ij q_i;  dv_j = sum_i P_ij dO_i
// The rows' pass stores dq, dk, dv; the columns' pass adds to them (a barrier between the passes).
//
// Per sequence a task gathers k and v transposed to (dk, S) and (c, S) and q, dO as rows into its workspace, then
// takes QB queries at a time with SIMD over keys j (VL lanes): scores and P; dP and the dv sums in one sweep over the
// channels (each loaded value vector used QB times); D and dS; dq and the dk sums in one sweep over dk. dk and dv are
// accumulated transposed in the workspace and written once per sequence.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ecmnet_simd.h"

namespace {

using namespace ecmnet_simd;  // VL, vf, vi, vload, vstore, splat, vexp2, LOG2E, FlushDenormals

constexpr int ABI_VERSION = 1;
constexpr i64 QB = 4;  // queries per block

inline float hsum(vf v) {
    float t = 0.0f;
    for (i64 l = 0; l < VL; ++l) t += v[l];
    return t;
}

struct Problem {
    const float *q, *k, *v, *dout, *lse;
    float *dq, *dk, *dv;
    i64 batch, d, c, h, w;
    float scale, alpha;
};

struct Workspace {
    std::vector<float> qs;   // (S, d) queries times alpha (scores in log2 units)
    std::vector<float> qn;   // (S, d) queries times scale (dk sums)
    std::vector<float> kt;   // (d, Sp) keys transposed
    std::vector<float> vt;   // (c, Sp) values transposed
    std::vector<float> go;   // (S + 1, c) dO rows; the last one zero (rows past the end of a query block)
    std::vector<float> dkt;  // (d, Sp) dk sums
    std::vector<float> dvt;  // (c, Sp) dv sums
    std::vector<float> p;    // (QB, Sp) probabilities
    std::vector<float> ds;   // (QB, Sp) dP, then dS
    i64 sp = 0;

    void allocate(const Problem& pr) {
        const i64 s = std::max(pr.h, pr.w);
        sp = (s + VL - 1) / VL * VL;
        qs.assign(static_cast<size_t>(s * pr.d), 0.0f);
        qn.assign(static_cast<size_t>(s * pr.d), 0.0f);
        kt.assign(static_cast<size_t>(pr.d * sp), 0.0f);
        vt.assign(static_cast<size_t>(pr.c * sp), 0.0f);
        go.assign(static_cast<size_t>((s + 1) * pr.c), 0.0f);
        dkt.assign(static_cast<size_t>(pr.d * sp), 0.0f);
        dvt.assign(static_cast<size_t>(pr.c * sp), 0.0f);
        p.assign(static_cast<size_t>(QB * sp), 0.0f);
        ds.assign(static_cast<size_t>(QB * sp), 0.0f);
    }
};

// One sequence of length s: position t's q/k/dq/dk at offset t * sq (d floats), v/dO/dv at t * sv (c floats), lse
// at t * sl; base offsets off_qk, off_v, off_l. add: accumulate the gradients (columns' pass).
void sequence(const Problem& pr, Workspace& ws, i64 off_qk, i64 off_v, i64 off_l, i64 s, i64 sq, i64 sv, i64 sl,
              bool add) {
    const i64 d = pr.d, c = pr.c, sp = (s + VL - 1) / VL * VL;
    float *qs = ws.qs.data(), *qn = ws.qn.data(), *kt = ws.kt.data(), *vt = ws.vt.data(), *go = ws.go.data();
    float *dkt = ws.dkt.data(), *dvt = ws.dvt.data(), *p = ws.p.data(), *dsb = ws.ds.data();
    const float* q0 = pr.q + off_qk;
    const float* k0 = pr.k + off_qk;
    const float* v0 = pr.v + off_v;
    const float* g0 = pr.dout + off_v;
    const float* l0 = pr.lse + off_l;
    for (i64 t = 0; t < s; ++t) {
        for (i64 e = 0; e < d; ++e) {
            const float qv = q0[t * sq + e];
            qs[t * d + e] = qv * pr.alpha;
            qn[t * d + e] = qv * pr.scale;
            kt[e * sp + t] = k0[t * sq + e];
        }
        for (i64 ch = 0; ch < c; ++ch) vt[ch * sp + t] = v0[t * sv + ch];
        std::memcpy(go + t * c, g0 + t * sv, static_cast<size_t>(c) * sizeof(float));
    }
    std::memset(go + s * c, 0, static_cast<size_t>(c) * sizeof(float));
    for (i64 t = s; t < sp; ++t) {  // padding keys: zero keys and values (their P is masked to 0 below)
        for (i64 e = 0; e < d; ++e) kt[e * sp + t] = 0.0f;
        for (i64 ch = 0; ch < c; ++ch) vt[ch * sp + t] = 0.0f;
    }
    std::fill(dkt, dkt + d * sp, 0.0f);
    std::fill(dvt, dvt + c * sp, 0.0f);

    vf iota;
    for (i64 l = 0; l < VL; ++l) iota[l] = static_cast<float>(l);

    for (i64 i0 = 0; i0 < s; i0 += QB) {
        const i64 nq = std::min<i64>(QB, s - i0);
        // rows past the end: query 0 of the block with a zero dO row and P = 0, so they add nothing
        const float* qrow[QB];
        const float* grow[QB];
        float lrow[QB];
        for (i64 qi = 0; qi < QB; ++qi) {
            const bool valid = qi < nq;
            qrow[qi] = qs + (valid ? i0 + qi : i0) * d;
            grow[qi] = go + (valid ? i0 + qi : s) * c;
            lrow[qi] = l0[(valid ? i0 + qi : i0) * sl];
        }

        // P, and in the same sweep over keys: dP (from the values) and the dv sums (from dO)
        vf dsum[QB] = {};
        for (i64 jb = 0; jb < sp; jb += VL) {
            vf pv[QB];
            for (i64 qi = 0; qi < QB; ++qi) pv[qi] = vf{};
            for (i64 e = 0; e < d; ++e) {
                const vf kv = vload(kt + e * sp + jb);
                for (i64 qi = 0; qi < QB; ++qi) pv[qi] += splat(qrow[qi][e]) * kv;
            }
            const vi key_ok = iota + static_cast<float>(jb) < static_cast<float>(s);
            for (i64 qi = 0; qi < QB; ++qi) {
                pv[qi] = vexp2(pv[qi] - lrow[qi]);
                pv[qi] = key_ok ? pv[qi] : vf{};
                if (qi >= nq) pv[qi] = vf{};
            }
            vf dp[QB] = {};
            for (i64 ch = 0; ch < c; ++ch) {
                const vf vv = vload(vt + ch * sp + jb);
                vf dvv = vload(dvt + ch * sp + jb);
                for (i64 qi = 0; qi < QB; ++qi) {
                    const vf gb = splat(grow[qi][ch]);
                    dp[qi] += gb * vv;
                    dvv += gb * pv[qi];
                }
                vstore(dvt + ch * sp + jb, dvv);
            }
            for (i64 qi = 0; qi < QB; ++qi) {
                vstore(p + qi * sp + jb, pv[qi]);
                vstore(dsb + qi * sp + jb, dp[qi]);
                dsum[qi] += pv[qi] * dp[qi];
            }
        }
        // dS = P (dP - D)
        for (i64 qi = 0; qi < QB; ++qi) {
            const vf dd = splat(hsum(dsum[qi]));
            for (i64 jb = 0; jb < sp; jb += VL)
                vstore(dsb + qi * sp + jb, vload(p + qi * sp + jb) * (vload(dsb + qi * sp + jb) - dd));
        }
        // dq (scaled on the way out) and the dk sums, one key-vector sweep per q/k channel
        const float* qsc[QB];
        for (i64 qi = 0; qi < QB; ++qi) qsc[qi] = qn + (qi < nq ? i0 + qi : i0) * d;
        for (i64 e = 0; e < d; ++e) {
            vf acc[QB] = {};
            for (i64 jb = 0; jb < sp; jb += VL) {
                const vf kv = vload(kt + e * sp + jb);
                vf dkv = vload(dkt + e * sp + jb);
                for (i64 qi = 0; qi < QB; ++qi) {
                    const vf dsv = vload(dsb + qi * sp + jb);
                    acc[qi] += dsv * kv;
                    dkv += splat(qsc[qi][e]) * dsv;
                }
                vstore(dkt + e * sp + jb, dkv);
            }
            for (i64 qi = 0; qi < nq; ++qi) {
                float* dst = pr.dq + off_qk + (i0 + qi) * sq + e;
                const float val = pr.scale * hsum(acc[qi]);
                *dst = add ? *dst + val : val;
            }
        }
    }
    // dk, dv back to positions
    for (i64 t = 0; t < s; ++t) {
        float* dkp = pr.dk + off_qk + t * sq;
        float* dvp = pr.dv + off_v + t * sv;
        for (i64 e = 0; e < d; ++e) dkp[e] = add ? dkp[e] + dkt[e * sp + t] : dkt[e * sp + t];
        for (i64 ch = 0; ch < c; ++ch) dvp[ch] = add ? dvp[ch] + dvt[ch * sp + t] : dvt[ch * sp + t];
    }
}

int run(const Problem& pr, int threads) {
    const i64 rows = pr.batch * pr.h, columns = pr.batch * pr.w, n = pr.batch * pr.h * pr.w;
    const i64 work = n * (pr.h + pr.w) * (3 * pr.d + 2 * pr.c + 16);
    const i64 wanted = std::min<i64>(std::max(threads, 1), std::max<i64>(1, work / (i64(1) << 20)));
    const int team = static_cast<int>(std::min(wanted, std::max(rows, columns)));
    std::vector<Workspace> spaces;
    try {
        spaces.resize(static_cast<size_t>(team));
        for (auto& ws : spaces) ws.allocate(pr);
    } catch (...) {
        return 5;
    }
    auto row = [&](Workspace& ws, i64 t) {  // (b, i): along the width, stride one pixel
        sequence(pr, ws, t * pr.w * pr.d, t * pr.w * pr.c, t * pr.w, pr.w, pr.d, pr.c, 1, false);
    };
    auto column = [&](Workspace& ws, i64 t) {  // (b, j): along the height, stride one image row
        const i64 base = (t / pr.w) * pr.h * pr.w + t % pr.w;
        sequence(pr, ws, base * pr.d, base * pr.c, n + base, pr.h, pr.w * pr.d, pr.w * pr.c, pr.w, true);
    };
#ifdef _OPENMP
    // PyTorch's intra-op threads (same libgomp.so.1); the implicit barrier after the rows orders the two passes
#pragma omp parallel num_threads(team)
    {
        FlushDenormals ftz;
        Workspace& ws = spaces[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < rows; ++t) row(ws, t);
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < columns; ++t) column(ws, t);
    }
#else
    FlushDenormals ftz;
    for (i64 t = 0; t < rows; ++t) row(spaces[0], t);
    for (i64 t = 0; t < columns; ++t) column(spaces[0], t);
#endif
    return 0;
}

}  // namespace

extern "C" {

int ecmnet_attn_bwd_abi_version() {
    return ABI_VERSION;
}

// q, k, dq, dk: (batch, h, w, d); v, dout, dv: (batch, h, w, c), contiguous fp32; lse: (2, batch, h, w) from
// ecmnet_axial_attention_lse with the same scale. dq, dk, dv are written. Returns 0, 1 for invalid sizes, 2 for a
// null pointer with a non-empty problem, 5 when the workspaces cannot be allocated.
int ecmnet_axial_attention_backward(const float* q, const float* k, const float* v, const float* dout,
                                    const float* lse, float* dq, float* dk, float* dv, int64_t batch, int64_t d,
                                    int64_t c, int64_t h, int64_t w, float scale, int threads) {
    if (batch < 0 || h < 0 || w < 0 || d < 1 || c < 1) return 1;
    if (batch == 0 || h == 0 || w == 0) return 0;
    if (!q || !k || !v || !dout || !lse || !dq || !dk || !dv) return 2;
    const Problem pr{q, k, v, dout, lse, dq, dk, dv, batch, d, c, h, w, scale, scale * LOG2E};
    return run(pr, threads);
}

}  // extern "C"
