// Training-mode BatchNorm2d followed by a per-channel PReLU, forward and backward, fp32, channels-last, behind a
// plain C ABI: the fused training path of BNPReLU (ecmnet_core/ops/bn_prelu_cpu.py).
//
// PyTorch runs the pair as four kernels (batch_norm, prelu and their backwards), each a full pass or two over the
// activation, and its PReLU backward reduces the weight gradient slowly on channels-last tensors. Here each
// direction is two passes over (M, C) rows, M = batch * h * w, with per-thread channel partial sums.
//
// Forward, per channel c, over the M rows:
//     mean, var (biased) of x;  s = gamma * rsqrt(var + eps);  t = beta - mean * s
//     z = x * s + t;  out = z > 0 ? z : a * z
// Backward, with g = dout * (z > 0 ? 1 : a), xhat = (x - mean) * invstd:
//     da = sum dout * min(z, 0);  dbeta = sum g;  dgamma = sum g * xhat
//     dx = gamma * invstd * (g - dbeta / M - xhat * dgamma / M)
// Sums are accumulated in float over blocks of ROWS rows, then in double, so long maps keep their precision; the
// forward statistics use the shifted-data formula (shift = the first row), which avoids E[x^2] - E[x]^2 cancellation.

#include <algorithm>
#include <cmath>
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
constexpr i64 ROWS = 64;  // rows per float partial sum
constexpr i64 C_MAX = 4096;

// Rows [lo, hi) of thread t of n.
inline void split(i64 m, int t, int n, i64& lo, i64& hi) {
    const i64 blocks = (m + ROWS - 1) / ROWS;
    lo = std::min(m, blocks * t / n * ROWS);
    hi = std::min(m, blocks * (t + 1) / n * ROWS);
}

// Channels are walked in native vectors of VL lanes (ecmnet_simd.h), the last c % VL channels one by one. The PReLU
// select is a vector blend: written as a scalar branch it neither vectorises nor predicts (activations change sign
// at random), which made this kernel about 20 times slower than its memory traffic.
// Per-channel sums of (x - shift) and its square over rows [r0, r1), added to f1, f2. Channel-vector outer, rows
// inner: the sums stay in registers (two rows at a time, for two independent add chains) and a block of rows is
// read from L1 after its first vector.
void moments(const float* __restrict__ x, const float* __restrict__ shift, float* __restrict__ f1,
             float* __restrict__ f2, i64 r0, i64 r1, i64 c) {
    i64 j = 0;
    for (; j + VL <= c; j += VL) {
        const vf sh = vload(shift + j);
        vf a1 = vf{}, a2 = vf{}, b1 = vf{}, b2 = vf{};
        i64 r = r0;
        for (; r + 1 < r1; r += 2) {
            const vf d0 = vload(x + r * c + j) - sh, d1 = vload(x + (r + 1) * c + j) - sh;
            a1 += d0;
            a2 += d0 * d0;
            b1 += d1;
            b2 += d1 * d1;
        }
        if (r < r1) {
            const vf d0 = vload(x + r * c + j) - sh;
            a1 += d0;
            a2 += d0 * d0;
        }
        vstore(f1 + j, vload(f1 + j) + a1 + b1);
        vstore(f2 + j, vload(f2 + j) + a2 + b2);
    }
    for (; j < c; ++j) {
        float a1 = 0.0f, a2 = 0.0f;
        for (i64 r = r0; r < r1; ++r) {
            const float d = x[r * c + j] - shift[j];
            a1 += d;
            a2 += d * d;
        }
        f1[j] += a1;
        f2[j] += a2;
    }
}

// out = prelu(x * s + b) over rows [r0, r1).
void affine_prelu(const float* __restrict__ x, const float* __restrict__ s, const float* __restrict__ b,
                  const float* __restrict__ a, float* __restrict__ out, i64 r0, i64 r1, i64 c) {
    for (i64 r = r0; r < r1; ++r) {
        const float* __restrict__ row = x + r * c;
        float* __restrict__ o = out + r * c;
        i64 j = 0;
        for (; j + VL <= c; j += VL) {
            const vf z = vload(row + j) * vload(s + j) + vload(b + j);
            vstore(o + j, z > 0.0f ? z : z * vload(a + j));
        }
        for (; j < c; ++j) {
            const float z = row[j] * s[j] + b[j];
            o[j] = z * (z > 0.0f ? 1.0f : a[j]);
        }
    }
}

