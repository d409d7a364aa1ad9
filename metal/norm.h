// RMSNorm arithmetic shared by the fused layer kernels, rounded where MLX's rms_norm rounds.
//
// mx.fast.rms_norm on Metal: rstd = precise::rsqrt(sum(x^2) / n + eps) in float32, then
// out = w * T(x * rstd), the product rounded to T. A model's weight may first be shifted and
// scaled (Gemma 3's 1 + w, the MoE router's w * root): each step rounds to T, as the MLX ops
// that make it (`w + offset`, `w * scale`, with the Python numbers rounded to T first).

// The weight an RMSNorm multiplies by: T(T(w + offset) * scale) (exact for offset 0, scale 1).
template <typename T>
inline float norm_weight(float w, float offset, float scale) {
  return float(T(float(T(w + offset)) * scale));
}

// T(w * T(x * rstd)).
template <typename T>
inline float apply_norm(float x, float rstd, float w) {
  return float(T(w * float(T(x * rstd))));
}

inline float inverse_rms(float sum_of_squares, uint n, float eps) {
  return metal::precise::rsqrt(sum_of_squares / float(n) + eps);
}

// The sum of every thread's `v` over a threadgroup of SIMDGROUPS full SIMD-groups; `partial`
// holds SIMDGROUPS floats of threadgroup memory. All threads must call it; every thread gets the
// sum (one summation order for all).
template <int SIMDGROUPS>
inline float threadgroup_sum(float v, threadgroup float* partial, uint simdgroup, uint lane) {
  v = simd_sum(v);
  if (SIMDGROUPS == 1) {
    return v;
  }
  if (lane == 0) {
    partial[simdgroup] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  v = simd_sum(lane < uint(SIMDGROUPS) ? partial[lane] : 0.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // `partial` may be reused after this
  return v;
}

// One thread's entries of an RMSNorm of a row held THREADS-strided in `v` (sum of squares
// `total`): out[row + t + i * THREADS] = norm(v[i]); `p` holds the norm's eps, offset, scale.
template <typename T, int THREADS, int PER_THREAD, typename O, typename W, typename P>
inline void write_norm(
    O out,
    size_t row,
    uint H,
    uint t,
    thread const float (&v)[PER_THREAD],
    float total,
    W w,
    P p) {
  const float rstd = inverse_rms(total, H, p[0]);
  for (int i = 0; i < PER_THREAD; ++i) {
    uint d = t + uint(i * THREADS);
    if (d < H) {
      out[row + d] = T(apply_norm<T>(v[i], rstd, norm_weight<T>(float(w[d]), p[1], p[2])));
    }
  }
}
