// Multi-tensor parameter updates for MindSpore's CPU backend
// (mind_diffusion.kernels.multi_tensor), as ops.Custom(func_type="aot") operators.
//
// Why: the train step updates every parameter tensor of the model separately.
// With MindSpore's AdamWeightDecay and the EMA written in ops, a UNet of ~300
// parameter tensors launches ~2,700 small kernels per step for AdamW (select,
// AdamWeightDecay) and the EMA (mul, mul, add, assign), each paying the CPU
// runtime's fixed launch cost. Here each is one call that walks all tensors.
//
// The operators update their tensor inputs in place (the Parameters' own
// memory) and return a [1] float32 token that the graph must depend on: the
// token orders the EMA after AdamW and keeps MindSpore from pruning the call.
//
//   md_adamw(h, θ_1..θ_n, m_1..m_n, v_1..v_n, g_1..g_n) -> token
//     h = [apply, η, β1, β2, ε, λ] float32 [6]. When apply ≠ 0, for every element:
//       m ← β1 m + (1 − β1) g,  v ← β2 v + (1 − β2) g²,  θ ← θ − η (m / (√v + ε) + λ θ)
//     (AdamW, Loshchilov & Hutter 2019, as MindSpore's AdamWeightDecay defines it; the
//     caller folds Adam's bias correction into η). MindSpore's kernel evaluates the
//     moments as m + (g − m)(1 − β1), so the two paths agree to float32 rounding, not bit
//     for bit: a run continues exactly on the path it started on. apply = 0 touches nothing.
//   md_ema(h, θ_1..θ_n, θ̄_1..θ̄_n) -> token
//     h = [apply, r, 1 − r] float32 [3], 1 − r as the ops path computes it. When apply ≠ 0:
//     θ̄ ← θ̄ · r + θ · (1 − r), rounded as the ops path (built with -ffp-contract=off).
//     apply = 0 touches nothing.
//
// All tensors float32 and contiguous; the token is 1 when applied, else 0.
// Work is split into chunks of at most kChunk elements over the process's CPUs
// (MIND_DIFFUSION_UPDATE_THREADS overrides).
#include <cmath>
#include <cstdint>
#include <vector>

#include "md_kernel.h"

namespace {

constexpr int64_t kChunk = 1 << 16;

struct Chunk {
  int tensor;
  int64_t begin, end;
};

int64_t numel(int ndims, const int64_t* shape) {
  int64_t n = 1;
  for (int d = 0; d < ndims; ++d) n *= shape[d];
  return n;
}

// Runs body(tensor, begin, end) over chunks of tensors 1 .. n of the operator (the first group),
// spread over the CPUs when there is enough work to pay for the threads.
template <typename F>
void for_each_chunk(int n, int* ndims, int64_t** shapes, F body) {
  std::vector<Chunk> work;
  int64_t total = 0;
  for (int t = 0; t < n; ++t) {
    const int64_t size = numel(ndims[1 + t], shapes[1 + t]);
    total += size;
    for (int64_t b = 0; b < size; b += kChunk) work.push_back({t, b, std::min(size, b + kChunk)});
  }
  const int workers = static_cast<int>(
      std::min<int64_t>(md::thread_limit("MIND_DIFFUSION_UPDATE_THREADS"), 1 + total / (4 * kChunk)));
  md::parallel_for(static_cast<int64_t>(work.size()), workers, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) body(work[c].tensor, work[c].begin, work[c].end);
  });
}

// Checks the operator's arity (1 + groups · n tensors + the token) and dtypes, and that the
// tensors of each group have the shapes of the first group's. Returns n, or -1.
int tensor_count(int nparam, int groups, int* ndims, int64_t** shapes, const char** dtypes) {
  if (nparam < 2 + groups || (nparam - 2) % groups != 0) return -1;
  for (int i = 0; i < nparam; ++i) {
    if (!md::is_f32(dtypes[i])) return -1;
  }
  const int n = (nparam - 2) / groups;
  for (int g = 1; g < groups; ++g) {
    for (int t = 0; t < n; ++t) {
      const int a = 1 + t, b = 1 + g * n + t;
      if (numel(ndims[a], shapes[a]) != numel(ndims[b], shapes[b])) return -1;
    }
  }
  return n;
}

float* tensor(void** params, int index) { return static_cast<float*>(params[index]); }

MD_INLINE void adamw_range(float* __restrict theta, float* __restrict m, float* __restrict v,
                           const float* __restrict g, int64_t begin, int64_t end, float lr, float beta1,
                           float beta2, float eps, float decay) {
  const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
  for (int64_t i = begin; i < end; ++i) {
    const float grad = g[i];
    const float m_new = beta1 * m[i] + one_minus_beta1 * grad;
    const float v_new = beta2 * v[i] + one_minus_beta2 * grad * grad;
    const float update = m_new / (std::sqrt(v_new) + eps) + decay * theta[i];
    m[i] = m_new;
    v[i] = v_new;
    theta[i] = theta[i] - lr * update;
  }
}

MD_INLINE void ema_range(const float* __restrict theta, float* __restrict average, int64_t begin, int64_t end,
                         float keep, float take) {
  for (int64_t i = begin; i < end; ++i) average[i] = average[i] * keep + theta[i] * take;
}

// Checks the operator (hyperparameters of `hyper_size` values, `groups` tensor groups) and
// writes its token. Returns n, 0 when the update is off (apply = 0), or -1 on bad inputs.
int start(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, int groups,
          int64_t hyper_size) {
  const int n = tensor_count(nparam, groups, ndims, shapes, dtypes);
  if (n < 0 || numel(ndims[0], shapes[0]) != hyper_size) return -1;
  const bool apply = tensor(params, 0)[0] != 0.0f;
  tensor(params, nparam - 1)[0] = apply ? 1.0f : 0.0f;
  return apply ? n : 0;
}

MD_INLINE int adamw(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  const int n = start(nparam, params, ndims, shapes, dtypes, 4, 6);
  if (n <= 0) return n < 0 ? 1 : 0;
  const float* h = tensor(params, 0);
  const float lr = h[1], beta1 = h[2], beta2 = h[3], eps = h[4], decay = h[5];
  for_each_chunk(n, ndims, shapes, [&](int t, int64_t begin, int64_t end) {
    adamw_range(tensor(params, 1 + t), tensor(params, 1 + n + t), tensor(params, 1 + 2 * n + t),
                tensor(params, 1 + 3 * n + t), begin, end, lr, beta1, beta2, eps, decay);
  });
  return 0;
}

MD_INLINE int ema(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  const int n = start(nparam, params, ndims, shapes, dtypes, 2, 3);
  if (n <= 0) return n < 0 ? 1 : 0;
  const float keep = tensor(params, 0)[1], take = tensor(params, 0)[2];
  for_each_chunk(n, ndims, shapes, [&](int t, int64_t begin, int64_t end) {
    ema_range(tensor(params, 1 + t), tensor(params, 1 + n + t), begin, end, keep, take);
  });
  return 0;
}

}  // namespace

MD_ENTRY_CLONES int md_adamw(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*,
                             void*) {
  return adamw(nparam, params, ndims, shapes, dtypes);
}

MD_ENTRY_CLONES int md_ema(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*,
                           void*) {
  return ema(nparam, params, ndims, shapes, dtypes);
}
