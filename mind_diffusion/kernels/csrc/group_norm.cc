// Group normalisation for MindSpore's CPU backend as ops.Custom(func_type="aot")
// operators (mind_diffusion.kernels.group_norm), forward and backward.
//
// For x [N, C, *] split into G groups of C/G channels, with M = (C/G)·S elements
// per (n, g) (S = product of the spatial sizes, 1 for rank-2 input):
//
//   μ_ng = mean of the group,  σ²_ng = biased variance,  r_ng = 1/√(σ²_ng + ε)
//   x̂ = (x − μ_ng) r_ng,   u = γ_c x̂ + β_c                     (group norm)
//   z = u                                                        (plain)
//   z = u (1 + s_nc) + t_nc   with ss [N, 2C] = [s | t]          (ADM's AdaGN)
//   y = z  or  y = SiLU(z) = z / (1 + e^−z)                     (fused activation)
//
// Backward, with g = ∂L/∂z (dy times SiLU'(z) = σ(z)(1 + z(1 − σ(z))) when fused)
// and the per-(n, c) gain k_nc = γ_c (1 + s_nc) (γ_c without ss):
//
//   ∂L/∂x = r (k g − mean_group(k g) − x̂ mean_group(k g x̂))
//   ∂L/∂β_c = Σ_n (1 + s_nc) Σ_S g,   ∂L/∂γ_c = Σ_n (1 + s_nc) Σ_S g x̂
//   ∂L/∂s_nc = Σ_S g u,               ∂L/∂t_nc = Σ_S g
//
// The forward also returns μ and r as float64 [N, G], so the backward uses the
// forward's statistics exactly instead of recomputing them.
//
// Why the statistics are float64 and two-pass: activations entering a norm can
// sit far from zero relative to their spread, and at |μ|/σ ≈ 10³ the one-pass
// E[x²] − E[x]² in float32 has lost every digit of σ².
// Two passes (mean, then Σ(x − μ)²) with float64 accumulators are exact to
// float32 accuracy for any such ratio and cost nothing measurable: the group
// (≤ a few hundred KB) is still in cache for the second pass, and the work is
// bound by memory, not arithmetic. For the same reason x − μ is formed as
// (x − μ_hi) − μ_lo with μ split into two floats: the float32 rounding of μ
// alone would shift x̂ by ulp(μ)/σ.
//
// Work is split over the N·G (n, g) pairs across threads (std::thread: no
// OpenMP runtime to clash with MindSpore's own thread pool); the per-element
// loops are branch-free so that g++ -O3 vectorises them, and the per-thread
// work functions are compiled twice (AVX2 and baseline x86-64; see MD_CLONES),
// the loader picking what the CPU has — so the library needs no -march flag
// and the cached build is safe to share between machines. Reductions use
// `#pragma omp simd reduction` (-fopenmp-simd: the pragma only, no OpenMP
// runtime), which lets g++ split a sum over SIMD lanes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "md_kernel.h"

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MD_CLONES
#endif

using md::is_f32;
bool is_f64(const char* d) { return d != nullptr && (std::strcmp(d, "float64") == 0 || std::strcmp(d, "double") == 0); }

using md::exp_f32;  // e^x to ~1 ulp (md_kernel.h)

// Everything one call works on; ss is null without scale-shift.
struct Job {
  int64_t n, c, g, s;  // batch, channels, groups, spatial size
  const float* x;
  const float* gamma;
  const float* beta;
  const float* ss;     // [N, 2C] scale | shift, or null
  const float* dy;     // backward only
  float eps;
  double* mean;        // [N, G]
  double* rstd;        // [N, G]
  float* y;            // forward: output; backward: ∂L/∂x
  double* sum_g;       // backward scratch [N, C]: Σ_S g
  double* sum_gxhat;   // backward scratch [N, C]: Σ_S g x̂
};

// Number of threads: one per 64K elements (starting a thread costs tens of µs, about
// what a pass over 64K elements takes), at most the CPUs this process may run on
// (MIND_DIFFUSION_NORM_THREADS instead if set), and at most 16.
int threads_for(int64_t tasks, int64_t elements) {
  static const int limit = md::thread_limit("MIND_DIFFUSION_NORM_THREADS");
  const int64_t by_work = std::max<int64_t>(1, elements / 65536);
  return static_cast<int>(std::min<int64_t>({static_cast<int64_t>(limit), tasks, by_work}));
}

