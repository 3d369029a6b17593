// Python bindings of the fused Euler and Runge-Kutta stage kernels: flowmatch_fast._cuda_euler.
//
// Deliberately torch-free: tensors arrive as raw pointers (ints), dtype codes, sizes and
// strides, and the stream as the integer handle of PyTorch's current stream (device HOST: the
// host emulation, on CPU tensors). The module links only the static CUDA runtime, so one build
// serves every torch version with a compatible driver (torch 2.11 and 2.13 alike). The Python
// side is flowmatch_fast/kernels/cuda/ (loader.py, launch.py); entry points: api.h.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "api.h"

namespace py = pybind11;
using namespace fmf;  // the entry points and codes of api.h

namespace {

[[noreturn]] void throw_cuda(cudaError_t err, const char* what) {
  std::ostringstream msg;
  msg << "flowmatch_fast._cuda_euler: " << what << " failed: " << cudaGetErrorName(err) << ": "
      << cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorUnsupportedPtxVersion ||
      err == cudaErrorInvalidKernelImage) {
    msg << " (the extension holds code for " << kernel_arch_list()
        << "; rebuild for this GPU, e.g. FLOWMATCH_FAST_CUDA_ARCHS=<major><minor> "
           "pip install --no-build-isolation -e .)";
  } else if (err == cudaErrorInsufficientDriver) {
    msg << " (no usable NVIDIA driver: none is installed, or it is older than the CUDA "
        << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10
        << " runtime this extension was built with needs)";
  }
  throw std::runtime_error(msg.str());
}

// Row-major coalescing of a strided view: drops size-1 dims and merges each dim into its outer
// neighbour when that neighbour's stride is exactly size * stride of the inner one. The linear
// element order (the state's row-major order) is preserved; outermost dim first.
std::pair<std::vector<int64_t>, std::vector<int64_t>> coalesce(const std::vector<int64_t>& sizes,
                                                               const std::vector<int64_t>& strides) {
  if (sizes.size() != strides.size()) {
    throw py::value_error("flowmatch_fast._cuda_euler: sizes and strides differ in length");
  }
  std::vector<int64_t> out_sizes, out_strides;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] < 0) throw py::value_error("flowmatch_fast._cuda_euler: negative size");
    if (sizes[d] == 1) continue;
    if (!out_sizes.empty() && out_strides.back() == sizes[d] * strides[d]) {
      out_sizes.back() *= sizes[d];  // the outer dim steps over exactly one inner row
      out_strides.back() = strides[d];
    } else {
      out_sizes.push_back(sizes[d]);
      out_strides.push_back(strides[d]);
    }
  }
  return {std::move(out_sizes), std::move(out_strides)};
}

