// Fused Euler update of flowmatch_fast: out = x + dt * v, bitwise identical to PyTorch.
//
// Contract (see flowmatch_fast/kernels/__init__.py): with P = double if the field is double,
// else float, and S = double if the state or the field is double, else float:
//
//   dt   = grid[i+1] - grid[i]                      float32 subtraction, read by the kernel
//   vv   = velocity(v[e], v_uncond[e], P(w))        in P (common.cuh; kCfg: vu + w * (vc - vu),
//                                                    kMix: (1 - w) * vu + w * vc)
//   prod = P(dt) * vv                               rounded in P
//   out  = S(x[e]) + S(prod)                        rounded in S
//
// and out[e + n] too for the doubled batch of guidance, and the trajectory slot when asked.
// Shared pieces: common.cuh (arithmetic, access, indexing), launch.cuh (parameters, dispatch,
// the launch on a GPU or on the host).

#include "launch.cuh"

#ifndef FMF_ARCH_LIST
#define FMF_ARCH_LIST "unknown"
#endif

namespace fmf {

// One element of the update (see the contract at the top).
template <int XC, int VC, int MODE>
__host__ __device__ __forceinline__ typename Types<XC, VC>::S euler_element(
    typename Types<XC, VC>::X x, typename Types<XC, VC>::V vc, typename Types<XC, VC>::V vu,
    typename Types<XC, VC>::P dt, Weights<typename Types<XC, VC>::P> w) {
  using T = Types<XC, VC>;
  using S = typename T::S;
  const typename T::P prod = mul_rn(dt, velocity<MODE, typename T::F>(vc, vu, w));
  return skewed(add_rn(static_cast<S>(x), static_cast<S>(prod)));
}

// One thread of the grid-stride launch; flags as template parameters so that each variant
// carries only the loads and stores it needs (2 x 4 dtypes x 24 = 192 variants):
//   CONTIG : the field is laid out like the state (after coalescing): vector accesses when the
//            host found every pointer aligned (p.vec), scalar tail; else per-element indexing.
//   MODE   : the VelocityMode (kCfg and kMix read v_uncond too).
//   TRAJ   : also write the trajectory slot.
//   DOUBLED: also write out[e + n] (the doubled batch of classifier-free guidance).
template <int XC, int VC, bool CONTIG, int MODE, bool TRAJ, bool DOUBLED>
struct EulerKernel {
  using T = Types<XC, VC>;
  StepParams<XC, VC> p;

  __host__ __device__ __forceinline__ void operator()(int64_t tid, int64_t nthreads) const {
    using P = typename T::P;
    // dt is read by the kernel: no host synchronisation, and a captured graph replays it
    // with whatever the grid buffer holds.
    const P dt = static_cast<P>(sub_rn(p.grid[1], p.grid[0]));
    const Weights<P> w = weights(p);
    grid_stride<T::VEC, CONTIG>(p, tid, nthreads, [&](auto width, int64_t e, int64_t off) {
      constexpr int N = decltype(width)::value;
      typename T::X xs[N];
      typename T::V vs[N];
      typename T::V us[N] = {};  // stays zero (and unused) with one field
      typename T::S r[N];
      load_inputs<MODE != kFieldOnly>(p, e, off, xs, vs, us);
#pragma unroll
      for (int j = 0; j < N; ++j) r[j] = euler_element<XC, VC, MODE>(xs[j], vs[j], us[j], dt, w);
      write_state(p, e, r, DOUBLED, TRAJ);
    });
  }
};

// ---- entry points (api.h)

const char* kernel_arch_list() { return FMF_ARCH_LIST; }

cudaError_t launch_euler_step(const StepArgs& a, const Target& t) {
  return dispatch_step(a, [&](auto XC, auto VC, auto Mode, auto Contig) {
    return with_flag(a.traj != nullptr, [&](auto Traj) {
      return with_flag(a.doubled, [&](auto Doubled) {
        constexpr int xc = decltype(XC)::value, vc = decltype(VC)::value;
        EulerKernel<xc, vc, decltype(Contig)::value, decltype(Mode)::value, decltype(Traj)::value,
                    decltype(Doubled)::value> k;
        fill_step_params(k.p, a, Contig);
        return launch(k, t, 0, Contig);
      });
    });
  });
}

// Host-side check of the strided indexing: the field offsets of `count` linear indices,
// through the same FieldIndexer the kernel uses.
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

float widen_host(int field_code, uint16_t bits) {
  return field_code == kF16 ? FieldT<kF16>::widen(bits) : FieldT<kBF16>::widen(bits);
}

uint16_t narrow_host(int field_code, float value) {
  return field_code == kF16 ? FieldT<kF16>::narrow(value) : FieldT<kBF16>::narrow(value);
}

HostLaunch host_launches() { return g_host_launches; }

void set_host_result_skew(int ulps) { g_host_result_skew = ulps; }

void set_host_mix_skew(int ulps) { g_host_mix_skew = ulps; }

}  // namespace fmf
