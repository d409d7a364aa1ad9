// Decode attention, launch 2 of 2: each query head's chunks (attention_chunks.metal) merged into
// its output, sum_c exp(m_c - M) partial_c / sum_c exp(m_c - M) l_c with M the largest m_c.
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/attention.py declares its parameters and
// launch.
//
// Inputs:  partial [HQ, CHUNKS, D] float32, stats [HQ, CHUNKS, 2] float32
// Output:  out [HQ, D] (T)
// Template: T, D
//
// One SIMD-group per query head, lane l holding entries l, l + 32, ...

constexpr int J = (D + 31) / 32;
const uint lane = thread_index_in_simdgroup;
const uint h = threadgroup_position_in_grid.y * simdgroups_per_threadgroup +
    simdgroup_index_in_threadgroup;
if (h >= uint(stats_shape[0])) {
  return;
}
const uint chunks = uint(stats_shape[1]);
auto head_stats = stats + size_t(h) * chunks * 2;
auto head_partial = partial + size_t(h) * chunks * D;

float top = -INFINITY;
for (uint c = lane; c < chunks; c += 32) {
  top = metal::max(top, head_stats[c * 2]);
}
top = simd_max(top);
float denominator = 0.0f;
for (uint c = lane; c < chunks; c += 32) {
  denominator += metal::exp(head_stats[c * 2] - top) * head_stats[c * 2 + 1];
}
denominator = simd_sum(denominator);

float o[J];
for (int j = 0; j < J; ++j) {
  o[j] = 0.0f;
}
for (uint c = 0; c < chunks; ++c) {
  float weight = metal::exp(head_stats[c * 2] - top);
  for (int j = 0; j < J; ++j) {
    uint d = lane + uint(32 * j);
    if (d < uint(D)) {
      o[j] += weight * head_partial[size_t(c) * D + d];
    }
  }
}
for (int j = 0; j < J; ++j) {
  uint d = lane + uint(32 * j);
  if (d < uint(D)) {
    out[size_t(h) * D + d] = T(o[j] / denominator);
  }
}
