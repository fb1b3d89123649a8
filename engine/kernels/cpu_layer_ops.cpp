// The small per-layer ops of a decoder on the CPU, float32: RMSNorm (with the residual add
// before it fused in), the rotary embedding in place, and the projections of anything short
// of a prefill (panel_linear, at the end).
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

#include <algorithm>

#include "cpu_vec.h"

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

// A projection's bias [out] (contiguous float32) or nullptr for none.
const float* check_bias(const std::optional<torch::Tensor>& bias, int64_t out) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == torch::kFloat32 &&
                        bias->dim() == 1 && bias->size(0) == out && bias->is_contiguous(),
                    "bias must be a contiguous float32 CPU [", out, "], got ",
                    bias->scalar_type(), " ", bias->sizes());
  return bias->data_ptr<float>();
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

// ---------------------------------------------------------------------------------------------
// A projection of a few rows (a decode batch of up to kSmallLinearRows sequences; the model
// sends it up to four, panel_linear below takes more): y = x weight^T (+ bias), weight
// [out, in] in torch's own layout.
//
// With so few rows a projection is bound by reading its weight from memory. MKL's sgemm on
// the plain weight rereads it for every few rows, and oneDNN's GEMM on its prepacked weight
// has a blocking meant for more rows: on this project's AVX2 machine the faster of the two
// takes 1.1-1.8x this loop's time on most projections of a decode step, cold
// (benchmarks/linear_cpu.py --cold; SmolLM2's 49152-row logits at 1-4 rows the exception,
// 0.9x), and whole steps of 1-8 rows are 5-34% shorter (benchmarks/decode_step_cpu.py).
// Here each weight row is read once and multiplied into every row of x while it is in
// registers: a block of NB weight rows against R rows of x keeps NB x R accumulators of one
// vector each (AVX2: at most 8 of 16 registers plus the loads). The sums run in the vector's
// lanes and are added up at the end, so a result differs from F.linear's by float32 rounding
// only. (Up to c2db5c7 it took 9-64 rows too, in groups; panel_linear does that faster.)

namespace {

constexpr int64_t kSmallLinearRows = 8;  // all at once
constexpr int64_t kWeightRowsPerTask = 64;

// On an AVX-512 machine the AVX2 loop ran decode steps of 4-32 rows 1.2-1.3x slower than
// oneDNN's own AVX-512 GEMM (benchmarks/decode_step_cpu.py, dummy-100m): there the loop works
// in 16-float vectors (cpu_vec.h) with twice the registers, and fetches the next block of
// weight rows into L1 while it multiplies this one (1.2-1.5x shorter at 4-8 rows of a whole
// step's cold weights). The AVX2 build keeps the blocking it was measured with and does not
// prefetch (not measured there).
using pdserve_vec::kLanes;
#if defined(__AVX2__) && defined(__FMA__)  // without them, plain loops (cpu_vec.h)
using pdserve_vec::sum_lanes;
using pdserve_vec::Vec;
using pdserve_vec::vfma;
using pdserve_vec::vload;
using pdserve_vec::vzero;
#endif
constexpr bool kSmallLinearVectorized = pdserve_vec::kVectorized;
constexpr int kAccumulators = pdserve_vec::kRegisters / 2;  // the rest: weight rows and x
constexpr bool kPrefetch = pdserve_vec::kAvx512;

#if defined(__AVX2__) && defined(__FMA__)

// Weight rows [begin, end) (`in` floats each) against R rows of x, over the first `in_vec`
// (a multiple of kLanes) of their columns: y[r * out + n]. NB weight rows at a time, then
// the rest one by one. Nothing else in the loop: a tail or a bias inside it made the compiler
// spill accumulators (1.3x slower at eight rows); the caller adds them afterwards. The loops
// over the block are unrolled by hand (PDSERVE_UNROLLED): left to itself GCC kept the accumulator
// array on the stack at eight rows, a store per FMA.
template <int R, int NB, bool PREFETCH = false>
void small_linear_span(const float* x, int64_t x_stride, const float* w, int64_t in,
                       int64_t in_vec, float* y, int64_t out, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + NB <= end; n += NB) {
    const float* w_rows = w + n * in;
    // The next block of weight rows, fetched into L1 while this one is multiplied (only
    // where there is one: past `out` lies someone else's memory).
    const float* next = n + 2 * NB <= out ? w_rows + NB * in : w_rows;
    Vec acc[NB][R];
    PDSERVE_UNROLLED for (int j = 0; j < NB; ++j)
      PDSERVE_UNROLLED for (int r = 0; r < R; ++r) acc[j][r] = vzero();
    for (int64_t k = 0; k < in_vec; k += kLanes) {
      if constexpr (PREFETCH) {
        PDSERVE_UNROLLED for (int j = 0; j < NB; ++j)
          pdserve_vec::prefetch(next + j * in, k, k + kLanes);
      }
      Vec wv[NB];
      PDSERVE_UNROLLED for (int j = 0; j < NB; ++j) wv[j] = vload(w_rows + j * in + k);
      PDSERVE_UNROLLED for (int r = 0; r < R; ++r) {
        const Vec xv = vload(x + r * x_stride + k);
        PDSERVE_UNROLLED for (int j = 0; j < NB; ++j) acc[j][r] = vfma(xv, wv[j], acc[j][r]);
      }
    }
    PDSERVE_UNROLLED for (int j = 0; j < NB; ++j)
      PDSERVE_UNROLLED for (int r = 0; r < R; ++r) y[r * out + n + j] = sum_lanes(acc[j][r]);
  }
  if constexpr (NB > 1) {
    if (n < end) small_linear_span<R, 1>(x, x_stride, w, in, in_vec, y, out, n, end);
  }
}
#else
template <int R, int NB, bool PREFETCH = false>
void small_linear_span(const float* x, int64_t x_stride, const float* w, int64_t in,
                       int64_t in_vec, float* y, int64_t out, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n)
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < in_vec; ++k) sum += x[r * x_stride + k] * w[n * in + k];
      y[r * out + n] = sum;
    }
}
#endif

