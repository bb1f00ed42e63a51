// 2-D convolution for MindSpore's CPU backend as ops.Custom(func_type="aot")
// operators (mind_diffusion.kernels.conv): forward, backward-data and
// backward-weights, each a call into the oneDNN library that MindSpore itself
// ships (mindspore/lib/libdnnl.so.3).
//
// Why not MindSpore's own Conv2D: MindSpore hands oneDNN plain NCHW tensors
// and oneDNN then runs its gemm-based convolution, whose backward passes are
// 1.7-2.3x slower than its direct AVX2 convolution on channel-blocked layouts
// (nChw8c activations, OIhw8i8o-like weights; measured at x [16, 128, 32, 32],
// 3x3, on AVX2). Here every primitive is created
// with format "any", so oneDNN picks its preferred layouts, and the tensors are
// reordered from/to NCHW around it (a reorder costs ~1 ms per 8 MB tensor,
// the convolution tens of ms).
//
// Operators (x [N, C, H, W], w [O, C, KH, KW], b [O], y/dy [N, O, OH, OW], all
// float32; g int64 [6] = stride_h, stride_w, pad_top, pad_bottom, pad_left,
// pad_right; dilation 1, one group):
//   md_conv2d_fwd          (x, w, b, g) -> y = conv(x, w) + b
//   md_conv2d_bwd_data    (x, w, dy, g) -> dx   (x only gives the shape)
//   md_conv2d_bwd_weights (x, w, dy, g) -> dw, db
// The primitives of one shape are created once (JIT-compiled by oneDNN) and
// cached; scratchpads and the blocked copies live in a pool of reusable
// buffers. The arithmetic is oneDNN's float32 convolution (fp32 accumulation).
//
// Layouts (MIND_DIFFUSION_CONV_LAYOUT): "blocked" (default) lets oneDNN choose;
// "plain" forces NCHW/OIHW (oneDNN's gemm convolution, as MindSpore's Conv2D,
// with the bias fused); "auto" builds both and, per shape and per primitive,
// alternates them over the first calls and keeps the faster (timing-dependent,
// so two runs may choose differently and differ in float32 rounding;
// MIND_DIFFUSION_CONV_VERBOSE=1 prints the choices).
//
// Threads: the shipped oneDNN is built for the "threadpool" runtime, so the
// caller supplies the threads. Pool below implements oneDNN's
// threadpool_iface with std::threads (as many as the CPUs this process may use,
// at most 16, or MIND_DIFFUSION_CONV_THREADS); when two kernels call it at
// once, the second runs all of its work on its own thread (oneDNN's work split
// stays correct, just serial).
//
// Interface: the few functions and constants of oneDNN v3's C API used here are
// declared below by hand (they are part of its stable v3 ABI), so building the
// library needs only g++ and the shipped libdnnl.so.3, no oneDNN headers.
// md_conv2d_probe() checks at run time that the library is v3 and that an
// engine and a stream can be made.
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "md_kernel.h"

