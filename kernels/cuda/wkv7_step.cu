// WKV-7 for inference: one token for each of B independent streams, states updated in place.
//
// One thread block per (stream, head), one thread per state row, the same arithmetic as one
// step of the training forward pass (wkv7_train.cu):
//     sa_i      = sum_j S[i, j] a[j]
//     S[i, j]   = S[i, j] d[j] + sa_i b[j] + v[i] k[j]
//     y[i]      = sum_j S[i, j] r[j]
// y is float32 like the state, whatever the input type.

#include "wkv7.h"
#include "wkv7_device.h"

namespace wkv7 {
namespace {

template <typename T, int N>
__global__ void __launch_bounds__(N) step_kernel(const StepArgs<T> p) {
  const int seq = blockIdx.x;  // = stream * H + head
  const int i = threadIdx.x;   // this thread owns row i of the state
  const long long at = static_cast<long long>(seq) * N + i;
  float* const row = p.state + static_cast<long long>(seq) * N * N + static_cast<long long>(i) * N;

  __shared__ float r_s[N], d_s[N], k_s[N], a_s[N], b_s[N];
  r_s[i] = to_float(p.r[at]);
  d_s[i] = decay_from_w(to_float(p.w[at]));
  k_s[i] = to_float(p.k[at]);
  a_s[i] = to_float(p.a[at]);
  b_s[i] = to_float(p.b[at]);
  const float v_i = to_float(p.v[at]);
  __syncthreads();

  float s[N];
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = row[j];

  float sa = 0.0f;
#pragma unroll
  for (int j = 0; j < N; ++j) sa = fmaf(s[j], a_s[j], sa);

  float y = 0.0f;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    s[j] = advance(s[j], d_s[j], sa, b_s[j], v_i, k_s[j]);
    y = fmaf(s[j], r_s[j], y);
    row[j] = s[j];
  }
  p.y[at] = y;
}

}  // namespace

template <typename T>
cudaError_t launch_step(const StepArgs<T>& args, cudaStream_t stream) {
  const dim3 grid(args.batch * args.heads);
  switch (args.head_size) {
    case 32: step_kernel<T, 32><<<grid, 32, 0, stream>>>(args); break;
    case 64: step_kernel<T, 64><<<grid, 64, 0, stream>>>(args); break;
    case 128: step_kernel<T, 128><<<grid, 128, 0, stream>>>(args); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template cudaError_t launch_step<float>(const StepArgs<float>&, cudaStream_t);
template cudaError_t launch_step<__nv_bfloat16>(const StepArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace wkv7
