// Scaled dot-product attention for MindSpore's CPU backend as ops.Custom(func_type="aot")
// operators (mind_diffusion.kernels.attention), forward and backward.
//
// Per row r of R = batch·heads, with q [d, T], k, v [d, S] (channels first, ADM's layout)
// and c = 1/√d (q and k each scaled by d^(-1/4), so their product by 1/√d):
//
//   L[t, s] = c Σ_i q[i, t] k[i, s]                    logits          [T, S]
//   P[t, s] = exp(L[t, s] − max_s L) / Σ_s exp(...)    softmax weights [T, S]  (second output)
//   O[i, t] = Σ_s v[i, s] P[t, s]                       result          [d, T]
//
// Backward, given G = ∂L/∂O [d, T] and the forward's P (stored, so nothing is recomputed:
// the weights are T·S floats per row, a few MB for ADM's sizes):
//
//   ∂v[i, s] = Σ_t G[i, t] P[t, s]
//   ∂P[t, s] = Σ_i G[i, t] v[i, s]
//   ∂L[t, s] = P[t, s] (∂P[t, s] − Σ_s' ∂P[t, s'] P[t, s'])       (softmax Jacobian)
//   ∂q[i, t] = c Σ_s ∂L[t, s] k[i, s],    ∂k[i, s] = c Σ_t ∂L[t, s] q[i, t]
//
// All sums are float32 (as the matrix products they replace), except the softmax's
// row sums Σ exp and Σ ∂P·P, which are float64: they are O(T·S) against the O(T·S·d)
// products, so the extra precision is free.
//
// Why these loops: every product above is one of two shapes, and both are written so
// that the innermost loop runs over a contiguous row and vectorises:
//
// - "gather": dst[s] (+)= Σ_j a_j src_j[s] over 8 source rows at once (logits and ∂P
//   over blocks of 8 channels, ∂k and ∂v over blocks of 8 query rows): per vector of
//   dst, 8 loads and 8 multiply-adds but a single store, so the row stays in L1 and the
//   loop is bound by loads, not stores.
// - "dot tile": out[j][m] = Σ_s a_j[s] b_m[s] for 4 rows a × 2 rows b (O and ∂q, whose
//   rows would otherwise be strided): 8 independent SIMD accumulators, 6 loads per 8
//   multiply-adds, and one horizontal sum per tile at the end.
//
// Blocks at the edges (T or d not a multiple of the block) repeat the last valid row with
// a zero coefficient or discard its result, so there is one code path per kernel.
//
// Work is split over R across std::threads (no OpenMP runtime to clash with MindSpore's
// own pool); each row's q, k, v and P (≤ 256 KB at T = S = 256) stay in L2 while it is
// worked on. The hot functions are compiled twice, for AVX2 + FMA and baseline x86-64
// (MD_AVX2_FMA), and chosen at run time; the library needs no -march
// and the cached build is safe to share between machines. The module adds
// -ffp-contract=fast so a·b + c becomes one FMA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "md_kernel.h"

namespace {

// The hot loops are compiled twice, for AVX2 + FMA and for baseline x86-64, and picked
// at run time (see dispatch below). Not target_clones: its "arch=haswell" clone is chosen
// by CPU model (never on AMD), and its "avx2" clone has no FMA.
#if defined(__x86_64__) && defined(__GNUC__)
#define MD_FAST_TARGET 1
#define MD_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define MD_FAST_TARGET 0
#define MD_AVX2_FMA
#endif

using md::is_f32;

using md::exp_f32;  // e^x to ~1 ulp (md_kernel.h)

constexpr int kGather = 8;   // source rows per gather
constexpr int kTileA = 4;    // rows of a per dot tile
constexpr int kTileB = 2;    // rows of b per dot tile
constexpr int kLanes = 8;    // accumulator lanes per dot (one AVX2 register)
constexpr int kRows = 8;     // query rows per backward block (= kGather: ∂k and ∂v gather over them)

// dst[s] = (init ? 0 : dst[s]) + Σ_j a[j] src[j][s], s < n.
MD_INLINE void gather(float* __restrict__ dst, const float* const* src, const float* a, int64_t n, bool init) {
  const float *__restrict__ s0 = src[0], *__restrict__ s1 = src[1], *__restrict__ s2 = src[2],
              *__restrict__ s3 = src[3], *__restrict__ s4 = src[4], *__restrict__ s5 = src[5],
              *__restrict__ s6 = src[6], *__restrict__ s7 = src[7];
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5], a6 = a[6], a7 = a[7];
  if (init) {
#pragma omp simd
    for (int64_t s = 0; s < n; ++s)
      dst[s] = ((a0 * s0[s] + a1 * s1[s]) + (a2 * s2[s] + a3 * s3[s])) +
               ((a4 * s4[s] + a5 * s5[s]) + (a6 * s6[s] + a7 * s7[s]));
  } else {
#pragma omp simd
    for (int64_t s = 0; s < n; ++s)
      dst[s] += ((a0 * s0[s] + a1 * s1[s]) + (a2 * s2[s] + a3 * s3[s])) +
                ((a4 * s4[s] + a5 * s5[s]) + (a6 * s6[s] + a7 * s7[s]));
  }
}

