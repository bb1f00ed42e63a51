// Counter-based dropout for MindSpore's CPU backend (mind_diffusion.kernels.dropout),
// as ops.Custom(func_type="aot") operators.
//
// The mask is a pure function of (counter, element index): element i is kept
// when hash(key(counter), i) ≥ p · 2^32, with the 32-bit hash below. The
// counter is the default generator's offset, which every dropout call of a
// step advances by one and the trainer sets per step from the run's seed, rank
// and step: a resumed run draws the same masks as an uninterrupted one, and
// the backward recomputes the mask instead of storing it.
//
// md_dropout: x [any] f32, counter [] i64, p [1] f32 -> y = x · m / (1 − p)
// with m ∈ {0, 1} the mask. The backward is the same call on dy (same counter,
// so the same mask). One pass; the hash vectorises (32-bit multiplies and
// shifts).
#include <cstdint>
#include <initializer_list>

#include "md_kernel.h"

namespace {

// SplitMix64's finaliser: a bijective 64-bit mix.
MD_INLINE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// MurmurHash3's 32-bit finaliser: a bijective 32-bit mix.
MD_INLINE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The 64-bit key of one dropout call, mixed so that consecutive counters
// (consecutive layers) give unrelated keys.
MD_INLINE uint64_t call_key(int64_t counter) {
  return mix64(mix64(static_cast<uint64_t>(counter) + 0x9E3779B97F4A7C15ull));
}

// The element's 32 random bits: two 32-bit mixing rounds keyed by the call's
// key, the high half of the index folded into the second key word.
MD_INLINE uint32_t element_bits(uint32_t k0, uint32_t k1, uint64_t i) {
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i >> 32);
  return mix32(mix32(lo ^ k0) ^ (k1 + hi * 0x9E3779B9u));
}

// Each entry point's whole body is inlined, so every CPU clone vectorises it for its own ISA.
MD_INLINE int run(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  if (nparam != 4) return 1;
  for (int i : {0, 2, 3}) {
    if (!md::is_f32(dtypes[i])) return 1;
  }
  if (!md::is_dtype(dtypes[1], "int64")) return 1;
  int64_t n = 1;
  for (int d = 0; d < ndims[0]; ++d) n *= shapes[0][d];
  const float* in = static_cast<const float*>(params[0]);
  const int64_t counter = *static_cast<const int64_t*>(params[1]);
  const float p = *static_cast<const float*>(params[2]);
  float* out = static_cast<float*>(params[3]);
  if (!(p >= 0.0f && p < 1.0f)) return 2;

  // Keep when bits ≥ threshold = round(p · 2^32): P(keep) = 1 − p to within 2^-32.
  const double scaled = static_cast<double>(p) * 4294967296.0 + 0.5;
  const uint32_t threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
  const float scale = 1.0f / (1.0f - p);
  const uint64_t key = call_key(counter);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = element_bits(k0, k1, static_cast<uint64_t>(i)) >= threshold;
    out[i] = keep ? in[i] * scale : 0.0f;
  }
  return 0;
}

}  // namespace

// x · m / (1 − p); the backward calls it on dy.
MD_ENTRY_CLONES int md_dropout(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  return run(nparam, params, ndims, shapes, dtypes);
}
