// Deterministic selection across a SIMD-group and a threadgroup.
//
// Order used everywhere: a (value, index) pair beats another when its value is larger, or equal
// with a lower index. It is a strict total order on distinct indices, so every reduction tree
// gives the same winner: the lowest index among the largest values (like mx.argmax on Metal, and
// like a stable descending sort). NaN ranks below every number (NaN values are ignored, as by
// MLX's Metal argmax; its CPU argmax ranks NaN highest instead), but any candidate beats
// NO_INDEX, the index of "no candidate yet": a row of NaN gives its lowest index, a row of -inf
// too, never NO_INDEX. Start a search from (-INFINITY, NO_INDEX).

constexpr constant uint NO_INDEX = 0xFFFFFFFFu;

inline bool beats(float value, uint index, float best, uint best_index) {
  if (index == NO_INDEX) {
    return false;
  }
  if (best_index == NO_INDEX || metal::isnan(best)) {
    return !metal::isnan(value) || index < best_index;
  }
  return value > best || (value == best && index < best_index);
}

// Every lane ends with the SIMD-group's winning (value, index).
inline void simd_argmax(thread float& value, thread uint& index) {
  for (ushort offset = 16; offset > 0; offset /= 2) {
    float other = simd_shuffle_xor(value, offset);
    uint other_index = simd_shuffle_xor(index, offset);
    if (beats(other, other_index, value, index)) {
      value = other;
      index = other_index;
    }
  }
}

// Every thread of a threadgroup of SIMDGROUPS full SIMD-groups ends with the threadgroup's winner.
// All threads must call it; `values`/`indices` hold SIMDGROUPS entries of threadgroup memory.
template <int SIMDGROUPS>
inline void threadgroup_argmax(
    thread float& value,
    thread uint& index,
    threadgroup float* values,
    threadgroup uint* indices,
    uint simdgroup,
    uint lane) {
  simd_argmax(value, index);
  if (lane == 0) {
    values[simdgroup] = value;
    indices[simdgroup] = index;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  value = lane < SIMDGROUPS ? values[lane] : -INFINITY;
  index = lane < SIMDGROUPS ? indices[lane] : NO_INDEX;
  simd_argmax(value, index);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the buffers may be reused after this
}

// The best value not yet taken among the ones a SIMD-group holds, PER_LANE per lane (lane l holds
// entries l, l + 32, ...; entries >= count are absent). Marks the winner taken in its lane.
template <int PER_LANE>
inline void simd_next_best(
    thread const float (&values)[PER_LANE],
    thread ulong& taken,
    uint lane,
    uint count,
    thread float& best,
    thread uint& best_index) {
  best = -INFINITY;
  best_index = NO_INDEX;
  for (int n = 0; n < PER_LANE; ++n) {
    uint e = uint(n) * 32 + lane;
    if (e < count && ((taken >> n) & 1) == 0 && beats(values[n], e, best, best_index)) {
      best = values[n];
      best_index = e;
    }
  }
  simd_argmax(best, best_index);
  if (best_index % 32 == lane) {
    taken |= ulong(1) << (best_index / 32);
  }
}