// ---------------------------------------------------------------- forward

// SiLU loops run in blocks of kBlock elements, in two passes: z and e^−z into
// buffers, then the division. Measured on an AMD EPYC (Zen 3) with AVX2, one loop
// doing exp, divide and multiply per element ran 3-4x slower than the two passes
// over data still in L1, so the split is worth its extra loads and stores.
constexpr int64_t kBlock = 256;

template <bool SILU>
MD_INLINE void forward_channel(const float* __restrict__ x, float* __restrict__ y, int64_t s, float mu_hi,
                               float mu_lo, float a, float b, float scale1, float shift) {
  if (!SILU) {
    for (int64_t i = 0; i < s; ++i) {
      const float z = ((x[i] - mu_hi) - mu_lo) * a + b;  // γ x̂ + β, with x̂ = (x − μ) r and a = γ r
      y[i] = z * scale1 + shift;                         // AdaGN; scale1 = 1, shift = 0 without it
    }
    return;
  }
  alignas(32) float e[kBlock];
  for (int64_t start = 0; start < s; start += kBlock) {
    const int64_t len = std::min(kBlock, s - start);
    const float* __restrict__ xb = x + start;
    float* __restrict__ yb = y + start;
    for (int64_t i = 0; i < len; ++i) {
      const float z = (((xb[i] - mu_hi) - mu_lo) * a + b) * scale1 + shift;
      yb[i] = z;
      e[i] = exp_f32(-z);
    }
    for (int64_t i = 0; i < len; ++i) yb[i] = yb[i] / (1.0f + e[i]);  // z σ(z)
  }
}

template <bool SILU>
MD_INLINE void forward_groups(const Job& j, int64_t begin, int64_t end) {
  const int64_t cpg = j.c / j.g, m = cpg * j.s;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.g, grp = task % j.g;
    const float* xg = j.x + (n * j.c + grp * cpg) * j.s;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < m; ++i) sum += static_cast<double>(xg[i]);
    const double mu = sum / static_cast<double>(m);
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < m; ++i) {
      const double d = static_cast<double>(xg[i]) - mu;
      sq += d * d;
    }
    const double r = 1.0 / std::sqrt(sq / static_cast<double>(m) + static_cast<double>(j.eps));
    j.mean[task] = mu;
    j.rstd[task] = r;
    const float mu_hi = static_cast<float>(mu), mu_lo = static_cast<float>(mu - static_cast<double>(mu_hi));
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t c = grp * cpg + k;
      const float a = static_cast<float>(static_cast<double>(j.gamma[c]) * r);
      const float scale1 = j.ss ? 1.0f + j.ss[n * 2 * j.c + c] : 1.0f;
      const float shift = j.ss ? j.ss[n * 2 * j.c + j.c + c] : 0.0f;
      forward_channel<SILU>(xg + k * j.s, j.y + (n * j.c + c) * j.s, j.s, mu_hi, mu_lo, a, j.beta[c], scale1, shift);
    }
  }
}

MD_CLONES void forward_plain(const Job& j, int64_t begin, int64_t end) { forward_groups<false>(j, begin, end); }
MD_CLONES void forward_silu(const Job& j, int64_t begin, int64_t end) { forward_groups<true>(j, begin, end); }

// --------------------------------------------------------------- backward

