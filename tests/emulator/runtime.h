// The interface between an emulated kernel (prelude.h + generated source) and the fiber scheduler
// (runtime.cpp). It includes no system header, so a kernel's translation unit sees only the names
// that prelude.h defines.
#pragma once

extern "C" {

// What Metal gives one thread through its [[attribute]] parameters.
struct emu_ids {
  unsigned thread_position_in_grid[3];
  unsigned thread_position_in_threadgroup[3];
  unsigned threadgroup_position_in_grid[3];
  unsigned threads_per_threadgroup[3];
  unsigned threads_per_grid[3];
  unsigned threadgroups_per_grid[3];
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
};

// Calls the kernel once for one thread.
typedef void (*emu_entry)(void** buffers, const emu_ids* ids);

// Runs `entry` over `grid` threads in threadgroups of `threadgroup` threads (both already clamped
// as MLX does). Threadgroups run one after another, their threads as cooperative fibers in an
// order shuffled by `seed`. With `random_order`, every SIMD-group exchange also draws a seed for
// the order in which the SIMD-group functions add the lanes (see prelude.h). Returns 0, or 1 with
// a message in `error`.
int emu_run(emu_entry entry, void** buffers, const unsigned grid[3], const unsigned threadgroup[3],
            unsigned long long seed, int random_order, char* error, unsigned long error_size);

// Synchronisation points: the calling fiber waits until every thread of its threadgroup (barrier)
// or of its SIMD-group (exchange) has reached the same call site.
void emu_threadgroup_barrier(const char* file, int line);
void emu_simdgroup_barrier(const char* file, int line);
// Publishes `payload`; when all lanes of the SIMD-group have published, `all[lane]` holds every
// lane's payload, `*lanes` the number of lanes in the SIMD-group and `*order` the exchange's
// summation-order seed, the same for all lanes (0: the fixed order). Returns the caller's lane.
unsigned emu_simd_exchange(unsigned long long payload, unsigned long long* all, unsigned* lanes,
                           unsigned long long* order, const char* op, const char* file, int line);

// Called where a kernel declares threadgroup memory: poisons it (0xFF bytes) once per threadgroup,
// as Metal leaves it undefined, and checks Metal's 32 KiB limit.
void emu_threadgroup_memory(void* data, unsigned long size, const char* name, const char* file,
                            int line);

// Aborts the launch with a message naming the kernel source line.
[[noreturn]] void emu_fail(const char* message, const char* file, int line);
}
