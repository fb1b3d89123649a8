// Paged decode attention on the CPU, float32: one query token per sequence, read straight
// from the paged KV cache (no gathered copy of the context).
//
// One task per sequence reads each of its cached K and V rows from memory exactly once, in
// memory order (a token's rows for all KV heads are contiguous): pass 1 takes every query
// head's dot product with the token's K row of its KV head, the softmax runs over the scores
// in a scratch buffer, pass 2 accumulates every head's weighted sum of the V rows. Reading
// the cache in its own order matters more than anything else here: a task per (sequence, KV
// head), striding over the rows, ran 1.5x slower than gathering a copy. While a block is read,
// the sequence's next block is prefetched (the blocks are scattered: the hardware cannot
// guess). Tasks run on torch's intra-op threads (at::parallel_for). Reference:
// engine/kernels/cpu_paged_decode.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_vec.h"

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

using pdserve_vec::prefetch;

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// With AVX2 or AVX-512 and a head_dim of whole vectors (cpu_vec.h), the two passes below are
// written in vectors. What the compiler made of `dot` was one chain of dependent FMAs and a
// sum of the lanes through memory, one add at a time: ~80 cycles a score, 27% of a 32-row
// decode step of the 77M model on an AVX-512 machine. Here a score is two chains and a
// shuffle tree, and pass 2 keeps the sums of a KV head's group of query heads in registers
// over a block of tokens, where `axpy` loaded and stored them for every token.
#if defined(__AVX2__) && defined(__FMA__)
using pdserve_vec::kLanes;
using pdserve_vec::Vec;

inline float vdot(const float* __restrict q, const float* __restrict k, int64_t n) {
  using namespace pdserve_vec;
  Vec a0 = vzero(), a1 = vzero();
  int64_t d = 0;
  for (; d + 2 * kLanes <= n; d += 2 * kLanes) {
    a0 = vfma(vload(q + d), vload(k + d), a0);
    a1 = vfma(vload(q + d + kLanes), vload(k + d + kLanes), a1);
  }
  if (d < n) a0 = vfma(vload(q + d), vload(k + d), a0);  // n is a multiple of kLanes
  return sum_lanes(vadd(a0, a1));
}

// Pass 2 over one block's `n` tokens for one KV head and its G query heads, DC vectors of
// head_dim at a time: acc[g * head_dim + ...] += p[g * seq_len + t] * v_t. G x DC sums, DC
// rows of V and the weight fit in the registers (chosen by weighted_sums).
template <int G, int DC>
void weighted_sums_block(const float* v_block, int64_t token_stride, int64_t n,
                         const float* p, int64_t seq_len, float* acc, int64_t head_dim) {
  using namespace pdserve_vec;
  for (int64_t c = 0; c < head_dim; c += DC * kLanes) {
    Vec a[G][DC];
    PDSERVE_UNROLLED for (int g = 0; g < G; ++g)
      PDSERVE_UNROLLED for (int d = 0; d < DC; ++d)
        a[g][d] = vload(acc + g * head_dim + c + d * kLanes);
    for (int64_t t = 0; t < n; ++t) {
      const float* v = v_block + t * token_stride + c;
      Vec vv[DC];
      PDSERVE_UNROLLED for (int d = 0; d < DC; ++d) vv[d] = vload(v + d * kLanes);
      PDSERVE_UNROLLED for (int g = 0; g < G; ++g) {
        const Vec w = vbroadcast(p[g * seq_len + t]);
        PDSERVE_UNROLLED for (int d = 0; d < DC; ++d) a[g][d] = vfma(w, vv[d], a[g][d]);
      }
    }
    PDSERVE_UNROLLED for (int g = 0; g < G; ++g)
      PDSERVE_UNROLLED for (int d = 0; d < DC; ++d)
        vstore(acc + g * head_dim + c + d * kLanes, a[g][d]);
  }
}

// The widest DC (4, 2 or 1 vectors) whose G x DC sums, DC rows and the weight fit in the
// registers and that divides head_dim.
template <int G>
void weighted_sums_group(const float* v_block, int64_t token_stride, int64_t n, const float* p,
                         int64_t seq_len, float* acc, int64_t head_dim) {
  using pdserve_vec::kRegisters;
  constexpr bool fits4 = G * 4 + 4 + 1 <= kRegisters, fits2 = G * 2 + 2 + 1 <= kRegisters;
  if (fits4 && head_dim % (4 * kLanes) == 0)
    weighted_sums_block<G, fits4 ? 4 : 1>(v_block, token_stride, n, p, seq_len, acc, head_dim);
  else if (fits2 && head_dim % (2 * kLanes) == 0)
    weighted_sums_block<G, fits2 ? 2 : 1>(v_block, token_stride, n, p, seq_len, acc, head_dim);
  else
    weighted_sums_block<G, 1>(v_block, token_stride, n, p, seq_len, acc, head_dim);
}