// Eight floats as one value: GCC's vector extension, one AVX register (two SSE registers
// in the baseline build). Used where auto-vectorisation packed scalars instead (dot_tile).
// (-Wpsabi warns that such values change the calling convention without AVX; these
// functions are always inlined, so no call passes one.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8 __attribute__((vector_size(32)));

MD_INLINE v8 load8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof(x));  // an unaligned vector load
  return x;
}

// out[j * kTileB + m] = Σ_s a[j][s] b[m][s], s < n: a 4 × 2 tile of dot products, with
// eight accumulators of kLanes lanes each that stay in registers.
MD_INLINE void dot_tile(const float* const* a, const float* const* b, int64_t n, float* out) {
  v8 acc[kTileA][kTileB];
  for (int j = 0; j < kTileA; ++j)
    for (int m = 0; m < kTileB; ++m) acc[j][m] = v8{};
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    const v8 b0 = load8(b[0] + s), b1 = load8(b[1] + s);
    for (int j = 0; j < kTileA; ++j) {
      const v8 x = load8(a[j] + s);
      acc[j][0] += x * b0;
      acc[j][1] += x * b1;
    }
  }
  for (int j = 0; j < kTileA; ++j)
    for (int m = 0; m < kTileB; ++m) {
      float sum = 0.0f;
      for (int l = 0; l < kLanes; ++l) sum += acc[j][m][l];
      for (int64_t t = s; t < n; ++t) sum += a[j][t] * b[m][t];  // the tail, < kLanes elements
      out[j * kTileB + m] = sum;
    }
}

// dst[t, i] = scale · Σ_s a[t][s] b[i][s] for rows t < na of a (stride lda) and i < nb of b
// (stride ldb), written to dst[i * ld_dst + t0 + t] (channels-first outputs O and ∂q).
MD_INLINE void dot_rows(const float* a, int64_t lda, int64_t na, const float* b, int64_t ldb, int64_t nb,
                        int64_t n, float scale, float* dst, int64_t ld_dst, int64_t t0) {
  for (int64_t t = 0; t < na; t += kTileA) {
    const float* ra[kTileA];
    for (int j = 0; j < kTileA; ++j) ra[j] = a + std::min(t + j, na - 1) * lda;  // edge: repeat the last row
    for (int64_t i = 0; i < nb; i += kTileB) {
      const float* rb[kTileB];
      for (int m = 0; m < kTileB; ++m) rb[m] = b + std::min(i + m, nb - 1) * ldb;
      float out[kTileA * kTileB];
      dot_tile(ra, rb, n, out);
      for (int j = 0; j < kTileA && t + j < na; ++j)
        for (int m = 0; m < kTileB && i + m < nb; ++m) dst[(i + m) * ld_dst + t0 + t + j] = scale * out[j * kTileB + m];
    }
  }
}

// dst = Σ_c coef[c · coef_stride] · rows[c] over c < count rows of length n (stride ld),
// accumulated onto dst unless init, 8 rows per pass; scale multiplies every coefficient.
MD_INLINE void gather_rows(float* dst, const float* rows, int64_t ld, const float* coef, int64_t coef_stride,
                           int64_t count, float scale, int64_t n, bool init) {
  for (int64_t c = 0; c < count; c += kGather) {
    const float* src[kGather];
    float a[kGather];
    for (int j = 0; j < kGather; ++j) {
      const bool valid = c + j < count;
      src[j] = rows + (valid ? c + j : count - 1) * ld;  // edge: any valid row, coefficient 0
      a[j] = valid ? scale * coef[(c + j) * coef_stride] : 0.0f;
    }
    gather(dst, src, a, n, init && c == 0);
  }
}

struct Job {
  int64_t r, d, t, s;
  float scale;  // 1/√d
  const float* q;
  const float* k;
  const float* v;
  const float* p;   // backward: the forward's weights
  const float* g;   // backward: ∂L/∂O
  float* out;       // forward: O; backward: ∂q
  float* weights;   // forward: P
  float* dk;
  float* dv;
};

