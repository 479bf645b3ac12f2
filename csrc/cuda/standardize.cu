// Per-token standardisation of the tokenizer's output slots: (x - mean) / (unbiased std + eps) over the last dim.
//
// Rows are short (16 values for the published tokenizer), so a full warp per row would idle most lanes: a
// power-of-two group of lanes (<= 32) owns one row and reduces with segmented warp shuffles.
#include "common.cuh"

namespace semanticist {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float group_sum(float v, int group) {
  for (int offset = group / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, group);
  return v;
}

int group_for(int64_t dim) {
  int group = 1;
  while (group < 32 && group < dim) group <<= 1;
  return group;
}

template <typename T>
__global__ void standardize_forward_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t dim,
                                           int group, float eps) {
  const int lane = threadIdx.x % group;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / group;
  // Lanes past the last row still join the shuffles (full mask), they just load and store nothing.
  const bool valid = row < rows;
  const T* xr = x + (valid ? row : 0) * dim;
  float sum = 0.f;
  if (valid)
    for (int64_t d = lane; d < dim; d += group) sum += to_float(xr[d]);
  const float mean = group_sum(sum, group) / static_cast<float>(dim);
  float sq = 0.f;
  if (valid)
    for (int64_t d = lane; d < dim; d += group) {
      const float c = to_float(xr[d]) - mean;
      sq += c * c;
    }
  const float std = sqrtf(group_sum(sq, group) / static_cast<float>(dim - 1));
  const float inv = 1.f / (std + eps);
  if (valid)
    for (int64_t d = lane; d < dim; d += group) out[row * dim + d] = from_float<T>((to_float(xr[d]) - mean) * inv);
}

// y = c * r with c = x - mean, s = unbiased std, r = 1 / (s + eps):
// dx = r * (g - mean(g)) - r^2 * c * sum(g * c) / ((dim - 1) * s).
template <typename T>
__global__ void standardize_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                            T* __restrict__ grad_in, int64_t rows, int64_t dim, int group, float eps) {
  const int lane = threadIdx.x % group;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / group;
  const bool valid = row < rows;
  const T* xr = x + (valid ? row : 0) * dim;
  const T* gr = grad_out + (valid ? row : 0) * dim;
  float sum = 0.f;
  if (valid)
    for (int64_t d = lane; d < dim; d += group) sum += to_float(xr[d]);
  const float mean = group_sum(sum, group) / static_cast<float>(dim);
  float sq = 0.f, gsum = 0.f, gc = 0.f;
  if (valid)
    for (int64_t d = lane; d < dim; d += group) {
      const float c = to_float(xr[d]) - mean;
      const float g = to_float(gr[d]);
      sq += c * c;
      gsum += g;
      gc += g * c;
    }
  sq = group_sum(sq, group);
  gsum = group_sum(gsum, group);
  gc = group_sum(gc, group);
  const float std = sqrtf(sq / static_cast<float>(dim - 1));
  const float inv = 1.f / (std + eps);
  const float gmean = gsum / static_cast<float>(dim);
  // A constant row has c == 0 everywhere: its second term is 0, not 0/0.
  const float k = std > 0.f ? inv * inv * gc / (static_cast<float>(dim - 1) * std) : 0.f;
  if (valid)
    for (int64_t d = lane; d < dim; d += group) {
      const float c = to_float(xr[d]) - mean;
      grad_in[row * dim + d] = from_float<T>(inv * (to_float(gr[d]) - gmean) - k * c);
    }
}

unsigned int blocks_for(int64_t rows, int group) {
  const int64_t blocks = (rows * group + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks);
}

}  // namespace

cudaError_t launch_standardize_forward(const void* x, void* out, int64_t rows, int64_t dim, float eps, DType dtype,
                                       cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  const int group = group_for(dim);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    standardize_forward_kernel<T><<<blocks_for(rows, group), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(out), rows, dim, group, eps);
    return cudaGetLastError();
  });
}

cudaError_t launch_standardize_backward(const void* grad_out, const void* x, void* grad_in, int64_t rows,
                                        int64_t dim, float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  const int group = group_for(dim);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    standardize_backward_kernel<T><<<blocks_for(rows, group), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(x), static_cast<T*>(grad_in), rows, dim, group, eps);
    return cudaGetLastError();
  });
}

}  // namespace semanticist
