// EDAB / BNPReLU inference kernels on the CPU, fp32, channels last, behind a plain C ABI (see ecmnet_core/ops/edab_cpu.py).
//
// The depthwise pair:
//     t   = PReLU_a1(b1 + dwconv_{3x1, dilation d1}(x))
//     out = PReLU_a2(b2 + dwconv_{1x3, dilation d2}(t))
// with zero padding d1 (rows) and d2 (columns), so out has x's size; optionally the per-(batch, channel) sum of out
// (ECA's average pool). Batch norms are folded into (w, b) beforehand, as the inference rewrites do.
//
// Built on first use by ecmnet_core/ops/edab_cpu.py (c++ -O3 -shared -fopenmp, loaded with ctypes). Layouts:
// x, out (batch, h, w, c) contiguous (the memory of a channels_last (B, C, H, W) tensor); params (10, c): the
// taps of w1 (3 rows), b1, a1, the taps of w2 (3 rows), b2, a2, channel-minor for vector loads; sums (batch, c) or null. Four convolutions and PReLUs per EDAB become two passes over memory,
// SIMD over channels, rows split over PyTorch's OpenMP threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ecmnet_simd.h"

namespace {

using namespace ecmnet_simd;

constexpr int ABI_VERSION = 1;

inline vf loadv(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(vf));
    return v;
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

inline vf prelu(vf y, vf a) { return y > 0.0f ? y : y * a; }

inline float prelu1(float y, float a) { return y > 0.0f ? y : y * a; }

// One output row of the vertical (3x1) pass: rows r0, r1, r2 of x (null where outside the image).
void vertical_row(const float* r0, const float* r1, const float* r2, float* dst, i64 w, i64 c, const float* wt,
                  const float* bias, const float* a) {
    const float* w0 = wt;
    const float* w1 = wt + c;
    const float* w2 = wt + 2 * c;
    for (i64 x = 0; x < w; ++x) {
        const i64 o = x * c;
        i64 ch = 0;
        for (; ch + VL <= c; ch += VL) {
            vf acc = loadv(bias + ch) + loadv(w1 + ch) * loadv(r1 + o + ch);
            if (r0) acc += loadv(w0 + ch) * loadv(r0 + o + ch);
            if (r2) acc += loadv(w2 + ch) * loadv(r2 + o + ch);
            storev(dst + o + ch, prelu(acc, loadv(a + ch)));
        }
        for (; ch < c; ++ch) {
            float acc = bias[ch] + w1[ch] * r1[o + ch];
            if (r0) acc += w0[ch] * r0[o + ch];
            if (r2) acc += w2[ch] * r2[o + ch];
            dst[o + ch] = prelu1(acc, a[ch]);
        }
    }
}

// One output row of the horizontal (1x3) pass over row `src` of t; adds the row's result to `sums` when given.
void horizontal_row(const float* src, float* dst, i64 w, i64 c, i64 d, const float* wt, const float* bias,
                    const float* a, float* sums) {
    const float* w0 = wt;
    const float* w1 = wt + c;
    const float* w2 = wt + 2 * c;
    for (i64 x = 0; x < w; ++x) {
        const i64 o = x * c;
        const bool left = x - d >= 0, right = x + d < w;
        i64 ch = 0;
        for (; ch + VL <= c; ch += VL) {
            vf acc = loadv(bias + ch) + loadv(w1 + ch) * loadv(src + o + ch);
            if (left) acc += loadv(w0 + ch) * loadv(src + o - d * c + ch);
            if (right) acc += loadv(w2 + ch) * loadv(src + o + d * c + ch);
            const vf y = prelu(acc, loadv(a + ch));
            storev(dst + o + ch, y);
            if (sums) storev(sums + ch, loadv(sums + ch) + y);
        }
        for (; ch < c; ++ch) {
            float acc = bias[ch] + w1[ch] * src[o + ch];
            if (left) acc += w0[ch] * src[o - d * c + ch];
            if (right) acc += w2[ch] * src[o + d * c + ch];
            const float y = prelu1(acc, a[ch]);
            dst[o + ch] = y;
            if (sums) sums[ch] += y;
        }
    }
}

}  // namespace