// Softmax of one row in place: float32 exponentials, float64 sum.
MD_INLINE void softmax_row(float* __restrict__ row, int64_t n) {
  float mx = row[0];
#pragma omp simd reduction(max : mx)
  for (int64_t s = 0; s < n; ++s) mx = std::max(mx, row[s]);
  for (int64_t s = 0; s < n; ++s) row[s] = exp_f32(row[s] - mx);
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < n; ++s) sum += static_cast<double>(row[s]);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t s = 0; s < n; ++s) row[s] *= inv;
}

MD_INLINE void forward_body(const Job& j, int64_t begin, int64_t end) {
  const int64_t d = j.d, T = j.t, S = j.s;
  for (int64_t r = begin; r < end; ++r) {
    const float* q = j.q + r * d * T;
    const float* k = j.k + r * d * S;
    const float* v = j.v + r * d * S;
    float* P = j.weights + r * T * S;
    for (int64_t t = 0; t < T; ++t) {
      // L[t, :] = c Σ_i q[i, t] k[i, :], straight into P's row, then its softmax.
      gather_rows(P + t * S, k, S, q + t, T, d, j.scale, S, true);
      softmax_row(P + t * S, S);
    }
    // O[i, t] = Σ_s P[t, s] v[i, s].
    dot_rows(P, S, T, v, S, d, S, 1.0f, j.out + r * d * T, T, 0);
  }
}

MD_INLINE void backward_body(const Job& j, int64_t begin, int64_t end) {
  const int64_t d = j.d, T = j.t, S = j.s;
  std::vector<float> scratch(static_cast<size_t>(kRows * S));
  float* dL = scratch.data();  // ∂P, then ∂L, of one block of query rows [kRows, S]
  for (int64_t r = begin; r < end; ++r) {
    const float* q = j.q + r * d * T;
    const float* k = j.k + r * d * S;
    const float* v = j.v + r * d * S;
    const float* P = j.p + r * T * S;
    const float* G = j.g + r * d * T;
    float* dq = j.out + r * d * T;
    float* dk = j.dk + r * d * S;
    float* dv = j.dv + r * d * S;
    for (int64_t t0 = 0; t0 < T; t0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, T - t0);
      const bool first = t0 == 0;
      for (int64_t t = 0; t < rows; ++t) {
        float* __restrict__ row = dL + t * S;
        const float* __restrict__ p = P + (t0 + t) * S;
        gather_rows(row, v, S, G + t0 + t, T, d, 1.0f, S, true);  // ∂P[t, :] = Σ_i G[i, t] v[i, :]
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int64_t s = 0; s < S; ++s) dot += static_cast<double>(row[s]) * static_cast<double>(p[s]);
        const float delta = static_cast<float>(dot);
        for (int64_t s = 0; s < S; ++s) row[s] = p[s] * (row[s] - delta);  // ∂L
      }
      // ∂q[i, t] = c Σ_s ∂L[t, s] k[i, s]
      dot_rows(dL, S, rows, k, S, d, S, j.scale, dq, T, t0);
      for (int64_t i = 0; i < d; ++i) {
        // ∂k[i, :] += c Σ_t q[i, t] ∂L[t, :],   ∂v[i, :] += Σ_t G[i, t] P[t, :]
        gather_rows(dk + i * S, dL, S, q + i * T + t0, 1, rows, j.scale, S, first);
        gather_rows(dv + i * S, P + t0 * S, S, G + i * T + t0, 1, rows, 1.0f, S, first);
      }
    }
  }
}

MD_AVX2_FMA void forward_avx2(const Job& j, int64_t b, int64_t e) { forward_body(j, b, e); }
void forward_base(const Job& j, int64_t b, int64_t e) { forward_body(j, b, e); }
MD_AVX2_FMA void backward_avx2(const Job& j, int64_t b, int64_t e) { backward_body(j, b, e); }
void backward_base(const Job& j, int64_t b, int64_t e) { backward_body(j, b, e); }

