// The launch helpers both kernel files share: filling the parameters every kernel reads,
// the vector-alignment check, the dispatch of dtype codes, velocity modes and flags onto
// template arguments, and the launch itself, on a GPU or emulated on the host.
//
// A kernel is a struct holding its parameters whose
//   __host__ __device__ void operator()(int64_t tid, int64_t nthreads) const
// is the work of one thread of a grid-stride launch. On a GPU, device_entry<Kernel> calls it
// with the thread's global index; the host emulation calls it for every thread of every block
// of the same grid shape, in order, so the vector path, the scalar tail, the field indexer and
// the trajectory offsets all run as the GPU runs them.

#pragma once

#include <atomic>
#include <type_traits>

#include "common.cuh"

namespace fmf {

constexpr int kBlocksPerSm = 8;  // 8 x 256 = 2048 resident threads per SM on sm_80 / sm_90
// The host emulation sizes its grid for one SM (at most 8 blocks of 256 threads), so that the
// grid-stride loops wrap around from 2049 work items on, i.e. in every test of a few thousand
// elements; on an H200 (132 SMs) they wrap from 270337.
constexpr int kHostSms = 1;

// Multiprocessor count per device, read once with cudaDeviceGetAttribute (no sync, legal
// during stream capture) and cached; 0 = not read yet. One cache for the whole module (an
// inline variable: one definition across the translation units).
constexpr int kMaxDevices = 64;
inline std::atomic<int> g_sm_count[kMaxDevices];  // zero-initialised (static storage)

inline cudaError_t sm_count(int device, int* out) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  int c = g_sm_count[device].load(std::memory_order_relaxed);
  if (c == 0) {
    const cudaError_t err = cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    g_sm_count[device].store(c, std::memory_order_relaxed);
  }
  *out = c;
  return cudaSuccess;
}

