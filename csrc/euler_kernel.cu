// Fused Euler update of flowmatch_fast: out = x + dt * v, bitwise identical to PyTorch.
//
// Contract (see flowmatch_fast/kernels/__init__.py): with P = double if the field is double,
// else float, and S = double if the state or the field is double, else float:
//
//   dt   = grid[i+1] - grid[i]                      float32 subtraction, read on the device
//   vv   = P(v[e]);  guided: vv = vu + P(w) * (vv - vu)   with vu = P(v_uncond[e])
//   prod = P(dt) * vv                               rounded in P
//   out  = S(x[e]) + S(prod)                        rounded in S
//
// Every operation goes through an explicitly rounded intrinsic (__fmul_rn, __dadd_rn, ...):
// the compiler never contracts those into a fused multiply-add, and the build also passes
// -fmad=false. No conversion rounds: half/bf16 -> float -> double are all exact widenings.
//
// Shared pieces (dtypes, rounded arithmetic, vector access, indexing): common.cuh. The fused
// Runge-Kutta stage is in stage_kernel.cu.
//
// This file is compiled by nvcc only; its host entry points (namespace fmf, bottom of the file)
// are called from binding.cpp, which holds the Python bindings. Nothing here includes torch.

#include "common.cuh"

#ifndef FMF_ARCH_LIST
#define FMF_ARCH_LIST "unknown"
#endif

