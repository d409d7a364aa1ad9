// One input row times matrix rows, by SIMD-groups: the core of the projection kernels.
//
// A SIMD-group computes ROWS rows of one matrix [N, K]. The row is walked in blocks of
// 32 lanes x 16 values: lane l takes the 16 columns k0 = 512 b + 16 l .. k0 + 15, so adjacent
// lanes read adjacent bytes of every row (weights, scales and the input). The matrix is dense
// (BITS == 0: T values) or MLX's affine quantization (BITS 2, 4 or 8: codes packed from the low
// bits of uint32 words, value = scale * code + bias per GROUP columns; 16 columns never straddle
// a group, GROUP being a multiple of 16). Sums in float32; MLX's qmv does the same per group:
// scale * sum(x * code) + bias * sum(x).

constant constexpr int LANE_VALUES = 16;
constant constexpr int BLOCK = 32 * LANE_VALUES;

// The 16 input values of a lane, RMS-normed when NORM (x * rstd rounded to T, times the norm's
// weight, rounded to T: mx.fast.rms_norm's arithmetic).
template <typename T, bool NORM, typename X, typename W>
inline void load_input(
    thread float (&xs)[LANE_VALUES],
    X x,
    W norm_w,
    uint k0,
    float rstd,
    float offset,
    float scale) {
  for (int i = 0; i < LANE_VALUES; ++i) {
    float v = float(x[k0 + i]);
    if constexpr (NORM) {
      v = apply_norm<T>(v, rstd, norm_weight<T>(float(norm_w[k0 + i]), offset, scale));
    }
    xs[i] = v;
  }
}

// 1 / rms of the input row, every lane of the SIMD-group computing it (no threadgroup memory).
template <typename X>
inline float simd_inverse_rms(X x, uint K, uint lane, float eps) {
  float sum = 0.0f;
  for (uint k = lane; k < K; k += 32) {
    float v = float(x[k]);
    sum += v * v;
  }
  return inverse_rms(simd_sum(sum), K, eps);
}

// acc[r] += row (row0 + r) . xs over this lane's 16 columns at k0, rows below `rows` only.
template <typename T, int BITS, int GROUP, int ROWS, typename W, typename S, typename B>
inline void accumulate_rows(
    thread float (&acc)[ROWS],
    thread const float (&xs)[LANE_VALUES],
    float x_sum,
    W w,
    S scales,
    B biases,
    uint K,
    uint row0,
    uint rows,
    uint k0) {
  for (int r = 0; r < ROWS; ++r) {
    uint row = row0 + uint(r);
    if (row >= rows) {
      break;
    }
    if constexpr (BITS == 0) {
      auto wr = w + size_t(row) * K + k0;
      float s = 0.0f;
      for (int i = 0; i < LANE_VALUES; ++i) {
        s += xs[i] * float(wr[i]);
      }
      acc[r] += s;
    } else {
      constexpr int PER_WORD = 32 / BITS;
      constexpr uint MASK = (1u << BITS) - 1u;
      auto wr = w + size_t(row) * (K / PER_WORD) + k0 / PER_WORD;
      float s = 0.0f;
      for (int word = 0; word < LANE_VALUES / PER_WORD; ++word) {
        uint32_t codes = wr[word];
        for (int j = 0; j < PER_WORD; ++j) {
          s += xs[word * PER_WORD + j] * float((codes >> (j * BITS)) & MASK);
        }
      }
      size_t g = size_t(row) * (K / GROUP) + k0 / GROUP;
      acc[r] += float(scales[g]) * s + float(biases[g]) * x_sum;
    }
  }
}

// The dot products of ROWS rows from `row0` (those below `rows`) of one matrix with the input,
// on every lane.
template <
    typename T,
    int BITS,
    int GROUP,
    int ROWS,
    bool NORM,
    typename X,
    typename NW,
    typename W,
    typename S,
    typename B>
inline void simd_rows(
    thread float (&acc)[ROWS],
    X x,
    NW norm_w,
    float rstd,
    float offset,
    float scale,
    W w,
    S scales,
    B biases,
    uint K,
    uint row0,
    uint rows,
    uint lane) {
  for (int r = 0; r < ROWS; ++r) {
    acc[r] = 0.0f;
  }
  for (uint k0 = lane * LANE_VALUES; k0 < K; k0 += BLOCK) {
    float xs[LANE_VALUES];
    load_input<T, NORM>(xs, x, norm_w, k0, rstd, offset, scale);
    float x_sum = 0.0f;
    for (int i = 0; i < LANE_VALUES; ++i) {
      x_sum += xs[i];
    }
    accumulate_rows<T, BITS, GROUP, ROWS>(acc, xs, x_sum, w, scales, biases, K, row0, rows, k0);
  }
  for (int r = 0; r < ROWS; ++r) {
    acc[r] = simd_sum(acc[r]);
  }
}

// nn.gelu_approx(gate) * up as MLX computes it in T: every constant and every step rounded to T
// (0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))), then times up.
template <typename T>
inline float geglu(float gate, float up) {
  float x = gate;
  float cube = float(T(x * x * x));
  float inner = float(T(x + float(T(float(T(0.044715f)) * cube))));
  float t = float(T(metal::precise::tanh(float(T(float(T(0.7978845608f)) * inner)))));
  float half_x = float(T(float(T(0.5f)) * x));
  float gelu = float(T(half_x * float(T(1.0f + t))));
  return float(T(gelu * up));
}
