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

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;

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

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define FLT_MAX (3.40282347e+38f)
#define INT_MAX (2147483647)
#define UINT_MAX (4294967295u)

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
}  // namespace precise

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

// All lanes' values of one SIMD-group function call, and the calling lane.
template <typename T>
struct Lanes {
  static_assert(sizeof(T) <= 8, "SIMD-group value wider than 64 bits");
  unsigned long long bits[32];
  unsigned count;
  unsigned me;
  Lanes(T v, const char* op, const char* file, int line) {
    unsigned long long b = 0;
    __builtin_memcpy(&b, &v, sizeof(T));
    me = emu_simd_exchange(b, bits, &count, op, file, line);
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

// Pairwise sums in a fixed tree: the hardware's order is unspecified; kernels must not rely on it.
template <typename T>
T tree_sum(const Lanes<T>& all, unsigned begin, unsigned end) {
  if (end - begin == 1) return all[begin];
  const unsigned mid = begin + (end - begin + 1) / 2;
  return tree_sum(all, begin, mid) + tree_sum(all, mid, end);
}

}  // namespace emu

#define EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

template <typename T>
T simd_sum(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_sum", file, line);
  return emu::tree_sum(all, 0, all.count);
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
  T r = T(0);
  for (unsigned i = 0; i < all.me; ++i) r += all[i];
  return r;
}

template <typename T>
T simd_prefix_inclusive_sum(T v, EMU_SITE) {
  emu::Lanes<T> all(v, "simd_prefix_inclusive_sum", file, line);
  T r = T(0);
  for (unsigned i = 0; i <= all.me; ++i) r += all[i];
  return r;
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
