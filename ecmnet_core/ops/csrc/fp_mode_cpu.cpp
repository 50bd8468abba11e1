// Flush-to-zero and denormals-are-zero for PyTorch's own CPU operators (ecmnet_core/ops/fp_mode_cpu.py).
//
// Weight decay leaves many trained weights denormal (the shipped model: 68,005, a third of the SS2D projections),
// and the products they feed are denormal too. Intel cores take a microcode assist for each denormal operand: a
// (690 x 128) @ (128 x 512) matmul with half its inputs denormal ran 85x slower on a Xeon with AVX-512. Our own
// kernels flush inside their bodies (ecmnet_simd::FlushDenormals); oneDNN's convolutions and MKL's matmuls run with
// the calling thread's mode. MXCSR is per thread and torch.set_flush_denormal sets only the caller's, so this sets
// it on the caller and on every thread of its OpenMP team, which are PyTorch's intra-op threads (one libgomp).

#include <cstdint>

#include "ecmnet_parallel.h"
#include "ecmnet_simd.h"

namespace {
constexpr int ABI_VERSION = 1;
constexpr unsigned FTZ_DAZ = 0x8040;
}  // namespace

extern "C" {

int ecmnet_fp_mode_abi_version() { return ABI_VERSION; }

// FTZ and DAZ on (on != 0) or off on the caller and a team of `threads`; returns the number of threads set, or -1
// where the CPU has no such mode (not x86).
int ecmnet_flush_denormals(int on, int threads) {
#ifdef ECMNET_X86
    int team = 0;
    ecmnet_parallel::parallel(threads < 1 ? 1 : threads, [&](int t, int n) {
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(on ? (csr | FTZ_DAZ) : (csr & ~FTZ_DAZ));
        if (t == 0) team = n;  // every thread of the team runs the body once
    });
    return team;
#else
    (void)on;
    (void)threads;
    return -1;
#endif
}

}  // extern "C"