// ---------------------------------------------------------------------------
// The part of oneDNN's v3 C API used here (see the note at the top).
namespace dnnl_abi {

// Opaque handles (engine, stream, memory descriptor, memory, primitive
// descriptor, primitive, attributes) are all pointers.
using handle = void*;

struct ExecArg {
  int arg;
  handle memory;
};

struct Version {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
};

constexpr int kSuccess = 0;
constexpr int kEngineCpu = 1;
constexpr int kF32 = 3;
constexpr int kFormatAny = 1;
constexpr int kForwardTraining = 64;
constexpr int kConvolutionDirect = 1;
constexpr int kScratchpadUser = 1;
constexpr unsigned kRuntimeThreadpool = 8;

constexpr int kQuerySrc = 129, kQueryDiffSrc = 130, kQueryWeights = 131, kQueryDiffWeights = 132, kQueryDst = 133,
              kQueryDiffDst = 134, kQueryScratchpad = 136;

constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgBias = 41, kArgScratchpad = 80, kArgDiffSrc = 129,
              kArgDiffDst = 145, kArgDiffWeights = 161, kArgDiffBias = 169;
constexpr int kArgFrom = kArgSrc, kArgTo = kArgDst;

extern "C" {
const Version* dnnl_version();
int dnnl_engine_create(handle* engine, int kind, size_t index);
int dnnl_threadpool_interop_stream_create(handle* stream, handle engine, void* threadpool);
int dnnl_threadpool_interop_set_max_concurrency(int max_concurrency);
int dnnl_threadpool_interop_get_max_concurrency(int* max_concurrency);
int dnnl_memory_desc_create_with_strides(handle* md, int ndims, const int64_t* dims, int data_type,
                                         const int64_t* strides);
int dnnl_memory_desc_create_with_tag(handle* md, int ndims, const int64_t* dims, int data_type, int tag);
int dnnl_memory_desc_clone(handle* md, const void* existing);
int dnnl_memory_desc_destroy(handle md);
int dnnl_memory_desc_equal(const void* lhs, const void* rhs);
size_t dnnl_memory_desc_get_size(const void* md);
int dnnl_memory_create(handle* memory, const void* md, handle engine, void* data);
int dnnl_memory_destroy(handle memory);
int dnnl_primitive_attr_create(handle* attr);
int dnnl_primitive_attr_destroy(handle attr);
int dnnl_primitive_attr_set_scratchpad_mode(handle attr, int mode);
int dnnl_convolution_forward_primitive_desc_create(handle* pd, handle engine, int prop_kind, int alg_kind,
                                                   const void* src, const void* weights, const void* bias,
                                                   const void* dst, const int64_t* strides, const int64_t* dilates,
                                                   const int64_t* padding_l, const int64_t* padding_r,
                                                   const void* attr);
int dnnl_convolution_backward_data_primitive_desc_create(handle* pd, handle engine, int alg_kind,
                                                         const void* diff_src, const void* weights,
                                                         const void* diff_dst, const int64_t* strides,
                                                         const int64_t* dilates, const int64_t* padding_l,
                                                         const int64_t* padding_r, const void* hint_fwd_pd,
                                                         const void* attr);
int dnnl_convolution_backward_weights_primitive_desc_create(handle* pd, handle engine, int alg_kind,
                                                            const void* src, const void* diff_weights,
                                                            const void* diff_bias, const void* diff_dst,
                                                            const int64_t* strides, const int64_t* dilates,
                                                            const int64_t* padding_l, const int64_t* padding_r,
                                                            const void* hint_fwd_pd, const void* attr);
int dnnl_reorder_primitive_desc_create(handle* pd, const void* src_md, handle src_engine, const void* dst_md,
                                       handle dst_engine, const void* attr);
const void* dnnl_primitive_desc_query_md(const void* pd, int what, int index);
int dnnl_primitive_desc_destroy(handle pd);
int dnnl_primitive_create(handle* primitive, const void* pd);
int dnnl_primitive_execute(const void* primitive, handle stream, int nargs, const ExecArg* args);
}

// dnnl::threadpool_interop::threadpool_iface: oneDNN calls the first four
// virtual functions (in this order); wait() is in newer v3 releases' layout.
class ThreadpoolIface {
 public:
  virtual int get_num_threads() const = 0;
  virtual bool get_in_parallel() const = 0;
  virtual void parallel_for(int n, const std::function<void(int, int)>& fn) = 0;
  virtual uint64_t get_flags() const = 0;
  virtual void wait() = 0;
  virtual ~ThreadpoolIface() = default;
};

}  // namespace dnnl_abi

namespace {

using namespace dnnl_abi;

// ---------------------------------------------------------------------------
// Threads.

thread_local bool tl_in_pool = false;

// Runs fn(i, n) for i in [0, n) on the calling thread and workers - 1 others.
class Pool final : public ThreadpoolIface {
 public:
  explicit Pool(int threads) : threads_(threads < 1 ? 1 : threads) {
    for (int i = 1; i < threads_; ++i) {
      try {
        workers_.emplace_back([this] { work(); });
      } catch (...) {  // no thread: fewer workers (the caller always works)
        break;
      }
    }
  }
  // The pool lives as long as the process (see context()): never destroyed.
  ~Pool() override = default;

  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return tl_in_pool; }
  uint64_t get_flags() const override { return 0; }  // synchronous
  void wait() override {}

