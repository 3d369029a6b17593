// One step of the RL recipes' SDE with its per-element log-probability (flowmatch_fast/sde.py),
// bitwise identical to reference.sde_step. The state is float32 (the recipes compute the step
// in float32 whatever the field's dtype); with P = double for a double field, else float:
//
//   v    = float(velocity(v[e], v_uncond[e], P(w)))   in P (common.cuh), then rounded to float
//   mean = x[e] * a + (v * c1) * dt                   each product and the sum rounded in float
//   next = replay ? z[e] : mean + s * z[e]            z: the step's noise, or the stored state
//   lp   = -(d * d) / denom - log_s - log_sqrt_2pi    d = next - mean; IEEE division
//
// a, c1, dt, s, denom, log_s, log_sqrt_2pi: the step's row of the grid's table, computed once
// per grid on the device by the same PyTorch ops as the recipes' (sde.py), read here (a graph
// replay reads whatever the table holds). Writes next into out (not when replaying) and the
// trajectory slot, and lp. Every op is an explicitly rounded intrinsic on the device (never
// contracted into a fused multiply-add; the division is __fdiv_rn) and the plain IEEE operator
// on the host emulation.
//
// Template parameters: the field dtype (4), CONTIG and MODE: 24 kernels per arch. replay and the
// trajectory store are run-time flags, uniform over the launch (see stage_kernel.cu's note).

#include "launch.cuh"

namespace fmf {

// What one launch needs: the shared parameters (p.grid points at the step's table row; p.out
// and p.traj are float32 buffers whatever S is) plus the noise and the log-prob.
template <int VC>
struct SdeParams : StepParams<kF32, VC> {
  float* out32;     // the next state (not written when replaying)
  float* traj32;    // the trajectory slot (write_traj)
  const float* z;   // the step's noise, or the stored next state; contiguous
  float* lp;        // per-element log-probability; contiguous
  bool replay;
};

template <int VC, bool CONTIG, int MODE>
struct SdeKernel {
  using T = Types<kF32, VC>;
  SdeParams<VC> p;

  __host__ __device__ __forceinline__ void operator()(int64_t tid, int64_t nthreads) const {
    const float a = p.grid[0], c1 = p.grid[1], dt = p.grid[2], s = p.grid[3];
    const float denom = p.grid[4], log_s = p.grid[5], log_sqrt_2pi = p.grid[6];
    const Weights<typename T::P> w = weights(p);
    grid_stride<T::VEC, CONTIG>(p, tid, nthreads, [&](auto width, int64_t e, int64_t off) {
      constexpr int N = decltype(width)::value;
      float xs[N];
      typename T::V vs[N];
      typename T::V us[N] = {};  // stays zero (and unused) with one field
      float zs[N];
      float r[N];
      float l[N];
      load_inputs<MODE != kFieldOnly>(p, e, off, xs, vs, us);
      load_vec(p.z + e, zs);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float v = static_cast<float>(velocity<MODE, typename T::F>(vs[j], us[j], w));
        const float mean = add_rn(mul_rn(xs[j], a), mul_rn(mul_rn(v, c1), dt));
        const float next = p.replay ? zs[j] : add_rn(mean, mul_rn(s, zs[j]));
        const float d = sub_rn(next, mean);
        r[j] = skewed(next);
        l[j] = skewed(sub_rn(sub_rn(div_rn(-mul_rn(d, d), denom), log_s), log_sqrt_2pi));
      }
      if (!p.replay) store_vec(p.out32 + e, r);
      if (p.write_traj) store_vec(p.traj32 + traj_offset(p, e), r);
      store_vec(p.lp + e, l);
    });
  }
};

// ---- entry point (api.h)

cudaError_t launch_sde_step(const StepArgs& a, const SdeArgs& sa, const Target& t) {
  if (a.state_code != kF32) return cudaErrorInvalidValue;
  return dispatch_step(a, [&](auto XC, auto VC, auto Mode, auto Contig) {
    constexpr int vc = decltype(VC)::value;
    if constexpr (decltype(XC)::value != kF32) {
      return cudaErrorInvalidValue;
    } else {
      constexpr int VEC = Types<kF32, vc>::VEC;
      SdeKernel<vc, decltype(Contig)::value, decltype(Mode)::value> k;
      SdeParams<vc>& p = k.p;
      fill_step_params(p, a, Contig);
      p.out32 = static_cast<float*>(a.out);
      p.traj32 = static_cast<float*>(a.traj);
      p.z = sa.noise;
      p.lp = sa.lp;
      p.replay = sa.replay;
      // float32 buffers at the launch's vector width (fill_step_params checked S-sized ones)
      p.vec = p.vec && aligned(sa.noise, VEC * sizeof(float)) && aligned(sa.lp, VEC * sizeof(float));
      return launch(k, t, 2, Contig);
    }
  });
}

}  // namespace fmf
