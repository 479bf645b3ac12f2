// Host-side launchers of the package's CUDA kernels.
//
// Plain CUDA, no torch headers: each launcher takes raw device pointers, sizes and a stream, so every .cu
// compiles with `nvcc -c` alone and the torch binding (csrc/torch/cuda_ops.cpp) stays a thin shim.
// All math is fp32 whatever the storage dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace semanticist {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[b, k, :] = k < keep[b] ? tokens[b, k, :] : null_tokens[k, :]; tokens/out (B, K, D), null_tokens (K, D).
cudaError_t launch_nested_dropout_forward(const void* tokens, const void* null_tokens, const int64_t* keep,
                                          void* out, int64_t batch, int64_t num_tokens, int64_t dim, DType dtype,
                                          cudaStream_t stream);

// How many fp32 partial sums of grad_null the backward writes: the batch is split into this many chunks so that
// the reduction over samples runs in parallel and stays deterministic (torch adds the partials).
inline int64_t nested_dropout_backward_chunks(int64_t batch) { return batch < 32 ? (batch > 0 ? batch : 1) : 32; }

// grad_tokens = grad_out where kept else 0; grad_null_partial[c, k, :] = sum over the samples b of chunk c
// with k >= keep[b] of grad_out[b, k, :]. grad_null_partial holds nested_dropout_backward_chunks(batch) * K * D.
cudaError_t launch_nested_dropout_backward(const void* grad_out, const int64_t* keep, void* grad_tokens,
                                           float* grad_null_partial, int64_t batch, int64_t num_tokens, int64_t dim,
                                           DType dtype, cudaStream_t stream);

// Per row of `dim` values: (x - mean) / (unbiased std + eps).
cudaError_t launch_standardize_forward(const void* x, void* out, int64_t rows, int64_t dim, float eps, DType dtype,
                                       cudaStream_t stream);

// Gradient of launch_standardize_forward with respect to x, recomputing the row statistics from x.
cudaError_t launch_standardize_backward(const void* grad_out, const void* x, void* grad_in, int64_t rows,
                                        int64_t dim, float eps, DType dtype, cudaStream_t stream);

}  // namespace semanticist