// As many weight rows a block as keep the accumulators (NB x R) within kAccumulators
// registers, four at most: with AVX2 one or two rows take four weight rows, three or four
// two, more one; with AVX-512 up to four rows take four, five three, more two.
template <int R>
void small_linear_rows(const float* x, int64_t x_stride, const float* w, int64_t in,
                       float* y, int64_t out) {
  constexpr int NB = std::max(1, std::min(4, kAccumulators / R));
  const int64_t in_vec = in - in % kLanes;
  at::parallel_for(0, out, kWeightRowsPerTask, [&](int64_t begin, int64_t end) {
    small_linear_span<R, NB, kPrefetch>(x, x_stride, w, in, in_vec, y, out, begin, end);
  });
}

}  // namespace

// x [rows <= kSmallLinearRows, in] (rows may be strided, each contiguous), weight [out, in]
// contiguous, bias [out] or None -> a new contiguous [rows, out].
torch::Tensor small_linear(torch::Tensor x, torch::Tensor weight,
                           std::optional<torch::Tensor> bias) {
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 &&
                        weight.dim() == 2 && weight.is_contiguous(),
                    "weight must be a contiguous float32 CPU [out, in], got ",
                    weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  check_rows("x", x, in);
  const int64_t rows = x.size(0);
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kSmallLinearRows, "small_linear takes 1 to ",
                    kSmallLinearRows, " rows, got ", rows);
  const float* bias_ptr = check_bias(bias, out);
  auto y = torch::empty({rows, out}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = weight.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  switch (rows) {
    case 1: small_linear_rows<1>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    case 2: small_linear_rows<2>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    case 3: small_linear_rows<3>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    case 4: small_linear_rows<4>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    case 5: small_linear_rows<5>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    case 6: small_linear_rows<6>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    case 7: small_linear_rows<7>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
    default: small_linear_rows<8>(x_ptr, x_stride, w_ptr, in, y_ptr, out); break;
  }
  if (in % kLanes != 0 || bias_ptr != nullptr) {  // the columns past the last vector, the bias
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < out; ++n) {
        float sum = y_ptr[r * out + n];
        for (int64_t k = in - in % kLanes; k < in; ++k)
          sum += x_ptr[r * x_stride + k] * w_ptr[n * in + k];
        y_ptr[r * out + n] = bias_ptr != nullptr ? sum + bias_ptr[n] : sum;
      }
  }
  return y;
}

// Up to how many rows small_linear takes, and 0 where it was built without AVX2 and FMA
// (then it is correct but slower than oneDNN, and the model does not use it).
int64_t small_linear_rows_limit() { return kSmallLinearVectorized ? kSmallLinearRows : 0; }

