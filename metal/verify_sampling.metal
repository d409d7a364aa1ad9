// Speculative verify, sampling (Leviathan et al.): accept draft i while u_i * q_i(d_i) < p_i(d_i);
// then sample the next token from normalize(max(p_n - q_n, 0)) (from p_K after K acceptances)
// by inverse CDF with u_K. Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/verify.py.
//
// Inputs:  target [K+1, V] probabilities, draft [K, V] probabilities (a placeholder when
//          HAS_DRAFT_PROBS is false: deterministic drafts, q = one-hot), drafts [K] int32,
//          uniforms [K+1] in [0, 1)
// Outputs: result [2] int32: (accepted n, next token)
// Template: TG (threads, one threadgroup, a multiple of 32), HAS_DRAFT_PROBS
//
// The token is the number of entries whose running sum of the residual is <= u_K * total
// (clamped to V - 1). The residual is >= 0, so its running sum never decreases: each thread sums
// a contiguous chunk, a threadgroup scan gives each chunk its start, and each thread counts its
// entries under the threshold. A residual that sums to 0 is replaced by p itself.

const uint V = target_shape[1];
const uint K = target_shape[0] - 1;
const uint t = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;

// Accepted prefix: K is a handful, every thread computes it (no barrier needed).
uint n = 0;
while (n < K) {
  uint d = uint(drafts[n]);
  float p = float(target[size_t(n) * V + d]);
  float q = HAS_DRAFT_PROBS ? float(draft[size_t(n) * V + d]) : 1.0f;
  if (!(float(uniforms[n]) * q < p)) {
    break;
  }
  ++n;
}
auto p_row = target + size_t(n) * V;
auto q_row = draft + size_t(n) * V;
const bool has_q = HAS_DRAFT_PROBS && n < K;
const uint rejected = (!HAS_DRAFT_PROBS && n < K) ? uint(drafts[n]) : UINT_MAX;

const uint chunk = (V + TG - 1) / TG;
const uint begin = metal::min(t * chunk, V);
const uint end = metal::min(begin + chunk, V);

threadgroup float residual_totals[TG / 32];
threadgroup float p_totals[TG / 32];
threadgroup uint counts[TG / 32];

float residual_sum = 0.0f;
float p_sum = 0.0f;
for (uint v = begin; v < end; ++v) {
  float p = float(p_row[v]);
  p_sum += p;
  residual_sum += residual_probability(p, has_q ? float(q_row[v]) : 0.0f, v == rejected);
}
float residual_before = simd_prefix_exclusive_sum(residual_sum);
float p_before = simd_prefix_exclusive_sum(p_sum);
float residual_simd = simd_sum(residual_sum);
float p_simd = simd_sum(p_sum);
if (lane == 0) {
  residual_totals[simdgroup] = residual_simd;
  p_totals[simdgroup] = p_simd;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float residual_total = 0.0f;
float p_total = 0.0f;
for (uint s = 0; s < TG / 32; ++s) {
  if (s < simdgroup) {
    residual_before += residual_totals[s];
    p_before += p_totals[s];
  }
  residual_total += residual_totals[s];
  p_total += p_totals[s];
}
const bool use_residual = residual_total > 0.0f;
const float threshold = float(uniforms[K]) * (use_residual ? residual_total : p_total);

uint count = 0;
float running = use_residual ? residual_before : p_before;
for (uint v = begin; v < end; ++v) {
  float p = float(p_row[v]);
  running += use_residual ? residual_probability(p, has_q ? float(q_row[v]) : 0.0f, v == rejected)
                          : p;
  count += running <= threshold ? 1u : 0u;
}
uint simd_count = simd_sum(count);
if (lane == 0) {
  counts[simdgroup] = simd_count;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (t == 0) {
  uint total_count = 0;
  for (uint s = 0; s < TG / 32; ++s) {
    total_count += counts[s];
  }
  result[0] = int(n);
  result[1] = int(metal::min(total_count, V - 1));
}
