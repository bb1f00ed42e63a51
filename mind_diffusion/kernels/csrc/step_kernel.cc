// Fused per-step kernels of the samplers (mind_diffusion.sampling.fused), for
// MindSpore's CPU backend as ops.Custom(func_type="aot") operators.
//
// One call does all the per-pixel work of a step after the network: the
// gather of the step's constants (from a [T, K] float32 table, by t), the
// split of the network output into its mean and variance parts, x̂_0 (clipped
// or not), the posterior mean μ_θ, σ_t and the noise term. It writes x_{t-1}
// and x̂_0. x̂_0 and μ_θ are float32 in the same order as the pure-ops path of
// GaussianDiffusion (and improved-diffusion); σ_t is exp(P + Q·v) with per-step
// P, Q (fused.log_std_line) and an exp accurate to 1 ulp, and DDIM's ε̂ for a
// v-predicting network is (x_t − √ᾱ x̂_0)/√(1 − ᾱ): equal to the pure-ops values
// up to float32 rounding.
//
// Inputs:  x [B, C, ...] f32, model_out [B, C or 2C, ...] f32, noise [B, C, ...]
//          f32, t [B] int32, table [T, K] f32.
// Outputs: x_prev [B, C, ...] f32 and, when the operator declares a second
//          output, pred_xstart [B, C, ...] f32 (a sampling loop that discards
//          x̂_0 declares one output: MindSpore then neither allocates nor
//          returns it, and the kernel does not store it).
// The mode (mean type, variance type, clipping) is in the function's name:
// one extern "C" entry point per supported combination.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "md_kernel.h"

