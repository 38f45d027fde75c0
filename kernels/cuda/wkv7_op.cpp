// WKV-7 CUDA kernels: the PyTorch binding. Checks shapes, types and devices, allocates the
// outputs, and queues the kernels on the current CUDA stream of the inputs' device.
// The autograd wiring lives in Python (kernels/cuda_ops.py).

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "wkv7.h"

namespace {

using torch::Tensor;

// r..b (and dy) must share shape [B, T, H, N] (or [B, H, N] for the step), dtype, device and be
// contiguous; `like` is r.
void check_like(const Tensor& x, const char* name, const Tensor& like) {
  TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), "wkv7: ", name, " is on ", x.device(), ", r on ", like.device());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7: ", name, " is ", x.scalar_type(), ", r is ",
              like.scalar_type());
  TORCH_CHECK(x.sizes() == like.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", r has ", like.sizes());
  TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
}

// States are float32 [B, H, N, N], contiguous, on r's device.
void check_state(const Tensor& s, const char* name, const Tensor& like, int64_t batch, int64_t heads, int64_t n) {
  TORCH_CHECK(s.device() == like.device(), "wkv7: ", name, " is on ", s.device(), ", r on ", like.device());
  TORCH_CHECK(s.scalar_type() == torch::kFloat32, "wkv7: ", name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 4 && s.size(0) == batch && s.size(1) == heads && s.size(2) == n && s.size(3) == n,
              "wkv7: ", name, " must have shape [", batch, ", ", heads, ", ", n, ", ", n, "], got ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), "wkv7: ", name, " must be contiguous");
}

void check_inputs(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                  const Tensor& b) {
  check_like(r, "r", r);
  check_like(w, "w", r);
  check_like(k, "k", r);
  check_like(v, "v", r);
  check_like(a, "a", r);
  check_like(b, "b", r);
}

void check_element_type(const Tensor& r) {
  TORCH_CHECK(r.scalar_type() == torch::kFloat32 || r.scalar_type() == torch::kBFloat16,
              "wkv7: inputs must be float32 or bfloat16, got ", r.scalar_type());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "wkv7: launching the ", what, " kernel failed: ", cudaGetErrorString(err));
}

// at::BFloat16 and __nv_bfloat16 are both one 16-bit bfloat16 value.
template <typename T>
T* data(const Tensor& x) {
  return reinterpret_cast<T*>(x.data_ptr());
}
template <typename T>
const T* data_or_null(const std::optional<Tensor>& x) {
  return x.has_value() ? reinterpret_cast<const T*>(x->data_ptr()) : nullptr;
}

template <typename T>
void run_forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
                 const std::optional<Tensor>& state0, Tensor& y, Tensor& state_out, Tensor& checkpoints, Tensor& sa,
                 bool save) {
  wkv7::ForwardArgs<T> args{};
  args.batch = static_cast<int>(r.size(0));
  args.seq_len = static_cast<int>(r.size(1));
  args.heads = static_cast<int>(r.size(2));
  args.head_size = static_cast<int>(r.size(3));
  args.r = data<T>(r);
  args.w = data<T>(w);
  args.k = data<T>(k);
  args.v = data<T>(v);
  args.a = data<T>(a);
  args.b = data<T>(b);
  args.state0 = data_or_null<float>(state0);
  args.y = data<T>(y);
  args.state_out = data<float>(state_out);
  args.checkpoints = save ? data<float>(checkpoints) : nullptr;
  args.sa = save ? data<float>(sa) : nullptr;
  check_launch(wkv7::launch_forward<T>(args, c10::cuda::getCurrentCUDAStream()), "forward");
}

