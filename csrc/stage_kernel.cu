// One fused Runge-Kutta stage of flowmatch_fast (midpoint, heun, rk4; the stage programs are in
// flowmatch_fast/integrators.py), bitwise identical to reference.stage_step.
//
// Contract: with P = double if the field is double, else float, and C = double if the state or
// the field is double, else float (the host runs the reference instead when the accumulator
// alone would make C double; see cuda_euler.stage_step):
//
//   kk  = P(k[e]);  guided: kk = ku + P(w) * (kk - ku)   with ku = P(k_uncond[e]), rounded in P
//   kk  = C(kk)                                     exact widening
//   s   = acc_w2 ? kk * 2 : kk;  has_acc: s = acc[e] + s      rounded in C (acc already in C)
//   write_acc: acc_out[e] = s
//   h   = C(grid[i+1] - grid[i])                    float32 subtraction, read on the device
//   h   = coef_one ? h : h * C(coef)                coef rounded to nearest into C, then in C
//   out = C(x[e]) + h * (from_acc ? s : kk)         the product rounded, then the sum, in C
//
// and out[e + n] too for the doubled batch of guidance, and the trajectory slot when asked.
// All arithmetic is in explicitly rounded intrinsics (common.cuh): no fused multiply-add.
//
// Template parameters: the dtypes (8 pairs), CONTIG and GUIDED, i.e. 32 kernels per arch. The
// flags that say which stage of which method runs (has_acc, acc_w2, write_acc, from_acc,
// coef_one) and the optional stores (doubled, traj) are run-time fields of StageParams instead:
// they are uniform over the launch, so each costs a predicated instruction or a branch without
// divergence, next to the element's 3-6 global memory accesses, in a kernel bound by memory
// traffic (or, at Alpamayo's sizes, by launch latency). Making them template parameters too
// would multiply the kernel count by up to 2^7 (the Euler kernel's 128 variants already take
// most of the build time and binary) to save those few instructions. CONTIG and GUIDED stay
// compile-time because they change the loads themselves (vector vs per-element indexed loads of
// the field, one vs two field arrays), and with them the registers the kernel needs.

#include "common.cuh"