// One channel's g = ∂L/∂z (written to gbuf when SiLU is fused; gbuf is the ∂L/∂x
// output, used as scratch) and its sums Σ g, Σ g (x − μ).
template <bool SILU>
MD_INLINE void backward_sums(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ gbuf,
                             int64_t s, float mu_hi, float mu_lo, float a, float b, float scale1, float shift,
                             double* sum_g, double* sum_gd) {
  double sg = 0.0, sgd = 0.0;
  if (SILU) {
    alignas(32) float e[kBlock];
    for (int64_t start = 0; start < s; start += kBlock) {
      const int64_t len = std::min(kBlock, s - start);
      float* __restrict__ gb = gbuf + start;
      const float* __restrict__ xb = x + start;
      const float* __restrict__ dyb = dy + start;
      for (int64_t i = 0; i < len; ++i) {
        // The forward's z, recomputed (cheaper than storing it), parked in gbuf.
        const float z = (((xb[i] - mu_hi) - mu_lo) * a + b) * scale1 + shift;
        gb[i] = z;
        e[i] = exp_f32(-z);
      }
      for (int64_t i = 0; i < len; ++i) {
        const float z = gb[i], sig = 1.0f / (1.0f + e[i]);
        gb[i] = dyb[i] * (sig * (1.0f + z * (1.0f - sig)));  // SiLU'(z) = σ (1 + z (1 − σ))
      }
    }
  }
  const float* g = SILU ? gbuf : dy;
#pragma omp simd reduction(+ : sg, sgd)
  for (int64_t i = 0; i < s; ++i) {
    const double gi = static_cast<double>(g[i]);
    sg += gi;
    sgd += gi * static_cast<double>((x[i] - mu_hi) - mu_lo);
  }
  *sum_g = sg;
  *sum_gd = sgd;
}

template <bool SILU>
MD_INLINE void backward_groups(const Job& j, int64_t begin, int64_t end) {
  const int64_t cpg = j.c / j.g, m = cpg * j.s;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / j.g, grp = task % j.g;
    const double mu = j.mean[task], r = j.rstd[task];
    const float mu_hi = static_cast<float>(mu), mu_lo = static_cast<float>(mu - static_cast<double>(mu_hi));
    const float* xg = j.x + (n * j.c + grp * cpg) * j.s;
    // Pass 1: per channel Σ g and Σ g x̂, and the group's Σ k g and Σ k g x̂.
    double group_kg = 0.0, group_kgx = 0.0;
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t c = grp * cpg + k, off = (n * j.c + c) * j.s;
      const float a = static_cast<float>(static_cast<double>(j.gamma[c]) * r);
      const float scale1 = j.ss ? 1.0f + j.ss[n * 2 * j.c + c] : 1.0f;
      const float shift = j.ss ? j.ss[n * 2 * j.c + j.c + c] : 0.0f;
      double sg, sgd;
      backward_sums<SILU>(xg + k * j.s, j.dy + off, j.y + off, j.s, mu_hi, mu_lo, a, j.beta[c], scale1, shift, &sg,
                          &sgd);
      const double sgx = sgd * r;
      j.sum_g[n * j.c + c] = sg;
      j.sum_gxhat[n * j.c + c] = sgx;
      const double gain = static_cast<double>(j.gamma[c]) * static_cast<double>(scale1);
      group_kg += gain * sg;
      group_kgx += gain * sgx;
    }
    const double m1 = group_kg / static_cast<double>(m), m2 = group_kgx / static_cast<double>(m);
    // Pass 2: ∂L/∂x = r k g − r m1 − (x − μ) r² m2, per channel as g·c1 + (x − μ)·c2 + c3.
    const float c2 = static_cast<float>(-r * r * m2), c3 = static_cast<float>(-r * m1);
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t c = grp * cpg + k, off = (n * j.c + c) * j.s;
      const float scale1 = j.ss ? 1.0f + j.ss[n * 2 * j.c + c] : 1.0f;
      const float c1 = static_cast<float>(r * static_cast<double>(j.gamma[c]) * static_cast<double>(scale1));
      const float* __restrict__ x = xg + k * j.s;
      float* __restrict__ dx = j.y + off;
      if (SILU) {  // in place: g was parked in dx
        for (int64_t i = 0; i < j.s; ++i) dx[i] = dx[i] * c1 + ((x[i] - mu_hi) - mu_lo) * c2 + c3;
      } else {
        const float* __restrict__ g = j.dy + off;
        for (int64_t i = 0; i < j.s; ++i) dx[i] = g[i] * c1 + ((x[i] - mu_hi) - mu_lo) * c2 + c3;
      }
    }
  }
}

MD_CLONES void backward_plain(const Job& j, int64_t begin, int64_t end) { backward_groups<false>(j, begin, end); }
MD_CLONES void backward_silu(const Job& j, int64_t begin, int64_t end) { backward_groups<true>(j, begin, end); }

// ------------------------------------------------------------- unpacking

