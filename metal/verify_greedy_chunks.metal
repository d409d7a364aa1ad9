// Speculative verify, greedy, launch 1 of 2: the argmax of every chunk of every target row.
// Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/verify.py.
//
// Inputs:  logits [K+1, V]
// Outputs: values [K+1, G] float, ids [K+1, G] uint32: each chunk's largest logit (NaN counts
//          as -inf) and its lowest id
// Template: TG (threads, a multiple of 32), PER_THREAD (entries per thread; a chunk is
//           TG * PER_THREAD entries)
// Grid:    (G * TG, K + 1): threadgroup (c, r) reduces chunk c of row r; thread t reads entries
//          c * TG * PER_THREAD + i * TG + t, so adjacent lanes read adjacent entries.

const uint V = logits_shape[1];
const uint row = threadgroup_position_in_grid.y;
const uint chunk = threadgroup_position_in_grid.x;
const uint G = threadgroups_per_grid.x;
const uint t = thread_index_in_threadgroup;
auto x = logits + size_t(row) * V;

threadgroup float best_values[TG / 32];
threadgroup uint best_indices[TG / 32];

float best = -INFINITY;
uint best_index = NO_ID;
for (uint i = 0; i < uint(PER_THREAD); ++i) {
  const uint v = chunk * uint(TG * PER_THREAD) + i * uint(TG) + t;
  if (v < V) {
    const float value = logit_value(float(x[v]));
    if (beats(value, v, best, best_index)) {
      best = value;
      best_index = v;
    }
  }
}
threadgroup_argmax<TG / 32>(
    best, best_index, best_values, best_indices, simdgroup_index_in_threadgroup,
    thread_index_in_simdgroup);
if (t == 0) {
  values[size_t(row) * G + chunk] = best;
  ids[size_t(row) * G + chunk] = best_index;
}
