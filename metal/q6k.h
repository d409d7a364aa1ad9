// GGUF Q6_K blocks (ggml's block_q6_K), read as 105 little-endian 16-bit words per block of 256
// weights (210 bytes: blocks are only 2-byte aligned, so no wider load is safe):
//   words   0..63   ql: the low 4 bits of every weight,
//   words  64..95   qh: the high 2 bits,
//   words  96..103  16 signed 8-bit sub-block scales, one per 16 weights,
//   word   104      d, float16.
// Weight e = 128 h + 32 k + i (h < 2, k < 4, i < 32) is d * scale[e / 16] * (q - 32) with
//   q = nibble (k / 2) of ql byte 64 h + 32 (k % 2) + i  |  bits 2k..2k+1 of qh byte 32 h + i << 4.
//
// A "slice" is the 16 weights one thread decodes: slice s < 16 of a block (h = s / 8, j = s % 8)
// holds i = 4j .. 4j + 3 for every k. Its bytes are 4-aligned runs of the block: ql bytes
// 64h + 4j (k = 0, 2) and 64h + 32 + 4j (k = 1, 3), qh bytes 32h + 4j, and scale bytes
// 8h + 2k + j / 4.

constexpr constant uint Q6K_WEIGHTS = 256;
constexpr constant uint Q6K_WORDS = 105;

struct Q6KSlice {
  uint low[2];  // ql bytes for k = 0, 2 (low[0]) and k = 1, 3 (low[1]), 4 bytes each
  uint high;    // qh bytes
  float scale[4];  // d * scale, per k (exact in float32: an 11-bit by 8-bit product)
};

// The slice s of the block starting at `block`.
template <typename Words>
inline Q6KSlice q6k_slice(Words block, uint s) {
  const uint h = s / 8;
  const uint j = s % 8;
  Q6KSlice out;
  out.low[0] = uint(block[32 * h + 2 * j]) | (uint(block[32 * h + 2 * j + 1]) << 16);
  out.low[1] = uint(block[32 * h + 16 + 2 * j]) | (uint(block[32 * h + 16 + 2 * j + 1]) << 16);
  out.high = uint(block[64 + 16 * h + 2 * j]) | (uint(block[64 + 16 * h + 2 * j + 1]) << 16);
  const float d = float(as_type<half>(ushort(block[104])));
  for (uint k = 0; k < 4; ++k) {
    const uint word = uint(block[96 + 4 * h + k]);
    const uint byte = (j < 4 ? word : word >> 8) & 0xFFu;
    out.scale[k] = d * float(int(byte) - int((byte & 0x80u) << 1));
  }
  return out;
}

// q - 32 of weight (k, 4j + t) of a slice, as a float.
inline float q6k_value(thread const Q6KSlice& slice, uint k, uint t) {
  const uint low = (slice.low[k % 2] >> (8 * t + 4 * (k / 2))) & 0xFu;
  const uint high = (slice.high >> (8 * t + 2 * k)) & 0x3u;
  return float(int(low | (high << 4)) - 32);
}

// The column, within its block, of weight (k, 4j + t) of slice s.
inline uint q6k_column(uint s, uint k, uint t) {
  return 128 * (s / 8) + 32 * k + 4 * (s % 8) + t;
}
