// x @ W.T for a Q6_K weight W: the tied head of a QAT GGUF in decode and in a verify window.
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/q6k.py declares its parameters and launch.
//
// Inputs:  x [M, K] (float, half or bfloat), blocks [V, K / 256 * 105] uint16 (q6k.h)
// Outputs: out [M, V] of type T
// Template: M (rows of x, 1..8), SIMDGROUPS (weight rows per threadgroup), T (output type)
//
// One SIMD-group per weight row: its two half-SIMD-groups take alternate blocks of the row, each
// lane one 16-weight slice of a block (q6k.h), so a half reads a block's 192 bytes of codes once,
// in 4-byte runs. Each lane multiplies its slice by the M rows of x, summing in float32 per
// sub-block scale; the SIMD-group's sum is the dot product.

const uint K = x_shape[1];
const uint V = blocks_shape[0];
const uint n_blocks = K / Q6K_WEIGHTS;
const uint row = threadgroup_position_in_grid.x * SIMDGROUPS + simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint s = lane % 16;
if (row >= V) {
  return;  // the whole SIMD-group: it shares the row
}
auto weights = blocks + size_t(row) * n_blocks * Q6K_WORDS;

float acc[M];
for (int m = 0; m < M; ++m) {
  acc[m] = 0.0f;
}
for (uint b = lane / 16; b < n_blocks; b += 2) {
  const Q6KSlice slice = q6k_slice(weights + size_t(b) * Q6K_WORDS, s);
  for (uint k = 0; k < 4; ++k) {
    float q[4];
    for (uint t = 0; t < 4; ++t) {
      q[t] = q6k_value(slice, k, t);
    }
    const uint column = b * Q6K_WEIGHTS + q6k_column(s, k, 0);
    for (int m = 0; m < M; ++m) {
      auto xs = x + size_t(m) * K + column;
      float dot = 0.0f;
      for (uint t = 0; t < 4; ++t) {
        dot += q[t] * float(xs[t]);
      }
      acc[m] += slice.scale[k] * dot;
    }
  }
}
for (int m = 0; m < M; ++m) {
  const float total = simd_sum(acc[m]);
  if (lane == 0) {
    out[size_t(m) * V + row] = static_cast<T>(total);
  }
}
