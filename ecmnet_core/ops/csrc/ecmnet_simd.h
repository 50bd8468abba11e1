// Shared by the compiled CPU kernels: the native vector width and vector types (GCC/Clang vector extensions),
// unaligned loads and stores, a broadcast, a vectorised 2^x and denormal flushing. Header-only; the
// loader (ecmnet_core/ops/cbuild.py) hashes this file with each kernel source, so a change here rebuilds both.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define ECMNET_X86 1
#endif

namespace ecmnet_simd {

using i64 = int64_t;

// Lanes of one native vector register. A wider vector type than the hardware has would be split by the compiler,
// and GCC splits selects (?:) on such types into scalar code.
#if defined(__AVX512F__)
constexpr i64 VL = 16;
#elif defined(__AVX__)
constexpr i64 VL = 8;
#else
constexpr i64 VL = 4;  // SSE2, NEON and anything else with 128-bit vectors (or none)
#endif

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

// Unaligned vector load and store (each compiles to one vector move).
inline vf vload(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(vf));
    return v;
}

inline void vstore(float* p, vf v) {
    std::memcpy(p, &v, sizeof(vf));
}

// Broadcast. `vf{} + x` would cost an extra scalar add (0 + -0 is +0, so it cannot be folded); x - 0 == x for every
// x, so this folds into a single broadcast.
inline vf splat(float x) {
    return x - vf{};
}

// 2^x: x = k + f with integer k and |f| <= 1/2; 2^f by Cephes' exp2f polynomial (relative error ~1e-7), 2^k by
// building the exponent bits. Clamping keeps 2^k a normal float (2^-126 ~ 1e-38 stands in for 0).
inline vf vexp2(vf x) {
    x = x > 127.4f ? splat(127.4f) : x;
    x = x < -126.0f ? splat(-126.0f) : x;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer, k in the low bits
    const vf t = x + magic;
    const vf f = x - (t - magic);
    vf p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    vi bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = (bits - 0x4B400000 + 127) << 23;  // bits of t are those of magic plus k
    vf scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

constexpr float LOG2E = 1.44269504088896341f;

// Flushes denormals to zero while alive (decaying states, tiny probabilities would otherwise hit the slow denormal
// path); the caller's mode is restored.
class FlushDenormals {
  public:
    FlushDenormals() {
#ifdef ECMNET_X86
        saved_ = _mm_getcsr();
        _mm_setcsr(saved_ | 0x8040);  // FTZ | DAZ
#endif
    }
    ~FlushDenormals() {
#ifdef ECMNET_X86
        _mm_setcsr(saved_);
#endif
    }
    FlushDenormals(const FlushDenormals&) = delete;
    FlushDenormals& operator=(const FlushDenormals&) = delete;

  private:
    unsigned saved_ = 0;
};

}  // namespace ecmnet_simd