extern "C" {

int ecmnet_edab_abi_version() { return ABI_VERSION; }

int ecmnet_dw_pair_lanes() { return static_cast<int>(VL); }

// Returns 0 on success, 1 for invalid sizes, 2 for a null pointer, 5 when out of memory.
int ecmnet_dw_pair(const float* x, float* out, float* sums, i64 batch, i64 h, i64 w, i64 c,
                   const float* params, i64 d1, i64 d2, int threads) {
    if (batch < 1 || h < 1 || w < 1 || c < 1 || d1 < 1 || d2 < 1) return 1;
    if (!x || !out || !params) return 2;
    const float *w1 = params, *b1 = params + 3 * c, *a1 = params + 4 * c;
    const float *w2 = params + 5 * c, *b2 = params + 8 * c, *a2 = params + 9 * c;
    const i64 rows = batch * h;
    const i64 row = w * c;
    std::vector<float> row_sums;
    try {
        if (sums) row_sums.assign(static_cast<size_t>(rows * c), 0.0f);
    } catch (...) {
        return 5;
    }
    float* rs = sums ? row_sums.data() : nullptr;
    const int nt = static_cast<int>(std::max<i64>(1, std::min<i64>(threads, rows)));
    bool failed = false;
    // the 1x3 pass needs only the same row of t: each output row is made from a row buffer that stays in cache
#pragma omp parallel num_threads(nt)
    {
        FlushDenormals ftz;  // each OpenMP thread has its own MXCSR
        std::vector<float> t;
        try {
            t.resize(static_cast<size_t>(row));
        } catch (...) {
#pragma omp atomic write
            failed = true;
        }
        {
#pragma omp for schedule(static)
            for (i64 r = 0; r < rows; ++r) {
                if (t.empty()) continue;  // every thread must reach the loop; the call then reports the failure
                const i64 y = r % h;
                const float* img = x + (r - y) * row;
                vertical_row(y - d1 >= 0 ? img + (y - d1) * row : nullptr, img + y * row,
                             y + d1 < h ? img + (y + d1) * row : nullptr, t.data(), w, c, w1, b1, a1);
                horizontal_row(t.data(), out + r * row, w, c, d2, w2, b2, a2, rs ? rs + r * c : nullptr);
            }
        }
    }
    if (failed) return 5;
    if (sums) {
        for (i64 b = 0; b < batch; ++b) {
            float* s = sums + b * c;
            std::fill(s, s + c, 0.0f);
            for (i64 y = 0; y < h; ++y) {
                const float* p = rs + (b * h + y) * c;
                for (i64 ch = 0; ch < c; ++ch) s[ch] += p[ch];
            }
        }
    }
    return 0;
}

// EDAB's merge: y = PReLU_a(scale * (f + e[b] * t1 + t2 + gamma * att) + shift): the sum of the block's three paths
// (ECA weights e (batch, c); DDA's output t2 + gamma * att with its attention att unscaled), then bn_prelu_out in
// eval mode. f, t1, t2, att, y (batch, h*w, c) contiguous; params (3, c): scale, shift, a.
int ecmnet_edab_merge(const float* f, const float* t1, const float* e, const float* t2, const float* att, float gamma,
                      float* y, i64 batch, i64 pixels, i64 c, const float* params, int threads) {
    if (batch < 1 || pixels < 1 || c < 1) return 1;
    if (!f || !t1 || !e || !t2 || !att || !y || !params) return 2;
    const float *scale = params, *shift = params + c, *a = params + 2 * c;
    const i64 n = batch * pixels;
    const vf g = splat(gamma);
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
    for (i64 p = 0; p < n; ++p) {
        const float* eb = e + (p / pixels) * c;
        const i64 o = p * c;
        i64 ch = 0;
        for (; ch + VL <= c; ch += VL) {
            const vf sum = loadv(f + o + ch) + loadv(eb + ch) * loadv(t1 + o + ch) + loadv(t2 + o + ch)
                           + g * loadv(att + o + ch);
            storev(y + o + ch, prelu(loadv(scale + ch) * sum + loadv(shift + ch), loadv(a + ch)));
        }
        for (; ch < c; ++ch) {
            const float sum = f[o + ch] + eb[ch] * t1[o + ch] + t2[o + ch] + gamma * att[o + ch];
            y[o + ch] = prelu1(scale[ch] * sum + shift[ch], a[ch]);
        }
    }
    return 0;
}

// EDAB's end: z = channel_shuffle(u + v, groups) for (n, c) pixel-major tensors; with k = c / groups, output channel
// j * groups + i takes input channel i * k + j (ShuffleNet's view-transpose-reshape).
int ecmnet_add_shuffle(const float* __restrict u, const float* __restrict v, float* __restrict z, i64 n, i64 c,
                       i64 groups, int threads) {
    if (n < 1 || c < 1 || groups < 1 || c % groups) return 1;
    if (!u || !v || !z) return 2;
    const i64 k = c / groups;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
    for (i64 p = 0; p < n; ++p) {
        const float* __restrict up = u + p * c;
        const float* __restrict vp = v + p * c;
        float* __restrict zp = z + p * c;
        if (k == 2) {  // EDAB: groups = c / 2, evens then odds (a loop GCC vectorises with permutes)
            for (i64 i = 0; i < groups; ++i) zp[i] = up[2 * i] + vp[2 * i];
            for (i64 i = 0; i < groups; ++i) zp[groups + i] = up[2 * i + 1] + vp[2 * i + 1];
            continue;
        }
        for (i64 j = 0; j < k; ++j) {
            for (i64 i = 0; i < groups; ++i) zp[j * groups + i] = up[i * k + j] + vp[i * k + j];
        }
    }
    return 0;
}

// BatchNorm (eval) + PReLU: y = PReLU_a(scale * x + shift) for (n, c) pixel-major tensors; params (3, c).
int ecmnet_affine_prelu(const float* x, float* y, i64 n, i64 c, const float* params, int threads) {
    if (n < 1 || c < 1) return 1;
    if (!x || !y || !params) return 2;
    const float *scale = params, *shift = params + c, *a = params + 2 * c;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
    for (i64 p = 0; p < n; ++p) {
        const i64 o = p * c;
        i64 ch = 0;
        for (; ch + VL <= c; ch += VL) {
            storev(y + o + ch, prelu(loadv(scale + ch) * loadv(x + o + ch) + loadv(shift + ch), loadv(a + ch)));
        }
        for (; ch < c; ++ch) y[o + ch] = prelu1(scale[ch] * x[o + ch] + shift[ch], a[ch]);
    }
    return 0;
}

}  // extern "C"