// Backward sums over rows [r0, r1): fg += g, fgx += g * (x - mean), fa += dout * min(z, 0).
void grad_sums(const float* __restrict__ x, const float* __restrict__ dout, const float* __restrict__ s,
               const float* __restrict__ b, const float* __restrict__ a, const float* __restrict__ mean,
               float* __restrict__ fg, float* __restrict__ fgx, float* __restrict__ fa, i64 r0, i64 r1, i64 c) {
    i64 j = 0;
    for (; j + VL <= c; j += VL) {
        const vf sv = vload(s + j), bv = vload(b + j), av = vload(a + j), mv = vload(mean + j);
        vf ag = vf{}, agx = vf{}, aa = vf{};
        for (i64 r = r0; r < r1; ++r) {
            const vf xv = vload(x + r * c + j), dy = vload(dout + r * c + j);
            const vf z = xv * sv + bv;
            const vf neg = z > 0.0f ? vf{} : dy;  // dout where z <= 0
            ag += dy + neg * (av - 1.0f);          // g = dout * (z > 0 ? 1 : a)
            agx += (dy + neg * (av - 1.0f)) * (xv - mv);
            aa += neg * z;
        }
        vstore(fg + j, vload(fg + j) + ag);
        vstore(fgx + j, vload(fgx + j) + agx);
        vstore(fa + j, vload(fa + j) + aa);
    }
    for (; j < c; ++j) {
        float ag = 0.0f, agx = 0.0f, aa = 0.0f;
        for (i64 r = r0; r < r1; ++r) {
            const float xv = x[r * c + j], dy = dout[r * c + j];
            const float z = xv * s[j] + b[j];
            const float neg = z > 0.0f ? 0.0f : dy;
            const float g = dy + neg * (a[j] - 1.0f);
            ag += g;
            agx += g * (xv - mean[j]);
            aa += neg * z;
        }
        fg[j] += ag;
        fgx[j] += agx;
        fa[j] += aa;
    }
}

// dx = s * g - k1 - k2 * (x - mean) over rows [r0, r1).
void grad_input(const float* __restrict__ x, const float* __restrict__ dout, const float* __restrict__ s,
                const float* __restrict__ b, const float* __restrict__ a, const float* __restrict__ mean,
                const float* __restrict__ k1, const float* __restrict__ k2, float* __restrict__ dx, i64 r0, i64 r1,
                i64 c) {
    for (i64 r = r0; r < r1; ++r) {
        const float* __restrict__ row = x + r * c;
        const float* __restrict__ dy = dout + r * c;
        float* __restrict__ o = dx + r * c;
        i64 j = 0;
        for (; j + VL <= c; j += VL) {
            const vf xv = vload(row + j), d = vload(dy + j);
            const vf z = xv * vload(s + j) + vload(b + j);
            const vf g = z > 0.0f ? d : d * vload(a + j);
            vstore(o + j, vload(s + j) * g - vload(k1 + j) - vload(k2 + j) * (xv - vload(mean + j)));
        }
        for (; j < c; ++j) {
            const float z = row[j] * s[j] + b[j];
            const float g = dy[j] * (z > 0.0f ? 1.0f : a[j]);
            o[j] = s[j] * g - k1[j] - k2[j] * (row[j] - mean[j]);
        }
    }
}

// Per-channel sums of K quantities over all m rows, into total (K * c doubles): each thread accumulates blocks of
// ROWS rows in float (accumulate(r0, r1, f) adds rows [r0, r1) to f[0 .. K * c)), flushed into double partials.
// False when memory runs out.
template <int K, class F>
bool channel_sums(int team, i64 m, i64 c, F&& accumulate, std::vector<double>& total) {
    const i64 kc = K * c;
    std::vector<double> part;
    try {
        part.assign(static_cast<size_t>(team * kc), 0.0);
        total.assign(static_cast<size_t>(kc), 0.0);
    } catch (...) {
        return false;
    }
    int used = team;
    parallel(team, [&](int t, int n) {
        if (t == 0) used = n;
        i64 lo, hi;
        split(m, t, n, lo, hi);
        double* p = part.data() + t * kc;
        std::vector<float> f(static_cast<size_t>(kc));
        for (i64 r0 = lo; r0 < hi; r0 += ROWS) {
            std::fill(f.begin(), f.end(), 0.0f);
            accumulate(r0, std::min(hi, r0 + ROWS), f.data());
            for (i64 j = 0; j < kc; ++j) p[j] += f[j];
        }
    });
    for (int t = 0; t < used; ++t)
        for (i64 j = 0; j < kc; ++j) total[j] += part[t * kc + j];
    return true;
}

}  // namespace

