// Paged decode attention on the CPU, float32: one query token per sequence, read straight
// from the paged KV cache (no gathered copy of the context).
//
// One task per sequence reads each of its cached K and V rows from memory exactly once, in
// memory order (a token's rows for all KV heads are contiguous): pass 1 takes every query
// head's dot product with the token's K row of its KV head, the softmax runs over the scores
// in a scratch buffer, pass 2 accumulates every head's weighted sum of the V rows. Reading
// the cache in its own order matters more than anything else here: a task per (sequence, KV
// head), striding over the rows, ran 1.5x slower than gathering a copy. Tasks run on torch's
// intra-op threads (at::parallel_for). Reference: engine/kernels/cpu_paged_decode.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// query [num_seqs, num_heads, head_dim]; key_cache / value_cache
// [num_blocks, block_size, num_kv_heads, head_dim] (rows contiguous in head_dim);
// block_tables [num_seqs, max_num_blocks] int32; seq_lens [num_seqs] int32.
// Returns [num_seqs, num_heads, head_dim]. Shapes and dtypes are checked by the launcher.
torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor key_cache,
                                     torch::Tensor value_cache, torch::Tensor block_tables,
                                     torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(query.is_contiguous() && block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "query, block_tables and seq_lens must be contiguous");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "cache rows must be contiguous in head_dim");
  TORCH_CHECK(key_cache.strides() == value_cache.strides(), "K and V caches must share strides");
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t block_stride = key_cache.stride(0), token_stride = key_cache.stride(1),
                head_stride = key_cache.stride(2);
  auto out = torch::empty_like(query);
  const float* q_ptr = query.data_ptr<float>();
  const float* k_ptr = key_cache.data_ptr<float>();
  const float* v_ptr = value_cache.data_ptr<float>();
  const int32_t* table_ptr = block_tables.data_ptr<int32_t>();
  const int32_t* len_ptr = seq_lens.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);

  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(num_heads * head_dim), inv_sum(num_heads);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t seq_len = len_ptr[seq];
      const float* q = q_ptr + seq * num_heads * head_dim;  // [num_heads, head_dim]
      float* o = out_ptr + seq * num_heads * head_dim;
      if (seq_len <= 0) {
        std::fill(o, o + num_heads * head_dim, 0.0f);
        continue;
      }
      const int32_t* table = table_ptr + seq * max_blocks;
      scores.resize(num_heads * seq_len);  // [num_heads, seq_len]
      // Pass 1: scaled scores. A token's K rows (all KV heads) are read in memory order.
      for (int64_t start = 0; start < seq_len; start += block_size) {
        const int64_t n = std::min(block_size, seq_len - start);
        const float* k_block = k_ptr + table[start / block_size] * block_stride;
        for (int64_t t = 0; t < n; ++t) {
          const float* k_token = k_block + t * token_stride;
          for (int64_t h = 0; h < num_heads; ++h) {
            const float* k = k_token + (h / group) * head_stride;
            scores[h * seq_len + start + t] = dot(q + h * head_dim, k, head_dim) * scale_f;
          }
        }
      }
      // Softmax per head, in place.
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = scores.data() + h * seq_len;
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < seq_len; ++t) max_score = std::max(max_score, s[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < seq_len; ++t) {
          s[t] = std::exp(s[t] - max_score);
          sum += s[t];
        }
        inv_sum[h] = 1.0f / sum;
      }
      // Pass 2: weighted sums of the V rows, again in memory order.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t start = 0; start < seq_len; start += block_size) {
        const int64_t n = std::min(block_size, seq_len - start);
        const float* v_block = v_ptr + table[start / block_size] * block_stride;
        for (int64_t t = 0; t < n; ++t) {
          const float* v_token = v_block + t * token_stride;
          for (int64_t h = 0; h < num_heads; ++h) {
            const float* v = v_token + (h / group) * head_stride;
            axpy(scores[h * seq_len + start + t], v, acc.data() + h * head_dim, head_dim);
          }
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        for (int64_t d = 0; d < head_dim; ++d) {
          o[h * head_dim + d] = acc[h * head_dim + d] * inv_sum[h];
        }
      }
    }
  });
  return out;
}

// cpu_layer_ops.cpp, built into the same module.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm_(torch::Tensor residual, torch::Tensor delta, torch::Tensor weight,
                            double eps);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
             int64_t head_dim);
torch::Tensor small_linear(torch::Tensor x, torch::Tensor weight,
                           std::optional<torch::Tensor> bias);
int64_t small_linear_rows_limit();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention, CPU float32 (see cpu_paged_decode.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm, CPU float32 (see cpu_layer_ops.cpp)");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += delta, then RMSNorm, CPU float32");
  m.def("rotary_", &rotary_, "Rotary embedding in place, CPU float32");
  m.def("small_linear", &small_linear, "x weight^T + bias for a few rows, CPU float32",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("small_linear_rows_limit", &small_linear_rows_limit,
        "Up to how many rows small_linear pays (0: built without AVX2/FMA)");
}
