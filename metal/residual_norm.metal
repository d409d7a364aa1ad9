// A layer's residual step in one launch: out = (r + post_norm(a)) [* scalar], then up to three
// RMSNorms of out (the next block's input norms).
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/residual.py declares its parameters and
// launch.
//
// Inputs:  r [R, H] (T) the residual stream, a [R, H] (T) the branch; post_w [H] (T); scalar [1]
//          (T; read when SCALAR); w0, w1, w2 [H] (T; the first NORMS read); params [12] float32:
//          (eps, offset, scale) of the post norm, then of norms 0, 1, 2 (norm.h).
// Outputs: out [R, H] (T); normed [NORMS, R, H] (T) (one unused element when NORMS == 0).
// Template: T, THREADS, PER_THREAD (at least H / THREADS), SCALAR, NORMS
//
// One threadgroup per row; thread t holds the entries t, t + THREADS, ... (adjacent threads read
// adjacent entries). Every step rounds to T where the composed MLX ops do.

constexpr int SIMDGROUPS = THREADS / 32;
threadgroup float partial[SIMDGROUPS];
const uint t = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;
const uint H = uint(r_shape[1]);
const size_t row = size_t(threadgroup_position_in_grid.y) * H;

float v[PER_THREAD];
float sum = 0.0f;
for (int i = 0; i < PER_THREAD; ++i) {
  uint d = t + uint(i * THREADS);
  v[i] = d < H ? float(a[row + d]) : 0.0f;
  sum += v[i] * v[i];
}
const float a_total = threadgroup_sum<SIMDGROUPS>(sum, partial, simdgroup, lane);
const float rstd = inverse_rms(a_total, H, params[0]);
const float s = SCALAR ? float(scalar[0]) : 1.0f;
sum = 0.0f;
for (int i = 0; i < PER_THREAD; ++i) {
  uint d = t + uint(i * THREADS);
  if (d < H) {
    float w = norm_weight<T>(float(post_w[d]), params[1], params[2]);
    float x = float(T(float(r[row + d]) + apply_norm<T>(v[i], rstd, w)));
    if (SCALAR) {
      x = float(T(x * s));
    }
    out[row + d] = T(x);
    v[i] = x;
  } else {
    v[i] = 0.0f;
  }
  sum += v[i] * v[i];
}

if (NORMS > 0) {
  const float total = threadgroup_sum<SIMDGROUPS>(sum, partial, simdgroup, lane);
  const size_t plane = size_t(threadgroups_per_grid.y) * H;  // one norm's [R, H]
  write_norm<T, THREADS, PER_THREAD>(normed, row, H, t, v, total, w0, params + 3);
  if (NORMS > 1) {
    write_norm<T, THREADS, PER_THREAD>(normed + plane, row, H, t, v, total, w1, params + 6);
  }
  if (NORMS > 2) {
    write_norm<T, THREADS, PER_THREAD>(normed + 2 * plane, row, H, t, v, total, w2, params + 9);
  }
}
