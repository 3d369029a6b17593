// Python bindings of the fused Euler and Runge-Kutta stage kernels: flowmatch_fast._cuda_euler.
//
// Deliberately torch-free: tensors arrive as raw device pointers (ints), dtype codes, sizes and
// strides, and the stream as the integer handle of PyTorch's current stream. The module links
// only the static CUDA runtime, so one build serves every torch version with a compatible
// driver (torch 2.11 and 2.13 alike). The Python side is flowmatch_fast/kernels/cuda_euler.py.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#ifndef FMF_ARCH_LIST
#define FMF_ARCH_LIST "unknown"
#endif

namespace py = pybind11;

// Defined in euler_kernel.cu (and stage_kernel.cu, below). C++ linkage on purpose: the mangled names carry the parameter
// types, so a declaration here that drifts from the definition fails at link time.
namespace fmf {
int max_dims();
const char* kernel_arch_list();
cudaError_t launch_euler_step(int state_code, int field_code, const void* x, const void* v,
                              const void* v_uncond, void* out, void* traj, int64_t n,
                              bool doubled, int64_t traj_row, int64_t traj_stride, int rank,
                              const int64_t* sizes, const int64_t* strides,
                              const float* grid_step, double guidance_weight, int device,
                              cudaStream_t stream);
bool field_offsets_host(int rank, const int64_t* sizes, const int64_t* strides,
                        const int64_t* indices, int64_t count, bool force64, int64_t* result);
// Defined in stage_kernel.cu.
cudaError_t launch_stage_step(int state_code, int field_code, const void* x, const void* k,
                              const void* k_uncond, const void* acc, void* out, void* acc_out,
                              void* traj, int64_t n, bool doubled, int64_t traj_row,
                              int64_t traj_stride, int rank, const int64_t* sizes,
                              const int64_t* strides, const float* grid_step, double coef,
                              bool acc_w2, bool from_acc, double guidance_weight, int device,
                              cudaStream_t stream);
}  // namespace fmf

