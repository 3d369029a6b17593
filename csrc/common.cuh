// Shared by the kernels of flowmatch_fast._cuda_euler (euler_kernel.cu, stage_kernel.cu):
// dtypes, explicitly rounded arithmetic, vector memory access, the strided-field indexer and
// the host-side launch helpers. Compiled by nvcc only; nothing here includes torch.
//
// Every operation of the kernels goes through an explicitly rounded intrinsic (__fmul_rn,
// __dadd_rn, ...): the compiler never contracts those into a fused multiply-add, and the build
// also passes -fmad=false. No conversion rounds where the kernels widen: half/bf16 -> float ->
// double are all exact.

#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fmf {

// Field ranks above this are collapsed first (coalescing, in binding.cpp); Python makes a field
// contiguous in the (never seen in practice) case where even that leaves too many dims.
constexpr int kMaxDims = 8;
constexpr int kThreads = 256;    // threads per block
constexpr int kBlocksPerSm = 8;  // 8 x 256 = 2048 resident threads per SM on sm_80 / sm_90

// dtype codes shared with binding.cpp and (through dtype_codes()) with Python.
enum DTypeCode : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// ------------------------------------------------------------------------------------------
// Types: the field is held as its raw storage type and widened exactly to P on load.
template <int CODE> struct FieldT;
template <> struct FieldT<kF16> {
  using storage = uint16_t;
  using P = float;
  static __device__ __forceinline__ float widen(storage b) { return __half2float(__ushort_as_half(b)); }
};
template <> struct FieldT<kBF16> {
  using storage = uint16_t;
  using P = float;
  // bf16 is the top half of a float32: widening is a shift (what c10::BFloat16 does too).
  static __device__ __forceinline__ float widen(storage b) { return __uint_as_float(uint32_t(b) << 16); }
};
template <> struct FieldT<kF32> {
  using storage = float;
  using P = float;
  static __device__ __forceinline__ float widen(storage b) { return b; }
};
template <> struct FieldT<kF64> {
  using storage = double;
  using P = double;
  static __device__ __forceinline__ double widen(storage b) { return b; }
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
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// ------------------------------------------------------------------------------------------
// Vector memory access: N elements of T moved as one 4/8/16-byte word (LDG/STG .32/.64/.128).
template <int BYTES> struct RawWord;
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<16> { using type = uint4; };

template <class T, int N>
__device__ __forceinline__ void load_vec(const T* p, T (&dst)[N]) {
  using R = typename RawWord<sizeof(T) * N>::type;
  const R r = __ldg(reinterpret_cast<const R*>(p));  // read-only path; inputs never alias out
  memcpy(dst, &r, sizeof(R));                          // register moves after optimisation
}

template <class T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&src)[N]) {
  using R = typename RawWord<sizeof(T) * N>::type;
  R r;
  memcpy(&r, src, sizeof(R));
  *reinterpret_cast<R*>(p) = r;
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
// dims: [B, M] with strides [0, 1]).
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

// Offset in the trajectory slot of state element e: rows of traj_row contiguous elements,
// traj_stride apart. Any launch-parameter struct with these members (Params, StageParams).
template <class Prm>
__device__ __forceinline__ int64_t traj_offset(const Prm& p, int64_t e) {
  int64_t b;
  if (p.use32) {
    b = p.traj_div.div(static_cast<uint32_t>(e));
  } else {
    b = e / p.traj_row;
  }
  return b * p.traj_stride + (e - b * p.traj_row);
}

// ------------------------------------------------------------------------------------------
// Host side.

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

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
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

// Turns a run-time flag into a template argument (nest calls for several flags).
template <class F>
inline cudaError_t with_flag(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace fmf
