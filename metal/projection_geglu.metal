// GeGLU of one input row in one launch: gelu_approx(gate . x) * (up . x), or times a given
// vector (Gemma 4's per-layer-input gate), the input optionally RMS-normed first.
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/projection.py declares its parameters
// and launch.
//
// Inputs:  x [K] (T); norm_w [K] (T; read when NORM); params [3] float32: norm eps, offset,
//          scale; gate: w0 [N, K] (T) or quantized [N, K * BITS / 32] uint32 with s0, b0
//          [N, K / GROUP]; up: w1, s1, b1 likewise when UP_MATRIX, else w1 = [N] (T) and s1, b1
//          placeholders.
// Output:  y [N] (T): geglu(T(gate . x), T(up . x)) with MLX's rounding (projection.h).
// Template: T, BITS (0: dense), GROUP, ROWS, NORM, UP_MATRIX
//
// Each SIMD-group computes ROWS rows of the gate and the same rows of the up matrix.

const uint K = uint(x_shape[0]);
const uint N = uint(w0_shape[0]);
const uint lane = thread_index_in_simdgroup;
const uint group = threadgroup_position_in_grid.y * simdgroups_per_threadgroup +
    simdgroup_index_in_threadgroup;
if (group >= (N + ROWS - 1) / ROWS) {
  return;
}

const float rstd = NORM ? simd_inverse_rms(x, K, lane, params[0]) : 1.0f;
const uint row0 = group * ROWS;
float gate[ROWS];
simd_rows<T, BITS, GROUP, ROWS, NORM>(
    gate, x, norm_w, rstd, params[1], params[2], w0, s0, b0, K, row0, N, lane);
float up[ROWS];
if constexpr (UP_MATRIX) {
  simd_rows<T, BITS, GROUP, ROWS, NORM>(
      up, x, norm_w, rstd, params[1], params[2], w1, s1, b1, K, row0, N, lane);
}

if (lane == 0) {
  for (int r = 0; r < ROWS; ++r) {
    uint row = row0 + uint(r);
    if (row < N) {
      float u = UP_MATRIX ? float(T(up[r])) : float(w1[row]);
      y[row] = T(geglu<T>(float(T(gate[r])), u));
    }
  }
}