bool use_avx2_fma() {
#if MD_FAST_TARGET
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

void forward_rows(const Job& j, int64_t b, int64_t e) {
  if (use_avx2_fma()) forward_avx2(j, b, e); else forward_base(j, b, e);
}

void backward_rows(const Job& j, int64_t b, int64_t e) {
  if (use_avx2_fma()) backward_avx2(j, b, e); else backward_base(j, b, e);
}

// Threads: one per ~4 MFLOP of work (starting one costs tens of µs), at most the CPUs
// this process may run on (MIND_DIFFUSION_ATTENTION_THREADS instead if set), at most 16.
int threads_for(int64_t tasks, int64_t flops) {
  static const int limit = md::thread_limit("MIND_DIFFUSION_ATTENTION_THREADS");
  const int64_t by_work = std::max<int64_t>(1, flops / (4 << 20));
  return static_cast<int>(std::min<int64_t>({static_cast<int64_t>(limit), tasks, by_work}));
}

bool is_3d(int ndim, const int64_t* shape, const char* dtype, int64_t a, int64_t b, int64_t c) {
  return ndim == 3 && shape[0] == a && shape[1] == b && shape[2] == c && is_f32(dtype);
}

// q [R, d, T], k, v [R, d, S] float32 → fills the sizes; false when they do not fit.
bool unpack_qkv(int* nd, int64_t** sh, const char** dt, Job* j) {
  if (nd[0] != 3 || !is_f32(dt[0])) return false;
  j->r = sh[0][0];
  j->d = sh[0][1];
  j->t = sh[0][2];
  if (nd[1] != 3 || sh[1][0] != j->r || sh[1][1] != j->d) return false;
  j->s = sh[1][2];
  if (!is_f32(dt[1]) || !is_3d(nd[2], sh[2], dt[2], j->r, j->d, j->s)) return false;
  j->scale = j->d > 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(j->d))) : 1.0f;
  return true;
}

// Forward: inputs q, k, v; outputs O [R, d, T] and P [R, T, S].
int forward(int nparam, void** p, int* nd, int64_t** sh, const char** dt) {
  if (nparam != 5) return 1;
  Job j{};
  if (!unpack_qkv(nd, sh, dt, &j)) return 1;
  if (!is_3d(nd[3], sh[3], dt[3], j.r, j.d, j.t) || !is_3d(nd[4], sh[4], dt[4], j.r, j.t, j.s)) return 1;
  j.q = static_cast<const float*>(p[0]);
  j.k = static_cast<const float*>(p[1]);
  j.v = static_cast<const float*>(p[2]);
  j.out = static_cast<float*>(p[3]);
  j.weights = static_cast<float*>(p[4]);
  if (j.r == 0 || j.t == 0 || j.d == 0) return 0;
  if (j.s == 0) {  // softmax over no keys: NaN, as the reference's 0/0
    std::fill(j.out, j.out + j.r * j.d * j.t, std::nanf(""));
    return 0;
  }
  md::parallel_for(j.r, threads_for(j.r, 4 * j.r * j.d * j.t * j.s),
                   [&j](int64_t b, int64_t e) { forward_rows(j, b, e); });
  return 0;
}

// Backward: inputs q, k, v, P, ∂L/∂O; outputs ∂q, ∂k, ∂v.
int backward(int nparam, void** p, int* nd, int64_t** sh, const char** dt) {
  if (nparam != 8) return 1;
  Job j{};
  if (!unpack_qkv(nd, sh, dt, &j)) return 1;
  if (!is_3d(nd[3], sh[3], dt[3], j.r, j.t, j.s) || !is_3d(nd[4], sh[4], dt[4], j.r, j.d, j.t)) return 1;
  if (!is_3d(nd[5], sh[5], dt[5], j.r, j.d, j.t) || !is_3d(nd[6], sh[6], dt[6], j.r, j.d, j.s) ||
      !is_3d(nd[7], sh[7], dt[7], j.r, j.d, j.s))
    return 1;
  j.q = static_cast<const float*>(p[0]);
  j.k = static_cast<const float*>(p[1]);
  j.v = static_cast<const float*>(p[2]);
  j.p = static_cast<const float*>(p[3]);
  j.g = static_cast<const float*>(p[4]);
  j.out = static_cast<float*>(p[5]);
  j.dk = static_cast<float*>(p[6]);
  j.dv = static_cast<float*>(p[7]);
  if (j.r == 0 || j.d == 0) return 0;
  if (j.t == 0 || j.s == 0) {  // no products: zero gradients (∂q has no elements when T = 0)
    std::fill(j.out, j.out + j.r * j.d * j.t, 0.0f);
    std::fill(j.dk, j.dk + j.r * j.d * j.s, 0.0f);
    std::fill(j.dv, j.dv + j.r * j.d * j.s, 0.0f);
    return 0;
  }
  md::parallel_for(j.r, threads_for(j.r, 8 * j.r * j.d * j.t * j.s),
                   [&j](int64_t b, int64_t e) { backward_rows(j, b, e); });
  return 0;
}

}  // namespace

// The entry points MindSpore's aot kernels call: 0 on success, 1 when the shapes or dtypes do not fit.
extern "C" int md_attention_fwd(int n, void** p, int* nd, int64_t** sh, const char** dt, void*, void*) {
  return forward(n, p, nd, sh, dt);
}

extern "C" int md_attention_bwd(int n, void** p, int* nd, int64_t** sh, const char** dt, void*, void*) {
  return backward(n, p, nd, sh, dt);
}
