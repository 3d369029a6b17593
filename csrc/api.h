// The entry points of flowmatch_fast._cuda_euler's kernels and the codes they take: the one
// declaration, included by binding.cpp (the Python bindings) and by the kernel files that
// define them. Host C++ only: no torch, no device code.
//
// Every entry point runs either on a GPU (Target::device >= 0, asynchronously on
// Target::stream) or, with Target::device == kHost, synchronously on the host: the host
// emulation walks the same grid of blocks and threads through the same kernel code (see
// launch.cuh), which is how CI runs the CUDA kernels on CPU tensors.

#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fmf {

// Field ranks above this are collapsed first (coalescing, in binding.cpp); Python makes a field
// contiguous in the (never seen in practice) case where even that leaves too many dims.
constexpr int kMaxDims = 8;

// dtype codes, shared with Python through dtype_codes().
enum DTypeCode : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// How the velocity of an element comes from the field(s), shared with Python through
// velocity_modes(). A new mode is one value here, one case in launch.cuh's with_mode and one
// branch in common.cuh's velocity().
enum VelocityMode : int {
  kFieldOnly = 0,  // v
  kCfg = 1,        // R1 classifier-free guidance: vu + w * (vc - vu), in the product dtype
  kMix = 2,        // Alpamayo 1.5 guidance: (1 - w) * vu + w * vc, rounded as PyTorch rounds it
};
constexpr int kNumModes = 3;

constexpr int kHost = -1;  // Target::device of the host emulation

struct Target {
  int device;           // CUDA device index, or kHost
  cudaStream_t stream;  // ignored on the host
};

// What both kernels take. Pointers are raw (device memory on a GPU, host memory on kHost);
// the field's dims are coalesced, outermost first (binding.cpp), 0 or 1 stride-1 dim when it
// is laid out like the state.
struct StepArgs {
  int state_code;  // kF32 / kF64
  int field_code;  // any DTypeCode
  int mode;        // VelocityMode; v_uncond is read by kCfg and kMix
  const void* x;
  const void* v;
  const void* v_uncond;  // same strides as v
  void* out;             // contiguous; 2n elements when doubled
  void* traj;            // nullptr: no trajectory write
  int64_t n;             // elements of the state
  bool doubled;          // also write out[n + e] (the doubled batch of guidance)
  int64_t traj_row;      // elements per trajectory row (contiguous)
  int64_t traj_stride;   // elements between trajectory rows
  int rank;
  const int64_t* sizes;
  const int64_t* strides;
  const float* grid_step;  // &grid[i]: dt = grid_step[1] - grid_step[0]
  double guidance_weight;
};

// What only the Runge-Kutta stage takes (see stage_kernel.cu).
struct StageArgs {
  const void* acc;  // nullptr: no accumulator input; else contiguous, in the compute dtype
  void* acc_out;    // nullptr: the accumulator is not written
  double coef;
  bool acc_w2;
  bool from_acc;
};

// What only the SDE step takes (see sde_kernel.cu); StepArgs::grid_step points at the step's
// row of the grid's table, StepArgs::out at the float32 next state (unused when replaying).
struct SdeArgs {
  const float* noise;  // contiguous: the step's noise, or the stored next state (replay)
  float* lp;           // contiguous: the per-element log-probability
  bool replay;
};

// Launch status: cudaSuccess, a CUDA error, or cudaErrorInvalidValue for codes, modes or ranks
// the kernels do not know.
cudaError_t launch_euler_step(const StepArgs& a, const Target& t);
cudaError_t launch_stage_step(const StepArgs& a, const StageArgs& s, const Target& t);
cudaError_t launch_sde_step(const StepArgs& a, const SdeArgs& s, const Target& t);

// What the host emulation launched last (tests read it to see the launcher's decisions).
struct HostLaunch {
  int64_t count[3];  // launches so far: [0] Euler, [1] stage, [2] SDE
  int kernel;        // 0 Euler, 1 stage, 2 SDE (the last launch)
  bool contiguous;   // the field is laid out like the state
  bool vectorized;   // the vector path was taken (every pointer aligned, rows whole vectors)
  bool index32;      // 32-bit fast division
  int vec;           // elements per vector access of this dtype pair
  int64_t blocks;    // grid size walked
};
HostLaunch host_launches();
// Test hook: the host emulation adds `ulps` units in the last place to every result it writes
// (0: exact). Proves that the parity tests notice a one-ulp change in the kernels' output.
void set_host_result_skew(int ulps);
// Test hook: the host emulation's kMix velocity moves `ulps` units in the last place of the field
// dtype (up, or away from zero for f16/bf16; 0: exact). Proves that the 1.5 parity tests notice a
// one-ulp change in the mix alone.
void set_host_mix_skew(int ulps);

const char* kernel_arch_list();

// Field offsets of `count` linear indices through the kernels' FieldIndexer, on the host;
// `force64` takes the 64-bit division path. false for a rank outside 1..kMaxDims.
bool field_offsets_host(int rank, const int64_t* sizes, const int64_t* strides,
                        const int64_t* indices, int64_t count, bool force64, int64_t* result);

// The kernels' widening of one 16-bit field element (kF16 or kBF16) to float, on the host.
float widen_host(int field_code, uint16_t bits);
// The kernels' narrowing of one float to a 16-bit field element (kF16 or kBF16; round to
// nearest even), on the host.
uint16_t narrow_host(int field_code, float value);

}  // namespace fmf