// Makes `device` the calling thread's current device for the launch and restores the previous
// one afterwards (the static runtime shares the driver's per-thread current context with
// PyTorch's runtime, so the restore keeps PyTorch's view unchanged). No-op in the usual case.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int current = -1;
    cudaError_t err = cudaGetDevice(&current);
    if (err != cudaSuccess) throw_cuda(err, "cudaGetDevice");
    if (current != device) {
      err = cudaSetDevice(device);
      if (err != cudaSuccess) throw_cuda(err, "cudaSetDevice");
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// What both launches check and hand to the kernels: StepArgs, with the field's dims coalesced
// (held here, StepArgs points into them). n == 0 means there is nothing to launch.
struct Checked {
  StepArgs args{};
  std::pair<std::vector<int64_t>, std::vector<int64_t>> dims;
};

void check_launch(Checked& c, uintptr_t x, int state_code, uintptr_t field, uintptr_t field_uncond,
                  int field_code, int mode, uintptr_t out, bool doubled, uintptr_t traj,
                  int64_t traj_row, int64_t traj_stride, const std::vector<int64_t>& sizes,
                  const std::vector<int64_t>& field_strides, uintptr_t grid, int64_t step,
                  double guidance_weight, int device) {
  if (state_code != kF32 && state_code != kF64) {
    throw py::value_error("flowmatch_fast._cuda_euler: state dtype code must be float32 or float64");
  }
  if (field_code < kF16 || field_code > kF64) {
    throw py::value_error("flowmatch_fast._cuda_euler: unknown field dtype code");
  }
  if (mode < 0 || mode >= kNumModes) {
    throw py::value_error("flowmatch_fast._cuda_euler: unknown velocity mode " + std::to_string(mode));
  }
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;  // negative sizes are rejected by coalesce() below
  c.dims = coalesce(sizes, field_strides);
  const int rank = static_cast<int>(c.dims.first.size());
  StepArgs& a = c.args;
  a.n = n;
  if (n == 0) return;  // nothing to write: no launch
  if (rank > kMaxDims) {
    throw py::value_error("flowmatch_fast._cuda_euler: the field has more than " +
                          std::to_string(kMaxDims) + " dims after coalescing");
  }
  if (x == 0 || field == 0 || out == 0 || grid == 0 || (mode != kFieldOnly && field_uncond == 0)) {
    throw py::value_error("flowmatch_fast._cuda_euler: null tensor pointer");
  }
  if (step < 0) throw py::value_error("flowmatch_fast._cuda_euler: negative step index");
  if (traj != 0 && (traj_row < 1 || n % traj_row != 0 || traj_stride < 0)) {
    throw py::value_error("flowmatch_fast._cuda_euler: bad trajectory row size or stride");
  }
  if (device < kHost) throw py::value_error("flowmatch_fast._cuda_euler: bad device index");
  a.state_code = state_code;
  a.field_code = field_code;
  a.mode = mode;
  a.x = reinterpret_cast<const void*>(x);
  a.v = reinterpret_cast<const void*>(field);
  a.v_uncond = mode != kFieldOnly ? reinterpret_cast<const void*>(field_uncond) : nullptr;
  a.out = reinterpret_cast<void*>(out);
  a.traj = reinterpret_cast<void*>(traj);
  a.doubled = doubled;
  a.traj_row = traj_row;
  a.traj_stride = traj_stride;
  a.rank = rank;
  a.sizes = c.dims.first.data();
  a.strides = c.dims.second.data();
  a.grid_step = reinterpret_cast<const float*>(grid) + step;
  a.guidance_weight = guidance_weight;
}

// Runs launch(target) and raises CUDA's error, if any. On a GPU: without the GIL (a launch can
// block when the launch queue is full) and with the tensors' device current. On the host
// (device == kHost): synchronously, with the GIL held.
template <class F>
void run_launch(int device, uintptr_t stream, const char* what, F&& launch) {
  cudaError_t err;
  if (device == kHost) {
    err = launch(Target{kHost, nullptr});
  } else {
    py::gil_scoped_release no_gil;
    DeviceGuard guard(device);
    err = launch(Target{device, reinterpret_cast<cudaStream_t>(stream)});
  }
  if (err != cudaSuccess) throw_cuda(err, what);
}

void euler_step(uintptr_t x, int state_code, uintptr_t v, uintptr_t v_uncond, int field_code,
                int mode, uintptr_t out, bool doubled, uintptr_t traj, int64_t traj_row,
                int64_t traj_stride, const std::vector<int64_t>& sizes,
                const std::vector<int64_t>& field_strides, uintptr_t grid, int64_t step,
                double guidance_weight, int device, uintptr_t stream) {
  Checked c;
  check_launch(c, x, state_code, v, v_uncond, field_code, mode, out, doubled, traj, traj_row,
               traj_stride, sizes, field_strides, grid, step, guidance_weight, device);
  if (c.args.n == 0) return;
  run_launch(device, stream, "the Euler kernel launch",
             [&](const Target& t) { return launch_euler_step(c.args, t); });
}

// acc and acc_out (0 when absent) are contiguous arrays of the compute dtype, i.e. of out's.
void stage_step(uintptr_t x, int state_code, uintptr_t k, uintptr_t k_uncond, int field_code,
                int mode, uintptr_t acc, uintptr_t out, uintptr_t acc_out, bool doubled,
                uintptr_t traj, int64_t traj_row, int64_t traj_stride,
                const std::vector<int64_t>& sizes, const std::vector<int64_t>& field_strides,
                uintptr_t grid, int64_t step, double coef, bool acc_w2, bool from_acc,
                double guidance_weight, int device, uintptr_t stream) {
  Checked c;
  check_launch(c, x, state_code, k, k_uncond, field_code, mode, out, doubled, traj, traj_row,
               traj_stride, sizes, field_strides, grid, step, guidance_weight, device);
  if (c.args.n == 0) return;
  const StageArgs st{reinterpret_cast<const void*>(acc), reinterpret_cast<void*>(acc_out), coef,
                     acc_w2, from_acc};
  run_launch(device, stream, "the Runge-Kutta stage kernel launch",
             [&](const Target& t) { return launch_stage_step(c.args, st, t); });
}

// The SDE step: the state, out, the trajectory slot, noise and lp are contiguous float32 (out
// unused when replaying); `table` is the grid's [T, 7] float32 table, `step` its row.
void sde_step(uintptr_t x, uintptr_t v, uintptr_t v_uncond, int field_code, int mode,
              uintptr_t table, int64_t step, uintptr_t noise, bool replay, uintptr_t out,
              uintptr_t traj, int64_t traj_row, int64_t traj_stride, uintptr_t lp,
              const std::vector<int64_t>& sizes, const std::vector<int64_t>& field_strides,
              double guidance_weight, int device, uintptr_t stream) {
  if (step < 0) throw py::value_error("flowmatch_fast._cuda_euler: negative step index");
  Checked c;  // the table's row as the "grid" pointer: 7 floats per step
  check_launch(c, x, kF32, v, v_uncond, field_code, mode, replay ? lp : out, false, traj,
               traj_row, traj_stride, sizes, field_strides, table, 7 * step, guidance_weight,
               device);
  if (c.args.n == 0) return;
  if (noise == 0 || lp == 0) throw py::value_error("flowmatch_fast._cuda_euler: null tensor pointer");
  const SdeArgs sa{reinterpret_cast<const float*>(noise), reinterpret_cast<float*>(lp), replay};
  run_launch(device, stream, "the SDE kernel launch",
             [&](const Target& t) { return launch_sde_step(c.args, sa, t); });
}

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    throw_cuda(err, "cudaGetDeviceCount");
  }
  return count;
}