// Blocks of a grid-stride launch over `items` work items: enough to cover them, at most what
// the GPU holds resident at once.
inline unsigned grid_blocks(int64_t items, int sms) {
  int64_t blocks = (items + kThreads - 1) / kThreads;
  const int64_t max_blocks = static_cast<int64_t>(sms) * kBlocksPerSm;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Whether the field is laid out like the state (after coalescing).
inline bool contiguous_field(const StepArgs& a) {
  return a.rank == 0 || (a.rank == 1 && a.strides[0] == 1);
}

// The parameters every kernel reads, from the entry point's arguments.
template <int XC, int VC>
void fill_step_params(StepParams<XC, VC>& p, const StepArgs& a, bool contig) {
  using T = Types<XC, VC>;
  memset(&p, 0, sizeof(p));
  p.x = static_cast<const typename T::X*>(a.x);
  p.v = static_cast<const typename T::V*>(a.v);
  p.vu = static_cast<const typename T::V*>(a.v_uncond);
  p.out = static_cast<typename T::S*>(a.out);
  p.traj = static_cast<typename T::S*>(a.traj);
  p.grid = a.grid_step;
  p.n = a.n;
  p.doubled = a.doubled;
  p.write_traj = a.traj != nullptr;
  p.traj_row = p.write_traj ? a.traj_row : 1;
  p.traj_stride = a.traj_stride;
  p.w = a.guidance_weight;
  p.one_minus_w = 1.0 - a.guidance_weight;  // Python's 1 - w: one double subtraction
  p.use32 = a.n <= INT32_MAX;  // then every dividend and divisor (<= n) is below 2^31
  if (p.write_traj && p.use32) p.traj_div.init(static_cast<uint32_t>(p.traj_row));
  if (!contig) {
    p.field.rank = a.rank;
    for (int d = 0; d < a.rank; ++d) {  // innermost first in the kernel's indexer
      const int src = a.rank - 1 - d;
      p.field.size[d] = a.sizes[src];
      p.field.stride[d] = a.strides[src];
      if (p.use32) p.field.div[d].init(static_cast<uint32_t>(a.sizes[src]));
    }
  }
  // Vector accesses need every base pointer aligned to its access width, the doubled copy to
  // start on a vector boundary, and trajectory rows to hold whole vectors. (The stage kernel
  // adds its accumulators.)
  constexpr int VEC = T::VEC;
  p.vec = contig && aligned(a.x, VEC * sizeof(typename T::X)) &&
          aligned(a.v, VEC * sizeof(typename T::V)) &&
          (a.mode == kFieldOnly || aligned(a.v_uncond, VEC * sizeof(typename T::V))) &&
          aligned(a.out, VEC * sizeof(typename T::S)) && (!a.doubled || a.n % VEC == 0) &&
          (!p.write_traj || (aligned(a.traj, VEC * sizeof(typename T::S)) &&
                             a.traj_row % VEC == 0 && a.traj_stride % VEC == 0));
}

// ------------------------------------------------------------------------------ dispatch
// Two state dtypes x four field dtypes; f(IntC<state>, IntC<field>).
template <class F>
cudaError_t with_dtypes(int state_code, int field_code, F&& f) {
  switch (state_code * 4 + field_code) {
    case kF32 * 4 + kF16: return f(IntC<kF32>{}, IntC<kF16>{});
    case kF32 * 4 + kBF16: return f(IntC<kF32>{}, IntC<kBF16>{});
    case kF32 * 4 + kF32: return f(IntC<kF32>{}, IntC<kF32>{});
    case kF32 * 4 + kF64: return f(IntC<kF32>{}, IntC<kF64>{});
    case kF64 * 4 + kF16: return f(IntC<kF64>{}, IntC<kF16>{});
    case kF64 * 4 + kBF16: return f(IntC<kF64>{}, IntC<kBF16>{});
    case kF64 * 4 + kF32: return f(IntC<kF64>{}, IntC<kF32>{});
    case kF64 * 4 + kF64: return f(IntC<kF64>{}, IntC<kF64>{});
    default: return cudaErrorInvalidValue;
  }
}

// f(IntC<mode>) for each VelocityMode.
template <class F>
cudaError_t with_mode(int mode, F&& f) {
  switch (mode) {
    case kFieldOnly: return f(IntC<kFieldOnly>{});
    case kCfg: return f(IntC<kCfg>{});
    case kMix: return f(IntC<kMix>{});
    default: return cudaErrorInvalidValue;
  }
}

// Turns a run-time flag into a template argument (nest calls for several flags).
template <class F>
cudaError_t with_flag(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// What every entry point dispatches on: f(IntC<state>, IntC<field>, IntC<mode>, contig) with
// contig a std::bool_constant (the field laid out like the state). Nothing to do for n == 0.
template <class F>
cudaError_t dispatch_step(const StepArgs& a, F&& f) {
  if (a.n <= 0) return cudaSuccess;
  if (a.rank < 0 || a.rank > kMaxDims) return cudaErrorInvalidValue;
  return with_dtypes(a.state_code, a.field_code, [&](auto xc, auto vc) {
    return with_mode(a.mode, [&](auto mode) {
      return with_flag(contiguous_field(a), [&](auto contig) { return f(xc, vc, mode, contig); });
    });
  });
}

// ------------------------------------------------------------------------------ launch
template <class Kernel>
__global__ void __launch_bounds__(kThreads) device_entry(const Kernel k) {
  k(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
    static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// The host emulation's record (api.h: host_launches). Host launches run with the GIL held
// (binding.cpp), so it is never written concurrently.
inline HostLaunch g_host_launches{};

// Launches `k` on t's device and stream, or walks the same grid on the host; the grid covers
// its work items (vectors on the vector path, else elements). kernel_id: 0 Euler, 1 stage,
// 2 SDE (for the record).
template <class Kernel>
cudaError_t launch(const Kernel& k, const Target& t, int kernel_id, bool contig) {
  constexpr int vec = Kernel::T::VEC;
  const int64_t items = k.p.vec ? (k.p.n + vec - 1) / vec : k.p.n;
  if (t.device == kHost) {
    const unsigned blocks = grid_blocks(items, kHostSms);
    const int64_t nthreads = static_cast<int64_t>(blocks) * kThreads;
    for (int64_t tid = 0; tid < nthreads; ++tid) k(tid, nthreads);  // block-major: tid = b*256+t
    HostLaunch& r = g_host_launches;
    ++r.count[kernel_id];
    r.kernel = kernel_id;
    r.contiguous = contig;
    r.vectorized = k.p.vec;
    r.index32 = k.p.use32;
    r.vec = vec;
    r.blocks = blocks;
    return cudaSuccess;
  }
  int sms = 0;
  const cudaError_t err = sm_count(t.device, &sms);
  if (err != cudaSuccess) return err;
  device_entry<Kernel><<<grid_blocks(items, sms), kThreads, 0, t.stream>>>(k);
  return cudaGetLastError();
}

}  // namespace fmf