// x [N, C, *] float32: fills n, c, s; false when it does not fit.
bool unpack_x(int ndim, const int64_t* shape, const char* dtype, Job* j) {
  if (ndim < 2 || !is_f32(dtype)) return false;
  j->n = shape[0];
  j->c = shape[1];
  j->s = 1;
  for (int d = 2; d < ndim; ++d) j->s *= shape[d];
  return j->c > 0;
}

bool same_shape(int nd_a, const int64_t* a, int nd_b, const int64_t* b) {
  if (nd_a != nd_b) return false;
  for (int d = 0; d < nd_a; ++d) {
    if (a[d] != b[d]) return false;
  }
  return true;
}

bool is_vector(int ndim, const int64_t* shape, const char* dtype, int64_t len) {
  return ndim == 1 && shape[0] == len && is_f32(dtype);
}

// The statistics [N, G] float64; sets g.
bool unpack_stats(int ndim, const int64_t* shape, const char* dtype, Job* j) {
  if (ndim != 2 || shape[0] != j->n || !is_f64(dtype)) return false;
  j->g = shape[1];
  return j->g > 0 && j->c % j->g == 0;
}

bool is_ss(int ndim, const int64_t* shape, const char* dtype, const Job& j) {
  return ndim == 2 && shape[0] == j.n && shape[1] == 2 * j.c && is_f32(dtype);
}

// Forward. Inputs x, γ [C], β [C], (ss [N, 2C],) ε [1]; outputs y (as x), μ and r [N, G] float64.
template <bool SILU, bool SS>
int forward(int nparam, void** p, int* nd, int64_t** sh, const char** dt) {
  constexpr int kIn = SS ? 5 : 4;
  if (nparam != kIn + 3) return 1;
  Job j{};
  if (!unpack_x(nd[0], sh[0], dt[0], &j)) return 1;
  if (!is_vector(nd[1], sh[1], dt[1], j.c) || !is_vector(nd[2], sh[2], dt[2], j.c)) return 1;
  if (SS && !is_ss(nd[3], sh[3], dt[3], j)) return 1;
  if (nd[kIn - 1] != 1 || sh[kIn - 1][0] != 1 || !is_f32(dt[kIn - 1])) return 1;
  if (!same_shape(nd[kIn], sh[kIn], nd[0], sh[0]) || !is_f32(dt[kIn])) return 1;
  if (!unpack_stats(nd[kIn + 1], sh[kIn + 1], dt[kIn + 1], &j)) return 1;
  if (!same_shape(nd[kIn + 2], sh[kIn + 2], nd[kIn + 1], sh[kIn + 1]) || !is_f64(dt[kIn + 2])) return 1;
  j.x = static_cast<const float*>(p[0]);
  j.gamma = static_cast<const float*>(p[1]);
  j.beta = static_cast<const float*>(p[2]);
  j.ss = SS ? static_cast<const float*>(p[3]) : nullptr;
  j.eps = *static_cast<const float*>(p[kIn - 1]);
  j.y = static_cast<float*>(p[kIn]);
  j.mean = static_cast<double*>(p[kIn + 1]);
  j.rstd = static_cast<double*>(p[kIn + 2]);
  if (j.n == 0 || j.s == 0) return 0;
  md::parallel_for(j.n * j.g, threads_for(j.n * j.g, j.n * j.c * j.s), [&j](int64_t b, int64_t e) {
    if (SILU) forward_silu(j, b, e); else forward_plain(j, b, e);
  });
  return 0;
}

