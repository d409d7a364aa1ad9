// The Metal types and builtins that our kernels use, in C++ for g++, over the fiber runtime.
// It includes no system header: a builtin that is not defined here fails compilation instead of
// resolving to a C library function with other semantics. Add a builtin only with a harness test.
#pragma once

#include "runtime.h"

// Address spaces: memory is memory on a CPU. `threadgroup` declarations are rewritten by the
// harness into static storage shared by the fibers of a threadgroup (see harness.py).
#define device
#define constant
#define thread

// ---- scalar types -------------------------------------------------------------------------------

#include "metal_scalars.h"

typedef _Float16 half;
typedef half float16_t;

// bfloat16: float's upper 16 bits, rounded to nearest even; arithmetic goes through float.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }
};
typedef bfloat bfloat16_t;

template <typename T, typename U>
inline T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  return __builtin_bit_cast(T, x);
}

// Metal's float constants (its math header has them; MLX's generated kernels use both). The C
// limits macros (FLT_MAX, INT_MAX, UINT_MAX, ...) are not known to be Metal names: use
// metal::numeric_limits.
#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))

// ---- vectors (only what the attributes need) ----------------------------------------------------

struct uint3 {
  uint x, y, z;
};

// ---- metal:: functions ------------------------------------------------------------------------

namespace metal {

template <typename T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float max() { return 3.40282347e+38f; }
  static constexpr float lowest() { return -3.40282347e+38f; }
};
template <>
struct numeric_limits<uint> {
  static constexpr uint max() { return 4294967295u; }
  static constexpr uint min() { return 0u; }
};
template <>
struct numeric_limits<int> {
  static constexpr int max() { return 2147483647; }
  static constexpr int min() { return -2147483647 - 1; }
};

inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
}  // namespace precise
// Metal's fast variants are less accurate for large arguments; these are the precise values.
namespace fast {
inline float cos(float x) { return __builtin_cosf(x); }
inline float sin(float x) { return __builtin_sinf(x); }
}  // namespace fast

// One overload per type, as Metal has: mixing int and uint is ambiguous here as it is there.
#define EMU_MIN_MAX(T)                              \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(uint)
EMU_MIN_MAX(long)
EMU_MIN_MAX(ulong)
#undef EMU_MIN_MAX
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }

template <typename T>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}

// ---- barriers -----------------------------------------------------------------------------------

enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<uint>(a) | static_cast<uint>(b));
}

inline void threadgroup_barrier(mem_flags, const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
  emu_threadgroup_barrier(file, line);
}
inline void simdgroup_barrier(mem_flags, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  emu_simdgroup_barrier(file, line);
}

// ---- SIMD-group functions: every lane publishes its value, then reads all lanes' values --------

