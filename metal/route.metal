// MoE router: the top-K experts of one token per threadgroup (one SIMD-group).
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/moe.py declares its parameters and launch.
//
// Inputs:  logits [T, E] (E <= 32 * PER_LANE), scale [E] (per-expert scale)
// Outputs: weights [T, K] float32, ids [T, K] uint32, by descending logit (ties: lower id first)
// Template: K, PER_LANE
//
// K rounds of "best untaken logit" across the SIMD-group, then the softmax over the K chosen
// logits (= softmax over all E, top K, renormalised) times the expert's scale.

const uint E = logits_shape[1];
const uint t = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
auto row = logits + size_t(t) * E;

float v[PER_LANE];
for (int n = 0; n < PER_LANE; ++n) {
  uint e = uint(n) * 32 + lane;
  float x = e < E ? float(row[e]) : -INFINITY;
  v[n] = metal::isnan(x) ? -INFINITY : x;  // a NaN logit ranks as -inf
}

ulong taken = 0;
float top[K];
uint top_id[K];
for (int j = 0; j < K; ++j) {
  simd_next_best(v, taken, lane, E, top[j], top_id[j]);
}

if (lane == 0) {
  float e_top[K];
  float total = 0.0f;
  for (int j = 0; j < K; ++j) {
    e_top[j] = metal::exp(top[j] - top[0]);
    total += e_top[j];
  }
  for (int j = 0; j < K; ++j) {
    weights[size_t(t) * K + j] = e_top[j] / total * float(scale[top_id[j]]);
    ids[size_t(t) * K + j] = top_id[j];
  }
}