  void parallel_for(int n, const std::function<void(int, int)>& fn) override {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n <= 1 || tl_in_pool) {
      const bool was = tl_in_pool;
      tl_in_pool = true;
      for (int i = 0; i < n; ++i) fn(i, n);
      tl_in_pool = was;
      return;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = &fn;
      job_n_ = n;
      next_.store(0);
      ++generation_;
    }
    wake_.notify_all();
    tl_in_pool = true;
    run(fn, n);
    tl_in_pool = false;
    // Close the job: a worker that has not joined yet (not scheduled while this thread did
    // the work) skips it; wait only for those that joined.
    std::unique_lock<std::mutex> lock(m_);
    job_ = nullptr;
    done_.wait(lock, [this] { return joined_ == 0; });
  }

 private:
  void run(const std::function<void(int, int)>& fn, int n) {
    for (int i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) fn(i, n);
  }

  void work() {
    pthread_setname_np(pthread_self(), "md_conv_pool");
    tl_in_pool = true;
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int, int)>* job;
      int n;
      {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return generation_ != seen && job_ != nullptr; });
        seen = generation_;
        job = job_;
        n = job_n_;
        ++joined_;
      }
      run(*job, n);
      std::lock_guard<std::mutex> lock(m_);
      if (--joined_ == 0) done_.notify_all();
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex busy_;  // one parallel_for at a time
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)>* job_ = nullptr;
  int job_n_ = 0;
  std::atomic<int> next_{0};
  int joined_ = 0;  // workers inside the current job
  uint64_t generation_ = 0;
};

struct Context {
  bool ok = false;
  handle engine = nullptr;
  Pool* pool = nullptr;
};

// Engine and pool, made once; deliberately never destroyed (worker threads
// must not be joined while the process exits).
const Context& context() {
  static const Context* ctx = [] {
    Context* c = new Context;
    const Version* v = dnnl_version();
    if (v == nullptr || v->major != 3 || (v->cpu_runtime != kRuntimeThreadpool)) return c;
    if (dnnl_engine_create(&c->engine, kEngineCpu, 0) != kSuccess) return c;
    c->pool = new Pool(md::thread_limit("MIND_DIFFUSION_CONV_THREADS"));
    c->ok = true;
    return c;
  }();
  return *ctx;
}

// One stream per calling thread (streams are not shared between threads), all on the pool.
handle stream() {
  thread_local handle s = nullptr;
  if (s == nullptr && context().ok) {
    if (dnnl_threadpool_interop_stream_create(&s, context().engine, static_cast<void*>(context().pool)) != kSuccess) {
      s = nullptr;
    }
  }
  return s;
}

// ---------------------------------------------------------------------------
// Reusable 64-byte aligned buffers for blocked copies and scratchpads.

class Buffers {
 public:
  static void* take(size_t bytes) {
    if (bytes == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mutex());
    auto& free = pool();
    auto it = free.lower_bound(bytes);
    if (it != free.end()) {
      void* p = it->second;
      sizes()[p] = it->first;
      free.erase(it);
      return p;
    }
    if (!free.empty()) {  // keep the pool small: drop the largest (too small) free buffer
      auto last = std::prev(free.end());
      std::free(last->second);
      free.erase(last);
    }
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(64, rounded);
    if (p != nullptr) sizes()[p] = rounded;
    return p;
  }
  static void give(void* p) {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lock(mutex());
    auto it = sizes().find(p);
    pool().emplace(it->second, p);
    sizes().erase(it);
  }

 private:
  static std::mutex& mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
  }
  static std::multimap<size_t, void*>& pool() {
    static auto* p = new std::multimap<size_t, void*>;
    return *p;
  }
  static std::map<void*, size_t>& sizes() {
    static auto* s = new std::map<void*, size_t>;
    return *s;
  }
};

struct Lease {
  void* ptr = nullptr;
  explicit Lease(size_t bytes) : ptr(Buffers::take(bytes)) {}
  ~Lease() { Buffers::give(ptr); }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
};

// ---------------------------------------------------------------------------
// Plans: the primitives of one convolution shape.

struct Shape {
  int64_t n, c, h, w, o, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr;
  bool operator<(const Shape& s) const {
    return std::tie(n, c, h, w, o, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr) <
           std::tie(s.n, s.c, s.h, s.w, s.o, s.kh, s.kw, s.oh, s.ow, s.sh, s.sw, s.pt, s.pb, s.pl, s.pr);
  }
};