// ---------------------------------------------------------------------------------------------
// The projections of everything short of a prefill past small_linear's few rows
// (panel_linear): a decode batch, a short prefill chunk. torch's F.linear (MKL, plain weight)
// rereads the weight for every few rows of a small batch, and oneDNN's GEMM on its prepacked
// weight is blocked for more rows; both, and small_linear's groups of rows that took 9-64
// rows up to c2db5c7 (dot products on the weight in torch's layout), ran 8-64 rows at 90-125
// GFLOP/s on one AVX-512 core whose FMAs peak at ~185, the weight cold.
//
// Here the weight is repacked once (panel_pack) into panels of kPanelWidth output columns,
// [panel][in][kPanelWidth]: a panel is one contiguous stream, and a row tile of x times a
// panel is kPanelRows x kPanelVecs accumulators (AVX-512 8 x 3 = 24 of 32 registers, AVX2
// 6 x 2 = 12 of 16), each FMA a broadcast of one x value into one vector of the panel's
// row k. No sums across lanes, and every row tile after the first reads the panel from L2.
// The panel after this one is fetched into L2 while this one is multiplied, a few cache
// lines per k spread over all of this panel's row tiles: without it the first tile of every
// panel waited on memory (1.5-1.9x slower at 16-64 rows). A scratch benchmark of one cold
// projection at a time: 16-64 rows 1.2-1.6x oneDNN's speed, 128-256 rows 1.04-1.1x, from 512
// rows all level (~180 GFLOP/s; the caller uses MKL there); at 1-4 rows small_linear is a
// few percent faster, and the model sends it those. Each output is one FMA chain over k: it
// differs from F.linear's by float32 rounding only, and is the same whichever thread runs it.

namespace {

#if defined(__AVX2__) && defined(__FMA__)
using pdserve_vec::vadd;
using pdserve_vec::vbroadcast;
using pdserve_vec::vstore;
#endif
constexpr int kPanelVecs = pdserve_vec::kAvx512 ? 3 : 2;
constexpr int kPanelRows = pdserve_vec::kAvx512 ? 8 : 6;
constexpr int64_t kPanelWidth = kPanelVecs * kLanes;  // 48 (AVX-512) or 16 columns
constexpr int64_t kCacheLine = 64;

// y[r][0, cols) (+ bias) for R rows of x (row stride x_stride) times one panel (`in` rows
// of kPanelWidth floats); meanwhile `fetch_lines` cache lines from `fetch` into L2.
template <int R>
void panel_tile(const float* x, int64_t x_stride, const float* panel, int64_t in,
                const float* bias, float* y, int64_t y_stride, int64_t cols,
                const char* fetch, int64_t fetch_lines) {
  const int64_t lines_per_k = (fetch_lines + in - 1) / std::max<int64_t>(in, 1);
  const char* fetch_end = fetch + fetch_lines * kCacheLine;
#if defined(__AVX2__) && defined(__FMA__)
  Vec acc[R][kPanelVecs];
  PDSERVE_UNROLLED for (int r = 0; r < R; ++r)
    PDSERVE_UNROLLED for (int j = 0; j < kPanelVecs; ++j) acc[r][j] = vzero();
  for (int64_t k = 0; k < in; ++k) {
    const float* w = panel + k * kPanelWidth;
    Vec wv[kPanelVecs];
    PDSERVE_UNROLLED for (int j = 0; j < kPanelVecs; ++j) wv[j] = vload(w + j * kLanes);
    PDSERVE_UNROLLED for (int r = 0; r < R; ++r) {
      const Vec xv = vbroadcast(x[r * x_stride + k]);
      PDSERVE_UNROLLED for (int j = 0; j < kPanelVecs; ++j) acc[r][j] = vfma(xv, wv[j], acc[r][j]);
    }
    for (int64_t i = 0; i < lines_per_k && fetch < fetch_end; ++i, fetch += kCacheLine)
      __builtin_prefetch(fetch, 0, 2);  // into L2
  }
  // Unrolled like the loop above: indexed by a variable row, acc would live in memory (GCC
  // then stored every accumulator after every FMA: 1.4x slower at 32-64 rows).
  PDSERVE_UNROLLED for (int r = 0; r < R; ++r) {
    if (cols == kPanelWidth) {  // the last panel may be narrower: through a buffer
      PDSERVE_UNROLLED for (int j = 0; j < kPanelVecs; ++j)
        vstore(y + r * y_stride + j * kLanes,
               bias ? vadd(acc[r][j], vload(bias + j * kLanes)) : acc[r][j]);
    } else {
      float row[kPanelWidth];
      PDSERVE_UNROLLED for (int j = 0; j < kPanelVecs; ++j) vstore(row + j * kLanes, acc[r][j]);
      for (int64_t c = 0; c < cols; ++c) y[r * y_stride + c] = bias ? row[c] + bias[c] : row[c];
    }
  }
#else  // plain C++ (correct, not fast: the model does not use it, panel_linear_pays)
  (void)fetch_end;
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      float sum = 0.0f;
      for (int64_t k = 0; k < in; ++k) sum += x[r * x_stride + k] * panel[k * kPanelWidth + c];
      y[r * y_stride + c] = bias ? sum + bias[c] : sum;
    }
#endif
}

