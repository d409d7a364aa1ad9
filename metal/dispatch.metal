// MoE dispatch: a stable counting sort of the T*k (token, slot) pairs by expert, in one
// threadgroup of TG threads. Body of an mx.fast.metal_kernel; see gemma_mlx/kernels/moe.py.
//
// Inputs:  ids [T, k] (expert of pair i = t*k + j; must be < E)
// Outputs: order [N] (pair at each sorted position), inverse_order [N] (position of each pair),
//          expert_offsets [E + 1] (first position of each expert; [E] = N),
//          sorted_ids [N] (expert at each position), sorted_tokens [N] (token at each position)
// Template: E, TG
//
// 1. count the pairs of each expert (threadgroup atomics);
// 2. exclusive scan of the counts -> expert_offsets, kept as per-expert cursors;
// 3. place the pairs TG at a time: position = cursor[expert] + number of earlier pairs of the
//    same expert in the tile; then every placed pair advances its expert's cursor. Pairs of one
//    expert keep their order, so the result equals a stable sort by expert.

const uint k = ids_shape[1];
const uint N = ids_shape[0] * k;
const uint t = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;

threadgroup atomic_uint cursor[E];
threadgroup uint simdgroup_total[TG / 32];
threadgroup uint tile[TG];

for (uint e = t; e < E; e += TG) {
  atomic_store_explicit(&cursor[e], 0u, memory_order_relaxed);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint i = t; i < N; i += TG) {
  atomic_fetch_add_explicit(&cursor[metal::min(uint(ids[i]), uint(E - 1))], 1u, memory_order_relaxed);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

uint carry = 0;  // pairs of the experts scanned in earlier chunks
for (uint first = 0; first < E; first += TG) {
  uint e = first + t;
  uint count = e < E ? atomic_load_explicit(&cursor[e], memory_order_relaxed) : 0u;
  uint within = simd_prefix_exclusive_sum(count);
  uint total = simd_sum(count);
  if (lane == 0) {
    simdgroup_total[simdgroup] = total;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint offset = carry + within;
  for (uint s = 0; s < simdgroup; ++s) {
    offset += simdgroup_total[s];
  }
  for (uint s = 0; s < TG / 32; ++s) {
    carry += simdgroup_total[s];
  }
  if (e < E) {
    expert_offsets[e] = offset;
    atomic_store_explicit(&cursor[e], offset, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (t == 0) {
  expert_offsets[E] = carry;
}

for (uint first = 0; first < N; first += TG) {
  uint i = first + t;
  uint e = i < N ? metal::min(uint(ids[i]), uint(E - 1)) : E;
  tile[t] = e;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (i < N) {
    uint rank = 0;
    for (uint j = 0; j < t; ++j) {
      rank += tile[j] == e ? 1u : 0u;
    }
    uint position = atomic_load_explicit(&cursor[e], memory_order_relaxed) + rank;
    order[position] = i;
    inverse_order[i] = position;
    sorted_ids[position] = e;
    sorted_tokens[position] = i / k;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (i < N) {
    atomic_fetch_add_explicit(&cursor[e], 1u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
