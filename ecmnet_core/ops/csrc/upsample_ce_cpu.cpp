// Bilinear upsampling (align_corners=False) of class logits followed by the weighted, ignore-aware cross-entropy,
// forward and backward, fp32, channels-last, behind a plain C ABI: the training loss of the fast path
// (ecmnet_core/ops/upsample_ce_cpu.py).
//
// The model's classifier runs at 1/2 resolution; upsampling its K logits to the label size and then taking
// PyTorch's cross-entropy creates, keeps and walks several full-resolution (B, K, H, W) tensors (upsampled logits,
// log-probabilities, their gradients, the zero-filled upsampling gradient): about a tenth of a CPU training step at
// 360x480. Here each full-resolution pixel's logits are interpolated in registers, its loss (or its gradient) is
// taken and, in the backward, scattered straight back to the four low-resolution pixels it came from. Nothing of
// full resolution is stored.
//
// Per label pixel (y, x) with class t != ignore, source coordinates as PyTorch's upsample_bilinear2d computes them
// for an output size (scale = in / out, src = max(scale * (dst + 0.5) - 0.5, 0)):
//     z = bilinear(logits)(y, x);  loss += w[t] * (logsumexp(z) - z[t]);  wsum += w[t]
//     dz = g * w[t] * (softmax(z) - onehot(t)) with g = dloss / wsum, then dlogits += bilinear^T dz
// Logits are copied into rows zero-padded to a multiple of the vector width, so every class operation is a few
// native vectors (ecmnet_simd.h); the padding lanes are masked out of the softmax. Threads split the batch (images are independent, so the
// scatter of the backward needs no atomics).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ecmnet_parallel.h"
#include "ecmnet_simd.h"

namespace {

using namespace ecmnet_simd;  // VL, vf, vi, vload, vstore, splat, vexp2, LOG2E, FlushDenormals
using ecmnet_parallel::parallel;

constexpr int ABI_VERSION = 1;
constexpr i64 K_MAX = 256;
constexpr float LN2 = 0.693147180559945309f;

// One axis of the interpolation: source rows i0, i1 and weights l0, l1 for each destination index.
struct Axis {
    std::vector<i64> i0, i1;
    std::vector<float> l0, l1;