constexpr int64_t kMaxVectorGroup = 8;  // query heads per KV head the vector pass 2 takes

void weighted_sums(int64_t group, const float* v_block, int64_t token_stride, int64_t n,
                   const float* p, int64_t seq_len, float* acc, int64_t head_dim) {
  switch (group) {
    case 1: weighted_sums_group<1>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    case 2: weighted_sums_group<2>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    case 3: weighted_sums_group<3>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    case 4: weighted_sums_group<4>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    case 5: weighted_sums_group<5>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    case 6: weighted_sums_group<6>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    case 7: weighted_sums_group<7>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
    default: weighted_sums_group<8>(v_block, token_stride, n, p, seq_len, acc, head_dim); break;
  }
}
#endif

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
#if defined(__AVX2__) && defined(__FMA__)
  const bool vectors = head_dim % kLanes == 0 && group <= kMaxVectorGroup;
#endif

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
      // The block after the one at token `start`: its offset in the cache and how many of the
      // sequence's tokens it holds (0 past the last).
      auto next_block = [&](int64_t start) -> std::pair<int64_t, int64_t> {
        const int64_t next = start + block_size;
        if (next >= seq_len) return {0, 0};
        return {table[next / block_size] * block_stride, std::min(block_size, seq_len - next)};
      };
      scores.resize(num_heads * seq_len);  // [num_heads, seq_len]
      // Pass 1: scaled scores. A token's K rows (all KV heads) are read in memory order.
      for (int64_t start = 0; start < seq_len; start += block_size) {
        const int64_t n = std::min(block_size, seq_len - start);
        const float* k_block = k_ptr + table[start / block_size] * block_stride;
        // The next block's K rows, token by token while this block's are read: the rows of a
        // sequence lie in scattered blocks, which the hardware's prefetcher cannot foresee.
        const auto [next_offset, n_next] = next_block(start);
        for (int64_t t = 0; t < n; ++t) {
          if (t < n_next)
            prefetch(k_ptr + next_offset, t * token_stride, (t + 1) * token_stride);
          const float* k_token = k_block + t * token_stride;
          for (int64_t h = 0; h < num_heads; ++h) {
            const float* k = k_token + (h / group) * head_stride;
#if defined(__AVX2__) && defined(__FMA__)
            const float score = vectors ? vdot(q + h * head_dim, k, head_dim)
                                        : dot(q + h * head_dim, k, head_dim);
#else
            const float score = dot(q + h * head_dim, k, head_dim);
#endif
            scores[h * seq_len + start + t] = score * scale_f;
          }
        }
      }
      // Softmax per head, in place.
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = scores.data() + h * seq_len;
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < seq_len; ++t) max_score = std::max(max_score, s[t]);
        float sum = 0.0f;
        int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
        {  // ~10-14% of the op's time as one std::exp a score
          using namespace pdserve_vec;
          const Vec shift = vbroadcast(max_score);
          Vec total = vzero();
          for (; t + kLanes <= seq_len; t += kLanes) {
            const Vec e = vexp_nonpositive(vsub(vload(s + t), shift));
            vstore(s + t, e);
            total = vadd(total, e);
          }
          sum = sum_lanes(total);
        }
#endif
        for (; t < seq_len; ++t) {
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
        const auto [next_offset, n_next] = next_block(start);  // its V rows, all at once
        prefetch(v_ptr + next_offset, 0, n_next * token_stride);
#if defined(__AVX2__) && defined(__FMA__)
        if (vectors) {
          for (int64_t kv = 0; kv < num_kv_heads; ++kv)
            weighted_sums(group, v_block + kv * head_stride, token_stride, n,
                          scores.data() + kv * group * seq_len + start, seq_len,
                          acc.data() + kv * group * head_dim, head_dim);
          continue;
        }
#endif
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
torch::Tensor panel_pack(torch::Tensor weight);
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t out,
                           std::optional<torch::Tensor> bias);
bool panel_linear_pays();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention, CPU float32 (see cpu_paged_decode.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm, CPU float32 (see cpu_layer_ops.cpp)");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += delta, then RMSNorm, CPU float32");
  m.def("rotary_", &rotary_, "Rotary embedding in place, CPU float32");
  m.def("small_linear", &small_linear, "x weight^T + bias for a few rows, CPU float32",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("small_linear_rows_limit", &small_linear_rows_limit,
        "Up to how many rows small_linear takes (0: built without AVX2/FMA)");
  m.def("panel_pack", &panel_pack, "A [out, in] weight in panel_linear's panels, CPU float32");
  m.def("panel_linear", &panel_linear, "x weight^T + bias on panel_pack's panels, CPU float32",
        py::arg("x"), py::arg("panels"), py::arg("out"), py::arg("bias") = py::none());
  m.def("panel_linear_pays", &panel_linear_pays,
        "Whether panel_linear was built with vectors (else slower than oneDNN)");
}
