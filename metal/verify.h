// What the rejected draft leaves of target probability p where the draft had probability q:
// max(p - q, 0); with one-hot drafts (q absent) p, except 0 at the rejected token itself.
inline float residual_probability(float p, float q, bool is_rejected_token) {
  return is_rejected_token ? 0.0f : metal::max(p - q, 0.0f);
}
