// Fiber scheduler for emulated Metal kernels: each thread of a threadgroup is a fiber that
// runs until it reaches a barrier or a SIMD-group function, so barriers and lockstep SIMD exchanges
// are exact, and the order in which fibers run between two synchronisation points is shuffled so
// that a missing barrier shows up as a wrong result.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

// ---- contexts: a 30-instruction switch on x86-64 Linux, ucontext elsewhere -----------------------
// glibc's swapcontext makes two signal-mask system calls per switch (~1 us); fibers switch at
// every barrier and SIMD-group function, so the switch is the emulator's inner loop.

#if defined(__x86_64__) && defined(__linux__)

extern "C" void emu_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline();
extern "C" void emu_fiber_main(unsigned long index);

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save_sp, and resumes the stack at load_sp the same way in reverse.
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch

  .globl emu_fiber_trampoline
  .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
  movq %r12, %rdi
  call emu_fiber_main
  ud2
  .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");

struct Context {
  void* sp = nullptr;
};

// A fresh stack that emu_switch "returns" into emu_fiber_trampoline with r12 = index.
void make_context(Context& c, char* stack, size_t size, unsigned index) {
  auto* top = reinterpret_cast<unsigned long*>(
      (reinterpret_cast<unsigned long>(stack + size) & ~15ul));
  unsigned long* sp = top;  // 16-byte aligned once `ret` pops the trampoline's address, as the
                            // trampoline's `call` needs
  *--sp = reinterpret_cast<unsigned long>(&emu_fiber_trampoline);
  *--sp = 0;      // rbp
  *--sp = 0;      // rbx
  *--sp = index;  // r12
  *--sp = 0;      // r13
  *--sp = 0;      // r14
  *--sp = 0;      // r15
  *--sp = 0x037Ful << 32 | 0x1F80ul;  // x87 control word | MXCSR: the defaults
  c.sp = sp;
}

void switch_context(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }

#else

#include <ucontext.h>

extern "C" void emu_fiber_main(unsigned long index);

struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* stack, size_t size, unsigned index) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, reinterpret_cast<void (*)()>(emu_fiber_main), 1, index);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

namespace {

constexpr unsigned kSimdWidth = 32;
constexpr unsigned kMaxThreads = 1024;          // Metal's threads per threadgroup
constexpr unsigned long kMaxThreadgroupMemory = 32768;
constexpr size_t kStackSize = 256 * 1024;

enum class State { runnable, barrier, simd, done };

struct Site {
  const char* op = "";
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const {
    return line == o.line && std::strcmp(op, o.op) == 0 && std::strcmp(file, o.file) == 0;
  }
  std::string str() const {
    std::ostringstream s;
    s << op << " (" << file << ":" << line << ")";
    return s.str();
  }
};

struct Fiber {
  Context context;
  State state = State::runnable;
  emu_ids ids;
  Site site;
  unsigned long long payload = 0;
  unsigned long long* all = nullptr;
  unsigned* lanes = nullptr;
  unsigned long long* order = nullptr;
};

struct Simdgroup {
  unsigned first = 0;
  unsigned size = 0;
  unsigned arrived = 0;
};

struct Memory {
  unsigned long size;
  unsigned long generation;
};

struct Launch {
  emu_entry entry = nullptr;
  void** buffers = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Simdgroup> simdgroups;
  unsigned threads = 0;
  unsigned barrier_arrived = 0;
  unsigned group[3] = {0, 0, 0};
  Context scheduler;
  Fiber* current = nullptr;
  bool failed = false;
  std::string error;
  unsigned long generation = 0;
  std::map<void*, Memory> memory;
  unsigned long memory_bytes = 0;
  std::mt19937_64* rng = nullptr;
  bool random_order = false;
};

Launch* launch = nullptr;
char* stacks = nullptr;

char* stack_of(unsigned i) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t slot = kStackSize + page;  // one guard page below each stack
  if (stacks == nullptr) {
    void* p = mmap(nullptr, slot * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("emulator: mmap of fiber stacks");
      std::abort();
    }
    stacks = static_cast<char*>(p);
    for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(stacks + t * slot, page, PROT_NONE);
  }
  return stacks + i * slot + page;
}

[[noreturn]] void fail(const std::string& message) {
  launch->failed = true;
  launch->error = message;
  switch_context(launch->current->context, launch->scheduler);
  std::abort();  // a failed fiber is never resumed
}

void yield() { switch_context(launch->current->context, launch->scheduler); }