template <typename T>
void run_backward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
                  const Tensor& dy, const std::optional<Tensor>& dstate_out, const Tensor& checkpoints, const Tensor& sa,
                  Tensor& chunk_states, std::vector<Tensor>& grads, Tensor& dstate0, bool need_dstate0) {
  wkv7::BackwardArgs<T> args{};
  args.batch = static_cast<int>(r.size(0));
  args.seq_len = static_cast<int>(r.size(1));
  args.heads = static_cast<int>(r.size(2));
  args.head_size = static_cast<int>(r.size(3));
  args.r = data<T>(r);
  args.w = data<T>(w);
  args.k = data<T>(k);
  args.v = data<T>(v);
  args.a = data<T>(a);
  args.b = data<T>(b);
  args.dy = data<T>(dy);
  args.dstate_out = data_or_null<float>(dstate_out);
  args.checkpoints = data<float>(checkpoints);
  args.sa = data<float>(sa);
  args.chunk_states = data<float>(chunk_states);
  args.dr = data<T>(grads[0]);
  args.dw = data<T>(grads[1]);
  args.dk = data<T>(grads[2]);
  args.dv = data<T>(grads[3]);
  args.da = data<T>(grads[4]);
  args.db = data<T>(grads[5]);
  args.dstate0 = need_dstate0 ? data<float>(dstate0) : nullptr;
  check_launch(wkv7::launch_backward<T>(args, c10::cuda::getCurrentCUDAStream()), "backward");
}

template <typename T>
void run_step(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
              Tensor& state, Tensor& y) {
  wkv7::StepArgs<T> args{};
  args.batch = static_cast<int>(r.size(0));
  args.heads = static_cast<int>(r.size(1));
  args.head_size = static_cast<int>(r.size(2));
  args.r = data<T>(r);
  args.w = data<T>(w);
  args.k = data<T>(k);
  args.v = data<T>(v);
  args.a = data<T>(a);
  args.b = data<T>(b);
  args.state = data<float>(state);
  args.y = data<float>(y);
  check_launch(wkv7::launch_step<T>(args, c10::cuda::getCurrentCUDAStream()), "step");
}

// Forward pass over [B, T, H, N] inputs. Returns [y, final state, checkpoints, sa]; the last
// two are what the backward pass needs and are empty unless save_for_backward is set.
std::vector<Tensor> forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                            const Tensor& b, const std::optional<Tensor>& state0, bool save_for_backward) {
  TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B, T, H, N], got ", r.sizes());
  check_element_type(r);
  check_inputs(r, w, k, v, a, b);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(wkv7::supports_head_size(static_cast<int>(N)), "wkv7: no kernel for head size ", N);
  if (state0.has_value()) check_state(*state0, "state0", r, B, H, N);

  const c10::cuda::CUDAGuard device_guard(r.device());
  const auto f32 = r.options().dtype(torch::kFloat32);
  Tensor y = torch::empty_like(r);
  Tensor state_out = torch::empty({B, H, N, N}, f32);
  Tensor checkpoints = save_for_backward ? torch::empty({B, H, wkv7::num_chunks(static_cast<int>(T)), N, N}, f32)
                                         : torch::empty({0}, f32);
  Tensor sa = save_for_backward ? torch::empty({B, T, H, N}, f32) : torch::empty({0}, f32);
  if (B * H == 0) return {y, state_out, checkpoints, sa};

  if (r.scalar_type() == torch::kFloat32) {
    run_forward<float>(r, w, k, v, a, b, state0, y, state_out, checkpoints, sa, save_for_backward);
  } else {
    run_forward<__nv_bfloat16>(r, w, k, v, a, b, state0, y, state_out, checkpoints, sa, save_for_backward);
  }
  return {y, state_out, checkpoints, sa};
}

