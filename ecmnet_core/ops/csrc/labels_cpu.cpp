// Logits to labels in one pass, fp32, behind a plain C ABI: the post-processing of every CPU prediction
// (ecmnet_core/ops/labels_cpu.py).
//
// PyTorch's `F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(1)` over (B, K, h, w) logits
// writes the upsampled (B, K, H, W) float tensor, then reduces it along its strided class axis: ~18 ms at 352x480
// on a 2-core Zen 3, longer than the rest of the frame's work around the network. Here each output row's K class
// rows are interpolated into a small buffer (skipped when no resize is needed and the rows are contiguous), then a
// running maximum over the classes, vectorised across the row, gives the label; the calibrated probability of the
// chosen class, 1 / sum_k exp((z_k - z_max) / T), takes one more pass over the same buffer when asked for.
//
// Bit for bit PyTorch's arithmetic (its x86 build contracts to FMAs; checked against torch 2.13 by the tests): per
// axis, src = max(fma(scale, dst + 0.5, -0.5), 0) with scale = in / out in float, i0 = floor(src),
// i1 = min(i0 + 1, in - 1), l1 = src - i0, l0 = 1 - l1 (l0 = 1, l1 = 0 when in == out); per pixel
// r_y = fma(x[y][x0], w0, x[y][x1] * w1) along each source row (once per row) and z = fma(r_y0, h0, r_y1 * h1).
// Ties go to the lowest class id (argmax's first maximum). Explicit std::fma and -ffp-contract=off, so the
// compiler adds no other contraction. Threads split the output rows.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ecmnet_parallel.h"
#include "ecmnet_simd.h"

#pragma STDC FP_CONTRACT OFF  // clang contracts within a statement by default; GCC in ISO mode does not

namespace {

using namespace ecmnet_simd;  // VL, vf, vload, vstore, splat, vexp2, LOG2E, FlushDenormals
using ecmnet_parallel::parallel;

constexpr int ABI_VERSION = 1;
constexpr i64 K_MAX = 255;  // class ids fit a uint8 with 255 left for "unknown"

// One axis of the interpolation, as PyTorch's upsample_bilinear2d (align_corners=False, no scale factor).
struct Axis {
    std::vector<i64> i0, i1;
    std::vector<float> l0, l1;

    Axis(i64 in, i64 out) : i0(out), i1(out), l0(out), l1(out) {
        const float scale = static_cast<float>(in) / static_cast<float>(out);
        for (i64 d = 0; d < out; ++d) {
            if (in == out) {
                i0[d] = i1[d] = d;
                l0[d] = 1.0f;
                l1[d] = 0.0f;
                continue;
            }
            // one rounding for scale * (d + 0.5) - 0.5, as PyTorch's FMA-contracted build computes it
            float src = std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f);
            src = src < 0.0f ? 0.0f : src;
            const i64 a = std::min<i64>(static_cast<i64>(std::floor(src)), in - 1);
            i0[d] = a;
            i1[d] = a < in - 1 ? a + 1 : a;
            l1[d] = std::min(std::max(src - static_cast<float>(a), 0.0f), 1.0f);
            l0[d] = 1.0f - l1[d];
        }
    }
};

struct Problem {
    const float* logits;  // element (n, c, y, x) at n * sn + c * sc + y * sy + x * sx
    i64 b, k, h, w, sn, sc, sy, sx, oh, ow;
    float inv_t;  // 1 / temperature
    float threshold;  // labels of pixels whose probability is below it become `unknown` (0: off)
    uint8_t unknown;
    uint8_t* labels;  // (b, oh, ow)
    float* conf;  // (b, oh, ow) or null
};

// Per-thread buffers: the horizontally interpolated rows of two source rows (K x ow each, tagged with their source
// row), the output row's K class rows, and the running maximum and its class.
struct Work {
    std::vector<float> hrow[2], z, best;
    std::vector<int32_t> arg;
    i64 tag[2] = {-1, -1};
    i64 tag_img[2] = {-1, -1};

    explicit Work(const Problem& pr)
        : z(static_cast<size_t>(pr.k * pr.ow)), best(static_cast<size_t>(pr.ow)), arg(static_cast<size_t>(pr.ow)) {
        hrow[0].resize(static_cast<size_t>(pr.k * pr.ow));
        hrow[1].resize(static_cast<size_t>(pr.k * pr.ow));
    }

    // The horizontally interpolated K rows of source row sy of image n (computed once, kept while it is needed).
    const float* source_row(const Problem& pr, const Axis& ax, i64 n, i64 sy, int prefer) {
        for (int s = 0; s < 2; ++s)
            if (tag[s] == sy && tag_img[s] == n) return hrow[s].data();
        const int s = prefer;
        float* out = hrow[s].data();
        for (i64 c = 0; c < pr.k; ++c) {
            const float* src = pr.logits + n * pr.sn + c * pr.sc + sy * pr.sy;
            float* dst = out + c * pr.ow;
            for (i64 x = 0; x < pr.ow; ++x)
                dst[x] = std::fma(src[ax.i0[x] * pr.sx], ax.l0[x], src[ax.i1[x] * pr.sx] * ax.l1[x]);
        }
        tag[s] = sy;
        tag_img[s] = n;
        return out;
    }
};