namespace {

// Same values as fmf::DTypeCode in euler_kernel.cu; Python reads them through dtype_codes().
enum : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

[[noreturn]] void throw_cuda(cudaError_t err, const char* what) {
  std::ostringstream msg;
  msg << "flowmatch_fast._cuda_euler: " << what << " failed: " << cudaGetErrorName(err) << ": "
      << cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorUnsupportedPtxVersion ||
      err == cudaErrorInvalidKernelImage) {
    msg << " (the extension holds code for " << FMF_ARCH_LIST
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

// What both launches check and derive from their arguments: the element count and the
// coalesced field dims. n == 0 means there is nothing to launch.
struct Checked {
  int64_t n;
  std::pair<std::vector<int64_t>, std::vector<int64_t>> dims;
  int rank;
};

Checked check_launch(int state_code, int field_code, uintptr_t x, uintptr_t field, uintptr_t out,
                     uintptr_t traj, int64_t traj_row, int64_t traj_stride,
                     const std::vector<int64_t>& sizes, const std::vector<int64_t>& field_strides,
                     uintptr_t grid, int64_t step, int device) {
  if (state_code != kF32 && state_code != kF64) {
    throw py::value_error("flowmatch_fast._cuda_euler: state dtype code must be float32 or float64");
  }
  if (field_code < kF16 || field_code > kF64) {
    throw py::value_error("flowmatch_fast._cuda_euler: unknown field dtype code");
  }
  Checked c;
  c.n = 1;
  for (int64_t s : sizes) c.n *= s;  // negative sizes are rejected by coalesce() below
  c.dims = coalesce(sizes, field_strides);
  c.rank = static_cast<int>(c.dims.first.size());
  if (c.n == 0) return c;  // nothing to write: no launch
  if (c.rank > fmf::max_dims()) {
    throw py::value_error("flowmatch_fast._cuda_euler: the field has more than " +
                          std::to_string(fmf::max_dims()) + " dims after coalescing");
  }
  if (x == 0 || field == 0 || out == 0 || grid == 0) {
    throw py::value_error("flowmatch_fast._cuda_euler: null tensor pointer");
  }
  if (step < 0) throw py::value_error("flowmatch_fast._cuda_euler: negative step index");
  if (traj != 0 && (traj_row < 1 || c.n % traj_row != 0 || traj_stride < 0)) {
    throw py::value_error("flowmatch_fast._cuda_euler: bad trajectory row size or stride");
  }
  if (device < 0) throw py::value_error("flowmatch_fast._cuda_euler: bad device index");
  return c;
}

void euler_step(uintptr_t x, int state_code, uintptr_t v, uintptr_t v_uncond, int field_code,
                uintptr_t out, bool doubled, uintptr_t traj, int64_t traj_row,
                int64_t traj_stride, const std::vector<int64_t>& sizes,
                const std::vector<int64_t>& field_strides, uintptr_t grid, int64_t step,
                double guidance_weight, int device, uintptr_t stream) {
  const Checked c = check_launch(state_code, field_code, x, v, out, traj, traj_row, traj_stride,
                                 sizes, field_strides, grid, step, device);
  if (c.n == 0) return;

  cudaError_t err;
  {
    py::gil_scoped_release no_gil;  // a launch can block when the launch queue is full
    DeviceGuard guard(device);
    err = fmf::launch_euler_step(
        state_code, field_code, reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(v),
        reinterpret_cast<const void*>(v_uncond), reinterpret_cast<void*>(out),
        reinterpret_cast<void*>(traj), c.n, doubled, traj_row, traj_stride, c.rank,
        c.dims.first.data(), c.dims.second.data(), reinterpret_cast<const float*>(grid) + step,
        guidance_weight, device, reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) throw_cuda(err, "the Euler kernel launch");
}

// acc and acc_out (0 when absent) are contiguous arrays of the compute dtype, i.e. of out's.
void stage_step(uintptr_t x, int state_code, uintptr_t k, uintptr_t k_uncond, int field_code,
                uintptr_t acc, uintptr_t out, uintptr_t acc_out, bool doubled, uintptr_t traj,
                int64_t traj_row, int64_t traj_stride, const std::vector<int64_t>& sizes,
                const std::vector<int64_t>& field_strides, uintptr_t grid, int64_t step,
                double coef, bool acc_w2, bool from_acc, double guidance_weight, int device,
                uintptr_t stream) {
  const Checked c = check_launch(state_code, field_code, x, k, out, traj, traj_row, traj_stride,
                                 sizes, field_strides, grid, step, device);
  if (c.n == 0) return;

  cudaError_t err;
  {
    py::gil_scoped_release no_gil;
    DeviceGuard guard(device);
    err = fmf::launch_stage_step(
        state_code, field_code, reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(k),
        reinterpret_cast<const void*>(k_uncond), reinterpret_cast<const void*>(acc),
        reinterpret_cast<void*>(out), reinterpret_cast<void*>(acc_out),
        reinterpret_cast<void*>(traj), c.n, doubled, traj_row, traj_stride, c.rank,
        c.dims.first.data(), c.dims.second.data(), reinterpret_cast<const float*>(grid) + step,
        coef, acc_w2, from_acc, guidance_weight, device, reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) throw_cuda(err, "the Runge-Kutta stage kernel launch");
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
  std::string list = fmf::kernel_arch_list(), item;
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
  s << "flowmatch_fast._cuda_euler: archs " << fmf::kernel_arch_list() << "; CUDA runtime "
    << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << " (static, reports "
    << runtime << "); max field dims " << fmf::max_dims();
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
  if (!fmf::field_offsets_host(static_cast<int>(dims.first.size()), dims.first.data(),
                               dims.second.data(), indices.data(),
                               static_cast<int64_t>(indices.size()), force64, result.data())) {
    throw py::value_error("flowmatch_fast._cuda_euler: too many dims after coalescing");
  }
  return py::cast(result);
}

}  // namespace

PYBIND11_MODULE(_cuda_euler, m) {
  m.doc() = "flowmatch_fast's fused Euler update and Runge-Kutta stage (CUDA, torch-free "
            "binding; see cuda_euler.py)";
  m.attr("MAX_DIMS") = fmf::max_dims();
  m.def("euler_step", &euler_step, py::arg("x"), py::arg("state_code"), py::arg("v"),
        py::arg("v_uncond"), py::arg("field_code"), py::arg("out"), py::arg("doubled"),
        py::arg("traj"), py::arg("traj_row"), py::arg("traj_stride"), py::arg("sizes"),
        py::arg("field_strides"), py::arg("grid"), py::arg("step"), py::arg("guidance_weight"),
        py::arg("device"), py::arg("stream"),
        "Launch out = x + (grid[step+1]-grid[step]) * v on `stream` (raw pointers; async).");
  m.def("stage_step", &stage_step, py::arg("x"), py::arg("state_code"), py::arg("k"),
        py::arg("k_uncond"), py::arg("field_code"), py::arg("acc"), py::arg("out"),
        py::arg("acc_out"), py::arg("doubled"), py::arg("traj"), py::arg("traj_row"),
        py::arg("traj_stride"), py::arg("sizes"), py::arg("field_strides"), py::arg("grid"),
        py::arg("step"), py::arg("coef"), py::arg("acc_w2"), py::arg("from_acc"),
        py::arg("guidance_weight"), py::arg("device"), py::arg("stream"),
        "Launch one Runge-Kutta stage (reference.stage_step's arithmetic) on `stream` "
        "(raw pointers; async).");
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
  m.def("coalesce", &coalesce, py::arg("sizes"), py::arg("strides"),
        "The dims the kernel iterates over (for tests).");
  m.def("field_offsets", &field_offsets, py::arg("sizes"), py::arg("strides"), py::arg("indices"),
        py::arg("force64") = false,
        "Field offsets of linear indices through the kernel's indexer, on the host (for tests).");
}
