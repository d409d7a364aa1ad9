// Drafter head, greedy, launch 1 of 2: the best candidate of each slice of the candidates.
// Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/drafter_head.py.
//
// Inputs:  scores [N, C] (centroid scores), z [N, D] (normed drafter states),
//          ordering [C * cluster] (token ids, cluster by cluster),
//          weight [rows, D] float, or [rows, D * BITS / 32] uint32 when QUANTIZED (MLX affine),
//          scales, biases [rows, D / GROUP_SIZE] (placeholders unless QUANTIZED)
// Outputs: slice_logits [N, S] float32, slice_tokens [N, S] uint32 (S = threadgroups along x)
// Template: K (centroids kept, <= 256), TG (threads, a multiple of 32), PER_THREAD (>= C / TG, <= 64),
//           SLICE (candidates per threadgroup), QUANTIZED, BITS (2, 4 or 8 when QUANTIZED),
//           GROUP_SIZE
//
// Threadgroup (s, n):
// 1. the K best centroids of row n (equal scores: the lower centroid id first; a NaN score ranks
//    as -inf). Every threadgroup of the row finds the same set from the row's C scores (a few KB,
//    cheaper than a launch): each SIMD-group its own K best in K rounds of `simd_next_best` (no
//    barrier), then each of those TG / 32 * K entries is ranked against the others, rank r < K
//    giving chosen[r] (the global K best are among the SIMD-groups' K best);
// 2. the logits of candidates s * SLICE ... s * SLICE + SLICE - 1 (candidate m is token
//    ordering[chosen[m / cluster] * cluster + m % cluster]), one SIMD-group per candidate, lanes
//    reading adjacent 32-bit words (or elements) of the token's row, dequantized and summed in
//    float32; a NaN logit ranks as -inf;
// 3. the slice's best candidate, equal logits: the lower token id. drafter_head_pick.metal then
//    picks the best of the row's slices by the same order (an argmax over the full row).

const uint C = scores_shape[1];
const uint D = z_shape[1];
const uint cluster = ordering_shape[0] / C;
const uint slices = threadgroups_per_grid.x;
const uint s = threadgroup_position_in_grid.x;
const uint n = threadgroup_position_in_grid.y;
const uint t = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;
auto row_scores = scores + size_t(n) * C;
auto x = z + size_t(n) * D;

threadgroup float best_values[TG / 32];
threadgroup uint best_indices[TG / 32];
threadgroup float top_values[TG / 32 * K];
threadgroup uint top_indices[TG / 32 * K];
threadgroup uint chosen[K];

// 1. Thread t holds centroids t, t + TG, ...: SIMD-group g holds c = i * TG + g * 32 + lane,
// which `simd_next_best` numbers e = i * 32 + lane (the same order).
float held[PER_THREAD];
for (int i = 0; i < PER_THREAD; ++i) {
  uint c = uint(i) * TG + t;
  float score = c < C ? float(row_scores[c]) : -INFINITY;
  held[i] = metal::isnan(score) ? -INFINITY : score;
}
const uint group_first = simdgroup * 32;
const uint full_rows = C / TG;
const uint remainder = C - full_rows * TG;
const uint held_by_group =
    full_rows * 32 + (remainder > group_first ? metal::min(remainder - group_first, 32u) : 0u);
const uint rounds = metal::min(uint(K), held_by_group);
ulong taken = 0;
for (uint j = 0; j < uint(K); ++j) {
  float best = -INFINITY;
  uint best_index = NO_INDEX;
  if (j < rounds) {
    simd_next_best(held, taken, lane, held_by_group, best, best_index);
    best_index = (best_index / 32) * TG + group_first + best_index % 32;
  }
  if (lane == 0) {
    top_values[simdgroup * K + j] = best;
    top_indices[simdgroup * K + j] = best_index;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint e = t; e < TG / 32 * K; e += TG) {
  const float value = top_values[e];
  const uint index = top_indices[e];
  if (index != NO_INDEX) {
    uint rank = 0;
    for (uint f = 0; f < TG / 32 * K; ++f) {
      rank += beats(top_values[f], top_indices[f], value, index) ? 1u : 0u;
    }
    if (rank < uint(K)) {
      chosen[rank] = index;
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2.
const uint values_per_word = 32 / metal::max(uint(BITS), 1u);
const uint words = D / values_per_word;
const uint groups = D / GROUP_SIZE;
const uint end = metal::min((s + 1) * SLICE, K * cluster);
float best = -INFINITY;
uint best_token = NO_INDEX;
for (uint m = s * SLICE + simdgroup; m < end; m += TG / 32) {
  uint token = uint(ordering[size_t(chosen[m / cluster]) * cluster + m % cluster]);
  float dot = 0.0f;
  if (QUANTIZED) {
    auto w = weight + size_t(token) * words;
    auto row_scales = scales + size_t(token) * groups;
    auto row_biases = biases + size_t(token) * groups;
    for (uint i = lane; i < words; i += 32) {
      uint word = uint(w[i]);
      uint first = i * values_per_word;  // a word never straddles a group (GROUP_SIZE >= 32 / BITS)
      float scale = float(row_scales[first / GROUP_SIZE]);
      float bias = float(row_biases[first / GROUP_SIZE]);
      for (uint v = 0; v < values_per_word; ++v) {
        float q = float((word >> (v * BITS)) & ((1u << BITS) - 1u));
        dot += (scale * q + bias) * float(x[first + v]);
      }
    }
  } else {
    auto w = weight + size_t(token) * D;
    for (uint d = lane; d < D; d += 32) {
      dot += float(w[d]) * float(x[d]);
    }
  }
  dot = simd_sum(dot);
  dot = metal::isnan(dot) ? -INFINITY : dot;
  if (beats(dot, token, best, best_token)) {
    best = dot;
    best_token = token;
  }
}

// 3.
threadgroup_argmax<TG / 32>(best, best_token, best_values, best_indices, simdgroup, lane);
if (t == 0) {
  slice_logits[size_t(n) * slices + s] = best;
  slice_tokens[size_t(n) * slices + s] = best_token;
}