extern "C" {

int ecmnet_bnp_abi_version() {
    return ABI_VERSION;
}

// x, out: (m, c) contiguous. gamma, beta, a: (c). mean_out, var_out (biased), invstd_out: (c), written.
// Returns 0, or 1 for invalid sizes, 2 for a null pointer, 5 when memory runs out.
int ecmnet_bn_prelu_forward(const float* x, const float* gamma, const float* beta, const float* a, float* out,
                            float* mean_out, float* var_out, float* invstd_out, int64_t m, int64_t c, float eps,
                            int threads) {
    if (m < 1 || c < 1 || c > C_MAX) return 1;
    if (!x || !gamma || !beta || !a || !out || !mean_out || !var_out || !invstd_out) return 2;
    const int team = team_size(threads, m * c);
    const float* shift = x;  // first row
    std::vector<double> sums;
    if (!channel_sums<2>(team, m, c, [&](i64 r0, i64 r1, float* f) { moments(x, shift, f, f + c, r0, r1, c); },
                         sums))
        return 5;
    std::vector<float> s(static_cast<size_t>(c)), b(static_cast<size_t>(c));
    for (i64 j = 0; j < c; ++j) {
        const double dm = sums[j] / static_cast<double>(m);
        const double var = std::max(0.0, sums[c + j] / static_cast<double>(m) - dm * dm);
        const double mean = shift[j] + dm;
        const double invstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
        mean_out[j] = static_cast<float>(mean);
        var_out[j] = static_cast<float>(var);
        invstd_out[j] = static_cast<float>(invstd);
        s[j] = static_cast<float>(gamma[j] * invstd);
        b[j] = static_cast<float>(beta[j] - mean * gamma[j] * invstd);
    }
    const float* sp = s.data();
    const float* bp = b.data();
    parallel(team, [&](int t, int n) {
        i64 lo, hi;
        split(m, t, n, lo, hi);
        affine_prelu(x, sp, bp, a, out, lo, hi, c);
    });
    return 0;
}

// dout, x, dx: (m, c) contiguous. mean, invstd (from the forward), gamma, beta, a: (c).
// dgamma, dbeta, da: (c), written. dx may be null (input needs no gradient).
int ecmnet_bn_prelu_backward(const float* dout, const float* x, const float* mean, const float* invstd,
                             const float* gamma, const float* beta, const float* a, float* dx, float* dgamma,
                             float* dbeta, float* da, int64_t m, int64_t c, int threads) {
    if (m < 1 || c < 1 || c > C_MAX) return 1;
    if (!dout || !x || !mean || !invstd || !gamma || !beta || !a || !dgamma || !dbeta || !da) return 2;
    const int team = team_size(threads, m * c);
    std::vector<float> s(static_cast<size_t>(c)), b(static_cast<size_t>(c));
    for (i64 j = 0; j < c; ++j) {
        s[j] = gamma[j] * invstd[j];
        b[j] = beta[j] - mean[j] * s[j];
    }
    const float* sp = s.data();
    const float* bp = b.data();
    std::vector<double> sums;  // g, g * (x - mean), dout * min(z, 0)
    if (!channel_sums<3>(team, m, c, [&](i64 r0, i64 r1, float* f) {
            grad_sums(x, dout, sp, bp, a, mean, f, f + c, f + 2 * c, r0, r1, c);
        }, sums))
        return 5;
    std::vector<float> k1(static_cast<size_t>(c)), k2(static_cast<size_t>(c));
    for (i64 j = 0; j < c; ++j) {
        const double sg = sums[j], sa = sums[2 * c + j];
        double sgx = sums[c + j];
        sgx *= invstd[j];  // sum g * xhat
        dgamma[j] = static_cast<float>(sgx);
        dbeta[j] = static_cast<float>(sg);
        da[j] = static_cast<float>(sa);
        // dx = s * g - s * (sg / m) - s * invstd * (sgx / m) * (x - mean)
        k1[j] = static_cast<float>(gamma[j] * invstd[j] * sg / static_cast<double>(m));
        k2[j] = static_cast<float>(gamma[j] * invstd[j] * invstd[j] * sgx / static_cast<double>(m));
    }
    if (!dx) return 0;
    const float* k1p = k1.data();
    const float* k2p = k2.data();
    parallel(team, [&](int t, int n) {
        i64 lo, hi;
        split(m, t, n, lo, hi);
        grad_input(x, dout, sp, bp, a, mean, k1p, k2p, dx, lo, hi, c);
    });
    return 0;
}

}  // extern "C"