    Axis(i64 in, i64 out) : i0(out), i1(out), l0(out), l1(out) {
        const float scale = static_cast<float>(in) / static_cast<float>(out);
        for (i64 d = 0; d < out; ++d) {
            float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
            src = src < 0.0f ? 0.0f : src;
            const i64 a = std::min<i64>(static_cast<i64>(src), in - 1);
            i0[d] = a;
            i1[d] = a < in - 1 ? a + 1 : a;
            l1[d] = src - static_cast<float>(a);
            l0[d] = 1.0f - l1[d];
        }
    }
};

struct Problem {
    const float* logits;  // (b, h, w, k)
    const int64_t* target;  // (b, oh, ow)
    const float* weight;  // (k) or null
    i64 b, k, h, w, oh, ow, ignore;
    i64 kp() const { return (k + VL - 1) / VL * VL; }
};

int batch_team(int threads, const Problem& pr) {  // images are the unit of work
    return static_cast<int>(std::max<i64>(1, std::min<i64>(std::max(threads, 1), pr.b)));
}

// Image n's logits into (h * w, kp) rows, zero padding.
void pad_rows(const Problem& pr, i64 n, float* rows) {
    const i64 kp = pr.kp(), hw = pr.h * pr.w;
    const float* src = pr.logits + n * hw * pr.k;
    for (i64 p = 0; p < hw; ++p) {
        std::memcpy(rows + p * kp, src + p * pr.k, static_cast<size_t>(pr.k) * sizeof(float));
        for (i64 j = pr.k; j < kp; ++j) rows[p * kp + j] = 0.0f;
    }
}

// The four low-resolution pixels output pixel (y, x) interpolates (row offsets into the padded rows; at the borders
// some coincide) and their bilinear weights.
struct Corners {
    i64 at[4];
    float wt[4];
};

inline Corners corners(const Axis& ay, const Axis& ax, i64 y, i64 x, i64 w, i64 kp) {
    return {{(ay.i0[y] * w + ax.i0[x]) * kp, (ay.i0[y] * w + ax.i1[x]) * kp, (ay.i1[y] * w + ax.i0[x]) * kp,
             (ay.i1[y] * w + ax.i1[x]) * kp},
            {ay.l0[y] * ax.l0[x], ay.l0[y] * ax.l1[x], ay.l1[y] * ax.l0[x], ay.l1[y] * ax.l1[x]}};
}

// z (kp floats) = the interpolated logits at the pixel of cn.
inline void interpolate(const float* rows, const Corners& cn, i64 kp, float* z) {
    const float *r0 = rows + cn.at[0], *r1 = rows + cn.at[1], *r2 = rows + cn.at[2], *r3 = rows + cn.at[3];
    for (i64 j = 0; j < kp; j += VL)
        vstore(z + j, vload(r0 + j) * cn.wt[0] + vload(r1 + j) * cn.wt[1] + vload(r2 + j) * cn.wt[2] +
                          vload(r3 + j) * cn.wt[3]);
}

// softmax numerators exp(z - max) of the k classes into e (padding lanes 0); returns their sum, sets zmax.
inline float exp_shifted(const float* z, i64 k, i64 kp, float* e, float& zmax) {
    vf iota;
    for (i64 l = 0; l < VL; ++l) iota[l] = static_cast<float>(l);
    vf m = splat(-INFINITY);
    for (i64 j = 0; j < kp; j += VL) {
        const vi valid = iota + static_cast<float>(j) < static_cast<float>(k);
        const vf v = vload(z + j);
        m = valid && v > m ? v : m;
    }
    zmax = m[0];
    for (i64 l = 1; l < VL; ++l) zmax = std::max(zmax, m[l]);
    vf sum{};
    for (i64 j = 0; j < kp; j += VL) {
        const vi valid = iota + static_cast<float>(j) < static_cast<float>(k);
        vf x = vexp2((vload(z + j) - zmax) * LOG2E);
        x = valid ? x : vf{};
        vstore(e + j, x);
        sum += x;
    }
    float total = 0.0f;
    for (i64 l = 0; l < VL; ++l) total += sum[l];
    return total;
}

// For every counted pixel x of output row y (label tg[y * ow + x] neither ignored nor out of range): its logits
// interpolated into z, their softmax numerators into e, then f(cls, corners, zmax, sum of e).
template <class F>
void for_counted_pixels(const Problem& pr, const int64_t* tg, const float* rows, const Axis& ay, const Axis& ax,
                        i64 y, float* z, float* e, F&& f) {
    const i64 kp = pr.kp();
    for (i64 x = 0; x < pr.ow; ++x) {
        const int64_t cls = tg[y * pr.ow + x];
        if (cls == pr.ignore || cls < 0 || cls >= pr.k) continue;
        const Corners cn = corners(ay, ax, y, x, pr.w, kp);
        interpolate(rows, cn, kp, z);
        float zmax;
        const float total = exp_shifted(z, pr.k, kp, e, zmax);
        f(cls, cn, zmax, total);
    }
}

}  // namespace

