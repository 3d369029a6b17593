// The arithmetic and memory access the kernels of flowmatch_fast._cuda_euler share
// (euler_kernel.cu, stage_kernel.cu): dtypes, explicitly rounded arithmetic, the velocity
// modes, vector access and the strided-field indexer. Every function here is
// __host__ __device__: the host emulation (launch.cuh) runs the very same code on the CPU.
//
// Rounding, the same bits on both sides:
// - device: every operation goes through an explicitly rounded intrinsic (__fmul_rn,
//   __dadd_rn, ...), which the compiler never contracts into a fused multiply-add (the build
//   also passes -fmad=false);
// - host: the plain IEEE operators of x86-64 SSE2 / AArch64, round-to-nearest-even in the
//   operand's precision, built with -ffp-contract=off (setup.py) so that no FMA is formed.
// No conversion rounds where the kernels widen: half/bf16 -> float -> double are exact. Where
// they narrow (kMix rounds to the field dtype), float -> half/bf16 rounds to nearest even through
// cuda_fp16.h / cuda_bf16.h: cvt.rn.f16.f32 / cvt.rn.bf16.f32 on the device, the headers'
// software rounding (the same bits; a NaN's payload aside) on the host.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "api.h"

namespace fmf {

constexpr int kThreads = 256;  // threads per block

// ------------------------------------------------------------------------------------------
// Types: the field is held as its raw storage type and widened exactly to P on load; round(p)
// is p rounded to the field dtype (to nearest even) and widened back, the identity for f32/f64.
__host__ __device__ __forceinline__ float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

template <int CODE> struct FieldT;
template <> struct FieldT<kF16> {
  using storage = uint16_t;
  using P = float;
  // cuda_fp16.h: cvt.f32.f16 on the device, its software conversion on the host.
  static __host__ __device__ __forceinline__ float widen(storage b) {
    return __half2float(__ushort_as_half(b));
  }
  static __host__ __device__ __forceinline__ storage narrow(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
  static __host__ __device__ __forceinline__ float round(float f) { return widen(narrow(f)); }
};
template <> struct FieldT<kBF16> {
  using storage = uint16_t;
  using P = float;
  // bf16 is the top half of a float32: widening is a shift (what c10::BFloat16 does too).
  static __host__ __device__ __forceinline__ float widen(storage b) {
    return bits_as_float(uint32_t(b) << 16);
  }
  static __host__ __device__ __forceinline__ storage narrow(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
  static __host__ __device__ __forceinline__ float round(float f) { return widen(narrow(f)); }
};
template <> struct FieldT<kF32> {
  using storage = float;
  using P = float;
  static __host__ __device__ __forceinline__ float widen(storage b) { return b; }
  static __host__ __device__ __forceinline__ float round(float f) { return f; }
};
template <> struct FieldT<kF64> {
  using storage = double;
  using P = double;
  static __host__ __device__ __forceinline__ double widen(storage b) { return b; }
  static __host__ __device__ __forceinline__ double round(double f) { return f; }
};

template <int CODE> struct StateT;
template <> struct StateT<kF32> { using type = float; };
template <> struct StateT<kF64> { using type = double; };

template <int XC, int VC> struct Types {
  using X = typename StateT<XC>::type;
  using F = FieldT<VC>;
  using V = typename F::storage;
  using P = typename F::P;
  using S = typename std::conditional<(sizeof(X) == 8 || sizeof(P) == 8), double, float>::type;
  // Elements per vector access: 16 bytes of the widest of state, field and output. The
  // narrower arrays then move 8 or 4 bytes per access (e.g. f32 state + bf16 field: 4 elements,
  // float4 for x and out, 8 bytes for the field).
  static constexpr int kMaxSize = sizeof(S) > sizeof(V) ? sizeof(S) : sizeof(V);
  static constexpr int VEC = 16 / kMaxSize;
};

// Rounded arithmetic, one overload per precision (never contracted into FMA).
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
#else
template <class T> inline T add_rn(T a, T b) { return a + b; }
template <class T> inline T sub_rn(T a, T b) { return a - b; }
template <class T> inline T mul_rn(T a, T b) { return a * b; }
template <class T> inline T div_rn(T a, T b) { return a / b; }
#endif

// The guidance weight w and 1 - w (computed in double, as Python computes it), each rounded to
// nearest into P once per thread: the scalars of PyTorch's ops on P's math type.
template <class P> struct Weights {
  P w;
  P one_minus_w;
};

// The host emulation's test hooks (api.h: set_host_result_skew, set_host_mix_skew): every result
// it writes moves this many ulps up; every kMix velocity this many ulps of the field dtype (a
// 16-bit field: to the next bit pattern, away from zero). Always 0 on the device, and on the host
// outside those tests.
inline int g_host_result_skew = 0;
inline int g_host_mix_skew = 0;

template <class F, class P>
__host__ __device__ __forceinline__ P skewed_mix(P v) {
#ifndef __CUDA_ARCH__
  for (int k = 0; k < g_host_mix_skew; ++k) {
    if constexpr (sizeof(typename F::storage) == 2) {
      v = F::widen(static_cast<typename F::storage>(F::narrow(v) + 1));  // next 16-bit pattern
    } else {
      v = std::nextafter(v, P(INFINITY));
    }
  }
#endif
  return v;
}

// The velocity of one element in the product dtype P (api.h's VelocityMode).
template <int MODE, class F, class P = typename F::P>
__host__ __device__ __forceinline__ P velocity(typename F::storage vc, typename F::storage vu,
                                               Weights<P> w) {
  static_assert(MODE == kFieldOnly || MODE == kCfg || MODE == kMix,
                "a VelocityMode without a branch here");
  const P c = F::widen(vc);
  if (MODE == kCfg) {
    const P u = F::widen(vu);
    return add_rn(u, mul_rn(w.w, sub_rn(c, u)));  // vu + w * (vc - vu), as guided_velocity()
  }
  if (MODE == kMix) {  // (1 - w) * vu + w * vc, as mixed_velocity(): PyTorch computes each
    // product and the sum in P and rounds it to the field dtype (for f16/bf16: a float32
    // rounding, then a 16-bit one, never fused into one).
    const P u = F::widen(vu);
    return skewed_mix<F>(
        F::round(add_rn(F::round(mul_rn(u, w.one_minus_w)), F::round(mul_rn(c, w.w)))));
  }
  return c;
}

template <class T>
__host__ __device__ __forceinline__ T skewed(T r) {
#ifndef __CUDA_ARCH__
  for (int k = 0; k < g_host_result_skew; ++k) r = std::nextafter(r, T(INFINITY));
#endif
  return r;
}

// ------------------------------------------------------------------------------------------
// Memory access of N consecutive elements: N > 1 moves them as one 4/8/16-byte word
// (LDG/STG .32/.64/.128 on the device; a copy of the same bytes on the host), N == 1 is a
// plain access (the scalar path).
template <int BYTES> struct RawWord;
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<16> { using type = uint4; };

template <class T, int N>
__host__ __device__ __forceinline__ void load_vec(const T* p, T (&dst)[N]) {
  if constexpr (N == 1) {
    dst[0] = *p;
  } else {
    using R = typename RawWord<sizeof(T) * N>::type;
#ifdef __CUDA_ARCH__
    const R r = __ldg(reinterpret_cast<const R*>(p));  // read-only path; inputs never alias out
    memcpy(dst, &r, sizeof(R));                          // register moves after optimisation
#else
    memcpy(dst, p, sizeof(R));
#endif
  }
}

template <class T, int N>
__host__ __device__ __forceinline__ void store_vec(T* p, const T (&src)[N]) {
  if constexpr (N == 1) {
    *p = src[0];
  } else {
    using R = typename RawWord<sizeof(T) * N>::type;
    R r;
    memcpy(&r, src, sizeof(R));
    *reinterpret_cast<R*>(p) = r;
  }
}

// ------------------------------------------------------------------------------------------
// Integer division by a run-time invariant divisor: a multiply-high and a shift instead of a
// division subroutine (Granlund & Montgomery; the same scheme as PyTorch's IntDivider). Exact
// for dividends and divisors below 2^31, which the host guarantees by using it only when the
// element count n <= INT32_MAX; larger launches take the plain 64-bit division.
struct FastDivmod {
  uint32_t divisor;
  uint32_t magic;
  uint32_t shift;

  __host__ void init(uint32_t d) {
    divisor = d;
    for (shift = 0; shift < 32; ++shift) {
      if ((1u << shift) >= d) break;
    }
    const uint64_t one = 1;
    magic = static_cast<uint32_t>(((one << 32) * ((one << shift) - d)) / d + 1);
  }

  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    return (t + n) >> shift;  // no overflow: t <= n < 2^31
  }
};

// Maps the linear index e of an element (row-major in the state's shape) to the offset of the
// field element it reads, for an arbitrarily strided field. Dims are stored innermost first,
// already coalesced by the host (so the usual case, a field broadcast over the batch, is two
// dims: [B, M] with strides [0, 1]). Offsets are 64-bit on both paths: a small field can sit
// far apart in memory (strides x sizes past 2^31).
struct FieldIndexer {
  int rank;  // >= 1 on the strided path
  FastDivmod div[kMaxDims];
  int64_t size[kMaxDims];
  int64_t stride[kMaxDims];

  __host__ __device__ __forceinline__ int64_t offset(int64_t e, bool use32) const {
    int64_t off = 0;
    if (use32) {
      uint32_t idx = static_cast<uint32_t>(e);
#pragma unroll
      for (int d = 0; d < kMaxDims; ++d) {
        if (d == rank - 1) {  // the outermost dim needs no division
          off += static_cast<int64_t>(idx) * stride[d];
          break;
        }
        const uint32_t q = div[d].div(idx);
        off += static_cast<int64_t>(idx - q * div[d].divisor) * stride[d];
        idx = q;
      }
    } else {
      int64_t idx = e;
#pragma unroll
      for (int d = 0; d < kMaxDims; ++d) {
        if (d == rank - 1) {
          off += idx * stride[d];
          break;
        }
        const int64_t q = idx / size[d];
        off += (idx - q * size[d]) * stride[d];
        idx = q;
      }
    }
    return off;
  }
};

// What both kernels read, passed by value inside the kernel parameter (launch.cuh fills it).
template <int XC, int VC>
struct StepParams {
  using T = Types<XC, VC>;
  const typename T::X* x;
  const typename T::V* v;
  const typename T::V* vu;  // unconditional field (kCfg, kMix); same strides as v
  typename T::S* out;       // [n] or [2n]: the doubled copy starts at out + n
  typename T::S* traj;      // row b of the trajectory slot starts at traj + b * traj_stride
  const float* grid;        // &grid[i]: dt = grid[1] - grid[0]
  int64_t n;                // elements of the state
  int64_t traj_row;         // elements per sample (traj rows are contiguous)
  int64_t traj_stride;      // elements between the rows of the trajectory slot
  double w;                 // guidance weight, rounded to P in the kernel (as PyTorch does)
  double one_minus_w;       // 1 - w in double (kMix), rounded to P in the kernel
  FastDivmod traj_div;      // divides by traj_row (use32 and a trajectory only)
  FieldIndexer field;       // strided path only
  bool use32;               // every index fits in 31 bits: fast division
  bool vec;                 // contiguous path: all pointers aligned for the vector width
  bool doubled;             // also write out[e + n]
  bool write_traj;          // also write the trajectory slot
};

// The launch's guidance weights in P, once per thread.
template <int XC, int VC, class P = typename Types<XC, VC>::P>
__host__ __device__ __forceinline__ Weights<P> weights(const StepParams<XC, VC>& p) {
  return {static_cast<P>(p.w), static_cast<P>(p.one_minus_w)};
}

// Offset in the trajectory slot of state element e: rows of traj_row contiguous elements,
// traj_stride apart.
template <int XC, int VC>
__host__ __device__ __forceinline__ int64_t traj_offset(const StepParams<XC, VC>& p, int64_t e) {
  int64_t b;
  if (p.use32) {
    b = p.traj_div.div(static_cast<uint32_t>(e));
  } else {
    b = e / p.traj_row;
  }
  return b * p.traj_stride + (e - b * p.traj_row);
}

// The grid-stride walk of one thread, shared by the kernels: on the contiguous path with every
// pointer aligned (p.vec), VEC elements at a time, then the scalar tail; otherwise one element
// at a time, the field read at its strided offset. op(IntC<N>, e, off) processes the N
// elements from state index e (field offset off).
template <int V> using IntC = std::integral_constant<int, V>;

template <int VEC, bool CONTIG, int XC, int VC, class Op>
__host__ __device__ __forceinline__ void grid_stride(const StepParams<XC, VC>& p, int64_t tid,
                                                     int64_t nthreads, Op&& op) {
  int64_t scalar_start = 0;
  if (CONTIG && p.vec) {
    const int64_t nvec = p.n / VEC;
    for (int64_t k = tid; k < nvec; k += nthreads) op(IntC<VEC>{}, k * VEC, k * VEC);
    scalar_start = nvec * VEC;
  }
  for (int64_t e = scalar_start + tid; e < p.n; e += nthreads) {
    op(IntC<1>{}, e, CONTIG ? e : p.field.offset(e, p.use32));
  }
}

// Loads N state elements and the field(s) at offset off (the unconditional field when
// TWO_FIELDS); independent loads, issued before any use.
template <bool TWO_FIELDS, int XC, int VC, int N>
__host__ __device__ __forceinline__ void load_inputs(const StepParams<XC, VC>& p, int64_t e,
                                                     int64_t off,
                                                     typename Types<XC, VC>::X (&xs)[N],
                                                     typename Types<XC, VC>::V (&vs)[N],
                                                     typename Types<XC, VC>::V (&us)[N]) {
  load_vec(p.x + e, xs);
  load_vec(p.v + off, vs);
  if (TWO_FIELDS) load_vec(p.vu + off, us);
}

// Stores N new state elements from index e: the state, its doubled copy, the trajectory slot
// (rows hold whole vectors on the vector path; for a doubled vector the host checked n % VEC == 0).
template <int XC, int VC, int N>
__host__ __device__ __forceinline__ void write_state(const StepParams<XC, VC>& p, int64_t e,
                                                     const typename Types<XC, VC>::S (&r)[N],
                                                     bool doubled, bool traj) {
  store_vec(p.out + e, r);
  if (doubled) store_vec(p.out + p.n + e, r);
  if (traj) store_vec(p.traj + traj_offset(p, e), r);
}

}  // namespace fmf