// The K class rows of output row y of image n: pointers into `rows` (K pointers), each ow floats with stride 1.
void class_rows(const Problem& pr, const Axis& ay, const Axis& ax, Work& wk, i64 n, i64 y, const float** rows) {
    const bool direct = pr.oh == pr.h && pr.ow == pr.w && pr.sx == 1;
    if (direct) {
        for (i64 c = 0; c < pr.k; ++c) rows[c] = pr.logits + n * pr.sn + c * pr.sc + y * pr.sy;
        return;
    }
    // source rows: y0 in slot 0 unless it is already cached, y1 in the other slot
    const float* r0 = wk.source_row(pr, ax, n, ay.i0[y], 0);
    const int other = r0 == wk.hrow[0].data() ? 1 : 0;
    const float* r1 = wk.source_row(pr, ax, n, ay.i1[y], other);
    const float h0 = ay.l0[y], h1 = ay.l1[y];
    for (i64 c = 0; c < pr.k; ++c) {
        const float* a = r0 + c * pr.ow;
        const float* b = r1 + c * pr.ow;
        float* dst = wk.z.data() + c * pr.ow;
        for (i64 x = 0; x < pr.ow; ++x) dst[x] = std::fma(a[x], h0, b[x] * h1);
        rows[c] = dst;
    }
}

void label_row(const Problem& pr, Work& wk, const float* const* rows, uint8_t* lab, float* conf) {
    const i64 ow = pr.ow;
    float* best = wk.best.data();
    int32_t* arg = wk.arg.data();
    std::memcpy(best, rows[0], static_cast<size_t>(ow) * sizeof(float));
    std::fill(arg, arg + ow, 0);
    for (i64 c = 1; c < pr.k; ++c) {  // strict '>': the first maximum wins, as argmax
        const float* r = rows[c];
        const int32_t cc = static_cast<int32_t>(c);
        for (i64 x = 0; x < ow; ++x) {
            const bool up = r[x] > best[x];
            best[x] = up ? r[x] : best[x];
            arg[x] = up ? cc : arg[x];
        }
    }
    for (i64 x = 0; x < ow; ++x) lab[x] = static_cast<uint8_t>(arg[x]);
    if (!conf && pr.threshold <= 0.0f) return;
    // probability of the chosen class: 1 / sum_k exp((z_k - z_max) / T); sums accumulate in `conf` (or the
    // caller's scratch when only the threshold needs it)
    float* sum = conf;
    std::fill(sum, sum + ow, 0.0f);
    const float scale = pr.inv_t * LOG2E;
    for (i64 c = 0; c < pr.k; ++c) {
        const float* r = rows[c];
        i64 x = 0;
        for (; x + VL <= ow; x += VL)
            vstore(sum + x, vload(sum + x) + vexp2((vload(r + x) - vload(best + x)) * scale));
        for (; x < ow; ++x) {
            vf t = splat((r[x] - best[x]) * scale);
            sum[x] += vexp2(t)[0];
        }
    }
    for (i64 x = 0; x < ow; ++x) sum[x] = 1.0f / sum[x];
    if (pr.threshold > 0.0f)
        for (i64 x = 0; x < ow; ++x)
            if (sum[x] < pr.threshold) lab[x] = pr.unknown;
}

}  // namespace

extern "C" {

int ecmnet_labels_abi_version() {
    return ABI_VERSION;
}

// labels (b, oh, ow) uint8 = argmax over the K classes of the logits bilinearly resampled to oh x ow
// (align_corners=False; no resampling when the sizes agree); conf (b, oh, ow) float32, optional, the probability of
// the chosen class at temperature 1 / inv_t; pixels below `threshold` (> 0) get label `unknown`. Strides are in
// floats, any layout (NCHW, channels-last). Returns 0, 1 for invalid sizes, 2 for a null pointer, 5 when memory
// runs out.
int ecmnet_labels_from_logits(const float* logits, int64_t b, int64_t k, int64_t h, int64_t w, int64_t sn,
                              int64_t sc, int64_t sy, int64_t sx, int64_t oh, int64_t ow, float inv_t,
                              float threshold, int unknown, uint8_t* labels, float* conf, int threads) {
    if (b < 1 || k < 1 || k > K_MAX || h < 1 || w < 1 || oh < 1 || ow < 1 || !(inv_t > 0.0f)) return 1;
    if (unknown < 0 || unknown > 255) return 1;
    if (!logits || !labels) return 2;
    const Problem pr{logits, b, k, h, w, sn, sc, sy, sx, oh, ow, inv_t, threshold,
                     static_cast<uint8_t>(unknown), labels, conf};
    const Axis ay(h, oh), ax(w, ow);
    const i64 rows_total = b * oh;
    const int team = ecmnet_parallel::team_size(threads, rows_total * ow * k);
    std::atomic<bool> failed{false};
    parallel(team, [&](int t, int n) {
        FlushDenormals ftz;
        try {
            Work wk(pr);
            std::vector<const float*> rows(static_cast<size_t>(k));
            std::vector<float> scratch(conf ? 0 : static_cast<size_t>(ow));
            for (i64 r = rows_total * t / n; r < rows_total * (t + 1) / n; ++r) {
                const i64 img = r / oh, y = r % oh;
                class_rows(pr, ay, ax, wk, img, y, rows.data());
                float* cf = conf ? conf + r * ow : (threshold > 0.0f ? scratch.data() : nullptr);
                label_row(pr, wk, rows.data(), labels + r * ow, cf);
            }
        } catch (...) {
            failed = true;
        }
    });
    return failed ? 5 : 0;
}

}  // extern "C"