extern "C" {

int ecmnet_uce_abi_version() {
    return ABI_VERSION;
}

static int check(const Problem& pr) {
    if (pr.b < 1 || pr.k < 1 || pr.k > K_MAX || pr.h < 1 || pr.w < 1 || pr.oh < 1 || pr.ow < 1) return 1;
    if (!pr.logits || !pr.target) return 2;
    return 0;
}

// logits: (b, h, w, k) contiguous; target: (b, oh, ow) int64; weight: (k) or null (all 1). Writes the summed
// weighted loss and the summed weight of the counted pixels (sums[0], sums[1]); labels outside [0, k) other than
// ignore are skipped (the caller checks them first). Returns 0, 1 for invalid sizes, 2 for a null pointer, 5 when
// memory runs out.
int ecmnet_upsample_ce_forward(const float* logits, const int64_t* target, const float* weight, double* sums,
                               int64_t b, int64_t k, int64_t h, int64_t w, int64_t oh, int64_t ow, int64_t ignore,
                               int threads) {
    const Problem pr{logits, target, weight, b, k, h, w, oh, ow, ignore};
    if (const int bad = check(pr)) return bad;
    if (!sums) return 2;
    const int team = batch_team(threads, pr);
    std::vector<double> part(static_cast<size_t>(2 * team), 0.0);
    std::atomic<bool> failed{false};
    const Axis ay(h, oh), ax(w, ow);
    const i64 kp = pr.kp();
    parallel(team, [&](int t, int n) {
        FlushDenormals ftz;
        std::vector<float> rows, z(static_cast<size_t>(kp)), e(static_cast<size_t>(kp));
        try {
            rows.resize(static_cast<size_t>(h * w * kp));
        } catch (...) {
            failed = true;
            return;
        }
        double loss = 0.0, wsum = 0.0;
        for (i64 img = b * t / n; img < b * (t + 1) / n; ++img) {
            pad_rows(pr, img, rows.data());
            const int64_t* tg = target + img * oh * ow;
            for (i64 y = 0; y < oh; ++y) {
                float row_loss = 0.0f, row_w = 0.0f;
                for_counted_pixels(pr, tg, rows.data(), ay, ax, y, z.data(), e.data(),
                                   [&](int64_t cls, const Corners&, float zmax, float total) {
                                       const float wt = weight ? weight[cls] : 1.0f;
                                       row_loss += wt * (zmax + std::log(total) - z[cls]);
                                       row_w += wt;
                                   });
                loss += row_loss;
                wsum += row_w;
            }
        }
        part[2 * t] = loss;
        part[2 * t + 1] = wsum;
    });
    if (failed) return 5;
    sums[0] = sums[1] = 0.0;
    for (int t = 0; t < team; ++t) {
        sums[0] += part[2 * t];
        sums[1] += part[2 * t + 1];
    }
    return 0;
}

// dlogits (b, h, w, k) = d(g * sum loss) / d logits, i.e. g = dloss / wsum for the mean. Returns as the forward.
int ecmnet_upsample_ce_backward(const float* logits, const int64_t* target, const float* weight, float* dlogits,
                                float g, int64_t b, int64_t k, int64_t h, int64_t w, int64_t oh, int64_t ow,
                                int64_t ignore, int threads) {
    const Problem pr{logits, target, weight, b, k, h, w, oh, ow, ignore};
    if (const int bad = check(pr)) return bad;
    if (!dlogits) return 2;
    const int team = batch_team(threads, pr);
    std::atomic<bool> failed{false};
    const Axis ay(h, oh), ax(w, ow);
    const i64 kp = pr.kp();
    parallel(team, [&](int t, int n) {
        FlushDenormals ftz;
        std::vector<float> rows, grad, z(static_cast<size_t>(kp)), e(static_cast<size_t>(kp));
        try {
            rows.resize(static_cast<size_t>(h * w * kp));
            grad.resize(static_cast<size_t>(h * w * kp));
        } catch (...) {
            failed = true;
            return;
        }
        for (i64 img = b * t / n; img < b * (t + 1) / n; ++img) {
            pad_rows(pr, img, rows.data());
            std::fill(grad.begin(), grad.end(), 0.0f);
            const int64_t* tg = target + img * oh * ow;
            for (i64 y = 0; y < oh; ++y) {
                for_counted_pixels(pr, tg, rows.data(), ay, ax, y, z.data(), e.data(),
                                   [&](int64_t cls, const Corners& cn, float, float total) {
                    // dz = c * (e / total - onehot), c = g * w[cls]; padding lanes of e are 0
                    const float cs = g * (weight ? weight[cls] : 1.0f) / total;
                    e[cls] -= total;  // e / total - 1 at the target, before scaling
                    for (i64 j = 0; j < kp; j += VL) {
                        const vf dz = vload(e.data() + j) * cs;
                        // the four corners may coincide at the borders: update them one after another
                        for (int q = 0; q < 4; ++q) {
                            float* d = grad.data() + cn.at[q] + j;
                            vstore(d, vload(d) + dz * cn.wt[q]);
                        }
                    }
                });
            }
            float* dst = dlogits + img * h * w * k;
            for (i64 p = 0; p < h * w; ++p)
                std::memcpy(dst + p * k, grad.data() + p * kp, static_cast<size_t>(k) * sizeof(float));
        }
    });
    return failed ? 5 : 0;
}

}  // extern "C"
