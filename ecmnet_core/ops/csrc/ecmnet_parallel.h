// Shared by the OpenMP-built CPU kernels: a team of threads running one body. Built with -fopenmp (the loader's first
// choice) the team is the process's OpenMP threads, i.e. PyTorch's (same libgomp.so.1 soname), so the kernel does not
// compete with PyTorch's still-spinning workers; otherwise the body runs once, on the caller's thread.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ecmnet_parallel {

// body(t, n) on threads t = 0 .. n - 1 (n <= team).
template <class F>
void parallel(int team, F&& body) {
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
    body(omp_get_thread_num(), omp_get_num_threads());
#else
    (void)team;
    body(0, 1);
#endif
}

// At most `threads`, and one per ~64 k units of work: below that one more thread does not pay for itself.
inline int team_size(int threads, int64_t work) {
    const int64_t by_work = std::max<int64_t>(1, work / (int64_t(1) << 16));
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(threads, 1), by_work)));
}

}  // namespace ecmnet_parallel
