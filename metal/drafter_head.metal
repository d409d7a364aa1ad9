// Drafter head, greedy: the assistant's next draft token from its centroid scores, without the
// vocabulary-wide row. Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/drafter_head.py.
//
// Inputs:  scores [N, C] (centroid scores), z [N, D] (normed drafter states),
//          ordering [C * cluster] (token ids, cluster by cluster),
//          weight [rows, D] float, or [rows, D * BITS / 32] uint32 when QUANTIZED (MLX affine),
//          scales, biases [rows, D / GROUP_SIZE] (placeholders unless QUANTIZED)
// Outputs: tokens [N] int32
// Template: K (centroids kept), TG (threads, a multiple of 32), PER_THREAD (>= C / TG, <= 64),
//           QUANTIZED, BITS (2, 4 or 8 when QUANTIZED), GROUP_SIZE
//
// One threadgroup per row n:
// 1. the K best centroids (equal scores: the lower centroid id first), K rounds of "best score
//    not yet taken" over the threadgroup; a NaN score ranks as -inf;
// 2. the K * cluster candidate logits, dot(row of token, z) dequantized and summed in float32,
//    one SIMD-group per candidate;
// 3. the best candidate, equal logits: the lower token id (as an argmax over the full row).

const uint C = scores_shape[1];
const uint D = z_shape[1];
const uint cluster = ordering_shape[0] / C;
const uint n = threadgroup_position_in_grid.y;
const uint t = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;
auto row_scores = scores + size_t(n) * C;
auto x = z + size_t(n) * D;

threadgroup float best_values[TG / 32];
threadgroup uint best_indices[TG / 32];
threadgroup uint chosen[K];

// 1. Thread t holds centroids t, t + TG, ...; bit i of `taken` marks centroid i * TG + t.
float held[PER_THREAD];
for (int i = 0; i < PER_THREAD; ++i) {
  uint c = uint(i) * TG + t;
  float s = c < C ? float(row_scores[c]) : -INFINITY;
  held[i] = metal::isnan(s) ? -INFINITY : s;
}
ulong taken = 0;
for (int j = 0; j < K; ++j) {
  float best = -INFINITY;
  uint best_index = UINT_MAX;
  for (int i = 0; i < PER_THREAD; ++i) {
    uint c = uint(i) * TG + t;
    if (c < C && ((taken >> i) & 1) == 0 && beats(held[i], c, best, best_index)) {
      best = held[i];
      best_index = c;
    }
  }
  threadgroup_argmax<TG / 32>(best, best_index, best_values, best_indices, simdgroup, lane);
  if (best_index % TG == t) {
    taken |= ulong(1) << (best_index / TG);
  }
  if (t == 0) {
    chosen[j] = best_index;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. Candidate m is token ordering[chosen[m / cluster] * cluster + m % cluster].
const uint words = D * BITS / 32;
const uint groups = D / GROUP_SIZE;
float best = -INFINITY;
uint best_token = UINT_MAX;
for (uint m = simdgroup; m < K * cluster; m += TG / 32) {
  uint token = uint(ordering[size_t(chosen[m / cluster]) * cluster + m % cluster]);
  float dot = 0.0f;
  if (QUANTIZED) {
    auto w = weight + size_t(token) * words;
    auto s = scales + size_t(token) * groups;
    auto b = biases + size_t(token) * groups;
    for (uint d = lane; d < D; d += 32) {
      uint q = (uint(w[d * BITS / 32]) >> ((d * BITS) % 32)) & ((1u << BITS) - 1u);
      float value = float(s[d / GROUP_SIZE]) * float(q) + float(b[d / GROUP_SIZE]);
      dot += value * float(x[d]);
    }
  } else {
    auto w = weight + size_t(token) * D;
    for (uint d = lane; d < D; d += 32) {
      dot += float(w[d]) * float(x[d]);
    }
  }
  dot = simd_sum(dot);
  if (beats(dot, token, best, best_token)) {
    best = dot;
    best_token = token;
  }
}

// 3.
threadgroup_argmax<TG / 32>(best, best_token, best_values, best_indices, simdgroup, lane);
if (t == 0) {
  tokens[n] = int(best_token);
}