namespace {

// Columns of the DDPM table (see fused.py, ddpm_table). The first two are (a, b) of
// x̂_0 = a x_t − b m for a network output m: (1/√ᾱ, √(1/ᾱ − 1)) for ε and the other
// mean types, (√ᾱ, √(1 − ᾱ)) for v.
// Columns 4-5 give log σ_t = P + Q·v for the network's variance output v (Q = 0 for a fixed Σ).
enum DdpmCol { kA = 0, kB, kCoef1, kCoef2, kLogStdOffset, kLogStdSlope, kMask, kDdpmCols };
// Columns of the DDIM table (see fused.py, ddim_table).
enum DdimCol { kDA = 0, kDB, kDCoef1, kDCoef2, kSqrtAbarPrev, kEpsCoef, kSigmaMask, kDdimCols };

enum Mean { kEpsilon = 0, kStartX = 1, kPreviousX = 2, kVelocity = 3 };
enum Var { kFixedSmall = 0, kFixedLarge = 1, kLearned = 2, kLearnedRange = 3 };

struct Args {
  const float* x;
  const float* out;
  const float* noise;
  const int32_t* t;
  const float* table;
  float* x_prev;
  float* pred;  // nullptr when x̂_0 is not an output
  int64_t batch, channels, spatial, out_channels, steps, cols;
};

// Checks shapes and dtypes and fills Args; false when they do not fit.
bool unpack(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
            int64_t want_cols, bool learned_sigma, Args* a) {
  if (nparam != 6 && nparam != 7) return false;
  for (int i = 0; i < nparam; ++i) {
    if (i != 3 && !md::is_f32(dtypes[i])) return false;
  }
  if (!md::is_i32(dtypes[3])) return false;
  int nd = ndims[0];
  if (nd < 2 || ndims[1] != nd || ndims[2] != nd || ndims[3] != 1 || ndims[4] != 2) return false;
  a->batch = shapes[0][0];
  a->channels = shapes[0][1];
  a->spatial = 1;
  for (int d = 2; d < nd; ++d) a->spatial *= shapes[0][d];
  a->out_channels = shapes[1][1];
  if (shapes[1][0] != a->batch || a->out_channels != (learned_sigma ? 2 : 1) * a->channels) return false;
  for (int d = 2; d < nd; ++d) {
    if (shapes[1][d] != shapes[0][d]) return false;
  }
  for (int i : {2, 5, 6}) {  // noise and the outputs are shaped like x
    if (i >= nparam) break;
    if (ndims[i] != nd) return false;
    for (int d = 0; d < nd; ++d) {
      if (shapes[i][d] != shapes[0][d]) return false;
    }
  }
  if (shapes[3][0] != a->batch) return false;
  a->steps = shapes[4][0];
  a->cols = shapes[4][1];
  if (a->cols != want_cols) return false;
  a->x = static_cast<const float*>(params[0]);
  a->out = static_cast<const float*>(params[1]);
  a->noise = static_cast<const float*>(params[2]);
  a->t = static_cast<const int32_t*>(params[3]);
  a->table = static_cast<const float*>(params[4]);
  a->x_prev = static_cast<float*>(params[5]);
  a->pred = nparam == 7 ? static_cast<float*>(params[6]) : nullptr;
  return true;
}

MD_INLINE float clip(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

using md::exp_f32;

// The step's constants, read once per example.
struct Row {
  float a, b, coef1, coef2, c4, c5, c6;
  explicit Row(const float* c)
      : a(c[0]), b(c[1]), coef1(c[2]), coef2(c[3]), c4(c[4]), c5(c[5]), c6(c[6]) {}
};

// x̂_0 from the mean part of the output, as GaussianDiffusion.p_mean_variance_from_output.
template <int MEAN, bool CLIP>
MD_INLINE float pred_xstart(float x, float m, const Row& c) {
  float p;
  if (MEAN == kEpsilon || MEAN == kVelocity) {
    p = c.a * x - c.b * m;  // (x_t − √(1 − ᾱ) ε̂) / √ᾱ, or √ᾱ x_t − √(1 − ᾱ) v̂
  } else if (MEAN == kStartX) {
    p = m;
  } else {
    p = m / c.coef1 - c.coef2 / c.coef1 * x;
  }
  return CLIP ? clip(p) : p;
}

// x_{t-1} = μ_θ + 1[t>0] σ_t z (Ho et al. 2020, Algorithm 2; improved DDPM's Σ_θ). log σ_t is affine in
// the network's variance output v, P + Q·v, with P and Q per step from the table (fused.py, ddpm_table):
// one multiply-add and one exp per pixel.
template <int MEAN, int VAR, bool CLIP, bool PRED>
MD_INLINE void ddpm_row(const Row& c, int64_t n, const float* __restrict__ xb, const float* __restrict__ mb,
                        const float* __restrict__ vb, const float* __restrict__ zb, float* __restrict__ ob,
                        float* __restrict__ pb) {
  const float log_std_offset = c.c4, log_std_slope = c.c5, mask = c.c6;
  constexpr bool learned_sigma = VAR == kLearned || VAR == kLearnedRange;
  const float fixed_std = learned_sigma ? 0.0f : std::exp(log_std_offset);
  for (int64_t i = 0; i < n; ++i) {
    const float x = xb[i];
    const float p = pred_xstart<MEAN, CLIP>(x, mb[i], c);
    const float mean = MEAN == kPreviousX ? mb[i] : c.coef1 * p + c.coef2 * x;
    const float std = learned_sigma ? exp_f32(log_std_offset + log_std_slope * vb[i]) : fixed_std;
    if (PRED) pb[i] = p;
    ob[i] = mean + mask * std * zb[i];
  }
}

// Runs `rows(c, plane, model output of sample b, offset of sample b)` for each sample b of the batch,
// with the coefficient row of its timestep; 2 when a timestep lies outside the table. The row
// functions are always inlined into each entry point's AVX-512 / AVX2 / baseline clone.
template <typename Rows>
MD_INLINE int for_each_sample(const Args& a, Rows rows) {
  const int64_t plane = a.channels * a.spatial;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int32_t step = a.t[b];
    if (step < 0 || step >= a.steps) return 2;
    rows(Row(a.table + step * a.cols), plane, a.out + b * a.out_channels * a.spatial, b * plane);
  }
  return 0;
}

template <int MEAN, int VAR, bool CLIP>
MD_INLINE int ddpm(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  constexpr bool learned_sigma = VAR == kLearned || VAR == kLearnedRange;
  Args a;
  if (!unpack(nparam, params, ndims, shapes, dtypes, kDdpmCols, learned_sigma, &a)) return 1;
  return for_each_sample(a, [&](const Row& c, int64_t plane, const float* mb, int64_t at)
                                __attribute__((always_inline)) {
    if (a.pred != nullptr) {
      ddpm_row<MEAN, VAR, CLIP, true>(c, plane, a.x + at, mb, mb + plane, a.noise + at, a.x_prev + at, a.pred + at);
    } else {
      ddpm_row<MEAN, VAR, CLIP, false>(c, plane, a.x + at, mb, mb + plane, a.noise + at, a.x_prev + at, nullptr);
    }
  });
}

// x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + 1[t>0] σ_t z (Song et al. 2021, Eq. 12).
template <int MEAN, bool CLIP, bool PRED>
MD_INLINE void ddim_row(const Row& c, int64_t n, const float* __restrict__ xb, const float* __restrict__ mb,
                        const float* __restrict__ zb, float* __restrict__ ob, float* __restrict__ pb) {
  const float sqrt_abar_prev = c.c4, eps_coef = c.c5, sigma_mask = c.c6;
  for (int64_t i = 0; i < n; ++i) {
    const float x = xb[i];
    const float p = pred_xstart<MEAN, CLIP>(x, mb[i], c);
    // ε̂ = (x_t / √ᾱ − x̂_0) / √(1/ᾱ − 1), or (x_t − √ᾱ x̂_0) / √(1 − ᾱ) from the v table's columns
    const float eps = MEAN == kVelocity ? (x - c.a * p) / c.b : (c.a * x - p) / c.b;
    const float mean = p * sqrt_abar_prev + eps_coef * eps;
    if (PRED) pb[i] = p;
    ob[i] = mean + sigma_mask * zb[i];
  }
}

template <int MEAN, bool LEARNED_SIGMA, bool CLIP>
MD_INLINE int ddim(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Args a;
  if (!unpack(nparam, params, ndims, shapes, dtypes, kDdimCols, LEARNED_SIGMA, &a)) return 1;
  return for_each_sample(a, [&](const Row& c, int64_t plane, const float* mb, int64_t at)
                                __attribute__((always_inline)) {
    if (a.pred != nullptr) {
      ddim_row<MEAN, CLIP, true>(c, plane, a.x + at, mb, a.noise + at, a.x_prev + at, a.pred + at);
    } else {
      ddim_row<MEAN, CLIP, false>(c, plane, a.x + at, mb, a.noise + at, a.x_prev + at, nullptr);
    }
  });
}

}  // namespace

