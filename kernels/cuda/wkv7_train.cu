// WKV-7 for training: a sequential forward pass that saves what the backward pass needs, and a
// backward pass that walks back through time a chunk of kChunk steps at a time.
//
// Work split (both passes): one thread block per (batch, head) sequence, one thread per state
// row or column, so a block has N threads and the N x N state lives in registers, N floats per
// thread. Per time step each thread reads the step's input vectors from shared memory, where
// every thread of the block reads the same element at the same time (a broadcast, no bank
// conflicts).
//
// ---------------------------------------------------------------------------------------------
// Forward (thread i owns row i of S):
//     sa_i   = sum_j S_{t-1}[i, j] a_t[j]
//     S_t[i, j] = S_{t-1}[i, j] d_t[j] + sa_i b_t[j] + v_t[i] k_t[j]
//     y_t[i] = sum_j S_t[i, j] r_t[j]
// For the backward pass it saves S_{t-1} a_t (one float per row and step) and the state
// before every kChunk-th step (a checkpoint).
//
// ---------------------------------------------------------------------------------------------
// Backward equations. Write G_t = dL/dS_t for the total gradient reaching S_t (from y_t and
// every later step), and dS_T for the gradient of the returned final state. Going from t = T-1
// down to 0, starting with dS = dS_T:
//
//     G_t      = dS + dy_t r_t^T                              y_t = S_t r_t adds its share
//     dr_t     = S_t^T dy_t             dr_t[j]  = sum_i S_t[i, j] dy_t[i]
//     dv_t     = G_t k_t                dv_t[i]  = sum_j G_t[i, j] k_t[j]
//     dk_t     = G_t^T v_t              dk_t[j]  = sum_i G_t[i, j] v_t[i]
//     dsa_t    = G_t b_t                dsa_t[i] = sum_j G_t[i, j] b_t[j]      (sa_t = S_{t-1} a_t)
//     db_t     = G_t^T sa_t             db_t[j]  = sum_i G_t[i, j] sa_t[i]
//     da_t     = S_{t-1}^T dsa_t        da_t[j]  = sum_i S_{t-1}[i, j] dsa_t[i]
//     dd_t[j]  = sum_i G_t[i, j] S_{t-1}[i, j]
//     dw_t[j]  = dd_t[j] * (-exp(w_t[j])) d_t[j]                            (d = exp(-exp(w)))
//     dS      <- G_t diag(d_t) + dsa_t a_t^T               dS_{t-1}[i, j] = G_t[i, j] d_t[j] + dsa_t[i] a_t[j]
//
// and after step 0, dS is the gradient of the initial state.
//
// Half of these are sums over the row index i (one result per column j: dr, dk, db, da, dd) and
// half are sums over the column index j (dv, dsa). To keep every sum inside one thread, thread i
// carries both row i and column i of dS (the two copies follow the same arithmetic, so they stay
// equal), and it reads column i of S_{t-1}: the row sums give dv_t[i] and dsa_t[i], the column
// sums give dr_t[i], dk_t[i], db_t[i], da_t[i] and dw_t[i]. Only dsa crosses threads (the column
// update needs all of it), through shared memory.
//
// Where S_{t-1} comes from: the backward pass visits the chunks from last to first. For each
// chunk it first rebuilds the chunk's states S_{t0-1} .. S_{t1-2} forward from the checkpoint,
// with the saved sa values and the same arithmetic as the forward pass (so exactly the forward
// pass's states), into a work buffer, then runs the equations above backwards over the chunk.
// Rebuilding needs no division by d, so its accuracy does not depend on how small d gets.
// Thread i rebuilds column i of S (S_t[:, i] = S_{t-1}[:, i] d_t[i] + sa_t b_t[i] + v_t k_t[i],
// no sum needed) and reads back only what it wrote itself.
// ---------------------------------------------------------------------------------------------

#include "wkv7.h"
#include "wkv7_device.h"