namespace fmf {

// One element of the update (see the contract at the top).
template <int XC, int VC, bool GUIDED>
__device__ __forceinline__ typename Types<XC, VC>::S euler_element(
    typename Types<XC, VC>::X x, typename Types<XC, VC>::V vc, typename Types<XC, VC>::V vu,
    typename Types<XC, VC>::P dt, typename Types<XC, VC>::P w) {
  using T = Types<XC, VC>;
  using P = typename T::P;
  using S = typename T::S;
  P vel = T::F::widen(vc);
  if (GUIDED) {
    const P u = T::F::widen(vu);
    vel = add_rn(u, mul_rn(w, sub_rn(vel, u)));  // vu + w * (vc - vu), as guided_velocity()
  }
  const P prod = mul_rn(dt, vel);
  return add_rn(static_cast<S>(x), static_cast<S>(prod));
}

// Everything one launch needs, passed by value as the kernel parameter (~350 bytes).
template <int XC, int VC>
struct Params {
  using T = Types<XC, VC>;
  const typename T::X* x;
  const typename T::V* v;
  const typename T::V* vu;  // unconditional field (guided only); same strides as v
  typename T::S* out;       // [k*n]; the doubled copy starts at out + n
  typename T::S* traj;      // row b of the trajectory slot starts at traj + b * traj_stride
  const float* grid;        // &grid[i]: dt = grid[1] - grid[0]
  int64_t n;                // elements of the state
  int64_t traj_row;         // M = elements per sample (traj rows are contiguous)
  int64_t traj_stride;      // elements between the rows of the trajectory slot
  double w;                 // guidance weight, rounded to P in the kernel (as PyTorch does)
  FastDivmod traj_div;      // divides by traj_row (use32 only)
  FieldIndexer field;       // strided path only
  bool use32;               // every index fits in 31 bits: fast division
  bool vec;                 // contiguous path: all pointers aligned for the vector width
};

// The kernel: a grid-stride loop, flags as template parameters so that each variant carries
// only the loads and stores it needs.
//   CONTIG : the field is laid out like the state (after coalescing): vector accesses when the
//            host found every pointer aligned (p.vec), scalar tail; else per-element indexing.
//   GUIDED : read v_uncond too and blend.
//   TRAJ   : also write the trajectory slot.
//   DOUBLED: also write out[e + n] (the doubled batch of classifier-free guidance).
template <int XC, int VC, bool CONTIG, bool GUIDED, bool TRAJ, bool DOUBLED>
__global__ void __launch_bounds__(kThreads) euler_kernel(const Params<XC, VC> p) {
  using T = Types<XC, VC>;
  using X = typename T::X;
  using V = typename T::V;
  using P = typename T::P;
  using S = typename T::S;
  constexpr int VEC = T::VEC;

  // dt is read on the device: no host synchronisation, and a captured graph replays it
  // with whatever the grid buffer holds.
  const P dt = static_cast<P>(__fsub_rn(p.grid[1], p.grid[0]));
  const P w = static_cast<P>(p.w);
  const int64_t n = p.n;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  int64_t scalar_start = 0;  // where the per-element loop begins
  if (CONTIG && p.vec) {
    const int64_t nvec = n / VEC;
    for (int64_t k = tid; k < nvec; k += nthreads) {
      const int64_t e = k * VEC;
      X xs[VEC];
      V vs[VEC];
      V us[VEC] = {};  // stays zero (and unused) when not guided
      S r[VEC];
      // Independent loads issued before any use.
      load_vec(p.x + e, xs);
      load_vec(p.v + e, vs);
      if (GUIDED) load_vec(p.vu + e, us);
#pragma unroll
      for (int j = 0; j < VEC; ++j) r[j] = euler_element<XC, VC, GUIDED>(xs[j], vs[j], us[j], dt, w);
      store_vec(p.out + e, r);
      if (DOUBLED) store_vec(p.out + n + e, r);  // host checked n % VEC == 0
      if (TRAJ) store_vec(p.traj + traj_offset(p, e), r);  // rows hold whole vectors
    }
    scalar_start = nvec * VEC;
  }
  for (int64_t e = scalar_start + tid; e < n; e += nthreads) {
    const int64_t off = CONTIG ? e : p.field.offset(e, p.use32);
    const V vc = p.v[off];
    const V vu = GUIDED ? p.vu[off] : V(0);
    const S r = euler_element<XC, VC, GUIDED>(p.x[e], vc, vu, dt, w);
    p.out[e] = r;
    if (DOUBLED) p.out[n + e] = r;
    if (TRAJ) p.traj[traj_offset(p, e)] = r;
  }
}

// ------------------------------------------------------------------------------------------
// Host side (sm_count, aligned, grid_blocks, with_flag: common.cuh).

// Everything the host entry point received, already validated and coalesced by binding.cpp.
struct LaunchRequest {
  const void* x;
  const void* v;
  const void* vu;  // nullptr: not guided
  void* out;
  void* traj;      // nullptr: no trajectory write
  int64_t n;
  bool doubled;
  int64_t traj_row;
  int64_t traj_stride;
  int rank;  // coalesced field dims; 0 or (1 with stride 1) is the contiguous case
  const int64_t* sizes;    // outermost first, as binding.cpp hands them over
  const int64_t* strides;
  const float* grid_step;  // &grid[i]
  double w;
  int sms;
  cudaStream_t stream;
};

template <int XC, int VC, bool CONTIG, bool GUIDED, bool TRAJ, bool DOUBLED>
static cudaError_t launch_variant(const LaunchRequest& a) {
  using T = Types<XC, VC>;
  using X = typename T::X;
  using V = typename T::V;
  using S = typename T::S;
  constexpr int VEC = T::VEC;

  Params<XC, VC> p;
  memset(&p, 0, sizeof(p));
  p.x = static_cast<const X*>(a.x);
  p.v = static_cast<const V*>(a.v);
  p.vu = static_cast<const V*>(a.vu);
  p.out = static_cast<S*>(a.out);
  p.traj = static_cast<S*>(a.traj);
  p.grid = a.grid_step;
  p.n = a.n;
  p.traj_row = TRAJ ? a.traj_row : 1;
  p.traj_stride = a.traj_stride;
  p.w = a.w;
  p.use32 = a.n <= INT32_MAX;  // then every dividend and divisor (<= n) is below 2^31
  if (TRAJ && p.use32) p.traj_div.init(static_cast<uint32_t>(p.traj_row));
  if (!CONTIG) {
    p.field.rank = a.rank;
    for (int d = 0; d < a.rank; ++d) {  // innermost first in the kernel's indexer
      const int src = a.rank - 1 - d;
      p.field.size[d] = a.sizes[src];
      p.field.stride[d] = a.strides[src];
      if (p.use32) p.field.div[d].init(static_cast<uint32_t>(a.sizes[src]));
    }
  }
  // Vector accesses need every base pointer aligned to its access width, the doubled copy to
  // start on a vector boundary, and trajectory rows to hold whole vectors.
  p.vec = CONTIG && aligned(a.x, VEC * sizeof(X)) && aligned(a.v, VEC * sizeof(V)) &&
          (!GUIDED || aligned(a.vu, VEC * sizeof(V))) && aligned(a.out, VEC * sizeof(S)) &&
          (!DOUBLED || a.n % VEC == 0) &&
          (!TRAJ || (aligned(a.traj, VEC * sizeof(S)) && a.traj_row % VEC == 0 &&
                     a.traj_stride % VEC == 0));

  const int64_t items = p.vec ? (a.n + VEC - 1) / VEC : a.n;
  euler_kernel<XC, VC, CONTIG, GUIDED, TRAJ, DOUBLED>
      <<<grid_blocks(items, a.sms), kThreads, 0, a.stream>>>(p);
  return cudaGetLastError();
}

// The four run-time flags become template arguments, one at a time.
template <int XC, int VC>
static cudaError_t launch_dtypes(const LaunchRequest& a) {
  const bool contig = a.rank == 0 || (a.rank == 1 && a.strides[0] == 1);
  return with_flag(contig, [&](auto C) {
    return with_flag(a.vu != nullptr, [&](auto G) {
      return with_flag(a.traj != nullptr, [&](auto Tr) {
        return with_flag(a.doubled, [&](auto D) {
          return launch_variant<XC, VC, decltype(C)::value, decltype(G)::value,
                                decltype(Tr)::value, decltype(D)::value>(a);
        });
      });
    });
  });
}

// ---- entry points used by binding.cpp (C++ linkage: a mismatched declaration fails to link)

int max_dims() { return kMaxDims; }

const char* kernel_arch_list() { return FMF_ARCH_LIST; }

// Launches the update on `stream`; the caller has made `device` current. Returns the launch's
// CUDA status (cudaErrorInvalidValue for dtype codes or ranks it does not know).
cudaError_t launch_euler_step(int state_code, int field_code, const void* x, const void* v,
                              const void* v_uncond, void* out, void* traj, int64_t n,
                              bool doubled, int64_t traj_row, int64_t traj_stride, int rank,
                              const int64_t* sizes, const int64_t* strides,
                              const float* grid_step, double guidance_weight, int device,
                              cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (rank < 0 || rank > kMaxDims) return cudaErrorInvalidValue;
  LaunchRequest a{x,        v,        v_uncond, out,       traj,
                  n,        doubled,  traj_row, traj_stride, rank,
                  sizes,    strides,  grid_step, guidance_weight, 0, stream};
  const cudaError_t err = sm_count(device, &a.sms);
  if (err != cudaSuccess) return err;
  // Two state dtypes x four field dtypes; the output dtype follows from them.
  switch (state_code * 4 + field_code) {
    case kF32 * 4 + kF16: return launch_dtypes<kF32, kF16>(a);
    case kF32 * 4 + kBF16: return launch_dtypes<kF32, kBF16>(a);
    case kF32 * 4 + kF32: return launch_dtypes<kF32, kF32>(a);
    case kF32 * 4 + kF64: return launch_dtypes<kF32, kF64>(a);
    case kF64 * 4 + kF16: return launch_dtypes<kF64, kF16>(a);
    case kF64 * 4 + kBF16: return launch_dtypes<kF64, kBF16>(a);
    case kF64 * 4 + kF32: return launch_dtypes<kF64, kF32>(a);
    case kF64 * 4 + kF64: return launch_dtypes<kF64, kF64>(a);
    default: return cudaErrorInvalidValue;
  }
}

// Host-side check of the strided indexing (runs on the CPU, no GPU needed): the field offsets
// of `count` linear indices, through the same FieldIndexer the kernel uses. `force64` takes the
// 64-bit division path. Sizes/strides are coalesced, outermost first, as for the launch.
bool field_offsets_host(int rank, const int64_t* sizes, const int64_t* strides,
                        const int64_t* indices, int64_t count, bool force64, int64_t* result) {
  if (rank < 1 || rank > kMaxDims) return false;
  FieldIndexer f;
  memset(&f, 0, sizeof(f));
  f.rank = rank;
  int64_t n = 1;
  for (int d = 0; d < rank; ++d) {
    const int src = rank - 1 - d;
    f.size[d] = sizes[src];
    f.stride[d] = strides[src];
    n *= sizes[src];
  }
  const bool use32 = !force64 && n <= INT32_MAX;
  if (use32) {
    for (int d = 0; d < rank; ++d) f.div[d].init(static_cast<uint32_t>(f.size[d]));
  }
  for (int64_t k = 0; k < count; ++k) result[k] = f.offset(indices[k], use32);
  return true;
}

}  // namespace fmf