// A memory descriptor owned here.
struct Desc {
  handle md = nullptr;
  size_t bytes = 0;
  Desc() = default;
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  ~Desc() {
    if (md != nullptr) dnnl_memory_desc_destroy(md);
  }
  bool set(const void* from) {
    if (from == nullptr || dnnl_memory_desc_clone(&md, from) != kSuccess) return false;
    bytes = dnnl_memory_desc_get_size(md);
    return true;
  }
};

// A reorder from one layout to another (none when they are equal).
struct Reorder {
  handle prim = nullptr;
  Desc scratch;
};

// One primitive with its layouts (the ones it chose) and scratchpad.
struct Step {
  handle prim = nullptr;
  // The primitive's layouts: fwd src, weights, dst; bwd data diff_dst, weights, diff_src;
  // bwd weights src, diff_dst, diff_weights.
  Desc a, b, c;
  Desc scratch;
  Reorder ra, rb, rc;  // a, b from the plain layouts; c to the plain layout
};

enum Kind { kFwd = 0, kData = 1, kWeights = 2 };
enum Layout { kBlocked = 0, kPlain = 1 };

// Which layout each primitive of a shape uses (see the note at the top): the one
// MIND_DIFFUSION_CONV_LAYOUT fixes, or with "auto" the faster on the first calls.
struct Tuner {
  std::mutex m;
  int calls = 0;
  double best[2] = {1e300, 1e300};
  std::atomic<int> chosen{-1};
};

struct Plan {
  Desc src, weights, bias, dst;  // plain NCHW / OIHW / [O]
  Step step[3][2];               // [kind][layout]
  bool have[3][2] = {};
  Tuner tune[3];
};

struct Attr {
  handle attr = nullptr;
  Attr() {
    if (dnnl_primitive_attr_create(&attr) == kSuccess) dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  }
  ~Attr() {
    if (attr != nullptr) dnnl_primitive_attr_destroy(attr);
  }
};

struct PrimitiveDesc {
  handle pd = nullptr;
  ~PrimitiveDesc() {
    if (pd != nullptr) dnnl_primitive_desc_destroy(pd);
  }
};

bool plain(Desc* d, int ndims, const int64_t* dims) {
  int64_t strides[4];
  int64_t s = 1;
  for (int i = ndims - 1; i >= 0; --i) {
    strides[i] = s;
    s *= dims[i];
  }
  handle md = nullptr;
  if (dnnl_memory_desc_create_with_strides(&md, ndims, dims, kF32, strides) != kSuccess) return false;
  const bool ok = d->set(md);
  dnnl_memory_desc_destroy(md);
  return ok;
}

bool make_reorder(const Desc& from, const Desc& to, Reorder* r) {
  if (dnnl_memory_desc_equal(from.md, to.md)) return true;
  Attr attr;
  PrimitiveDesc pd;
  if (dnnl_reorder_primitive_desc_create(&pd.pd, from.md, context().engine, to.md, context().engine, attr.attr) !=
      kSuccess) {
    return false;
  }
  return r->scratch.set(dnnl_primitive_desc_query_md(pd.pd, kQueryScratchpad, 0)) &&
         dnnl_primitive_create(&r->prim, pd.pd) == kSuccess;
}

// Fills a step from its primitive descriptor: the layouts it chose (queries qa, qb, qc)
// and the reorders from plain a, b and to plain c.
bool make_step(const PrimitiveDesc& pd, int qa, int qb, int qc, const Desc& pa, const Desc& pb, const Desc& pc,
               Step* s) {
  return s->a.set(dnnl_primitive_desc_query_md(pd.pd, qa, 0)) && s->b.set(dnnl_primitive_desc_query_md(pd.pd, qb, 0)) &&
         s->c.set(dnnl_primitive_desc_query_md(pd.pd, qc, 0)) &&
         s->scratch.set(dnnl_primitive_desc_query_md(pd.pd, kQueryScratchpad, 0)) &&
         dnnl_primitive_create(&s->prim, pd.pd) == kSuccess && make_reorder(pa, s->a, &s->ra) &&
         make_reorder(pb, s->b, &s->rb) && make_reorder(s->c, pc, &s->rc);
}

