// Speculative verify, greedy, launch 2 of 2: how many drafts equal the target's argmax, and the
// target's token after them. Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/verify.py.
//
// Inputs:  values [K+1, G] float, ids [K+1, G] uint32 (launch 1: each chunk's best logit and its
//          id), drafts [K] int32
// Outputs: result [2] int32: (accepted n, the argmax of row n)
// Template: TG (threads, a multiple of 32)
// Grid:    one threadgroup
//
// A row's argmax is the best of its chunks' in the order of select.h (larger value, then lower
// id): a strict total order, so it equals the argmax of the whole row, the lowest id among the
// largest logits. Rows are combined in order and the loop stops at the first rejected draft.

const uint G = values_shape[1];
const uint K = values_shape[0] - 1;
const uint t = thread_index_in_threadgroup;

threadgroup float best_values[TG / 32];
threadgroup uint best_indices[TG / 32];

uint n = 0;
uint token = 0;
for (uint row = 0; row <= K; ++row) {
  float best = -INFINITY;
  uint best_index = NO_ID;
  for (uint c = t; c < G; c += uint(TG)) {
    const float value = values[size_t(row) * G + c];
    const uint id = ids[size_t(row) * G + c];
    if (beats(value, id, best, best_index)) {
      best = value;
      best_index = id;
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
