// Argument checks and layout preparation shared by the CPU and CUDA bindings, so both see identical inputs.
#pragma once

#include <ATen/ATen.h>

namespace semanticist {

struct NestedDropoutArgs {
  at::Tensor tokens;       // (B, K, D), contiguous
  at::Tensor null_tokens;  // (K, D), contiguous, tokens' dtype
  at::Tensor keep;         // (B,), contiguous int64
  int64_t batch, num_tokens, dim;
};

inline void check_float_dtype(const at::Tensor& t, const char* what) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, what,
              " must be float32, float16 or bfloat16, got ", s);
}

inline NestedDropoutArgs prepare_nested_dropout(const at::Tensor& tokens, const at::Tensor& null_tokens,
                                                const at::Tensor& keep) {
  TORCH_CHECK(tokens.dim() == 3, "nested_dropout: tokens must be (B, K, D), got ", tokens.sizes());
  check_float_dtype(tokens, "nested_dropout: tokens");
  const int64_t B = tokens.size(0), K = tokens.size(1), D = tokens.size(2);
  TORCH_CHECK(null_tokens.numel() == K * D, "nested_dropout: null must hold K * D = ", K * D, " values, got ",
              null_tokens.sizes());
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == B, "nested_dropout: keep must be (B,) = (", B, "), got ",
              keep.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kLong, "nested_dropout: keep must be int64, got ", keep.scalar_type());
  TORCH_CHECK(null_tokens.device() == tokens.device() && keep.device() == tokens.device(),
              "nested_dropout: tokens, null and keep must be on one device");
  return {tokens.contiguous(), null_tokens.to(tokens.scalar_type()).reshape({K, D}).contiguous(), keep.contiguous(),
          B, K, D};
}

inline void check_nested_dropout_backward(const at::Tensor& grad, const at::Tensor& keep) {
  TORCH_CHECK(grad.dim() == 3, "nested_dropout_backward: grad must be (B, K, D), got ", grad.sizes());
  check_float_dtype(grad, "nested_dropout_backward: grad");
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == grad.size(0) && keep.scalar_type() == at::kLong,
              "nested_dropout_backward: keep must be int64 (B,)");
  TORCH_CHECK(keep.device() == grad.device(), "nested_dropout_backward: grad and keep must be on one device");
}

inline void check_standardize(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 2, "standardize: needs a last dim of at least 2 (unbiased std), got ",
              x.sizes());
  check_float_dtype(x, "standardize: x");
}

}  // namespace semanticist