// The three primitives with one choice of layouts: oneDNN's own ("any": blocked) or plain NCHW.
void build_set(const Shape& k, Layout layout, Plan* p) {
  const int64_t src[4] = {k.n, k.c, k.h, k.w}, wei[4] = {k.o, k.c, k.kh, k.kw}, dst[4] = {k.n, k.o, k.oh, k.ow};
  const int64_t strides[2] = {k.sh, k.sw}, dilates[2] = {0, 0}, pad_l[2] = {k.pt, k.pl}, pad_r[2] = {k.pb, k.pr};
  Desc any_src, any_wei, any_dst;
  const void *s_md = p->src.md, *w_md = p->weights.md, *d_md = p->dst.md;
  if (layout == kBlocked) {
    if (dnnl_memory_desc_create_with_tag(&any_src.md, 4, src, kF32, kFormatAny) != kSuccess ||
        dnnl_memory_desc_create_with_tag(&any_wei.md, 4, wei, kF32, kFormatAny) != kSuccess ||
        dnnl_memory_desc_create_with_tag(&any_dst.md, 4, dst, kF32, kFormatAny) != kSuccess) {
      return;
    }
    s_md = any_src.md;
    w_md = any_wei.md;
    d_md = any_dst.md;
  }
  Attr attr;
  PrimitiveDesc fwd, data, wgt;
  if (attr.attr == nullptr ||
      dnnl_convolution_forward_primitive_desc_create(&fwd.pd, context().engine, kForwardTraining, kConvolutionDirect,
                                                     s_md, w_md, p->bias.md, d_md, strides, dilates, pad_l, pad_r,
                                                     attr.attr) != kSuccess) {
    return;
  }
  p->have[kFwd][layout] =
      make_step(fwd, kQuerySrc, kQueryWeights, kQueryDst, p->src, p->weights, p->dst, &p->step[kFwd][layout]);
  if (dnnl_convolution_backward_data_primitive_desc_create(&data.pd, context().engine, kConvolutionDirect, s_md, w_md,
                                                           d_md, strides, dilates, pad_l, pad_r, fwd.pd,
                                                           attr.attr) == kSuccess) {
    p->have[kData][layout] = make_step(data, kQueryDiffDst, kQueryWeights, kQueryDiffSrc, p->dst, p->weights, p->src,
                                       &p->step[kData][layout]);
  }
  if (dnnl_convolution_backward_weights_primitive_desc_create(&wgt.pd, context().engine, kConvolutionDirect, s_md,
                                                              w_md, p->bias.md, d_md, strides, dilates, pad_l, pad_r,
                                                              fwd.pd, attr.attr) == kSuccess) {
    p->have[kWeights][layout] = make_step(wgt, kQuerySrc, kQueryDiffDst, kQueryDiffWeights, p->src, p->dst,
                                          p->weights, &p->step[kWeights][layout]);
  }
}

// The layout MIND_DIFFUSION_CONV_LAYOUT asks for: "blocked" (the default), "plain", or
// "auto" (-1: time both on the first calls of each shape).
int forced_layout() {
  const char* env = std::getenv("MIND_DIFFUSION_CONV_LAYOUT");
  if (env != nullptr && std::strcmp(env, "plain") == 0) return kPlain;
  if (env != nullptr && std::strcmp(env, "auto") == 0) return -1;
  return kBlocked;
}

bool build(const Shape& k, Plan* p) {
  const int64_t src[4] = {k.n, k.c, k.h, k.w}, wei[4] = {k.o, k.c, k.kh, k.kw}, bias[1] = {k.o},
                dst[4] = {k.n, k.o, k.oh, k.ow};
  if (!plain(&p->src, 4, src) || !plain(&p->weights, 4, wei) || !plain(&p->bias, 1, bias) || !plain(&p->dst, 4, dst)) {
    return false;
  }
  // oneDNN plans its work split for the concurrency it assumes outside a parallel call
  // (a per-thread setting): make it the pool's for the creation, then restore it.
  int before = 0;
  dnnl_threadpool_interop_get_max_concurrency(&before);
  dnnl_threadpool_interop_set_max_concurrency(context().pool->get_num_threads());
  const int forced = forced_layout();
  if (forced != kPlain) build_set(k, kBlocked, p);
  const bool all_blocked = p->have[kFwd][kBlocked] && p->have[kData][kBlocked] && p->have[kWeights][kBlocked];
  if (forced != kBlocked || !all_blocked) build_set(k, kPlain, p);  // plain also stands in for a refused blocked one
  dnnl_threadpool_interop_set_max_concurrency(before);
  for (int kind = 0; kind < 3; ++kind) {
    if (!p->have[kind][kBlocked] && !p->have[kind][kPlain]) return false;
    if (forced >= 0 && p->have[kind][forced]) {
      p->tune[kind].chosen = forced;
    } else if (!p->have[kind][kBlocked] || !p->have[kind][kPlain]) {
      p->tune[kind].chosen = p->have[kind][kBlocked] ? kBlocked : kPlain;
    }
  }
  return true;
}

