// Speculative verify, greedy: how many drafts equal the target's argmax, and the target's token
// after them. Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/verify.py.
//
// Inputs:  logits [K+1, V] (row i follows draft i - 1), drafts [K] int32
// Outputs: result [2] int32: (accepted n, the argmax of row n)
// Template: TG (threads, one threadgroup, a multiple of 32)
//
// Rows are reduced one after another and the loop stops at the first rejected draft, so a round
// reads n + 1 rows, not K + 1. Ties go to the lower token id (as mx.argmax).

const uint V = logits_shape[1];
const uint K = logits_shape[0] - 1;
const uint t = thread_index_in_threadgroup;

threadgroup float best_values[TG / 32];
threadgroup uint best_indices[TG / 32];

uint n = 0;
uint token = 0;
for (uint row = 0; row <= K; ++row) {
  auto x = logits + size_t(row) * V;
  float best = -INFINITY;
  uint best_index = UINT_MAX;
  for (uint v = t; v < V; v += TG) {
    float value = float(x[v]);
    if (beats(value, v, best, best_index)) {
      best = value;
      best_index = v;
    }
  }
  threadgroup_argmax<TG / 32>(
      best, best_index, best_values, best_indices, simdgroup_index_in_threadgroup,
      thread_index_in_simdgroup);
  n = row;
  token = best_index;
  if (row == K || best_index != uint(drafts[row])) {
    break;
  }
}
if (t == 0) {
  result[0] = int(n);
  result[1] = int(token);
}
