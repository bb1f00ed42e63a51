// What every C++ kernel of mind_diffusion shares: inlining and CPU-clone
// attributes, dtype checks of MindSpore's aot calling convention, and the
// thread split. kernels/aot.py compiles every source with this folder on the
// include path and hashes this header into each library's name, so editing it
// rebuilds them all.
#pragma once

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

// Inlined into its caller, so a function built with CPU clones vectorises its
// whole body for each clone's instruction set.
#define MD_INLINE inline __attribute__((always_inline))

// An extern "C" entry point compiled for AVX-512, AVX2 and baseline x86-64 (or
// the baseline alone elsewhere); the loader picks the best the CPU runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MD_ENTRY_CLONES extern "C" __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MD_ENTRY_CLONES extern "C"
#endif

namespace md {

// MindSpore names dtypes "float32" or "float", "int32" or "int", ...
MD_INLINE bool is_dtype(const char* dtype, const char* name) {
  return dtype != nullptr && std::strcmp(dtype, name) == 0;
}
MD_INLINE bool is_f32(const char* dtype) { return is_dtype(dtype, "float32") || is_dtype(dtype, "float"); }
MD_INLINE bool is_i32(const char* dtype) { return is_dtype(dtype, "int32") || is_dtype(dtype, "int"); }

// e^x in float32 to ~1 ulp, written so that the loops around it vectorise
// (Cody-Waite range reduction x = k ln 2 + r, |r| ≤ ln2 / 2, and Cephes' expf
// polynomial). Arguments are clamped to the normal range [-87.3, 88.37].
MD_INLINE float exp_f32(float x) {
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447505531f ? -87.3365447505531f : x;
  const float shifter = 12582912.0f;  // 1.5 · 2^23: adding and subtracting it rounds to an integer
  const float k = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// The CPUs this process may run on (its affinity mask), or the positive value of
// the environment variable `env` when set; at most 16.
inline int thread_limit(const char* env) {
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  if (const char* value = std::getenv(env)) {
    const int want = std::atoi(value);
    if (want > 0) cpus = want;
  }
  return std::max(1, std::min(cpus, 16));
}

// Runs fn(begin, end) over [0, tasks) in `workers` contiguous chunks, the last on
// this thread (and any chunk whose thread cannot be started: no exception may
// cross extern "C"). Threads are started per call: callers size `workers` so
// that each has enough work to pay for its start (tens of µs).
template <typename F>
void parallel_for(int64_t tasks, int workers, F fn) {
  workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(workers, tasks)));
  if (workers <= 1) {
    fn(int64_t{0}, tasks);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  const int64_t chunk = (tasks + workers - 1) / workers;
  for (int w = 0; w < workers - 1; ++w) {
    const int64_t begin = w * chunk, end = std::min(tasks, begin + chunk);
    if (begin >= end) continue;
    try {
      pool.emplace_back([=] { fn(begin, end); });
    } catch (...) {
      fn(begin, end);
    }
  }
  const int64_t begin = (workers - 1) * chunk;
  if (begin < tasks) fn(begin, tasks);
  for (auto& t : pool) t.join();
}

}  // namespace md