// The plan of a shape, built on first use; null when oneDNN refuses it.
Plan* plan(const Shape& k) {
  static std::mutex* m = new std::mutex;
  static auto* plans = new std::map<Shape, Plan*>;  // never freed (see context())
  std::lock_guard<std::mutex> lock(*m);
  auto it = plans->find(k);
  if (it != plans->end()) return it->second;
  Plan* p = new Plan;
  if (!build(k, p)) {
    delete p;
    p = nullptr;
  }
  (*plans)[k] = p;
  return p;
}

// ---------------------------------------------------------------------------
// Execution.

struct Memory {
  handle mem = nullptr;
  Memory(const Desc& d, void* data) {
    if (dnnl_memory_create(&mem, d.md, context().engine, data) != kSuccess) mem = nullptr;
  }
  ~Memory() {
    if (mem != nullptr) dnnl_memory_destroy(mem);
  }
};

bool execute(handle prim, const Desc& scratch, std::initializer_list<std::pair<int, const Memory*>> args) {
  std::vector<ExecArg> list;
  for (auto& a : args) {
    if (a.second->mem == nullptr) return false;
    list.push_back({a.first, a.second->mem});
  }
  Lease pad(scratch.bytes);
  std::unique_ptr<Memory> pad_mem;
  if (scratch.bytes > 0) {
    if (pad.ptr == nullptr) return false;
    pad_mem.reset(new Memory(scratch, pad.ptr));
    if (pad_mem->mem == nullptr) return false;
    list.push_back({kArgScratchpad, pad_mem->mem});
  }
  handle s = stream();
  return s != nullptr && dnnl_primitive_execute(prim, s, static_cast<int>(list.size()), list.data()) == kSuccess;
}

bool reorder(const Reorder& r, const Desc& from_md, void* from, const Desc& to_md, void* to) {
  Memory a(from_md, from), b(to_md, to);
  return execute(r.prim, r.scratch, {{kArgFrom, &a}, {kArgTo, &b}});
}

// `data` in the step's layout `want`: itself when no reorder is needed, else a copy in `lease`.
bool prepare(const Reorder& r, const Desc& plain_md, void* data, const Desc& want, Lease* lease, void** out) {
  if (r.prim == nullptr) {
    *out = data;
    return true;
  }
  lease->ptr = Buffers::take(want.bytes);
  *out = lease->ptr;
  return lease->ptr != nullptr && reorder(r, plain_md, data, want, lease->ptr);
}

using md::is_f32;

bool is_i64(const char* dtype) { return md::is_dtype(dtype, "int64") || md::is_dtype(dtype, "int64_t"); }

// Reads and checks the operands common to the three kernels: x (0), w (1), g (3) and the
// [N, O, OH, OW] tensor at y_index (y or dy), all float32 but g (int64 [6]); fills the shape key.
int unpack(int nparam, int want, int* ndims, int64_t** shapes, const char** dtypes, void** params, int y_index,
           Shape* k) {
  if (nparam != want) return 10;
  for (int i = 0; i < nparam; ++i) {
    if (i == 3) continue;
    if (!is_f32(dtypes[i])) return 11;
  }
  if (!is_i64(dtypes[3]) || ndims[3] != 1 || shapes[3][0] != 6) return 12;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[y_index] != 4) return 13;
  const int64_t* x = shapes[0];
  const int64_t* w = shapes[1];
  const int64_t* y = shapes[y_index];
  const int64_t* g = static_cast<const int64_t*>(params[3]);
  *k = Shape{x[0], x[1], x[2], x[3], w[0], w[2], w[3], y[2], y[3], g[0], g[1], g[2], g[3], g[4], g[5]};
  if (w[1] != x[1] || y[0] != x[0] || y[1] != w[0]) return 14;
  if (k->sh < 1 || k->sw < 1 || k->pt < 0 || k->pb < 0 || k->pl < 0 || k->pr < 0) return 15;
  if (k->oh != (k->h + k->pt + k->pb - k->kh) / k->sh + 1 || k->ow != (k->w + k->pl + k->pr - k->kw) / k->sw + 1) {
    return 16;
  }
  if (k->n * k->c * k->h * k->w == 0 || k->n * k->o * k->oh * k->ow == 0) return 17;
  return 0;
}

