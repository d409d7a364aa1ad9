// Rows of a Q6_K table, dequantized: the embedding lookup of a QAT GGUF's tied embedding.
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/q6k.py declares its parameters and launch.
//
// Inputs:  ids [N] (int32 or uint32, each < V), blocks [V, K / 256 * 105] uint16 (q6k.h)
// Outputs: out [N, K] of type T
// Template: T (output type)
//
// Thread (g, n) writes slice g % 16 of block g / 16 of row ids[n]: 16 weights, each
// d * scale * (q - 32) computed exactly in float32, then rounded once to T.

const uint n = thread_position_in_grid.y;
const uint g = thread_position_in_grid.x;
const uint n_blocks = blocks_shape[1] / Q6K_WORDS;
if (g >= n_blocks * 16) {
  return;
}
const uint K = n_blocks * Q6K_WEIGHTS;
const uint b = g / 16;
const uint s = g % 16;
const size_t row = size_t(uint(ids[n]));
const Q6KSlice slice = q6k_slice(blocks + (row * n_blocks + b) * Q6K_WORDS, s);
auto dst = out + size_t(n) * K + b * Q6K_WEIGHTS;
for (uint k = 0; k < 4; ++k) {
  for (uint t = 0; t < 4; ++t) {
    dst[q6k_column(s, k, t)] = static_cast<T>(slice.scale[k] * q6k_value(slice, k, t));
  }
}
