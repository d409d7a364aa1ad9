// Up to three matrices times one (optionally RMS-normed) input row, in one launch: a decode
// step's input norm and q/k/v projections, or the MoE router's norm and logits.
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/projection.py declares its parameters
// and launch.
//
// Inputs:  x [K] (T); norm_w [K] (T; read when NORM); params [3] float32: norm eps, offset,
//          scale; rows [3] int32: N0, N1, N2; matrix i (N_i rows): w<i> [N_i, K] (T) or
//          [N_i, K * BITS / 32] uint32 with s<i>, b<i> [N_i, K / GROUP] (T); a matrix without
//          rows is a placeholder.
// Output:  y [N0 + N1 + N2] (OUT): each matrix's rows after the rows of those before it,
//          rounded to T (then to OUT).
// Template: T, OUT, BITS (0: dense), GROUP, ROWS, NORM
//
// Each SIMD-group computes ROWS consecutive rows of one matrix: matrix i's rows take
// ceil(N_i / ROWS) SIMD-groups, in matrix order. Every SIMD-group computes the input's norm
// itself (a pass over x, from cache): no threadgroup memory, no barrier.

const uint K = uint(x_shape[0]);
const uint N0 = uint(rows[0]);
const uint N1 = uint(rows[1]);
const uint N2 = uint(rows[2]);
const uint G0 = (N0 + ROWS - 1) / ROWS;
const uint G1 = (N1 + ROWS - 1) / ROWS;
const uint G2 = (N2 + ROWS - 1) / ROWS;
const uint lane = thread_index_in_simdgroup;
const uint group = threadgroup_position_in_grid.y * simdgroups_per_threadgroup +
    simdgroup_index_in_threadgroup;
if (group >= G0 + G1 + G2) {
  return;
}

const float rstd = NORM ? simd_inverse_rms(x, K, lane, params[0]) : 1.0f;
float acc[ROWS];
uint row0;
uint out0;
uint n;
if (group < G0) {
  row0 = group * ROWS;
  out0 = 0;
  n = N0;
  simd_rows<T, BITS, GROUP, ROWS, NORM>(
      acc, x, norm_w, rstd, params[1], params[2], w0, s0, b0, K, row0, n, lane);
} else if (group < G0 + G1) {
  row0 = (group - G0) * ROWS;
  out0 = N0;
  n = N1;
  simd_rows<T, BITS, GROUP, ROWS, NORM>(
      acc, x, norm_w, rstd, params[1], params[2], w1, s1, b1, K, row0, n, lane);
} else {
  row0 = (group - G0 - G1) * ROWS;
  out0 = N0 + N1;
  n = N2;
  simd_rows<T, BITS, GROUP, ROWS, NORM>(
      acc, x, norm_w, rstd, params[1], params[2], w2, s2, b2, K, row0, n, lane);
}

if (lane == 0) {
  for (int r = 0; r < ROWS; ++r) {
    if (row0 + uint(r) < n) {
      y[out0 + row0 + uint(r)] = OUT(T(acc[r]));
    }
  }
}
