// Drafter head, greedy, launch 2 of 2: each row's token from its slices' best candidates.
// Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/drafter_head.py.
//
// Inputs:  slice_logits [N, S] float32, slice_tokens [N, S] uint32 (drafter_head.metal's outputs)
// Outputs: tokens [N] int32
//
// One SIMD-group per row: the best (logit, token), equal logits: the lower token id. Every slice
// holds a valid token (drafter_head.metal ranks NaN as -inf), so the row's token is valid too.

const uint S = slice_logits_shape[1];
const uint n = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;

float best = -INFINITY;
uint best_token = NO_INDEX;
for (uint s = lane; s < S; s += 32) {
  float value = slice_logits[size_t(n) * S + s];
  uint token = slice_tokens[size_t(n) * S + s];
  if (beats(value, token, best, best_token)) {
    best = value;
    best_token = token;
  }
}
simd_argmax(best, best_token);
if (lane == 0) {
  tokens[n] = int(best_token);
}
