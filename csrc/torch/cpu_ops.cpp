// CPU kernels of the `semanticist` operators: always built, and the reference the CUDA kernels are held to.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

namespace semanticist {
namespace {

at::Tensor nested_dropout_cpu(const at::Tensor& tokens, const at::Tensor& null_tokens, const at::Tensor& keep) {
  const NestedDropoutArgs a = prepare_nested_dropout(tokens, null_tokens, keep);
  at::Tensor out = at::empty_like(a.tokens);
  const int64_t per_sample = a.num_tokens * a.dim;
  const int64_t* keep_p = a.keep.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.tokens.scalar_type(), "nested_dropout_cpu", [&] {
    const scalar_t* src = a.tokens.data_ptr<scalar_t>();
    const scalar_t* null_p = a.null_tokens.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t split = std::clamp<int64_t>(keep_p[b], 0, a.num_tokens) * a.dim;
        std::copy(src + b * per_sample, src + b * per_sample + split, dst + b * per_sample);
        std::copy(null_p + split, null_p + per_sample, dst + b * per_sample + split);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> nested_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& keep) {
  check_nested_dropout_backward(grad, keep);
  const at::Tensor g = grad.contiguous();
  const at::Tensor k = keep.contiguous();
  const int64_t B = g.size(0), K = g.size(1), D = g.size(2);
  at::Tensor grad_tokens = at::empty_like(g);
  at::Tensor grad_null = at::zeros({K, D}, g.options().dtype(at::kFloat));
  const int64_t* keep_p = k.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "nested_dropout_backward_cpu", [&] {
    const scalar_t* g_p = g.data_ptr<scalar_t>();
    scalar_t* gt_p = grad_tokens.data_ptr<scalar_t>();
    float* gn_p = grad_null.data_ptr<float>();
    // Parallel over positions: each thread owns its rows of grad_null, so the sum over samples needs no locks
    // and runs in sample order (deterministic).
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end; ++pos) {
        float* acc = gn_p + pos * D;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t off = (b * K + pos) * D;
          if (pos < keep_p[b]) {
            std::copy(g_p + off, g_p + off + D, gt_p + off);
          } else {
            std::fill(gt_p + off, gt_p + off + D, scalar_t(0));
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(g_p[off + d]);
          }
        }
      }
    });
  });
  return {grad_tokens, grad_null};
}

struct RowStats {
  float mean, std, inv;
};

template <typename scalar_t>
RowStats row_stats(const scalar_t* x, int64_t dim, float eps) {
  float sum = 0.f;
  for (int64_t d = 0; d < dim; ++d) sum += static_cast<float>(x[d]);
  const float mean = sum / static_cast<float>(dim);
  float sq = 0.f;
  for (int64_t d = 0; d < dim; ++d) {
    const float c = static_cast<float>(x[d]) - mean;
    sq += c * c;
  }
  const float std = std::sqrt(sq / static_cast<float>(dim - 1));
  return {mean, std, 1.f / (std + eps)};
}

at::Tensor standardize_cpu(const at::Tensor& x, double eps) {
  check_standardize(x);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t dim = xc.size(-1), rows = xc.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "standardize_cpu", [&] {
    const scalar_t* x_p = xc.data_ptr<scalar_t>();
    scalar_t* o_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x_p + r * dim;
        const RowStats s = row_stats(xr, dim, static_cast<float>(eps));
        for (int64_t d = 0; d < dim; ++d) o_p[r * dim + d] = static_cast<scalar_t>((static_cast<float>(xr[d]) - s.mean) * s.inv);
      }
    });
  });
  return out;
}

// Same formula as the CUDA kernel: dx = r * (g - mean(g)) - r^2 * c * sum(g * c) / ((dim - 1) * s).
at::Tensor standardize_backward_cpu(const at::Tensor& grad, const at::Tensor& x, double eps) {
  check_standardize(x);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "standardize_backward: grad must match x in shape and dtype");
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  at::Tensor grad_in = at::empty_like(xc);
  const int64_t dim = xc.size(-1), rows = xc.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "standardize_backward_cpu", [&] {
    const scalar_t* x_p = xc.data_ptr<scalar_t>();
    const scalar_t* g_p = gc.data_ptr<scalar_t>();
    scalar_t* o_p = grad_in.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x_p + r * dim;
        const scalar_t* gr = g_p + r * dim;
        const RowStats s = row_stats(xr, dim, static_cast<float>(eps));
        float gsum = 0.f, gdot = 0.f;
        for (int64_t d = 0; d < dim; ++d) {
          const float g = static_cast<float>(gr[d]);
          gsum += g;
          gdot += g * (static_cast<float>(xr[d]) - s.mean);
        }
        const float gmean = gsum / static_cast<float>(dim);
        const float k = s.std > 0.f ? s.inv * s.inv * gdot / (static_cast<float>(dim - 1) * s.std) : 0.f;
        for (int64_t d = 0; d < dim; ++d) {
          const float c = static_cast<float>(xr[d]) - s.mean;
          o_p[r * dim + d] = static_cast<scalar_t>(s.inv * (static_cast<float>(gr[d]) - gmean) - k * c);
        }
      }
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(semanticist, CPU, m) {
  m.impl("nested_dropout", &nested_dropout_cpu);
  m.impl("nested_dropout_backward", &nested_dropout_backward_cpu);
  m.impl("standardize", &standardize_cpu);
  m.impl("standardize_backward", &standardize_backward_cpu);
}

}  // namespace semanticist