std::vector<std::string> compiled_archs() {
  std::vector<std::string> archs;
  std::string list = kernel_arch_list(), item;
  std::istringstream in(list);
  while (std::getline(in, item, ';')) {
    if (!item.empty()) archs.push_back(item);
  }
  return archs;
}

std::string build_info() {
  std::ostringstream s;
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);  // works without a GPU or driver
  s << "flowmatch_fast._cuda_euler: archs " << kernel_arch_list() << "; CUDA runtime "
    << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << " (static, reports "
    << runtime << "); max field dims " << kMaxDims;
  return s.str();
}

py::list field_offsets(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
                       const std::vector<int64_t>& indices, bool force64) {
  auto dims = coalesce(sizes, strides);
  if (dims.first.empty()) {  // one element: offset 0
    dims.first.push_back(1);
    dims.second.push_back(0);
  }
  std::vector<int64_t> result(indices.size());
  if (!field_offsets_host(static_cast<int>(dims.first.size()), dims.first.data(),
                          dims.second.data(), indices.data(),
                          static_cast<int64_t>(indices.size()), force64, result.data())) {
    throw py::value_error("flowmatch_fast._cuda_euler: too many dims after coalescing");
  }
  return py::cast(result);
}

}  // namespace

PYBIND11_MODULE(_cuda_euler, m) {
  m.doc() = "flowmatch_fast's fused Euler update and Runge-Kutta stage (CUDA, torch-free "
            "binding; see flowmatch_fast/kernels/cuda/launch.py)";
  m.attr("MAX_DIMS") = kMaxDims;
  m.attr("HOST") = kHost;
  m.def("euler_step", &euler_step, py::arg("x"), py::arg("state_code"), py::arg("v"),
        py::arg("v_uncond"), py::arg("field_code"), py::arg("mode"), py::arg("out"),
        py::arg("doubled"), py::arg("traj"), py::arg("traj_row"), py::arg("traj_stride"),
        py::arg("sizes"), py::arg("field_strides"), py::arg("grid"), py::arg("step"),
        py::arg("guidance_weight"), py::arg("device"), py::arg("stream"),
        "Launch out = x + (grid[step+1]-grid[step]) * v on `stream` (raw pointers; async), or "
        "with device=HOST run the same kernel code on the host (host pointers; synchronous).");
  m.def("stage_step", &stage_step, py::arg("x"), py::arg("state_code"), py::arg("k"),
        py::arg("k_uncond"), py::arg("field_code"), py::arg("mode"), py::arg("acc"),
        py::arg("out"), py::arg("acc_out"), py::arg("doubled"), py::arg("traj"),
        py::arg("traj_row"), py::arg("traj_stride"), py::arg("sizes"), py::arg("field_strides"),
        py::arg("grid"), py::arg("step"), py::arg("coef"), py::arg("acc_w2"),
        py::arg("from_acc"), py::arg("guidance_weight"), py::arg("device"), py::arg("stream"),
        "Launch one Runge-Kutta stage (reference.stage_step's arithmetic); devices as euler_step.");
  m.def("sde_step", &sde_step, py::arg("x"), py::arg("v"), py::arg("v_uncond"),
        py::arg("field_code"), py::arg("mode"), py::arg("table"), py::arg("step"),
        py::arg("noise"), py::arg("replay"), py::arg("out"), py::arg("traj"),
        py::arg("traj_row"), py::arg("traj_stride"), py::arg("lp"), py::arg("sizes"),
        py::arg("field_strides"), py::arg("guidance_weight"), py::arg("device"),
        py::arg("stream"),
        "Launch one step of the RL recipes' SDE (reference.sde_step's arithmetic); devices as "
        "euler_step.");
  m.def("device_count", &device_count,
        "cudaGetDeviceCount through the extension's runtime; RuntimeError with CUDA's message.");
  m.def("build_info", &build_info, "Compiled archs and CUDA runtime version.");
  m.def("compiled_archs", &compiled_archs, "e.g. ['sm_80', 'sm_90', 'compute_90'].");
  m.def("dtype_codes", []() {
    py::dict d;
    d["float16"] = static_cast<int>(kF16);
    d["bfloat16"] = static_cast<int>(kBF16);
    d["float32"] = static_cast<int>(kF32);
    d["float64"] = static_cast<int>(kF64);
    return d;
  });
  m.def("velocity_modes", []() {
    py::dict d;
    d["field"] = static_cast<int>(kFieldOnly);
    d["cfg"] = static_cast<int>(kCfg);
    d["mix"] = static_cast<int>(kMix);
    return d;
  });
  m.def("host_launches", []() {
    const HostLaunch r = host_launches();
    py::dict d;
    d["euler"] = r.count[0];
    d["stage"] = r.count[1];
    d["sde"] = r.count[2];
    d["kernel"] = r.kernel == 0 ? "euler" : r.kernel == 1 ? "stage" : "sde";
    d["contiguous"] = r.contiguous;
    d["vectorized"] = r.vectorized;
    d["index32"] = r.index32;
    d["vec"] = r.vec;
    d["blocks"] = r.blocks;
    return d;
  }, "Launch counts of the host emulation and what it decided for the last launch (tests).");
  m.def("set_host_result_skew", &set_host_result_skew, py::arg("ulps"),
        "Test hook: the host emulation writes every result this many ulps up (0: exact).");
  m.def("set_host_mix_skew", &set_host_mix_skew, py::arg("ulps"),
        "Test hook: the host emulation's mixed (Alpamayo 1.5) velocity moves this many ulps of "
        "the field dtype (0: exact).");
  m.def("widen_host", [](int field_code, const std::vector<uint16_t>& bits) {
    if (field_code != kF16 && field_code != kBF16) {
      throw py::value_error("flowmatch_fast._cuda_euler: widen_host takes float16 or bfloat16");
    }
    std::vector<float> out(bits.size());
    for (size_t k = 0; k < bits.size(); ++k) out[k] = widen_host(field_code, bits[k]);
    return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(float));
  }, py::arg("field_code"), py::arg("bits"),
        "The kernels' widening of 16-bit field elements to float32 on the host, as raw bytes.");
  m.def("narrow_host", [](int field_code, py::bytes values) {
    if (field_code != kF16 && field_code != kBF16) {
      throw py::value_error("flowmatch_fast._cuda_euler: narrow_host takes float16 or bfloat16");
    }
    const std::string raw = values;
    if (raw.size() % sizeof(float) != 0) {
      throw py::value_error("flowmatch_fast._cuda_euler: narrow_host takes float32 bytes");
    }
    std::vector<uint16_t> out(raw.size() / sizeof(float));
    for (size_t k = 0; k < out.size(); ++k) {
      float f;
      memcpy(&f, raw.data() + k * sizeof(float), sizeof(float));
      out[k] = narrow_host(field_code, f);
    }
    return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(uint16_t));
  }, py::arg("field_code"), py::arg("values"),
        "The kernels' rounding of float32 values (raw bytes) to 16-bit field elements on the "
        "host, as raw bytes.");
  m.def("coalesce", &coalesce, py::arg("sizes"), py::arg("strides"),
        "The dims the kernel iterates over (for tests).");
  m.def("field_offsets", &field_offsets, py::arg("sizes"), py::arg("strides"), py::arg("indices"),
        py::arg("force64") = false,
        "Field offsets of linear indices through the kernel's indexer, on the host (for tests).");
}
