// One fused Runge-Kutta stage of flowmatch_fast (midpoint, heun, rk4; the stage programs are in
// flowmatch_fast/integrators.py), bitwise identical to reference.stage_step.
//
// Contract: with P = double if the field is double, else float, and C = double if the state or
// the field is double, else float (the host runs the reference instead when the accumulator
// alone would make C double; see supports() in flowmatch_fast/kernels/cuda/launch.py):
//
//   kk  = velocity(k[e], k_uncond[e], P(w))         in P (common.cuh; kCfg: ku + w * (kc - ku),
//                                                   kMix: (1 - w) * ku + w * kc)
//   kk  = C(kk)                                     exact widening
//   s   = acc_w2 ? kk * 2 : kk;  has_acc: s = acc[e] + s      rounded in C (acc already in C)
//   write_acc: acc_out[e] = s
//   h   = C(grid[i+1] - grid[i])                    float32 subtraction, read on the device
//   h   = coef_one ? h : h * C(coef)                coef rounded to nearest into C, then in C
//   out = C(x[e]) + h * (from_acc ? s : kk)         the product rounded, then the sum, in C
//
// and out[e + n] too for the doubled batch of guidance, and the trajectory slot when asked.
// Shared pieces: common.cuh (arithmetic, access, indexing), launch.cuh (parameters, dispatch,
// the launch on a GPU or on the host).
//
// Template parameters: the dtypes (8 pairs), CONTIG and MODE, i.e. 48 kernels per arch. The
// flags that say which stage of which method runs (has_acc, acc_w2, write_acc, from_acc,
// coef_one) and the optional stores (doubled, traj) are run-time fields of StageParams instead:
// they are uniform over the launch, so each costs a predicated instruction or a branch without
// divergence, next to the element's 3-6 global memory accesses, in a kernel bound by memory
// traffic (or, at Alpamayo's sizes, by launch latency). Making them template parameters too
// would multiply the kernel count by up to 2^7 (the Euler kernel's 128 variants already take
// most of the build time and binary) to save those few instructions. CONTIG and MODE stay
// compile-time because they change the loads themselves (vector vs per-element indexed loads of
// the field, one vs two field arrays), and with them the registers the kernel needs.

#include "launch.cuh"

namespace fmf {

// What one launch needs: the shared parameters plus the accumulator and the stage's flags.
template <int XC, int VC>
struct StageParams : StepParams<XC, VC> {
  using C = typename Types<XC, VC>::S;  // the compute dtype: promote(state, P)
  const C* acc;  // contiguous, in C (has_acc only)
  C* acc_out;    // contiguous (write_acc only)
  double coef;   // the stage's step coefficient, rounded to C in the kernel
  // Run-time flags, uniform over the launch (see the top of the file).
  bool has_acc;   // s = acc + s
  bool acc_w2;    // s starts at 2 * kk (rk4's middle stages)
  bool write_acc; // store s into acc_out
  bool from_acc;  // the update uses s instead of kk
  bool coef_one;  // h = dt (no multiplication by coef)
};

// One element of the stage (see the contract at the top). Returns the new state; s receives
// the accumulator value.
template <int XC, int VC, int MODE>
__host__ __device__ __forceinline__ typename Types<XC, VC>::S stage_element(
    const StageParams<XC, VC>& p, typename Types<XC, VC>::X x, typename Types<XC, VC>::V kc,
    typename Types<XC, VC>::V ku, typename Types<XC, VC>::S acc, typename Types<XC, VC>::S h,
    Weights<typename Types<XC, VC>::P> w, typename Types<XC, VC>::S& s) {
  using T = Types<XC, VC>;
  using C = typename T::S;
  const C kk = static_cast<C>(velocity<MODE, typename T::F>(kc, ku, w));
  s = p.acc_w2 ? mul_rn(kk, C(2)) : kk;
  if (p.has_acc) s = add_rn(acc, s);  // acc + s, the reference's operand order
  return skewed(add_rn(static_cast<C>(x), mul_rn(h, p.from_acc ? s : kk)));
}

// One thread of the grid-stride launch, as EulerKernel (vector accesses on the contiguous path
// when the host found every pointer aligned, scalar tail; per-element field indexing otherwise).
template <int XC, int VC, bool CONTIG, int MODE>
struct StageKernel {
  using T = Types<XC, VC>;
  StageParams<XC, VC> p;

  __host__ __device__ __forceinline__ void operator()(int64_t tid, int64_t nthreads) const {
    using C = typename T::S;
    // h once per thread: dt read by the kernel (graph replays see the grid buffer's contents).
    C h = static_cast<C>(sub_rn(p.grid[1], p.grid[0]));
    if (!p.coef_one) h = mul_rn(h, static_cast<C>(p.coef));  // coef rounded to nearest into C
    const Weights<typename T::P> w = weights(p);
    grid_stride<T::VEC, CONTIG>(p, tid, nthreads, [&](auto width, int64_t e, int64_t off) {
      constexpr int N = decltype(width)::value;
      typename T::X xs[N];
      typename T::V ks[N];
      typename T::V us[N] = {};  // stays zero (and unused) with one field
      C as[N] = {};              // stays zero (and unused) without an accumulator
      C r[N];
      C s[N];
      load_inputs<MODE != kFieldOnly>(p, e, off, xs, ks, us);
      if (p.has_acc) load_vec(p.acc + e, as);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        r[j] = stage_element<XC, VC, MODE>(p, xs[j], ks[j], us[j], as[j], h, w, s[j]);
      }
      write_state(p, e, r, p.doubled, p.write_traj);
      if (p.write_acc) store_vec(p.acc_out + e, s);
    });
  }
};

// ---- entry point (api.h)

cudaError_t launch_stage_step(const StepArgs& a, const StageArgs& st, const Target& t) {
  return dispatch_step(a, [&](auto XC, auto VC, auto Mode, auto Contig) {
    constexpr int xc = decltype(XC)::value, vc = decltype(VC)::value;
    using C = typename Types<xc, vc>::S;
    constexpr int VEC = Types<xc, vc>::VEC;
    StageKernel<xc, vc, decltype(Contig)::value, decltype(Mode)::value> k;
    StageParams<xc, vc>& p = k.p;
    fill_step_params(p, a, Contig);
    p.acc = static_cast<const C*>(st.acc);
    p.acc_out = static_cast<C*>(st.acc_out);
    p.coef = st.coef;
    p.has_acc = st.acc != nullptr;
    p.acc_w2 = st.acc_w2;
    p.write_acc = st.acc_out != nullptr;
    p.from_acc = st.from_acc;
    p.coef_one = st.coef == 1.0;
    p.vec = p.vec && (!p.has_acc || aligned(st.acc, VEC * sizeof(C))) &&
            (!p.write_acc || aligned(st.acc_out, VEC * sizeof(C)));
    return launch(k, t, 1, Contig);
  });
}

}  // namespace fmf