namespace emu {

// All lanes' values of one SIMD-group function call, the calling lane, and the seed of the order
// in which this call adds lanes (0: a fixed order; see emu_run's random_order).
template <typename T>
struct Lanes {
  static_assert(sizeof(T) <= 8, "SIMD-group value wider than 64 bits");
  unsigned long long bits[32];
  unsigned count;
  unsigned me;
  unsigned long long order;
  Lanes(T v, const char* op, const char* file, int line) {
    unsigned long long b = 0;
    __builtin_memcpy(&b, &v, sizeof(T));
    me = emu_simd_exchange(b, bits, &count, &order, op, file, line);
  }
  T operator[](unsigned lane) const {
    T v;
    __builtin_memcpy(&v, &bits[lane], sizeof(T));
    return v;
  }
  // The value of `lane`, which must exist (reading an absent lane is undefined on Metal).
  T from(uint lane, const char* op, const char* file, int line) const {
    if (lane >= count) emu_fail(op, file, line);
    return (*this)[lane];
  }
};

// splitmix64: the next pseudo-random number of `state`.
inline unsigned long long next_random(unsigned long long& state) {
  unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The sum of lanes[0 .. n): with state 0 a balanced pairwise tree in lane order; otherwise a
// random binary tree (state advances). The hardware's order is unspecified: kernels must not
// rely on one, and with random orders a kernel that does gives different results across seeds.
template <typename T>
T tree_sum(const Lanes<T>& all, const unsigned* lanes, unsigned n, unsigned long long& state) {
  if (n == 1) return all[lanes[0]];
  const unsigned split = state ? 1 + next_random(state) % (n - 1) : (n + 1) / 2;
  const T left = tree_sum(all, lanes, split, state);
  return left + tree_sum(all, lanes + split, n - split, state);
}

// The sum of lanes [0, end) in this call's order (a random permutation under a random tree when
// the order is random, drawn from the call's seed and `salt`); 0 for no lanes.
template <typename T>
T ordered_sum(const Lanes<T>& all, unsigned end, unsigned long long salt) {
  if (end == 0) return T(0);
  unsigned lanes[32];
  for (unsigned i = 0; i < end; ++i) lanes[i] = i;
  unsigned long long state = all.order ? all.order ^ (salt * 0xD1B54A32D192ED03ull) : 0;
  if (state) {
    for (unsigned i = end - 1; i > 0; --i) {
      const unsigned j = next_random(state) % (i + 1);
      const unsigned t = lanes[i];
      lanes[i] = lanes[j];
      lanes[j] = t;
    }
  }
  return tree_sum(all, lanes, end, state);
}

}  // namespace emu

#define EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

template <typename T>
T simd_sum(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_sum", file, line);
  return emu::ordered_sum(all, all.count, 0);  // one order for all lanes: one result
}

template <typename T>
T simd_max(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_max", file, line);
  T r = all[0];
  for (unsigned i = 1; i < all.count; ++i) r = max(r, all[i]);
  return r;
}

template <typename T>
T simd_min(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_min", file, line);
  T r = all[0];
  for (unsigned i = 1; i < all.count; ++i) r = min(r, all[i]);
  return r;
}

template <typename T>
T simd_prefix_exclusive_sum(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_prefix_exclusive_sum", file, line);
  return emu::ordered_sum(all, all.me, all.me + 1);  // each lane its own order
}

template <typename T>
T simd_prefix_inclusive_sum(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_prefix_inclusive_sum", file, line);
  return emu::ordered_sum(all, all.me + 1, all.me + 1);
}

template <typename T>
T simd_shuffle(T v, ushort lane, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_shuffle", file, line);
  return all.from(lane, "simd_shuffle: source lane out of range", file, line);
}

template <typename T>
T simd_shuffle_xor(T v, ushort mask, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_shuffle_xor", file, line);
  return all.from(all.me ^ mask, "simd_shuffle_xor: source lane out of range", file, line);
}

// Lanes whose source would fall outside the 32 lanes keep their own value (Metal's rule).
template <typename T>
T simd_shuffle_down(T v, ushort delta, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_shuffle_down", file, line);
  if (all.me + delta >= 32) return v;
  return all.from(all.me + delta, "simd_shuffle_down: source lane out of range", file, line);
}

template <typename T>
T simd_shuffle_up(T v, ushort delta, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_shuffle_up", file, line);
  if (all.me < delta) return v;
  return all[all.me - delta];
}

template <typename T>
T simd_broadcast(T v, ushort lane, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_broadcast", file, line);
  return all.from(lane, "simd_broadcast: source lane out of range", file, line);
}

template <typename T>
T simd_broadcast_first(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_broadcast_first", file, line);
  return all[0];
}

inline bool simd_any(bool c, EMU_SITE) {
  emu::Lanes<bool> all(c, "simd_any", file, line);
  for (unsigned i = 0; i < all.count; ++i) {
    if (all[i]) return true;
  }
  return false;
}

inline bool simd_all(bool c, EMU_SITE) {
  emu::Lanes<bool> all(c, "simd_all", file, line);
  for (unsigned i = 0; i < all.count; ++i) {
    if (!all[i]) return false;
  }
  return true;
}

// Bit i set when lane i's condition holds.
struct simd_vote {
  typedef uint64_t vote_t;
  vote_t bits;
  explicit constexpr operator vote_t() const { return bits; }
  bool all() const = delete;  // Metal's all() counts inactive lanes; not emulated
  bool any() const { return bits != 0; }
};

inline simd_vote simd_ballot(bool c, EMU_SITE) {
  emu::Lanes<bool> all(c, "simd_ballot", file, line);
  simd_vote v{0};
  for (unsigned i = 0; i < all.count; ++i) {
    if (all[i]) v.bits |= uint64_t(1) << i;
  }
  return v;
}

#undef EMU_SITE

// ---- atomics: fibers never run at the same time, so every operation is atomic -----------------

enum memory_order { memory_order_relaxed };

template <typename T>
struct atomic {
  T emu_value;  // Metal gives no direct access; only the functions below
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;

template <typename T>
void atomic_store_explicit(atomic<T>* object, T value, memory_order) {
  object->emu_value = value;
}
template <typename T>
T atomic_load_explicit(const atomic<T>* object, memory_order) {
  return object->emu_value;
}
template <typename T>
T atomic_fetch_add_explicit(atomic<T>* object, T operand, memory_order) {
  T old = object->emu_value;
  object->emu_value = old + operand;
  return old;
}
template <typename T>
T atomic_fetch_max_explicit(atomic<T>* object, T operand, memory_order) {
  T old = object->emu_value;
  object->emu_value = max(old, operand);
  return old;
}
template <typename T>
T atomic_fetch_min_explicit(atomic<T>* object, T operand, memory_order) {
  T old = object->emu_value;
  object->emu_value = min(old, operand);
  return old;
}

}  // namespace metal

using namespace metal;
