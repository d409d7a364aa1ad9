// Decode attention, launch 1 of 2: one query token against a chunk of CHUNK cached positions per
// threadgroup, for SIMDGROUPS query heads that share a KV head (grouped-query attention).
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/attention.py declares its parameters and
// launch.
//
// Inputs:  q [HQ * D] (T; one dimension: contiguous); k, v [1, HKV, L, D] (T) as the cache holds
//          them (a slice of a larger buffer: read through k_strides, v_strides); params [1]
//          float32: the score scale.
// Outputs: partial [HQ, CHUNKS, D] float32: sum over the chunk of exp(s_p - m) v_p;
//          stats [HQ, CHUNKS, 2] float32: m (the chunk's largest score), sum of exp(s_p - m).
// Template: T, D, CHUNK, SIMDGROUPS (a divisor of HQ / HKV)
//
// Grid (32 * SIMDGROUPS, HQ / SIMDGROUPS, CHUNKS): one SIMD-group per query head, lane l holding
// entries l, l + 32, ... of the head (adjacent lanes read adjacent entries of every K and V row).
// Scores, the softmax and the weighted sum stay in float32 (online softmax over the chunk);
// attention_combine.metal merges the chunks.

constexpr int J = (D + 31) / 32;
const uint lane = thread_index_in_simdgroup;
const uint h = threadgroup_position_in_grid.y * SIMDGROUPS + simdgroup_index_in_threadgroup;
const uint kv = h / (uint(q_shape[0]) / D / uint(k_shape[1]));
const uint chunk = threadgroup_position_in_grid.z;
const uint chunks = threadgroups_per_grid.z;
const uint length = uint(k_shape[2]);
const uint first = chunk * CHUNK;
const uint last = metal::min(length, first + uint(CHUNK));

float qs[J];
float o[J];
for (int j = 0; j < J; ++j) {
  uint d = lane + uint(32 * j);
  qs[j] = d < uint(D) ? float(q[size_t(h) * D + d]) * params[0] : 0.0f;
  o[j] = 0.0f;
}
float m = -INFINITY;
float l = 0.0f;
auto k_head = k + kv * k_strides[1];
auto v_head = v + kv * v_strides[1];
for (uint p = first; p < last; ++p) {
  auto kp = k_head + p * k_strides[2];
  auto vp = v_head + p * v_strides[2];
  float s = 0.0f;
  for (int j = 0; j < J; ++j) {
    uint d = lane + uint(32 * j);
    if (d < uint(D)) {
      s += qs[j] * float(kp[d * k_strides[3]]);
    }
  }
  s = simd_sum(s);
  float m_new = metal::max(m, s);
  float keep = metal::exp(m - m_new);
  float weight = metal::exp(s - m_new);
  l = l * keep + weight;
  for (int j = 0; j < J; ++j) {
    uint d = lane + uint(32 * j);
    float value = d < uint(D) ? float(vp[d * v_strides[3]]) : 0.0f;
    o[j] = o[j] * keep + weight * value;
  }
  m = m_new;
}

const size_t slot = size_t(h) * chunks + chunk;
for (int j = 0; j < J; ++j) {
  uint d = lane + uint(32 * j);
  if (d < uint(D)) {
    partial[slot * D + d] = o[j];
  }
}
if (lane == 0) {
  stats[slot * 2] = m;
  stats[slot * 2 + 1] = l;
}
