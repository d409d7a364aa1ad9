// Shared by the speculative verify kernels (see gemma_mlx/kernels/verify.py). Every threadgroup
// helper below must be called by all threads of a threadgroup of SIMDGROUPS full SIMD-groups
// (SIMDGROUPS <= 32) and reuses its threadgroup `scratch` only after a closing barrier.

constant uint NO_ID = 0xFFFFFFFFu;  // above every token id and every chunk index

// A NaN logit counts as -inf (so it never beats a number, and an all-NaN row gives id 0).
inline float logit_value(float x) {
  return metal::isnan(x) ? -INFINITY : x;
}

// The weight of an entry when sampling after the accepted drafts: max(p - q, 0) with q the draft's
// probability (one-hot drafts: 1 at the rejected draft, 0 elsewhere; q = 0 samples from p itself).
// NaN and negative p weigh 0.
inline float residual_weight(float p, float q) {
  return p > q ? p - q : 0.0f;
}

// Rejection sampling's accepted prefix: draft i is kept while u_i * q_i(d_i) < p_i(d_i) (q = 1
// for one-hot drafts), all in float32. K is a handful: every thread computes it, no barrier.
template <typename P, typename Q, typename D, typename U>
inline uint accepted_drafts(P target, Q draft, D drafts, U uniforms, uint K, uint V, bool has_q) {
  uint n = 0;
  while (n < K) {
    const uint d = uint(drafts[n]);
    const float p = float(target[size_t(n) * V + d]);
    const float q = has_q ? float(draft[size_t(n) * V + d]) : 1.0f;
    if (!(float(uniforms[n]) * q < p)) {
      break;
    }
    ++n;
  }
  return n;
}

// Exclusive prefix sum of `value` in thread order; `total` gets the threadgroup's sum.
template <int SIMDGROUPS>
inline float threadgroup_prefix_sum(
    float value,
    thread float& total,
    threadgroup float* scratch,
    uint simdgroup,
    uint lane) {
  const float within = simd_prefix_exclusive_sum(value);
  const float simd_total = simd_sum(value);
  if (lane == 0) {
    scratch[simdgroup] = simd_total;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float earlier = 0.0f;
  total = 0.0f;
  for (uint s = 0; s < uint(SIMDGROUPS); ++s) {
    if (s < simdgroup) {
      earlier += scratch[s];
    }
    total += scratch[s];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return earlier + within;
}

// The smallest (MAXIMUM false) or largest (MAXIMUM true) `value` of the threadgroup.
template <int SIMDGROUPS, bool MAXIMUM>
inline uint threadgroup_extreme(uint value, threadgroup uint* scratch, uint simdgroup, uint lane) {
  value = MAXIMUM ? simd_max(value) : simd_min(value);
  if (lane == 0) {
    scratch[simdgroup] = value;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  value = lane < uint(SIMDGROUPS) ? scratch[lane] : value;
  value = MAXIMUM ? simd_max(value) : simd_min(value);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return value;
}

// Inverse-CDF search over the weights a thread holds in order, starting from the running sum
// `running` of everything before them: the first index whose weight is positive and whose running
// sum exceeds `threshold` (NO_ID: none), and one past the last index with a positive weight (0:
// none). Returns the running sum after them.
template <int COUNT>
inline float search_weights(
    thread const float (&weights)[COUNT],
    uint first_index,
    uint count,
    float running,
    float threshold,
    thread uint& found,
    thread uint& last_positive_end) {
  for (uint i = 0; i < count; ++i) {
    running += weights[i];
    if (weights[i] > 0.0f) {
      if (found == NO_ID && running > threshold) {
        found = first_index + i;
      }
      last_positive_end = first_index + i + 1;
    }
  }
  return running;
}