// Calls of the three kernels that ran to completion (for tests: proof that the fast path ran).
std::atomic<int64_t> g_calls[3];

}  // namespace

// Completed calls so far of the forward (kind 0), backward-data (1) or backward-weights (2) kernel.
extern "C" int64_t md_conv2d_calls(int kind) { return kind >= 0 && kind < 3 ? g_calls[kind].load() : -1; }

// 0 when the library is usable (oneDNN v3 with the threadpool runtime, engine and stream made);
// writes oneDNN's version and the pool's thread count.
extern "C" int md_conv2d_probe(int* major, int* minor, int* patch, int* threads) try {
  const Version* v = dnnl_version();
  if (v != nullptr) {
    *major = v->major;
    *minor = v->minor;
    *patch = v->patch;
  }
  if (!context().ok) return 1;
  *threads = context().pool->get_num_threads();
  return stream() == nullptr ? 2 : 0;
} catch (...) {
  return 5;
}

// Runs kernel `kind` with the layout chosen for it; until that is known (kTuneCalls calls), the
// calls alternate between the layouts, the first of each warming up (JIT, page faults) and the
// others timed, and the faster layout (by its best time) is kept.
static constexpr int kTuneCalls = 6;

template <class Run>
static int tuned(Plan* p, Kind kind, const Shape& k, Run run) {
  Tuner& t = p->tune[kind];
  const int chosen = t.chosen.load();
  if (chosen >= 0) return run(p->step[kind][chosen]);
  int call;
  {
    std::lock_guard<std::mutex> lock(t.m);
    call = t.calls++;
  }
  const int layout = call % 2;
  const auto start = std::chrono::steady_clock::now();
  if (int err = run(p->step[kind][layout])) return err;
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::lock_guard<std::mutex> lock(t.m);
  if (call >= 2) t.best[layout] = std::min(t.best[layout], ms);
  if (t.calls >= kTuneCalls && t.chosen.load() < 0) {
    t.chosen = t.best[kPlain] < t.best[kBlocked] ? kPlain : kBlocked;
    if (std::getenv("MIND_DIFFUSION_CONV_VERBOSE") != nullptr) {
      static const char* kinds[3] = {"forward", "backward-data", "backward-weights"};
      std::fprintf(stderr,
                   "mind_diffusion conv2d %s x[%ld,%ld,%ld,%ld] w[%ld,%ld,%ld,%ld] stride %ld: blocked %.2f ms, "
                   "plain %.2f ms -> %s\n",
                   kinds[kind], (long)k.n, (long)k.c, (long)k.h, (long)k.w, (long)k.o, (long)k.c, (long)k.kh,
                   (long)k.kw, (long)k.sh, t.best[kBlocked], t.best[kPlain], t.chosen == kPlain ? "plain" : "blocked");
    }
  }
  return 0;
}

// y = conv(x, w) + b; params: x, w, b, g, y.
static int md_conv2d_fwd_impl(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*,
                              void*) {
  Shape k;
  if (int err = unpack(nparam, 5, ndims, shapes, dtypes, params, 4, &k)) return err;
  if (ndims[2] != 1 || shapes[2][0] != k.o) return 18;
  if (!context().ok) return 1;
  Plan* p = plan(k);
  if (p == nullptr) return 2;
  const int err = tuned(p, kFwd, k, [&](const Step& s) {
    Lease xl(0), wl(0), yl(0);
    void *x, *w;
    if (!prepare(s.ra, p->src, params[0], s.a, &xl, &x) || !prepare(s.rb, p->weights, params[1], s.b, &wl, &w)) {
      return 3;
    }
    void* y = params[4];
    if (s.rc.prim != nullptr) {
      yl.ptr = Buffers::take(s.c.bytes);
      if (yl.ptr == nullptr) return 3;
      y = yl.ptr;
    }
    Memory mx(s.a, x), mw(s.b, w), mb(p->bias, params[2]), my(s.c, y);
    if (!execute(s.prim, s.scratch, {{kArgSrc, &mx}, {kArgWeights, &mw}, {kArgBias, &mb}, {kArgDst, &my}})) return 4;
    if (s.rc.prim != nullptr && !reorder(s.rc, s.c, y, p->dst, params[4])) return 3;
    return 0;
  });
  if (err == 0) g_calls[kFwd].fetch_add(1);
  return err;
}