// Backward pass. Returns [dr, dw, dk, dv, da, db, dstate0] (dstate0 empty unless asked for).
std::vector<Tensor> backward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                             const Tensor& b, const Tensor& dy, const std::optional<Tensor>& dstate_out,
                             const Tensor& checkpoints, const Tensor& sa, bool need_dstate0) {
  TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B, T, H, N], got ", r.sizes());
  check_element_type(r);
  check_inputs(r, w, k, v, a, b);
  check_like(dy, "dy", r);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(wkv7::supports_head_size(static_cast<int>(N)), "wkv7: no kernel for head size ", N);
  if (dstate_out.has_value()) check_state(*dstate_out, "dstate_out", r, B, H, N);
  TORCH_CHECK(checkpoints.scalar_type() == torch::kFloat32 && checkpoints.is_contiguous() &&
                  checkpoints.numel() == B * H * wkv7::num_chunks(static_cast<int>(T)) * N * N,
              "wkv7: checkpoints do not come from a forward pass with save_for_backward on these shapes");
  TORCH_CHECK(sa.scalar_type() == torch::kFloat32 && sa.is_contiguous() && sa.numel() == r.numel(),
              "wkv7: sa does not come from a forward pass with save_for_backward on these shapes");

  const c10::cuda::CUDAGuard device_guard(r.device());
  const auto f32 = r.options().dtype(torch::kFloat32);
  std::vector<Tensor> grads;
  for (int i = 0; i < 6; ++i) grads.push_back(torch::empty_like(r));
  Tensor dstate0 = need_dstate0 ? torch::empty({B, H, N, N}, f32) : torch::empty({0}, f32);
  if (B * H == 0) {
    grads.push_back(dstate0);
    return grads;
  }
  Tensor chunk_states = torch::empty({B, H, wkv7::kChunk, N, N}, f32);

  if (r.scalar_type() == torch::kFloat32) {
    run_backward<float>(r, w, k, v, a, b, dy, dstate_out, checkpoints, sa, chunk_states, grads, dstate0,
                        need_dstate0);
  } else {
    run_backward<__nv_bfloat16>(r, w, k, v, a, b, dy, dstate_out, checkpoints, sa, chunk_states, grads, dstate0,
                                need_dstate0);
  }
  grads.push_back(dstate0);
  return grads;
}

// One step for B streams: inputs [B, H, N], `state` [B, H, N, N] float32 updated in place.
// Returns y [B, H, N] float32.
Tensor step_(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
             Tensor& state) {
  TORCH_CHECK(r.dim() == 3, "wkv7 step: inputs must be [B, H, N], got ", r.sizes());
  check_element_type(r);
  check_inputs(r, w, k, v, a, b);
  const int64_t B = r.size(0), H = r.size(1), N = r.size(2);
  TORCH_CHECK(wkv7::supports_head_size(static_cast<int>(N)), "wkv7: no kernel for head size ", N);
  check_state(state, "state", r, B, H, N);

  const c10::cuda::CUDAGuard device_guard(r.device());
  Tensor y = torch::empty({B, H, N}, r.options().dtype(torch::kFloat32));
  if (B * H == 0) return y;
  if (r.scalar_type() == torch::kFloat32) {
    run_step<float>(r, w, k, v, a, b, state, y);
  } else {
    run_step<__nv_bfloat16>(r, w, k, v, a, b, state, y);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "WKV-7 CUDA kernels (chunked training forward/backward, batched single step)";
  m.attr("CHUNK") = wkv7::kChunk;
  py::list head_sizes;
  for (int n : wkv7::kHeadSizes) head_sizes.append(n);
  m.attr("HEAD_SIZES") = py::tuple(head_sizes);
  m.def("supports_head_size", [](int64_t n) { return wkv7::supports_head_size(static_cast<int>(n)); },
        "Whether a kernel is compiled for head size n", py::arg("n"));
  m.def("forward", &forward, "Sequence forward: returns [y, state_T, checkpoints, sa]", py::arg("r"), py::arg("w"),
        py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("state0"), py::arg("save_for_backward"));
  m.def("backward", &backward, "Sequence backward: returns [dr, dw, dk, dv, da, db, dstate0]", py::arg("r"),
        py::arg("w"), py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("dy"), py::arg("dstate_out"),
        py::arg("checkpoints"), py::arg("sa"), py::arg("need_dstate0"));
  m.def("step_", &step_, "One step for B streams, state updated in place: returns y", py::arg("r"), py::arg("w"),
        py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("state"));
}
