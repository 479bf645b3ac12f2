// CUDA bindings of the `semanticist` operators: check and lay out the tensors, then call the plain-CUDA launchers
// of csrc/cuda/ on the current stream. Only core c10 headers are used to reach the stream, so this file needs
// no CUDA-enabled torch to compile.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../cuda/launchers.h"
#include "checks.h"

namespace semanticist {
namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(t.device()).native_handle());
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "semanticist CUDA ops support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor nested_dropout_cuda(const at::Tensor& tokens, const at::Tensor& null_tokens, const at::Tensor& keep) {
  const NestedDropoutArgs a = prepare_nested_dropout(tokens, null_tokens, keep);
  const c10::DeviceGuard guard(a.tokens.device());
  at::Tensor out = at::empty_like(a.tokens);
  check_launch(launch_nested_dropout_forward(a.tokens.data_ptr(), a.null_tokens.data_ptr(),
                                             a.keep.data_ptr<int64_t>(), out.data_ptr(), a.batch, a.num_tokens,
                                             a.dim, dtype_of(a.tokens), current_stream(a.tokens)),
               "nested_dropout");
  return out;
}

std::tuple<at::Tensor, at::Tensor> nested_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& keep) {
  check_nested_dropout_backward(grad, keep);
  const at::Tensor g = grad.contiguous();
  const at::Tensor k = keep.contiguous();
  const c10::DeviceGuard guard(g.device());
  const int64_t B = g.size(0), K = g.size(1), D = g.size(2);
  at::Tensor grad_tokens = at::empty_like(g);
  at::Tensor partial = at::empty({nested_dropout_backward_chunks(B), K, D}, g.options().dtype(at::kFloat));
  check_launch(launch_nested_dropout_backward(g.data_ptr(), k.data_ptr<int64_t>(), grad_tokens.data_ptr(),
                                              partial.data_ptr<float>(), B, K, D, dtype_of(g), current_stream(g)),
               "nested_dropout_backward");
  return {grad_tokens, partial.sum(0)};
}

at::Tensor standardize_cuda(const at::Tensor& x, double eps) {
  check_standardize(x);
  const at::Tensor xc = x.contiguous();
  const c10::DeviceGuard guard(xc.device());
  at::Tensor out = at::empty_like(xc);
  const int64_t dim = xc.size(-1);
  check_launch(launch_standardize_forward(xc.data_ptr(), out.data_ptr(), xc.numel() / dim, dim,
                                          static_cast<float>(eps), dtype_of(xc), current_stream(xc)),
               "standardize");
  return out;
}

at::Tensor standardize_backward_cuda(const at::Tensor& grad, const at::Tensor& x, double eps) {
  check_standardize(x);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "standardize_backward: grad must match x in shape and dtype");
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  const c10::DeviceGuard guard(xc.device());
  at::Tensor grad_in = at::empty_like(xc);
  const int64_t dim = xc.size(-1);
  check_launch(launch_standardize_backward(gc.data_ptr(), xc.data_ptr(), grad_in.data_ptr(), xc.numel() / dim, dim,
                                           static_cast<float>(eps), dtype_of(xc), current_stream(xc)),
               "standardize_backward");
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(semanticist, CUDA, m) {
  m.impl("nested_dropout", &nested_dropout_cuda);
  m.impl("nested_dropout_backward", &nested_dropout_backward_cuda);
  m.impl("standardize", &standardize_cuda);
  m.impl("standardize_backward", &standardize_backward_cuda);
}

}  // namespace semanticist

extern "C" bool semanticist_built_with_cuda() { return true; }