// Each entry point is compiled for AVX-512, AVX2 and baseline x86-64 (MD_ENTRY_CLONES, md_kernel.h).
#define MD_DDPM(NAME, MEAN, VAR)                                                                    \
  MD_ENTRY_CLONES int md_ddpm_##NAME##_clip(int n, void** p, int* nd, int64_t** s, const char** d,       \
                                       void*, void*) { return ddpm<MEAN, VAR, true>(n, p, nd, s, d); } \
  MD_ENTRY_CLONES int md_ddpm_##NAME##_noclip(int n, void** p, int* nd, int64_t** s, const char** d,     \
                                         void*, void*) { return ddpm<MEAN, VAR, false>(n, p, nd, s, d); }

#define MD_DDPM_MEAN(MNAME, MEAN)                       \
  MD_DDPM(MNAME##_fixed_small, MEAN, kFixedSmall)       \
  MD_DDPM(MNAME##_fixed_large, MEAN, kFixedLarge)       \
  MD_DDPM(MNAME##_learned, MEAN, kLearned)              \
  MD_DDPM(MNAME##_learned_range, MEAN, kLearnedRange)

MD_DDPM_MEAN(epsilon, kEpsilon)
MD_DDPM_MEAN(start_x, kStartX)
MD_DDPM_MEAN(previous_x, kPreviousX)
MD_DDPM_MEAN(velocity, kVelocity)

#define MD_DDIM(NAME, MEAN, LEARNED)                                                                \
  MD_ENTRY_CLONES int md_ddim_##NAME##_clip(int n, void** p, int* nd, int64_t** s, const char** d,       \
                                       void*, void*) { return ddim<MEAN, LEARNED, true>(n, p, nd, s, d); } \
  MD_ENTRY_CLONES int md_ddim_##NAME##_noclip(int n, void** p, int* nd, int64_t** s, const char** d,     \
                                         void*, void*) { return ddim<MEAN, LEARNED, false>(n, p, nd, s, d); }

MD_DDIM(epsilon_fixed, kEpsilon, false)
MD_DDIM(epsilon_learned, kEpsilon, true)
MD_DDIM(start_x_fixed, kStartX, false)
MD_DDIM(start_x_learned, kStartX, true)
MD_DDIM(previous_x_fixed, kPreviousX, false)
MD_DDIM(previous_x_learned, kPreviousX, true)
MD_DDIM(velocity_fixed, kVelocity, false)
MD_DDIM(velocity_learned, kVelocity, true)

// e^x as the kernels take it, over n values (for the tests).
MD_ENTRY_CLONES int md_exp_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_f32(x[i]);
  return 0;
}