std::string group_name() {
  std::ostringstream s;
  s << "threadgroup (" << launch->group[0] << ", " << launch->group[1] << ", " << launch->group[2]
    << ")";
  return s.str();
}

// Why no fiber can run: which threads wait where, which returned.
std::string stall_report() {
  std::map<std::string, unsigned> waiting;
  unsigned done = 0;
  for (const Fiber& f : launch->fibers) {
    if (f.state == State::done) {
      ++done;
    } else {
      waiting[f.site.str()]++;
    }
  }
  std::ostringstream s;
  s << group_name() << " of " << launch->threads << " threads cannot make progress:";
  for (const auto& [site, count] : waiting) s << " " << count << " wait at " << site << ";";
  if (done) s << " " << done << " returned;";
  s << " every thread of a threadgroup must reach the same threadgroup_barrier, and every lane of"
       " a SIMD-group the same SIMD-group function (the emulator requires uniform control flow"
       " there)";
  return s.str();
}

bool run_group(std::mt19937_64& rng) {
  Launch& L = *launch;
  ++L.generation;
  L.barrier_arrived = 0;
  for (Simdgroup& g : L.simdgroups) g.arrived = 0;
  for (unsigned i = 0; i < L.threads; ++i) {
    Fiber& f = L.fibers[i];
    f.state = State::runnable;
    f.site = Site();
    make_context(f.context, stack_of(i), kStackSize, i);
  }
  std::vector<unsigned> order;
  order.reserve(L.threads);
  for (;;) {
    order.clear();
    bool all_done = true;
    for (unsigned i = 0; i < L.threads; ++i) {
      if (L.fibers[i].state == State::runnable) order.push_back(i);
      if (L.fibers[i].state != State::done) all_done = false;
    }
    if (all_done) return true;
    if (order.empty()) {
      L.failed = true;
      L.error = stall_report();
      return false;
    }
    std::shuffle(order.begin(), order.end(), rng);
    for (unsigned i : order) {
      if (L.fibers[i].state != State::runnable) continue;
      L.current = &L.fibers[i];
      switch_context(L.scheduler, L.current->context);
      if (L.failed) return false;
    }
  }
}

}  // namespace

