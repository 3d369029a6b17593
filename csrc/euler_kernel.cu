// Fused Euler update of flowmatch_fast: out = x + dt * v, bitwise identical to PyTorch.
//
// Contract (see flowmatch_fast/kernels/__init__.py): with P = double if the field is double,
// else float, and S = double if the state or the field is double, else float:
//
//   dt   = grid[i+1] - grid[i]                      float32 subtraction, read by the kernel
//   vv   = velocity(v[e], v_uncond[e], P(w))        in P (common.cuh; kCfg: vu + w * (vc - vu))
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
    typename Types<XC, VC>::P dt, typename Types<XC, VC>::P w) {
  using T = Types<XC, VC>;
  using S = typename T::S;
  const typename T::P prod = mul_rn(dt, velocity<MODE, typename T::F>(vc, vu, w));
  return skewed(add_rn(static_cast<S>(x), static_cast<S>(prod)));
}

// One thread of the grid-stride launch; flags as template parameters so that each variant
// carries only the loads and stores it needs (2 x 4 dtypes x 16 = 128 variants):
//   CONTIG : the field is laid out like the state (after coalescing): vector accesses when the
//            host found every pointer aligned (p.vec), scalar tail; else per-element indexing.
//   MODE   : the VelocityMode (kCfg reads v_uncond too).
//   TRAJ   : also write the trajectory slot.
//   DOUBLED: also write out[e + n] (the doubled batch of classifier-free guidance).
template <int XC, int VC, bool CONTIG, int MODE, bool TRAJ, bool DOUBLED>
struct EulerKernel {
  StepParams<XC, VC> p;

  __host__ __device__ __forceinline__ void operator()(int64_t tid, int64_t nthreads) const {
    using T = Types<XC, VC>;
    using X = typename T::X;
    using V = typename T::V;
    using P = typename T::P;
    using S = typename T::S;
    constexpr int VEC = T::VEC;
    constexpr bool TWO_FIELDS = MODE != kFieldOnly;

    // dt is read by the kernel: no host synchronisation, and a captured graph replays it
    // with whatever the grid buffer holds.
    const P dt = static_cast<P>(sub_rn(p.grid[1], p.grid[0]));
    const P w = static_cast<P>(p.w);
    const int64_t n = p.n;

    int64_t scalar_start = 0;  // where the per-element loop begins
    if (CONTIG && p.vec) {
      const int64_t nvec = n / VEC;
      for (int64_t k = tid; k < nvec; k += nthreads) {
        const int64_t e = k * VEC;
        X xs[VEC];
        V vs[VEC];
        V us[VEC] = {};  // stays zero (and unused) with one field
        S r[VEC];
        // Independent loads issued before any use.
        load_vec(p.x + e, xs);
        load_vec(p.v + e, vs);
        if (TWO_FIELDS) load_vec(p.vu + e, us);
#pragma unroll
        for (int j = 0; j < VEC; ++j) r[j] = euler_element<XC, VC, MODE>(xs[j], vs[j], us[j], dt, w);
        store_vec(p.out + e, r);
        if (DOUBLED) store_vec(p.out + n + e, r);  // host checked n % VEC == 0
        if (TRAJ) store_vec(p.traj + traj_offset(p, e), r);  // rows hold whole vectors
      }
      scalar_start = nvec * VEC;
    }
    for (int64_t e = scalar_start + tid; e < n; e += nthreads) {
      const int64_t off = CONTIG ? e : p.field.offset(e, p.use32);
      const V vc = p.v[off];
      const V vu = TWO_FIELDS ? p.vu[off] : V(0);
      const S r = euler_element<XC, VC, MODE>(p.x[e], vc, vu, dt, w);
      p.out[e] = r;
      if (DOUBLED) p.out[n + e] = r;
      if (TRAJ) p.traj[traj_offset(p, e)] = r;
    }
  }
};

// ---- entry points (api.h)

const char* kernel_arch_list() { return FMF_ARCH_LIST; }

cudaError_t launch_euler_step(const StepArgs& a, const Target& t) {
  if (a.n <= 0) return cudaSuccess;
  if (a.rank < 0 || a.rank > kMaxDims) return cudaErrorInvalidValue;
  const bool contig = contiguous_field(a);
  return with_dtypes(a.state_code, a.field_code, [&](auto XC, auto VC) {
    return with_mode(a.mode, [&](auto Mode) {
      return with_flag(contig, [&](auto Contig) {
        return with_flag(a.traj != nullptr, [&](auto Traj) {
          return with_flag(a.doubled, [&](auto Doubled) {
            constexpr int xc = decltype(XC)::value, vc = decltype(VC)::value;
            EulerKernel<xc, vc, decltype(Contig)::value, decltype(Mode)::value,
                        decltype(Traj)::value, decltype(Doubled)::value> k;
            fill_step_params(k.p, a, contig);
            constexpr int VEC = Types<xc, vc>::VEC;
            const int64_t items = k.p.vec ? (a.n + VEC - 1) / VEC : a.n;
            return launch(k, items, t, 0, contig, VEC);
          });
        });
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

HostLaunch host_launches() { return g_host_launches; }

void set_host_result_skew(int ulps) { g_host_result_skew = ulps; }

}  // namespace fmf
