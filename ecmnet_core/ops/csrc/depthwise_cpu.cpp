// Backward of a depthwise 2-D convolution (groups == channels), stride 1, "same" zero padding, fp32, channels-last,
// behind a plain C ABI: the training path of ecmnet_core.model.layers.DepthwiseConv2d
// (ecmnet_core/ops/depthwise_cpu.py). The forward stays with oneDNN, which is fast there.
//
// oneDNN's depthwise backward leaves its fast path for dilated kernels and for 5x5 and 7x7 ones: 12-33 ms against
// 1-3 ms for the same shapes undilated ((3, 1) and (1, 3), 64 channels x 45 x 60 and 32 x 90 x 120, batch 8), and
// ECMNet's EDABs and MSAUs run about thirty of those per step. The work is a few multiply-adds per element, so the
// kernel is written for memory traffic: every pass walks rows of the (B * H, W, C) tensor with the channels in
// native vectors (ecmnet_simd.h), the last C % VL one by one.
//
// With taps (u, v), offsets ou = u * dh - ph and ov = v * dw - pw, and zero outside the map, the forward is
//     out[b, i, j, c] = bias[c] + sum_uv w[u, v, c] * x[b, i + ou, j + ov, c]
// and the backward
//     dx[b, p, q, c]  = sum_uv w[u, v, c] * dy[b, p - ou, q - ov, c]
//     dw[u, v, c]     = sum_bij dy[b, i, j, c] * x[b, i + ou, j + ov, c];   dbias[c] = sum_bij dy[b, i, j, c]
// Weights come as (kh * kw, C) rows. Weight sums are accumulated per row in float, then in double per thread.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ecmnet_parallel.h"
#include "ecmnet_simd.h"

namespace {

using i64 = int64_t;
using ecmnet_simd::vf;
using ecmnet_simd::VL;
using ecmnet_simd::vload;
using ecmnet_simd::vstore;
using ecmnet_parallel::parallel;
using ecmnet_parallel::team_size;

constexpr int ABI_VERSION = 1;
constexpr i64 C_MAX = 4096;
constexpr i64 TAPS_MAX = 121;  // up to 11 x 11

struct Shape {
    i64 b, h, w, c, kh, kw, dh, dw, ph, pw;
    i64 rows() const { return b * h; }
};

inline void split(i64 n, int t, int teams, i64& lo, i64& hi) {
    lo = n * t / teams;
    hi = n * (t + 1) / teams;
}

// o[j] += wv * s[j + ov] over the columns j where j + ov is inside the row (C channels per column).
inline void tap_row(const float* __restrict__ s, const float* __restrict__ wv, float* __restrict__ o, i64 w, i64 c,
                    i64 ov) {
    const i64 jlo = std::max<i64>(0, -ov), jhi = std::min<i64>(w, w - ov);
    for (i64 j = jlo; j < jhi; ++j) {
        const float* __restrict__ sj = s + (j + ov) * c;
        float* __restrict__ oj = o + j * c;
        i64 k = 0;
        for (; k + VL <= c; k += VL) vstore(oj + k, vload(oj + k) + vload(wv + k) * vload(sj + k));
        for (; k < c; ++k) oj[k] += wv[k] * sj[k];
    }
}

// dx rows [r0, r1) = sum_uv w[u, v] * dy shifted by (-ou, -ov).
void input_grad(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx, const Shape& s,
                i64 r0, i64 r1) {
    const i64 row = s.w * s.c;
    for (i64 r = r0; r < r1; ++r) {
        const i64 b = r / s.h, i = r % s.h;
        float* __restrict__ o = dx + r * row;
        std::memset(o, 0, sizeof(float) * row);
        for (i64 u = 0; u < s.kh; ++u) {
            const i64 ii = i - (u * s.dh - s.ph);
            if (ii < 0 || ii >= s.h) continue;
            const float* __restrict__ srow = dy + (b * s.h + ii) * row;
            for (i64 v = 0; v < s.kw; ++v) tap_row(srow, wt + (u * s.kw + v) * s.c, o, s.w, s.c, -(v * s.dw - s.pw));
        }
    }
}

// f[k] += sum_j a[j, k] * b[j + ov, k] over the valid columns (float, one row).
inline void dot_row(const float* __restrict__ a, const float* __restrict__ bsrc, float* __restrict__ f, i64 w, i64 c,
                    i64 ov) {
    const i64 jlo = std::max<i64>(0, -ov), jhi = std::min<i64>(w, w - ov);
    i64 k = 0;
    for (; k + VL <= c; k += VL) {
        vf acc0 = vf{}, acc1 = vf{};
        i64 j = jlo;
        for (; j + 1 < jhi; j += 2) {
            acc0 += vload(a + j * c + k) * vload(bsrc + (j + ov) * c + k);
            acc1 += vload(a + (j + 1) * c + k) * vload(bsrc + (j + 1 + ov) * c + k);
        }
        if (j < jhi) acc0 += vload(a + j * c + k) * vload(bsrc + (j + ov) * c + k);
        vstore(f + k, vload(f + k) + acc0 + acc1);
    }
    for (; k < c; ++k) {
        float acc = 0.0f;
        for (i64 j = jlo; j < jhi; ++j) acc += a[j * c + k] * bsrc[(j + ov) * c + k];
        f[k] += acc;
    }
}

}  // namespace