extern "C" {

void emu_fiber_main(unsigned long index) {
  Fiber& f = launch->fibers[index];
  launch->entry(launch->buffers, &f.ids);
  f.state = State::done;
  switch_context(f.context, launch->scheduler);
  std::abort();
}

int emu_run(emu_entry entry, void** buffers, const unsigned grid[3], const unsigned threadgroup[3],
            unsigned long long seed, int random_order, char* error, unsigned long error_size) {
  Launch L;
  launch = &L;
  L.entry = entry;
  L.buffers = buffers;
  L.random_order = random_order != 0;
  auto report = [&](const std::string& message) {
    std::snprintf(error, error_size, "%s", message.c_str());
    launch = nullptr;
    return 1;
  };
  unsigned groups[3];
  for (int d = 0; d < 3; ++d) {
    if (threadgroup[d] == 0 || grid[d] == 0) return report("grid and threadgroup sizes must be > 0");
    if (grid[d] % threadgroup[d] != 0) {
      return report("the grid is not a whole number of threadgroups (the emulator runs uniform "
                    "threadgroups only; dispatch whole threadgroups and bound-check in the body)");
    }
    groups[d] = grid[d] / threadgroup[d];
  }
  L.threads = threadgroup[0] * threadgroup[1] * threadgroup[2];
  if (L.threads > kMaxThreads) return report("more than 1024 threads per threadgroup");
  L.fibers.resize(L.threads);
  const unsigned simdgroups = (L.threads + kSimdWidth - 1) / kSimdWidth;
  L.simdgroups.resize(simdgroups);
  for (unsigned s = 0; s < simdgroups; ++s) {
    L.simdgroups[s].first = s * kSimdWidth;
    L.simdgroups[s].size = std::min(kSimdWidth, L.threads - s * kSimdWidth);
  }
  std::vector<unsigned> group_order(groups[0] * groups[1] * groups[2]);
  for (unsigned i = 0; i < group_order.size(); ++i) group_order[i] = i;
  std::mt19937_64 rng(seed);
  L.rng = &rng;
  std::shuffle(group_order.begin(), group_order.end(), rng);
  for (unsigned g : group_order) {
    const unsigned gp[3] = {g % groups[0], (g / groups[0]) % groups[1], g / (groups[0] * groups[1])};
    std::copy(gp, gp + 3, L.group);
    for (unsigned i = 0; i < L.threads; ++i) {
      emu_ids& ids = L.fibers[i].ids;
      const unsigned local[3] = {i % threadgroup[0], (i / threadgroup[0]) % threadgroup[1],
                                 i / (threadgroup[0] * threadgroup[1])};
      for (int d = 0; d < 3; ++d) {
        ids.thread_position_in_threadgroup[d] = local[d];
        ids.threadgroup_position_in_grid[d] = gp[d];
        ids.thread_position_in_grid[d] = gp[d] * threadgroup[d] + local[d];
        ids.threads_per_threadgroup[d] = threadgroup[d];
        ids.threads_per_grid[d] = grid[d];
        ids.threadgroups_per_grid[d] = groups[d];
      }
      ids.thread_index_in_threadgroup = i;
      ids.thread_index_in_simdgroup = i % kSimdWidth;
      ids.simdgroup_index_in_threadgroup = i / kSimdWidth;
      ids.simdgroups_per_threadgroup = simdgroups;
    }
    if (!run_group(rng)) return report(L.error);
  }
  launch = nullptr;
  return 0;
}

void emu_threadgroup_barrier(const char* file, int line) {
  Launch& L = *launch;
  Fiber& f = *L.current;
  f.state = State::barrier;
  f.site = Site{"threadgroup_barrier", file, line};
  if (++L.barrier_arrived == L.threads) {
    for (const Fiber& other : L.fibers) {
      if (!(other.site == f.site)) {
        fail(group_name() + ": threads wait at different barriers: " + other.site.str() +
             " and " + f.site.str());
      }
    }
    L.barrier_arrived = 0;
    for (Fiber& other : L.fibers) other.state = State::runnable;
  }
  yield();
}

unsigned emu_simd_exchange(unsigned long long payload, unsigned long long* all, unsigned* lanes,
                           unsigned long long* order, const char* op, const char* file, int line) {
  Launch& L = *launch;
  Fiber& f = *L.current;
  Simdgroup& g = L.simdgroups[f.ids.simdgroup_index_in_threadgroup];
  f.state = State::simd;
  f.site = Site{op, file, line};
  f.payload = payload;
  f.all = all;
  f.lanes = lanes;
  f.order = order;
  if (++g.arrived == g.size) {
    unsigned long long values[kSimdWidth] = {};
    for (unsigned lane = 0; lane < g.size; ++lane) {
      const Fiber& other = L.fibers[g.first + lane];
      if (!(other.site == f.site)) {
        fail(group_name() + ": lanes of SIMD-group " +
             std::to_string(f.ids.simdgroup_index_in_threadgroup) +
             " are at different SIMD-group functions: " + other.site.str() + " and " +
             f.site.str());
      }
      values[lane] = other.payload;
    }
    const unsigned long long seed = L.random_order ? (*L.rng)() | 1u : 0u;
    for (unsigned lane = 0; lane < g.size; ++lane) {
      Fiber& other = L.fibers[g.first + lane];
      if (other.all != nullptr) std::memcpy(other.all, values, sizeof(values));
      if (other.lanes != nullptr) *other.lanes = g.size;
      if (other.order != nullptr) *other.order = seed;
      other.state = State::runnable;
    }
    g.arrived = 0;
  }
  yield();
  return f.ids.thread_index_in_simdgroup;
}

void emu_simdgroup_barrier(const char* file, int line) {
  emu_simd_exchange(0, nullptr, nullptr, nullptr, "simdgroup_barrier", file, line);
}

void emu_threadgroup_memory(void* data, unsigned long size, const char* name, const char* file,
                            int line) {
  Launch& L = *launch;
  auto it = L.memory.find(data);
  if (it == L.memory.end()) {
    L.memory_bytes += size;
    if (L.memory_bytes > kMaxThreadgroupMemory) {
      fail(std::string("threadgroup memory exceeds Metal's 32 KiB with `") + name + "` at " +
           file + ":" + std::to_string(line) + " (" + std::to_string(L.memory_bytes) +
           " bytes)");
    }
    it = L.memory.emplace(data, Memory{size, 0}).first;
  }
  if (it->second.generation != L.generation) {
    std::memset(data, 0xFF, size);
    it->second.generation = L.generation;
  }
}

void emu_fail(const char* message, const char* file, int line) {
  fail(std::string(message) + " at " + file + ":" + std::to_string(line));
}

}  // extern "C"
