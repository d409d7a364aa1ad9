// Speculative verify, sampling (Leviathan et al.), launch 1 of 2: the accepted drafts, then the
// weight of every chunk of the row the next token is sampled from. Body of an
// mx.fast.metal_kernel; see gemma_mlx/kernels/verify.py.
//
// Inputs:  target [K+1, V] probabilities, draft [K, V] probabilities (a placeholder when
//          HAS_DRAFT_PROBS is false: deterministic drafts, q = one-hot), drafts [K] int32,
//          uniforms [K+1] in [0, 1)
// Outputs: sums [2, G] float: per chunk of row n (n = drafts accepted), the sum of the residual
//          max(p - q, 0) (row 0) and of p (row 1); float32 whatever the inputs' dtype
// Template: TG (threads, a multiple of 32), PER_THREAD (a chunk is TG * PER_THREAD entries),
//           HAS_DRAFT_PROBS
// Grid:    (G * TG): threadgroup c sums chunk c; thread t reads entries c * TG * PER_THREAD +
//          i * TG + t, so adjacent lanes read adjacent entries.

const uint V = target_shape[1];
const uint K = target_shape[0] - 1;
const uint chunk = threadgroup_position_in_grid.x;
const uint G = threadgroups_per_grid.x;
const uint t = thread_index_in_threadgroup;

const uint n = accepted_drafts(target, draft, drafts, uniforms, K, V, HAS_DRAFT_PROBS);
const bool has_q = HAS_DRAFT_PROBS && n < K;
const uint rejected = (!HAS_DRAFT_PROBS && n < K) ? uint(drafts[n]) : NO_ID;
auto p_row = target + size_t(n) * V;
auto q_row = draft + size_t(has_q ? n : 0) * V;

threadgroup float scratch[TG / 32];

float residual = 0.0f;
float plain = 0.0f;
for (uint i = 0; i < uint(PER_THREAD); ++i) {
  const uint v = chunk * uint(TG * PER_THREAD) + i * uint(TG) + t;
  if (v < V) {
    const float p = float(p_row[v]);
    const float q = has_q ? float(q_row[v]) : (v == rejected ? 1.0f : 0.0f);
    residual += residual_weight(p, q);
    plain += residual_weight(p, 0.0f);
  }
}
const uint simdgroup = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
float residual_total;
float plain_total;
threadgroup_prefix_sum<TG / 32>(residual, residual_total, scratch, simdgroup, lane);
threadgroup_prefix_sum<TG / 32>(plain, plain_total, scratch, simdgroup, lane);
if (t == 0) {
  sums[chunk] = residual_total;
  sums[G + chunk] = plain_total;
}
