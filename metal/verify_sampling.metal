// Speculative verify, sampling (Leviathan et al.), launch 2 of 2: accept draft i while
// u_i * q_i(d_i) < p_i(d_i); then sample the next token from the weights max(p_n - q_n, 0) (p_K
// after K acceptances; p_n itself when they are all 0) by inverse CDF with u_K. Body of an
// mx.fast.metal_kernel; see gemma_mlx/kernels/verify.py.
//
// Inputs:  target, draft, drafts, uniforms as in launch 1 (verify_sampling_chunks.metal),
//          sums [2, G] float (launch 1: the chunk sums of the residual and of p)
// Outputs: result [2] int32: (accepted n, next token)
// Template: TG (threads, a multiple of 32), PER_THREAD (a chunk is TG * PER_THREAD entries),
//           CHUNKS_PER_THREAD (>= G / TG), HAS_DRAFT_PROBS
// Grid:    one threadgroup
//
// The token: with total the sum of all weights and threshold = u_K * total, the first id with a
// positive weight whose running sum exceeds the threshold. Found in two steps, each comparing
// running sums with the threshold the same way: the chunk (a scan of the chunk sums), then the
// id inside it (a scan of its entries, against threshold - the sum before the chunk, so that
// small weights are resolved at the chunk's scale). Where rounding leaves no running sum above
// the threshold, the last positive weight is taken; all weights 0 (or NaN) gives id 0.
// Every value is float32.

const uint V = target_shape[1];
const uint K = target_shape[0] - 1;
const uint G = sums_shape[1];
const uint t = thread_index_in_threadgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;

const uint n = accepted_drafts(target, draft, drafts, uniforms, K, V, HAS_DRAFT_PROBS);
const bool has_q = HAS_DRAFT_PROBS && n < K;
const uint rejected = (!HAS_DRAFT_PROBS && n < K) ? uint(drafts[n]) : NO_ID;
auto p_row = target + size_t(n) * V;
auto q_row = draft + size_t(has_q ? n : 0) * V;

threadgroup float sum_scratch[TG / 32];
threadgroup uint id_scratch[TG / 32];
threadgroup float shared_start[1];

// 1. The chunk. Thread t holds chunks [t * CHUNKS_PER_THREAD, ...) of both kinds of weight.
const uint first_chunk = metal::min(t * uint(CHUNKS_PER_THREAD), G);
const uint chunks_held = metal::min(first_chunk + uint(CHUNKS_PER_THREAD), G) - first_chunk;
float residual_sums[CHUNKS_PER_THREAD];
float plain_sums[CHUNKS_PER_THREAD];
float residual_held = 0.0f;
float plain_held = 0.0f;
for (uint i = 0; i < chunks_held; ++i) {
  residual_sums[i] = sums[first_chunk + i];
  plain_sums[i] = sums[G + first_chunk + i];
  residual_held += residual_sums[i];
  plain_held += plain_sums[i];
}
float residual_total;
float plain_total;
const float residual_before =
    threadgroup_prefix_sum<TG / 32>(residual_held, residual_total, sum_scratch, simdgroup, lane);
const float plain_before =
    threadgroup_prefix_sum<TG / 32>(plain_held, plain_total, sum_scratch, simdgroup, lane);
const bool plain = !(residual_total > 0.0f);
const float threshold = float(uniforms[K]) * (plain ? plain_total : residual_total);

float chunk_sums[CHUNKS_PER_THREAD];
for (uint i = 0; i < chunks_held; ++i) {
  chunk_sums[i] = plain ? plain_sums[i] : residual_sums[i];
}
uint found = NO_ID;
uint last_end = 0;
search_weights(
    chunk_sums, first_chunk, chunks_held, plain ? plain_before : residual_before, threshold,
    found, last_end);
uint chunk = threadgroup_extreme<TG / 32, false>(found, id_scratch, simdgroup, lane);
if (chunk == NO_ID) {
  const uint end = threadgroup_extreme<TG / 32, true>(last_end, id_scratch, simdgroup, lane);
  chunk = end > 0 ? end - 1 : 0;
}
if (first_chunk <= chunk && chunk < first_chunk + chunks_held) {
  float start = plain ? plain_before : residual_before;
  for (uint i = 0; first_chunk + i < chunk; ++i) {
    start += chunk_sums[i];
  }
  shared_start[0] = start;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float chunk_threshold = threshold - shared_start[0];

// 2. The id inside the chunk: thread t holds PER_THREAD consecutive entries.
const uint first_id = chunk * uint(TG * PER_THREAD) + t * uint(PER_THREAD);
const uint ids_held = first_id < V ? metal::min(uint(PER_THREAD), V - first_id) : 0;
float weights[PER_THREAD];
float held = 0.0f;
for (uint i = 0; i < ids_held; ++i) {
  const uint v = first_id + i;
  const float p = float(p_row[v]);
  const float q = plain ? 0.0f : has_q ? float(q_row[v]) : (v == rejected ? 1.0f : 0.0f);
  weights[i] = residual_weight(p, q);
  held += weights[i];
}
float chunk_total;
const float before = threadgroup_prefix_sum<TG / 32>(held, chunk_total, sum_scratch, simdgroup, lane);
found = NO_ID;
last_end = 0;
search_weights(weights, first_id, ids_held, before, chunk_threshold, found, last_end);
uint token = threadgroup_extreme<TG / 32, false>(found, id_scratch, simdgroup, lane);
if (token == NO_ID) {
  const uint end = threadgroup_extreme<TG / 32, true>(last_end, id_scratch, simdgroup, lane);
  token = end > 0 ? end - 1 : 0;
}
if (t == 0) {
  result[0] = int(n);
  result[1] = int(token);
}
