// The small per-layer ops of a decoder on the CPU, float32: RMSNorm (with the residual add
// before it fused in) and the rotary embedding in place.
//
// In torch each of them is several ops (RMSNorm: pow, mean, add, rsqrt, mul, mul; rotary:
// two slices, a negation, a concatenation, two products and a sum), ~25 us apiece at a decode
// batch whatever its size: per layer per step, more than a small model's projections. Here
// each is one pass over its rows. Rows run on torch's intra-op threads (at::parallel_for).
// The arithmetic is Hugging Face's, in the same order: the rotary embedding and the residual
// add are equal to torch's bit for bit (no contraction into FMAs: see ROUNDED), RMSNorm's sum
// of squares differs only in its summation order. Launchers and checks:
// engine/kernels/cpu_layer_ops.py; bound into the module of cpu_paged_decode.cpp. Every op
// checks its arguments itself (ValueError), so a wrong call never reads out of bounds.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

// Each product and sum rounded on its own, as torch's elementwise ops round them.
#define ROUNDED __attribute__((optimize("fp-contract=off")))

namespace {

constexpr int64_t kRowsPerTask = 16;

// What the loops below rely on; a ValueError in Python, naming the argument.
void check_rows(const char* name, const torch::Tensor& t, int64_t width) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name,
                    " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1 && (width < 0 || t.size(1) == width), name,
                    " must be [rows, ", width, "] contiguous in its last dim, got ", t.sizes(),
                    " with strides ", t.strides());
}

int64_t check_weight(const torch::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 &&
                        weight.dim() == 1 && weight.is_contiguous(),
                    "weight must be a contiguous float32 CPU [hidden], got ",
                    weight.scalar_type(), " ", weight.sizes());
  return weight.size(0);
}

// out = weight * (x * (1 / sqrt(mean(x^2) + eps))), one row of `hidden` floats.
inline void rms_norm_row(const float* __restrict x, const float* __restrict weight,
                         float* __restrict out, int64_t hidden, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < hidden; ++i) sum += x[i] * x[i];
  const float inv_rms = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) out[i] = weight[i] * (x[i] * inv_rms);
}

ROUNDED inline void add_row(float* __restrict residual, const float* __restrict delta,
                            int64_t hidden) {
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) residual[i] = residual[i] + delta[i];
}

// x * cos + rotate_half(x) * sin for one head of `head_dim` floats, in place.
ROUNDED inline void rotary_head(float* __restrict x, const float* __restrict cos,
                                const float* __restrict sin, int64_t half) {
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = x[d], x2 = x[d + half];
    x[d] = x1 * cos[d] + (-x2) * sin[d];
    x[d + half] = x2 * cos[d + half] + x1 * sin[d + half];
  }
}

}  // namespace

// x [rows, hidden] (rows may be strided, hidden contiguous), weight [hidden] -> a new
// contiguous [rows, hidden].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows("x", x, check_weight(weight));
  const int64_t rows = x.size(0), hidden = x.size(1), row_stride = x.stride(0);
  auto out = torch::empty({rows, hidden}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(x_ptr + r * row_stride, w_ptr, out_ptr + r * hidden, hidden, eps_f);
  });
  return out;
}

// residual += delta (in place), then RMSNorm of the sum -> a new [rows, hidden]. Both
// [rows, hidden] contiguous.
torch::Tensor add_rms_norm_(torch::Tensor residual, torch::Tensor delta, torch::Tensor weight,
                            double eps) {
  const int64_t width = check_weight(weight);
  check_rows("residual", residual, width);
  check_rows("delta", delta, width);
  TORCH_CHECK_VALUE(residual.is_contiguous() && delta.is_contiguous() &&
                        delta.sizes() == residual.sizes(),
                    "residual and delta must be contiguous and of one shape, got ",
                    residual.sizes(), " and ", delta.sizes());
  const int64_t rows = residual.size(0), hidden = residual.size(1);
  auto out = torch::empty_like(residual);
  float* res_ptr = residual.data_ptr<float>();
  const float* delta_ptr = delta.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      add_row(res_ptr + r * hidden, delta_ptr + r * hidden, hidden);
      rms_norm_row(res_ptr + r * hidden, w_ptr, out_ptr + r * hidden, hidden, eps_f);
    }
  });
  return out;
}

// The first `num_heads` heads of each row of x [tokens, >= num_heads * head_dim] (rows may be
// strided, each row's heads contiguous) rotated in place by cos / sin [tokens, head_dim]
// (contiguous), Hugging Face's rotate_half convention.
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
             int64_t head_dim) {
  check_rows("x", x, -1);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim % 2 == 0 && num_heads >= 0 &&
                        x.size(1) >= num_heads * head_dim,
                    "x rows of ", x.size(1), " floats cannot hold ", num_heads, " heads of ",
                    head_dim, " (an even head_dim)");
  check_rows("cos", cos, head_dim);
  check_rows("sin", sin, head_dim);
  TORCH_CHECK_VALUE(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == x.size(0) &&
                        sin.size(0) == x.size(0),
                    "cos and sin must be contiguous [", x.size(0), ", ", head_dim, "]");
  const int64_t tokens = x.size(0), row_stride = x.stride(0), half = head_dim / 2;
  float* x_ptr = x.data_ptr<float>();
  const float* cos_ptr = cos.data_ptr<float>();
  const float* sin_ptr = sin.data_ptr<float>();
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < num_heads; ++h)
        rotary_head(x_ptr + t * row_stride + h * head_dim, cos_ptr + t * head_dim,
                    sin_ptr + t * head_dim, half);
  });
}
