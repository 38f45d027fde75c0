// WKV-7 CUDA kernels: device-side arithmetic shared by the training and the step kernels.
// Only included from .cu files.
#pragma once

#include <cuda_bf16.h>

#include "wkv7.h"

namespace wkv7 {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// d = exp(-exp(w)). expf, not __expf: the fast intrinsic's error would show up in the
// float32 comparison against the float64 reference.
__device__ __forceinline__ float decay_from_w(float w) { return expf(-expf(w)); }

// One element of the state update S_t[i, j] = S_{t-1}[i, j] d[j] + sa[i] b[j] + v[i] k[j].
// The forward pass and the backward pass's rebuild both call this, so the rebuilt states are
// bit-for-bit the ones the forward pass produced.
__device__ __forceinline__ float advance(float s, float d_j, float sa_i, float b_j, float v_i, float k_j) {
  return fmaf(s, d_j, fmaf(sa_i, b_j, v_i * k_j));
}

}  // namespace wkv7