// dx = ∂(Σ y·dy)/∂x; params: x (shape only), w, dy, g, dx.
static int md_conv2d_bwd_data_impl(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                   void*, void*) {
  Shape k;
  if (int err = unpack(nparam, 5, ndims, shapes, dtypes, params, 2, &k)) return err;
  if (ndims[4] != 4 || !std::equal(shapes[0], shapes[0] + 4, shapes[4])) return 18;
  if (!context().ok) return 1;
  Plan* p = plan(k);
  if (p == nullptr) return 2;
  const int err = tuned(p, kData, k, [&](const Step& s) {
    Lease dyl(0), wl(0), dxl(0);
    void *dy, *w;
    if (!prepare(s.ra, p->dst, params[2], s.a, &dyl, &dy) || !prepare(s.rb, p->weights, params[1], s.b, &wl, &w)) {
      return 3;
    }
    void* dx = params[4];
    if (s.rc.prim != nullptr) {
      dxl.ptr = Buffers::take(s.c.bytes);
      if (dxl.ptr == nullptr) return 3;
      dx = dxl.ptr;
    }
    Memory mdy(s.a, dy), mw(s.b, w), mdx(s.c, dx);
    if (!execute(s.prim, s.scratch, {{kArgDiffDst, &mdy}, {kArgWeights, &mw}, {kArgDiffSrc, &mdx}})) return 4;
    if (s.rc.prim != nullptr && !reorder(s.rc, s.c, dx, p->src, params[4])) return 3;
    return 0;
  });
  if (err == 0) g_calls[kData].fetch_add(1);
  return err;
}

// dw = ∂(Σ y·dy)/∂w, db = Σ_{n,h,w} dy; params: x, w (shape only), dy, g, dw, db.
static int md_conv2d_bwd_weights_impl(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                      void*, void*) {
  Shape k;
  if (int err = unpack(nparam, 6, ndims, shapes, dtypes, params, 2, &k)) return err;
  if (ndims[4] != 4 || !std::equal(shapes[1], shapes[1] + 4, shapes[4]) || ndims[5] != 1 || shapes[5][0] != k.o) {
    return 18;
  }
  if (!context().ok) return 1;
  Plan* p = plan(k);
  if (p == nullptr) return 2;
  const int err = tuned(p, kWeights, k, [&](const Step& s) {
    Lease xl(0), dyl(0), dwl(0);
    void *x, *dy;
    if (!prepare(s.ra, p->src, params[0], s.a, &xl, &x) || !prepare(s.rb, p->dst, params[2], s.b, &dyl, &dy)) {
      return 3;
    }
    void* dw = params[4];
    if (s.rc.prim != nullptr) {
      dwl.ptr = Buffers::take(s.c.bytes);
      if (dwl.ptr == nullptr) return 3;
      dw = dwl.ptr;
    }
    Memory mx(s.a, x), mdy(s.b, dy), mdw(s.c, dw), mdb(p->bias, params[5]);
    if (!execute(s.prim, s.scratch,
                 {{kArgSrc, &mx}, {kArgDiffDst, &mdy}, {kArgDiffWeights, &mdw}, {kArgDiffBias, &mdb}})) {
      return 4;
    }
    if (s.rc.prim != nullptr && !reorder(s.rc, s.c, dw, p->weights, params[4])) return 3;
    return 0;
  });
  if (err == 0) g_calls[kWeights].fetch_add(1);
  return err;
}

// Entry points: no exception may cross extern "C" (a failed allocation is reported as an error code).
#define MD_ENTRY(NAME)                                                                                     \
  extern "C" int NAME(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,       \
                      void* stream, void* extra) {                                                        \
    try {                                                                                                  \
      return NAME##_impl(nparam, params, ndims, shapes, dtypes, stream, extra);                            \
    } catch (...) {                                                                                        \
      return 5;                                                                                            \
    }                                                                                                      \
  }

MD_ENTRY(md_conv2d_fwd)
MD_ENTRY(md_conv2d_bwd_data)
MD_ENTRY(md_conv2d_bwd_weights)