namespace wkv7 {
namespace {

// Offsets into a [B, T, H, N] tensor: element (batch, t, head, n) sits at
// sequence_base(...) + t * H * N + n.
__device__ __forceinline__ long long sequence_base(int batch, int seq_len, int heads, int head, int head_size) {
  return (static_cast<long long>(batch) * seq_len * heads + head) * head_size;
}

template <typename T, int N>
__global__ void __launch_bounds__(N) forward_kernel(const ForwardArgs<T> p) {
  const int seq = blockIdx.x;  // = batch * H + head, also the index of this sequence's state
  const int batch = seq / p.heads, head = seq % p.heads;
  const int i = threadIdx.x;  // this thread owns row i of the state
  const long long base = sequence_base(batch, p.seq_len, p.heads, head, N) + i;
  const long long step = static_cast<long long>(p.heads) * N;
  const long long state_offset = static_cast<long long>(seq) * N * N + static_cast<long long>(i) * N;
  const long long n_chunks = num_chunks(p.seq_len);

  __shared__ float r_s[N], d_s[N], k_s[N], a_s[N], b_s[N];

  float s[N];  // row i of the state
#pragma unroll
  for (int j = 0; j < N; ++j) s[j] = p.state0 ? p.state0[state_offset + j] : 0.0f;

  for (int t = 0; t < p.seq_len; ++t) {
    if (p.checkpoints && t % kChunk == 0) {
      float* checkpoint = p.checkpoints + (seq * n_chunks + t / kChunk) * N * N + static_cast<long long>(i) * N;
#pragma unroll
      for (int j = 0; j < N; ++j) checkpoint[j] = s[j];
    }
    const long long at = base + t * step;
    __syncthreads();  // everyone is done with the previous step's vectors
    r_s[i] = to_float(p.r[at]);
    d_s[i] = decay_from_w(to_float(p.w[at]));
    k_s[i] = to_float(p.k[at]);
    a_s[i] = to_float(p.a[at]);
    b_s[i] = to_float(p.b[at]);
    const float v_i = to_float(p.v[at]);
    __syncthreads();

    float sa = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) sa = fmaf(s[j], a_s[j], sa);

    float y = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      s[j] = advance(s[j], d_s[j], sa, b_s[j], v_i, k_s[j]);
      y = fmaf(s[j], r_s[j], y);
    }
    p.y[at] = from_float<T>(y);
    if (p.sa) p.sa[at] = sa;
  }

#pragma unroll
  for (int j = 0; j < N; ++j) p.state_out[state_offset + j] = s[j];
}

