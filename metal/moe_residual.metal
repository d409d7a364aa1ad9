// The residual step after Gemma 4's MoE block in one launch: the experts' outputs weighted and
// summed, each branch post-normed, their sum post-normed into the residual stream, the layer
// scalar: out = (h + post(post1(m) + post2(sum_j w_j y_j))) [* scalar].
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/residual.py declares its parameters and
// launch.
//
// Inputs:  h [R, H] (T) the residual stream; m [R, H] (T) the dense MLP's output; y [R, K, H] (T)
//          the K routed experts' outputs; weights [R, K] float32 the router's; post1_w, post2_w,
//          post_w [H] (T); scalar [1] (T; read when SCALAR); params [9] float32: (eps, offset,
//          scale) of post1, post2 and post (norm.h).
// Output:  out [R, H] (T)
// Template: T, THREADS, PER_THREAD (at least H / THREADS), SCALAR
//
// One threadgroup per row; thread t holds the entries t, t + THREADS, ... Rounded where the
// composed MLX ops round: each weighted output and the experts' sum to T (the sum accumulated
// in float32), each normed branch, their sum, the residual sum and the scaled result.

constexpr int SIMDGROUPS = THREADS / 32;
threadgroup float partial[SIMDGROUPS];
const uint t = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint simdgroup = simdgroup_index_in_threadgroup;
const uint H = uint(h_shape[1]);
const uint K = uint(y_shape[1]);
const uint r = threadgroup_position_in_grid.y;
const size_t row = size_t(r) * H;

float mv[PER_THREAD];
float ev[PER_THREAD];
float m_sum = 0.0f;
float e_sum = 0.0f;
for (int i = 0; i < PER_THREAD; ++i) {
  uint d = t + uint(i * THREADS);
  mv[i] = 0.0f;
  ev[i] = 0.0f;
  if (d < H) {
    mv[i] = float(m[row + d]);
    float e = 0.0f;
    for (uint j = 0; j < K; ++j) {
      float w = float(T(weights[size_t(r) * K + j]));
      e += float(T(float(y[(size_t(r) * K + j) * H + d]) * w));
    }
    ev[i] = float(T(e));
  }
  m_sum += mv[i] * mv[i];
  e_sum += ev[i] * ev[i];
}
const float m_rstd =
    inverse_rms(threadgroup_sum<SIMDGROUPS>(m_sum, partial, simdgroup, lane), H, params[0]);
const float e_rstd =
    inverse_rms(threadgroup_sum<SIMDGROUPS>(e_sum, partial, simdgroup, lane), H, params[3]);

float f_sum = 0.0f;
for (int i = 0; i < PER_THREAD; ++i) {
  uint d = t + uint(i * THREADS);
  float f = 0.0f;
  if (d < H) {
    float w1 = norm_weight<T>(float(post1_w[d]), params[1], params[2]);
    float w2 = norm_weight<T>(float(post2_w[d]), params[4], params[5]);
    f = float(T(apply_norm<T>(mv[i], m_rstd, w1) + apply_norm<T>(ev[i], e_rstd, w2)));
  }
  mv[i] = f;  // reused: the sum of the two branches
  f_sum += f * f;
}
const float f_rstd =
    inverse_rms(threadgroup_sum<SIMDGROUPS>(f_sum, partial, simdgroup, lane), H, params[6]);
const float s = SCALAR ? float(scalar[0]) : 1.0f;
for (int i = 0; i < PER_THREAD; ++i) {
  uint d = t + uint(i * THREADS);
  if (d < H) {
    float w = norm_weight<T>(float(post_w[d]), params[7], params[8]);
    float x = float(T(float(h[row + d]) + apply_norm<T>(mv[i], f_rstd, w)));
    if (SCALAR) {
      x = float(T(x * s));
    }
    out[row + d] = T(x);
  }
}