// The last rows of x, fewer than kPanelRows (R counts down to them).
template <int R>
void panel_tail(int64_t rows, const float* x, int64_t x_stride, const float* panel, int64_t in,
                const float* bias, float* y, int64_t y_stride, int64_t cols, const char* fetch,
                int64_t fetch_lines) {
  if constexpr (R > 0) {
    if (rows == R)
      panel_tile<R>(x, x_stride, panel, in, bias, y, y_stride, cols, fetch, fetch_lines);
    else
      panel_tail<R - 1>(rows, x, x_stride, panel, in, bias, y, y_stride, cols, fetch,
                        fetch_lines);
  }
}

}  // namespace

// weight [out, in] float32 (any strides) -> panels [ceil(out / kPanelWidth), in,
// kPanelWidth], the columns past `out` zero.
torch::Tensor panel_pack(torch::Tensor weight) {
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 &&
                        weight.dim() == 2 && weight.size(0) > 0,
                    "weight must be a float32 CPU [out, in], got ", weight.scalar_type(), " ",
                    weight.sizes(), " on ", weight.device());
  const torch::Tensor w = weight.contiguous();
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t num_panels = (out + kPanelWidth - 1) / kPanelWidth;
  auto panels = torch::zeros({num_panels, in, kPanelWidth}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = panels.data_ptr<float>();
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < kPanelWidth && p * kPanelWidth + c < out; ++c)
        for (int64_t k = 0; k < in; ++k)
          dst[(p * in + k) * kPanelWidth + c] = src[(p * kPanelWidth + c) * in + k];
  });
  return panels;
}

// x [rows, in] (rows may be strided, each contiguous) times panel_pack's panels of a weight
// [out, in], plus bias [out] or None -> a new contiguous [rows, out] = x weight^T + bias.
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t out,
                           std::optional<torch::Tensor> bias) {
  TORCH_CHECK_VALUE(panels.device().is_cpu() && panels.scalar_type() == torch::kFloat32 &&
                        panels.dim() == 3 && panels.size(2) == kPanelWidth &&
                        panels.is_contiguous(),
                    "panels must be panel_pack's contiguous float32 CPU [panels, in, ",
                    kPanelWidth, "], got ", panels.scalar_type(), " ", panels.sizes());
  const int64_t num_panels = panels.size(0), in = panels.size(1);
  TORCH_CHECK_VALUE(out > (num_panels - 1) * kPanelWidth && out <= num_panels * kPanelWidth,
                    num_panels, " panels of ", kPanelWidth, " columns cannot hold ", out,
                    " output features");
  check_rows("x", x, in);
  const float* bias_ptr = check_bias(bias, out);
  const int64_t rows = x.size(0), x_stride = x.stride(0);
  auto y = torch::empty({rows, out}, x.options());
  if (rows == 0) return y;
  const float* x_ptr = x.data_ptr<float>();
  const float* p_ptr = panels.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  const int64_t panel_floats = in * kPanelWidth;
  const int64_t panel_lines = panel_floats * static_cast<int64_t>(sizeof(float)) / kCacheLine;
  const int64_t tiles = (rows + kPanelRows - 1) / kPanelRows;
  const int64_t lines_per_tile = (panel_lines + tiles - 1) / tiles;
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = p_ptr + p * panel_floats;
      const int64_t col = p * kPanelWidth, cols = std::min(kPanelWidth, out - col);
      const float* b = bias_ptr ? bias_ptr + col : nullptr;
      // This task's next panel, a share of it per row tile (none after the task's last).
      const char* next = reinterpret_cast<const char*>(panel + panel_floats);
      const bool fetch_next = p + 1 < end;
      int64_t r = 0;
      for (int64_t t = 0; r < rows; ++t, r += kPanelRows) {
        const int64_t first = std::min(panel_lines, t * lines_per_tile);
        const int64_t lines = fetch_next ? std::min(panel_lines - first, lines_per_tile) : 0;
        const char* fetch = next + first * kCacheLine;
        if (rows - r >= kPanelRows)
          panel_tile<kPanelRows>(x_ptr + r * x_stride, x_stride, panel, in, b,
                                 y_ptr + r * out + col, out, cols, fetch, lines);
        else
          panel_tail<kPanelRows - 1>(rows - r, x_ptr + r * x_stride, x_stride, panel, in, b,
                                     y_ptr + r * out + col, out, cols, fetch, lines);
      }
    }
  });
  return y;
}

// Whether panel_linear was built with vectors (AVX2 and FMA, or AVX-512): without them it is
// correct but slower than oneDNN, and the model does not use it.
bool panel_linear_pays() { return pdserve_vec::kVectorized; }