extern "C" {

int ecmnet_dw_abi_version() {
    return ABI_VERSION;
}

static int check(const Shape& s) {
    if (s.b < 1 || s.h < 1 || s.w < 1 || s.c < 1 || s.c > C_MAX || s.kh < 1 || s.kw < 1 || s.kh * s.kw > TAPS_MAX ||
        s.dh < 1 || s.dw < 1 || 2 * s.ph != s.dh * (s.kh - 1) || 2 * s.pw != s.dw * (s.kw - 1))
        return 1;
    return 0;
}

// dy, x, dx: (b, h, w, c) contiguous; wt: (kh * kw, c). Written when not null: dx, dweight (kh * kw, c),
// dbias (c). Returns 0, or 1 for invalid sizes, 2 for a null pointer, 5 when memory runs out.
int ecmnet_dw_backward(const float* dy, const float* x, const float* wt, float* dx, float* dweight, float* dbias,
                       int64_t b, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t dh, int64_t dw,
                       int64_t ph, int64_t pw, int threads) {
    const Shape s{b, h, w, c, kh, kw, dh, dw, ph, pw};
    if (check(s)) return 1;
    if (!dy || !x || !wt) return 2;
    const int team = team_size(threads, b * h * w * c * kh * kw);
    if (dx) {
        parallel(team, [&](int t, int n) {
            i64 lo, hi;
            split(s.rows(), t, n, lo, hi);
            input_grad(dy, wt, dx, s, lo, hi);
        });
    }
    if (!dweight && !dbias) return 0;
    const i64 taps = kh * kw, kc = (taps + 1) * c;  // weight sums, then the bias sums
    std::vector<double> part;
    try {
        part.assign(static_cast<size_t>(team * kc), 0.0);
    } catch (...) {
        return 5;
    }
    int used = team;
    parallel(team, [&](int t, int n) {
        if (t == 0) used = n;
        i64 lo, hi;
        split(s.rows(), t, n, lo, hi);
        double* p = part.data() + t * kc;
        std::vector<float> f(static_cast<size_t>(kc));
        const i64 row = s.w * s.c;
        for (i64 r = lo; r < hi; ++r) {
            const i64 bb = r / s.h, i = r % s.h;
            const float* __restrict__ g = dy + r * row;
            std::fill(f.begin(), f.end(), 0.0f);
            for (i64 u = 0; u < s.kh; ++u) {
                const i64 ii = i + u * s.dh - s.ph;
                if (ii < 0 || ii >= s.h) continue;
                const float* __restrict__ xrow = x + (bb * s.h + ii) * row;
                for (i64 v = 0; v < s.kw; ++v) dot_row(g, xrow, f.data() + (u * s.kw + v) * s.c, s.w, s.c, v * s.dw - s.pw);
            }
            float* fb = f.data() + taps * s.c;
            for (i64 j = 0; j < s.w; ++j) {
                const float* gj = g + j * s.c;
                for (i64 k = 0; k < s.c; ++k) fb[k] += gj[k];
            }
            for (i64 k = 0; k < kc; ++k) p[k] += f[k];
        }
    });
    for (i64 k = 0; k < kc; ++k) {
        double sum = 0.0;
        for (int t = 0; t < used; ++t) sum += part[t * kc + k];
        if (k < taps * c) {
            if (dweight) dweight[k] = static_cast<float>(sum);
        } else if (dbias) {
            dbias[k - taps * c] = static_cast<float>(sum);
        }
    }
    return 0;
}

}  // extern "C"