// Backward. Inputs x, γ, β, (ss,) μ, r, dy; outputs ∂L/∂x, ∂L/∂γ, ∂L/∂β(, ∂L/∂ss).
template <bool SILU, bool SS>
int backward(int nparam, void** p, int* nd, int64_t** sh, const char** dt) {
  constexpr int kStats = SS ? 4 : 3, kDy = kStats + 2, kOut = kDy + 1;
  if (nparam != kOut + (SS ? 4 : 3)) return 1;
  Job j{};
  if (!unpack_x(nd[0], sh[0], dt[0], &j)) return 1;
  if (!is_vector(nd[1], sh[1], dt[1], j.c) || !is_vector(nd[2], sh[2], dt[2], j.c)) return 1;
  if (SS && !is_ss(nd[3], sh[3], dt[3], j)) return 1;
  if (!unpack_stats(nd[kStats], sh[kStats], dt[kStats], &j)) return 1;
  if (!same_shape(nd[kStats + 1], sh[kStats + 1], nd[kStats], sh[kStats]) || !is_f64(dt[kStats + 1])) return 1;
  if (!same_shape(nd[kDy], sh[kDy], nd[0], sh[0]) || !is_f32(dt[kDy])) return 1;
  if (!same_shape(nd[kOut], sh[kOut], nd[0], sh[0]) || !is_f32(dt[kOut])) return 1;
  if (!is_vector(nd[kOut + 1], sh[kOut + 1], dt[kOut + 1], j.c)) return 1;
  if (!is_vector(nd[kOut + 2], sh[kOut + 2], dt[kOut + 2], j.c)) return 1;
  if (SS && !is_ss(nd[kOut + 3], sh[kOut + 3], dt[kOut + 3], j)) return 1;
  j.x = static_cast<const float*>(p[0]);
  j.gamma = static_cast<const float*>(p[1]);
  j.beta = static_cast<const float*>(p[2]);
  j.ss = SS ? static_cast<const float*>(p[3]) : nullptr;
  j.mean = static_cast<double*>(p[kStats]);
  j.rstd = static_cast<double*>(p[kStats + 1]);
  j.dy = static_cast<const float*>(p[kDy]);
  j.y = static_cast<float*>(p[kOut]);
  float* dgamma = static_cast<float*>(p[kOut + 1]);
  float* dbeta = static_cast<float*>(p[kOut + 2]);
  float* dss = SS ? static_cast<float*>(p[kOut + 3]) : nullptr;
  std::vector<double> sums(2 * static_cast<size_t>(j.n * j.c), 0.0);
  j.sum_g = sums.data();
  j.sum_gxhat = sums.data() + j.n * j.c;
  if (j.s > 0) {
    md::parallel_for(j.n * j.g, threads_for(j.n * j.g, j.n * j.c * j.s), [&j](int64_t b, int64_t e) {
      if (SILU) backward_silu(j, b, e); else backward_plain(j, b, e);
    });
  }
  // ∂L/∂γ, ∂L/∂β (sums over the batch, in float64) and ∂L/∂ss: O(N·C), serial.
  for (int64_t c = 0; c < j.c; ++c) {
    double dg = 0.0, db = 0.0;
    for (int64_t n = 0; n < j.n; ++n) {
      const double sg = j.sum_g[n * j.c + c], sgx = j.sum_gxhat[n * j.c + c];
      const double scale1 = SS ? 1.0 + static_cast<double>(j.ss[n * 2 * j.c + c]) : 1.0;
      dg += scale1 * sgx;
      db += scale1 * sg;
      if (SS) {
        dss[n * 2 * j.c + c] = static_cast<float>(static_cast<double>(j.gamma[c]) * sgx +
                                                  static_cast<double>(j.beta[c]) * sg);  // Σ g u
        dss[n * 2 * j.c + j.c + c] = static_cast<float>(sg);
      }
    }
    dgamma[c] = static_cast<float>(dg);
    dbeta[c] = static_cast<float>(db);
  }
  return 0;
}

}  // namespace

// The entry points MindSpore's aot kernels call: 0 on success, 1 when the shapes or dtypes do not fit.
#define MD_ENTRY(NAME, BODY)                                                                  \
  extern "C" int NAME(int n, void** p, int* nd, int64_t** sh, const char** dt, void*, void*) { \
    return BODY(n, p, nd, sh, dt);                                                            \
  }

MD_ENTRY(md_group_norm_fwd, (forward<false, false>))
MD_ENTRY(md_group_norm_silu_fwd, (forward<true, false>))
MD_ENTRY(md_group_norm_ss_fwd, (forward<false, true>))
MD_ENTRY(md_group_norm_ss_silu_fwd, (forward<true, true>))
MD_ENTRY(md_group_norm_bwd, (backward<false, false>))
MD_ENTRY(md_group_norm_silu_bwd, (backward<true, false>))
MD_ENTRY(md_group_norm_ss_bwd, (backward<false, true>))
MD_ENTRY(md_group_norm_ss_silu_bwd, (backward<true, true>))