namespace fmf {

// Everything one launch needs, passed by value as the kernel parameter.
template <int XC, int VC>
struct StageParams {
  using T = Types<XC, VC>;
  using C = typename T::S;  // the compute dtype: promote(state, P)
  const typename T::X* x;
  const typename T::V* k;
  const typename T::V* ku;  // unconditional field (guided only); same strides as k
  const C* acc;             // contiguous, in C (has_acc only)
  C* out;                   // [n] or [2n]: the doubled copy starts at out + n
  C* acc_out;               // contiguous (write_acc only)
  C* traj;                  // row b of the trajectory slot starts at traj + b * traj_stride
  const float* grid;        // &grid[i]: dt = grid[1] - grid[0]
  int64_t n;                // elements of the state
  int64_t traj_row;         // elements per sample (traj rows are contiguous)
  int64_t traj_stride;      // elements between the rows of the trajectory slot
  double w;                 // guidance weight, rounded to P in the kernel (as PyTorch does)
  double coef;              // the stage's step coefficient, rounded to C in the kernel
  FastDivmod traj_div;      // divides by traj_row (use32 and write_traj only)
  FieldIndexer field;       // strided path only
  bool use32;               // every index fits in 31 bits: fast division
  bool vec;                 // contiguous path: all pointers aligned for the vector width
  // Run-time flags, uniform over the launch (see the top of the file).
  bool has_acc;             // s = acc + s
  bool acc_w2;              // s starts at 2 * kk (rk4's middle stages)
  bool write_acc;           // store s into acc_out
  bool from_acc;            // the update uses s instead of kk
  bool coef_one;            // h = dt (no multiplication by coef)
  bool doubled;             // also write out[e + n]
  bool write_traj;          // also write the trajectory slot
};

// One element of the stage (see the contract at the top). Returns the new state; s receives
// the accumulator value.
template <int XC, int VC, bool GUIDED>
__device__ __forceinline__ typename Types<XC, VC>::S stage_element(
    const StageParams<XC, VC>& p, typename Types<XC, VC>::X x, typename Types<XC, VC>::V kc,
    typename Types<XC, VC>::V ku, typename Types<XC, VC>::S acc, typename Types<XC, VC>::S h,
    typename Types<XC, VC>::P w, typename Types<XC, VC>::S& s) {
  using T = Types<XC, VC>;
  using P = typename T::P;
  using C = typename T::S;
  P kv = T::F::widen(kc);
  if (GUIDED) {
    const P u = T::F::widen(ku);
    kv = add_rn(u, mul_rn(w, sub_rn(kv, u)));  // ku + w * (kc - ku), as guided_velocity()
  }
  const C kk = static_cast<C>(kv);
  s = p.acc_w2 ? mul_rn(kk, C(2)) : kk;
  if (p.has_acc) s = add_rn(acc, s);  // acc + s, the reference's operand order
  return add_rn(static_cast<C>(x), mul_rn(h, p.from_acc ? s : kk));
}

// The kernel: a grid-stride loop, as euler_kernel (vector accesses on the contiguous path when
// the host found every pointer aligned, scalar tail; per-element field indexing otherwise).
template <int XC, int VC, bool CONTIG, bool GUIDED>
__global__ void __launch_bounds__(kThreads) stage_kernel(const StageParams<XC, VC> p) {
  using T = Types<XC, VC>;
  using X = typename T::X;
  using V = typename T::V;
  using P = typename T::P;
  using C = typename T::S;
  constexpr int VEC = T::VEC;

  // h once per thread: dt read on the device (graph replays see the grid buffer's contents).
  C h = static_cast<C>(__fsub_rn(p.grid[1], p.grid[0]));
  if (!p.coef_one) h = mul_rn(h, static_cast<C>(p.coef));  // cvt.rn: coef rounded to nearest
  const P w = static_cast<P>(p.w);
  const int64_t n = p.n;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  int64_t scalar_start = 0;
  if (CONTIG && p.vec) {
    const int64_t nvec = n / VEC;
    for (int64_t i = tid; i < nvec; i += nthreads) {
      const int64_t e = i * VEC;
      X xs[VEC];
      V ks[VEC];
      V us[VEC] = {};  // stays zero (and unused) when not guided
      C as[VEC] = {};  // stays zero (and unused) without an accumulator
      C r[VEC];
      C s[VEC];
      load_vec(p.x + e, xs);
      load_vec(p.k + e, ks);
      if (GUIDED) load_vec(p.ku + e, us);
      if (p.has_acc) load_vec(p.acc + e, as);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        r[j] = stage_element<XC, VC, GUIDED>(p, xs[j], ks[j], us[j], as[j], h, w, s[j]);
      }
      store_vec(p.out + e, r);
      if (p.doubled) store_vec(p.out + n + e, r);  // host checked n % VEC == 0
      if (p.write_acc) store_vec(p.acc_out + e, s);
      if (p.write_traj) store_vec(p.traj + traj_offset(p, e), r);  // rows hold whole vectors
    }
    scalar_start = nvec * VEC;
  }
  for (int64_t e = scalar_start + tid; e < n; e += nthreads) {
    const int64_t off = CONTIG ? e : p.field.offset(e, p.use32);
    const V kc = p.k[off];
    const V ku = GUIDED ? p.ku[off] : V(0);
    const C acc = p.has_acc ? p.acc[e] : C(0);
    C s;
    const C r = stage_element<XC, VC, GUIDED>(p, p.x[e], kc, ku, acc, h, w, s);
    p.out[e] = r;
    if (p.doubled) p.out[n + e] = r;
    if (p.write_acc) p.acc_out[e] = s;
    if (p.write_traj) p.traj[traj_offset(p, e)] = r;
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

// Everything the host entry point received, already validated and coalesced by binding.cpp.
struct StageRequest {
  const void* x;
  const void* k;
  const void* ku;   // nullptr: not guided
  const void* acc;  // nullptr: no accumulator input
  void* out;
  void* acc_out;    // nullptr: the accumulator is not written
  void* traj;       // nullptr: no trajectory write
  int64_t n;
  bool doubled;
  int64_t traj_row;
  int64_t traj_stride;
  int rank;  // coalesced field dims; 0 or (1 with stride 1) is the contiguous case
  const int64_t* sizes;    // outermost first, as binding.cpp hands them over
  const int64_t* strides;
  const float* grid_step;  // &grid[i]
  double coef;
  bool acc_w2;
  bool from_acc;
  double w;
  int sms;
  cudaStream_t stream;
};

template <int XC, int VC, bool CONTIG, bool GUIDED>
static cudaError_t launch_stage_variant(const StageRequest& a) {
  using T = Types<XC, VC>;
  using X = typename T::X;
  using V = typename T::V;
  using C = typename T::S;
  constexpr int VEC = T::VEC;

  StageParams<XC, VC> p;
  memset(&p, 0, sizeof(p));
  p.x = static_cast<const X*>(a.x);
  p.k = static_cast<const V*>(a.k);
  p.ku = static_cast<const V*>(a.ku);
  p.acc = static_cast<const C*>(a.acc);
  p.out = static_cast<C*>(a.out);
  p.acc_out = static_cast<C*>(a.acc_out);
  p.traj = static_cast<C*>(a.traj);
  p.grid = a.grid_step;
  p.n = a.n;
  p.has_acc = a.acc != nullptr;
  p.acc_w2 = a.acc_w2;
  p.write_acc = a.acc_out != nullptr;
  p.from_acc = a.from_acc;
  p.coef_one = a.coef == 1.0;
  p.coef = a.coef;
  p.doubled = a.doubled;
  p.write_traj = a.traj != nullptr;
  p.traj_row = p.write_traj ? a.traj_row : 1;
  p.traj_stride = a.traj_stride;
  p.w = a.w;
  p.use32 = a.n <= INT32_MAX;  // then every dividend and divisor (<= n) is below 2^31
  if (p.write_traj && p.use32) p.traj_div.init(static_cast<uint32_t>(p.traj_row));
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
  p.vec = CONTIG && aligned(a.x, VEC * sizeof(X)) && aligned(a.k, VEC * sizeof(V)) &&
          (!GUIDED || aligned(a.ku, VEC * sizeof(V))) && aligned(a.out, VEC * sizeof(C)) &&
          (!p.has_acc || aligned(a.acc, VEC * sizeof(C))) &&
          (!p.write_acc || aligned(a.acc_out, VEC * sizeof(C))) &&
          (!a.doubled || a.n % VEC == 0) &&
          (!p.write_traj || (aligned(a.traj, VEC * sizeof(C)) && a.traj_row % VEC == 0 &&
                             a.traj_stride % VEC == 0));

  const int64_t items = p.vec ? (a.n + VEC - 1) / VEC : a.n;
  stage_kernel<XC, VC, CONTIG, GUIDED><<<grid_blocks(items, a.sms), kThreads, 0, a.stream>>>(p);
  return cudaGetLastError();
}

template <int XC, int VC>
static cudaError_t launch_stage_dtypes(const StageRequest& a) {
  const bool contig = a.rank == 0 || (a.rank == 1 && a.strides[0] == 1);
  return with_flag(contig, [&](auto Contig) {
    return with_flag(a.ku != nullptr, [&](auto Guided) {
      return launch_stage_variant<XC, VC, decltype(Contig)::value, decltype(Guided)::value>(a);
    });
  });
}

// ---- entry point used by binding.cpp (C++ linkage: a mismatched declaration fails to link)

// Launches one stage on `stream`; the caller has made `device` current. acc and acc_out, when
// given, are contiguous arrays of the compute dtype C (the host converts acc). Returns the
// launch's CUDA status (cudaErrorInvalidValue for dtype codes or ranks it does not know).
cudaError_t launch_stage_step(int state_code, int field_code, const void* x, const void* k,
                              const void* k_uncond, const void* acc, void* out, void* acc_out,
                              void* traj, int64_t n, bool doubled, int64_t traj_row,
                              int64_t traj_stride, int rank, const int64_t* sizes,
                              const int64_t* strides, const float* grid_step, double coef,
                              bool acc_w2, bool from_acc, double guidance_weight, int device,
                              cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (rank < 0 || rank > kMaxDims) return cudaErrorInvalidValue;
  StageRequest a{};  // by name: too many fields to keep an aggregate's order readable
  a.x = x;
  a.k = k;
  a.ku = k_uncond;
  a.acc = acc;
  a.out = out;
  a.acc_out = acc_out;
  a.traj = traj;
  a.n = n;
  a.doubled = doubled;
  a.traj_row = traj_row;
  a.traj_stride = traj_stride;
  a.rank = rank;
  a.sizes = sizes;
  a.strides = strides;
  a.grid_step = grid_step;
  a.coef = coef;
  a.acc_w2 = acc_w2;
  a.from_acc = from_acc;
  a.w = guidance_weight;
  a.stream = stream;
  const cudaError_t err = sm_count(device, &a.sms);
  if (err != cudaSuccess) return err;
  switch (state_code * 4 + field_code) {
    case kF32 * 4 + kF16: return launch_stage_dtypes<kF32, kF16>(a);
    case kF32 * 4 + kBF16: return launch_stage_dtypes<kF32, kBF16>(a);
    case kF32 * 4 + kF32: return launch_stage_dtypes<kF32, kF32>(a);
    case kF32 * 4 + kF64: return launch_stage_dtypes<kF32, kF64>(a);
    case kF64 * 4 + kF16: return launch_stage_dtypes<kF64, kF16>(a);
    case kF64 * 4 + kBF16: return launch_stage_dtypes<kF64, kBF16>(a);
    case kF64 * 4 + kF32: return launch_stage_dtypes<kF64, kF32>(a);
    case kF64 * 4 + kF64: return launch_stage_dtypes<kF64, kF64>(a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fmf
