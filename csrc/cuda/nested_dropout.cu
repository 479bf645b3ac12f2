// Nested dropout: keep the first keep[b] slot tokens of each sample, replace the rest with learned null tokens.
#include "common.cuh"

namespace semanticist {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void nested_dropout_forward_kernel(const T* __restrict__ tokens, const T* __restrict__ null_tokens,
                                              const int64_t* __restrict__ keep, T* __restrict__ out, int64_t batch,
                                              int64_t num_tokens, int64_t dim) {
  const int64_t per_sample = num_tokens * dim;
  const int64_t total = batch * per_sample;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_sample;
    const int64_t kd = i - b * per_sample;
    out[i] = kd / dim < keep[b] ? tokens[i] : null_tokens[kd];
  }
}

// Thread (c, kd) walks the samples of batch chunk c at position kd: grad_tokens is written once, and the sum for
// grad_null needs no atomics, so the result does not depend on scheduling.
template <typename T>
__global__ void nested_dropout_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ keep,
                                               T* __restrict__ grad_tokens, float* __restrict__ grad_null_partial,
                                               int64_t batch, int64_t num_tokens, int64_t dim, int64_t chunk_size) {
  const int64_t per_sample = num_tokens * dim;
  const int64_t chunk = blockIdx.y;
  const int64_t b_begin = chunk * chunk_size;
  const int64_t b_end = b_begin + chunk_size < batch ? b_begin + chunk_size : batch;
  for (int64_t kd = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; kd < per_sample;
       kd += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = kd / dim;
    float acc = 0.f;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t i = b * per_sample + kd;
      const T g = grad_out[i];
      if (k < keep[b]) {
        grad_tokens[i] = g;
      } else {
        grad_tokens[i] = from_float<T>(0.f);
        acc += to_float(g);
      }
    }
    grad_null_partial[chunk * per_sample + kd] = acc;
  }
}

}  // namespace

cudaError_t launch_nested_dropout_forward(const void* tokens, const void* null_tokens, const int64_t* keep,
                                          void* out, int64_t batch, int64_t num_tokens, int64_t dim, DType dtype,
                                          cudaStream_t stream) {
  const int64_t total = batch * num_tokens * dim;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    nested_dropout_forward_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(tokens), static_cast<const T*>(null_tokens), keep, static_cast<T*>(out), batch,
        num_tokens, dim);
    return cudaGetLastError();
  });
}

cudaError_t launch_nested_dropout_backward(const void* grad_out, const int64_t* keep, void* grad_tokens,
                                           float* grad_null_partial, int64_t batch, int64_t num_tokens, int64_t dim,
                                           DType dtype, cudaStream_t stream) {
  const int64_t per_sample = num_tokens * dim;
  const int64_t chunks = nested_dropout_backward_chunks(batch);
  if (per_sample == 0) return cudaSuccess;
  if (batch == 0) return cudaMemsetAsync(grad_null_partial, 0, sizeof(float) * chunks * per_sample, stream);
  const int64_t chunk_size = (batch + chunks - 1) / chunks;
  const dim3 grid(grid_for(per_sample, kThreads), static_cast<unsigned int>(chunks));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    nested_dropout_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), keep, static_cast<T*>(grad_tokens), grad_null_partial, batch, num_tokens,
        dim, chunk_size);
    return cudaGetLastError();
  });
}

}  // namespace semanticist
