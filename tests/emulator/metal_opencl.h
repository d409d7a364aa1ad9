// The Metal names our kernels use, declared for C++ for OpenCL (clang -x clcpp), so that clang
// checks what g++ with prelude.h cannot: address spaces. Metal's `device`, `constant`,
// `threadgroup` and `thread` become OpenCL's __global, __constant, __local and __private, so
// binding a device pointer to a thread one is an error, and a pointer or reference written
// without an address space gets OpenCL's __generic one, which strict.py reports (Metal has no
// generic address space). Declarations only: nothing here runs. Keep to the names prelude.h
// defines (the same Metal subset); every overload that takes memory names its address spaces.
#pragma once
#pragma OPENCL EXTENSION cl_khr_fp16 : enable

#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private

#include "metal_scalars.h"

typedef half float16_t;
// Metal's bfloat is a scalar type, readable in every address space (a member function's `this`
// is __generic here, which covers all but __constant).
struct bfloat {
  bfloat() = default;
  bfloat(float f);
  operator float() const;
  operator float() const __constant;
};
typedef bfloat bfloat16_t;

template <typename T, typename U>
T as_type(U x);

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))

typedef uint uint3 __attribute__((ext_vector_type(3)));

// What the harness turns a `threadgroup T name[N];` declaration into: a reference to threadgroup
// memory (OpenCL allows __local variables only in kernel functions, MLX's kernel is a template).
template <typename T>
__local T& emu_threadgroup();

namespace metal {

template <typename T>
struct numeric_limits {
  static constexpr T infinity();
  static constexpr T max();
  static constexpr T min();
  static constexpr T lowest();
};

float exp(float x);
float exp2(float x);
float log(float x);
float sqrt(float x);
float tanh(float x);
float floor(float x);
float abs(float x);
float fma(float a, float b, float c);
bool isnan(float x);
bool isinf(float x);
namespace precise {
float exp(float x);
float rsqrt(float x);
float tanh(float x);
}  // namespace precise
namespace fast {
float cos(float x);
float sin(float x);
}  // namespace fast

int min(int a, int b);
int max(int a, int b);
uint min(uint a, uint b);
uint max(uint a, uint b);
long min(long a, long b);
long max(long a, long b);
ulong min(ulong a, ulong b);
ulong max(ulong a, ulong b);
float min(float a, float b);
float max(float a, float b);

template <typename T>
T select(T a, T b, bool c);

enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags a, mem_flags b);
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

template <typename T>
T simd_sum(T v);
template <typename T>
T simd_max(T v);
template <typename T>
T simd_min(T v);
template <typename T>
T simd_prefix_exclusive_sum(T v);
template <typename T>
T simd_prefix_inclusive_sum(T v);
template <typename T>
T simd_shuffle(T v, ushort lane);
template <typename T>
T simd_shuffle_xor(T v, ushort mask);
template <typename T>
T simd_shuffle_down(T v, ushort delta);
template <typename T>
T simd_shuffle_up(T v, ushort delta);
template <typename T>
T simd_broadcast(T v, ushort lane);
template <typename T>
T simd_broadcast_first(T v);
bool simd_any(bool c);
bool simd_all(bool c);

struct simd_vote {
  typedef uint64_t vote_t;
  explicit operator vote_t() const;
  bool any() const;
};
simd_vote simd_ballot(bool c);

enum memory_order { memory_order_relaxed };
template <typename T>
struct atomic {
  T emu_value;
};
// Clang predeclares OpenCL's own atomic_int, ... (C11 _Atomic types): the Metal names are macros.
#define atomic_int metal::atomic<int>
#define atomic_uint metal::atomic<uint>
#define atomic_float metal::atomic<float>

// Metal's atomic functions take device or threadgroup atomics, nothing else.
#define EMU_ATOMICS(SPACE)                                                             \
  template <typename T>                                                                \
  void atomic_store_explicit(SPACE atomic<T>* object, T value, memory_order order);    \
  template <typename T>                                                                \
  T atomic_load_explicit(const SPACE atomic<T>* object, memory_order order);           \
  template <typename T>                                                                \
  T atomic_fetch_add_explicit(SPACE atomic<T>* object, T operand, memory_order order); \
  template <typename T>                                                                \
  T atomic_fetch_max_explicit(SPACE atomic<T>* object, T operand, memory_order order); \
  template <typename T>                                                                \
  T atomic_fetch_min_explicit(SPACE atomic<T>* object, T operand, memory_order order);
EMU_ATOMICS(__global)
EMU_ATOMICS(__local)
#undef EMU_ATOMICS

}  // namespace metal

using namespace metal;
