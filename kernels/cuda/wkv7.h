// WKV-7 CUDA kernels: the host-side interface shared by the kernels (*.cu) and the binding.
//
// The operator, per batch element and head, with the state S[i, j] indexed (value i, key j):
//
//     d_t = exp(-exp(w_t))
//     S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
//     y_t = S_t r_t
//
// Layouts (all contiguous, row-major):
//     r, w, k, v, a, b, y, dy and their gradients   [B, T, H, N]   (step: [B, H, N])
//     states                                       [B, H, N, N]   float32, S[i, j] at i * N + j
//
// This header needs only the CUDA runtime and bf16 headers, so the kernels build without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace wkv7 {

// The forward pass keeps a copy of the state every kChunk steps; the backward pass rebuilds the
// states inside one chunk from that copy. 16 balances checkpoint memory (T / 16 states per
// sequence) against the per-chunk rebuild buffer (16 states per sequence).
constexpr int kChunk = 16;

// Head sizes with a compiled kernel (one thread per state row, so N threads per block). The
// launchers' switch statements list the same sizes.
constexpr int kHeadSizes[] = {32, 64, 128};
__host__ __device__ inline bool supports_head_size(int n) { return n == 32 || n == 64 || n == 128; }

__host__ __device__ inline long long num_chunks(int seq_len) { return (seq_len + kChunk - 1) / kChunk; }

// T is the element type of r, w, k, v, a, b, y and their gradients: float or __nv_bfloat16.
// States, checkpoints and the saved S_{t-1} a_t are always float.
template <typename T>
struct ForwardArgs {
  int batch, seq_len, heads, head_size;
  const T *r, *w, *k, *v, *a, *b;  // [B, T, H, N]
  const float* state0;             // [B, H, N, N], or nullptr for zeros
  T* y;                            // [B, T, H, N]
  float* state_out;                // [B, H, N, N]
  // Saved for the backward pass; both nullptr when no gradient is needed.
  float* checkpoints;  // [B, H, num_chunks(T), N, N]: the state before steps 0, kChunk, 2 kChunk, ...
  float* sa;           // [B, T, H, N]: S_{t-1} a_t
};

template <typename T>
struct BackwardArgs {
  int batch, seq_len, heads, head_size;
  const T *r, *w, *k, *v, *a, *b;  // [B, T, H, N], as given to the forward pass
  const T* dy;                     // [B, T, H, N]
  const float* dstate_out;         // [B, H, N, N] gradient of the final state, or nullptr (zero)
  const float* checkpoints;        // from the forward pass
  const float* sa;                 // from the forward pass
  float* chunk_states;             // work space [B, H, kChunk, N, N]
  T *dr, *dw, *dk, *dv, *da, *db;  // [B, T, H, N]
  float* dstate0;                  // [B, H, N, N], or nullptr when not needed
};

template <typename T>
struct StepArgs {
  int batch, heads, head_size;
  const T *r, *w, *k, *v, *a, *b;  // [B, H, N]
  float* state;                    // [B, H, N, N], updated in place
  float* y;                        // [B, H, N]
};

// Each launcher queues one kernel on `stream` and returns the launch status
// (cudaErrorInvalidValue for an unsupported head size). Defined for T = float, __nv_bfloat16.
template <typename T>
cudaError_t launch_forward(const ForwardArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t launch_backward(const BackwardArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t launch_step(const StepArgs<T>& args, cudaStream_t stream);

}  // namespace wkv7