template <typename T, int N>
__global__ void __launch_bounds__(N) backward_kernel(const BackwardArgs<T> p) {
  const int seq = blockIdx.x;
  const int batch = seq / p.heads, head = seq % p.heads;
  const int i = threadIdx.x;  // this thread owns row i and column i of dS, and column i of S
  const long long base = sequence_base(batch, p.seq_len, p.heads, head, N);
  const long long step = static_cast<long long>(p.heads) * N;
  const long long state_offset = static_cast<long long>(seq) * N * N;
  const long long n_chunks = num_chunks(p.seq_len);
  // chunk_states[m][j][i] = S_{t0 + m - 1}[j, i] for the chunk being processed: thread i's
  // column, laid out so the block's N threads touch N consecutive floats.
  float* const chunk_states = p.chunk_states + static_cast<long long>(seq) * kChunk * N * N + i;

  __shared__ float r_s[N], d_s[N], k_s[N], v_s[N], a_s[N], b_s[N], dy_s[N], sa_s[N], dsa_s[N];

  float ds_row[N], ds_col[N];  // row i and column i of dS, starting from dS_T
#pragma unroll
  for (int j = 0; j < N; ++j) {
    ds_row[j] = p.dstate_out ? p.dstate_out[state_offset + static_cast<long long>(i) * N + j] : 0.0f;
    ds_col[j] = p.dstate_out ? p.dstate_out[state_offset + static_cast<long long>(j) * N + i] : 0.0f;
  }

  for (long long chunk = n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = static_cast<int>(chunk) * kChunk;
    const int t1 = min(p.seq_len, t0 + kChunk);

    // Phase 1: rebuild column i of S_{t0-1} .. S_{t1-2} from the checkpoint.
    {
      const float* checkpoint = p.checkpoints + (seq * n_chunks + chunk) * N * N + i;
      float s_col[N];
#pragma unroll
      for (int j = 0; j < N; ++j) s_col[j] = checkpoint[static_cast<long long>(j) * N];

      for (int t = t0; t < t1; ++t) {
        float* slot = chunk_states + static_cast<long long>(t - t0) * N * N;
#pragma unroll
        for (int j = 0; j < N; ++j) slot[static_cast<long long>(j) * N] = s_col[j];  // S_{t-1}

        const long long at = base + t * step + i;
        __syncthreads();
        v_s[i] = to_float(p.v[at]);
        sa_s[i] = p.sa[at];
        const float d_i = decay_from_w(to_float(p.w[at]));
        const float k_i = to_float(p.k[at]);
        const float b_i = to_float(p.b[at]);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < N; ++j) s_col[j] = advance(s_col[j], d_i, sa_s[j], b_i, v_s[j], k_i);
      }
    }

    // Phase 2: the backward equations, from step t1-1 down to t0.
    for (int t = t1 - 1; t >= t0; --t) {
      const long long at = base + t * step + i;
      __syncthreads();  // everyone is done with the previous step's vectors
      const float w_i = to_float(p.w[at]);
      r_s[i] = to_float(p.r[at]);
      d_s[i] = decay_from_w(w_i);
      k_s[i] = to_float(p.k[at]);
      v_s[i] = to_float(p.v[at]);
      a_s[i] = to_float(p.a[at]);
      b_s[i] = to_float(p.b[at]);
      dy_s[i] = to_float(p.dy[at]);
      sa_s[i] = p.sa[at];
      const float r_i = r_s[i], d_i = d_s[i], k_i = k_s[i], a_i = a_s[i], b_i = b_s[i], dy_i = dy_s[i];
      __syncthreads();

      // Row i: G[i, :] = dS[i, :] + dy[i] r, then dv[i] = G[i, :] . k, dsa[i] = G[i, :] . b,
      // and the row becomes dS_{t-1}[i, :] = G[i, :] * d + dsa[i] a.
      float dv = 0.0f, dsa = 0.0f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        ds_row[j] = fmaf(dy_i, r_s[j], ds_row[j]);
        dv = fmaf(ds_row[j], k_s[j], dv);
        dsa = fmaf(ds_row[j], b_s[j], dsa);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) ds_row[j] = fmaf(ds_row[j], d_s[j], dsa * a_s[j]);
      dsa_s[i] = dsa;
      __syncthreads();  // the column update below needs every row's dsa

      // Column i: G[:, i] = dS[:, i] + dy r[i]; the sums over rows, with S_{t-1}[:, i] from the
      // rebuild and S_t[:, i] advanced from it on the fly.
      const float* s_prev = chunk_states + static_cast<long long>(t - t0) * N * N;
      float dr = 0.0f, dk = 0.0f, db = 0.0f, da = 0.0f, dd = 0.0f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float s_before = s_prev[static_cast<long long>(j) * N];  // S_{t-1}[j, i]
        const float s_after = advance(s_before, d_i, sa_s[j], b_i, v_s[j], k_i);  // S_t[j, i]
        const float g = fmaf(dy_s[j], r_i, ds_col[j]);  // G[j, i]
        dr = fmaf(s_after, dy_s[j], dr);
        dk = fmaf(g, v_s[j], dk);
        db = fmaf(g, sa_s[j], db);
        dd = fmaf(g, s_before, dd);
        da = fmaf(s_before, dsa_s[j], da);
        ds_col[j] = fmaf(g, d_i, dsa_s[j] * a_i);
      }

      p.dr[at] = from_float<T>(dr);
      p.dw[at] = from_float<T>(dd * -expf(w_i) * d_i);
      p.dk[at] = from_float<T>(dk);
      p.dv[at] = from_float<T>(dv);
      p.da[at] = from_float<T>(da);
      p.db[at] = from_float<T>(db);
    }
  }

  if (p.dstate0) {
#pragma unroll
    for (int j = 0; j < N; ++j) p.dstate0[state_offset + static_cast<long long>(j) * N + i] = ds_col[j];
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers: pick the kernel compiled for the head size.

template <typename T>
cudaError_t launch_forward(const ForwardArgs<T>& args, cudaStream_t stream) {
  const dim3 grid(args.batch * args.heads);
  switch (args.head_size) {
    case 32: forward_kernel<T, 32><<<grid, 32, 0, stream>>>(args); break;
    case 64: forward_kernel<T, 64><<<grid, 64, 0, stream>>>(args); break;
    case 128: forward_kernel<T, 128><<<grid, 128, 0, stream>>>(args); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BackwardArgs<T>& args, cudaStream_t stream) {
  const dim3 grid(args.batch * args.heads);
  switch (args.head_size) {
    case 32: backward_kernel<T, 32><<<grid, 32, 0, stream>>>(args); break;
    case 64: backward_kernel<T, 64><<<grid, 64, 0, stream>>>(args); break;
    case 128: backward_kernel<T, 128><<<grid, 128, 0, stream>>>(args); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template cudaError_t launch_forward<float>(const ForwardArgs<float>&, cudaStream_t);
template cudaError_t launch_forward<__nv_bfloat16>(const ForwardArgs<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_backward<float>(const BackwardArgs<float>&, cudaStream_t);
template cudaError_t launch_backward<__nv_bfloat16>(const BackwardArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace wkv7
