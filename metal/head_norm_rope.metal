// A decode step's attention heads in one launch: every query and key head RMS-normed (weighted)
// and rotated (RoPE, rotate-half layout), every value head RMS-normed without a weight.
// Body of an mx.fast.metal_kernel; gemma_mlx/kernels/heads.py declares its parameters and launch.
//
// Inputs:  q [HQ * D], k [HK * D], v [HK * D] (T; the projections of one token; v is read when
//          V_INPUT, else the values are the keys before their norm: attention_k_eq_v);
//          q_w, k_w [D] (T); freqs [D / 2] float32 (read when FREQS: each pair's wavelength,
//          inf for a pair left unrotated); ints [3] int32: the token's position, HQ, HK;
//          params [9] float32: (eps, offset, scale) of the q and k norms, the v norm's eps,
//          the RoPE's position scale, log2 of its base.
// Outputs: q_out [HQ, D], k_out [HK, D], v_out [HK, D] (T); without keys (HK == 0: a KV-shared
//          layer) k_out and v_out are one unused element each.
// Template: T, D, V_INPUT, V_NORM, FREQS
//
// One SIMD-group per head (queries, then keys, then values), lane l holding entries l, l + 32,
// ... RoPE pairs entry i with i + D / 2: in the same lane when D / 2 is a multiple of 32, else
// (D <= 32) in lane l ^ (D / 2). Computed as MLX's rms_norm and Metal RoPE kernels compute:
// the normed head rounded to T, each pair's angle position * scale * 2^(-i / (D/2) * log2 base)
// (or / wavelength), each rotated entry in float32 from the normed one, rounded to T.

constexpr int J = (D + 31) / 32;
constexpr int HALF = D / 2;
const uint HQ = uint(ints[1]);
const uint HK = uint(ints[2]);
const uint lane = thread_index_in_simdgroup;
const uint head = threadgroup_position_in_grid.y * simdgroups_per_threadgroup +
    simdgroup_index_in_threadgroup;
if (head >= HQ + 2 * HK) {
  return;
}
const bool is_q = head < HQ;
const bool is_v = head >= HQ + HK;
const uint h = is_q ? head : is_v ? head - (HQ + HK) : head - HQ;

float x[J];
float sum = 0.0f;
for (int j = 0; j < J; ++j) {
  uint d = lane + uint(32 * j);
  float value = 0.0f;
  if (d < uint(D)) {
    size_t i = size_t(h) * D + d;
    value = is_q ? float(q[i]) : (is_v && V_INPUT) ? float(v[i]) : float(k[i]);
  }
  x[j] = value;
  sum += value * value;
}

if (is_v) {
  const float rstd = inverse_rms(simd_sum(sum), uint(D), params[6]);
  for (int j = 0; j < J; ++j) {
    uint d = lane + uint(32 * j);
    if (d < uint(D)) {
      v_out[size_t(h) * D + d] = V_NORM ? T(x[j] * rstd) : T(x[j]);
    }
  }
  return;
}

const uint p = is_q ? 0 : 3;
const float rstd = inverse_rms(simd_sum(sum), uint(D), params[p]);
for (int j = 0; j < J; ++j) {
  uint d = lane + uint(32 * j);
  float w = d >= uint(D) ? 0.0f : is_q ? float(q_w[d]) : float(k_w[d]);
  x[j] = apply_norm<T>(x[j], rstd, norm_weight<T>(w, params[p + 1], params[p + 2]));
}

const float scaled_position = params[7] * float(ints[0]);
for (int j = 0; j < J; ++j) {
  uint d = lane + uint(32 * j);
  float partner;
  if constexpr (HALF % 32 == 0) {
    partner = x[d < uint(HALF) ? j + HALF / 32 : j - HALF / 32];
  } else {
    partner = simd_shuffle_xor(x[j], ushort(HALF));
  }
  if (d < uint(D)) {
    uint i = d % uint(HALF);
    float inv_freq = FREQS ? 1.0f / freqs[i] : metal::exp2(-(float(i) / float(HALF)) * params[8]);
    float theta = scaled_position * inv_freq;
    float c = metal::fast::cos(theta);
    float s = metal::fast::sin(theta);
    T y = T(d < uint(HALF) ? x[j] * c - partner * s : partner * s + x[j] * c);
    if (is_q) {
      q_out[size_t(h) * D + d] = y;
    } else {
      k_out[size_t(h) * D + d] = y;
    }
  }
}
