// The CPU simulator of cuda_sim.h: fibres, the scheduler and its checks.
#include "cuda_sim.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_SIM_ASAN 1
#endif
#endif
#if defined(CUDA_SIM_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_sim {
namespace detail {
namespace {

// ---- Execution contexts: a stack pointer switched by a few instructions on x86-64 (a fibre switch costs
// about as much as a function call, so a block of 512 threads crossing a few hundred barriers takes
// milliseconds), ucontext elsewhere.
#if defined(__x86_64__)
extern "C" void cuda_sim_switch_stack(void** save_sp, void* load_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer into *save_sp, loads load_sp and restores the same from there.
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".type cuda_sim_switch_stack,@function\n"
    "cuda_sim_switch_stack:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size cuda_sim_switch_stack,.-cuda_sim_switch_stack\n");

struct Context {
  void* sp = nullptr;
};

// A fresh context that starts in entry() on the stack [stack, stack + size).
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack + size)) & ~uintptr_t{15});
  uintptr_t* sp = top;
  *--sp = 0;                                       // entry's return address: it never returns
  *--sp = reinterpret_cast<uintptr_t>(entry);      // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = 0;           // rbp, rbx, r12-r15
  uint32_t control[2];
  __asm__ volatile("stmxcsr %0" : "=m"(control[0]));
  uint16_t fpu_cw;
  __asm__ volatile("fnstcw %0" : "=m"(fpu_cw));
  control[1] = fpu_cw;
  *--sp = 0;
  std::memcpy(sp, control, sizeof(control));
  c.sp = sp;
}
void context_switch(Context& from, Context& to) { cuda_sim_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

#if defined(CUDA_SIM_ASAN)
constexpr size_t kStackBytes = 1 << 20;  // instrumented frames are larger
#else
constexpr size_t kStackBytes = 256 << 10;
#endif
constexpr size_t kGuardBytes = 4096;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxParamBytes = 4096;
constexpr int64_t kMaxYieldsInARow = 10'000'000;

// A fibre's stack, with an inaccessible guard page below it (an overflow faults instead of corrupting).
struct Stack {
  char* base = nullptr;  // the mapping, guard page first
  char* lo() const { return base + kGuardBytes; }
  static Stack make() {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("cuda_sim: cannot map a fibre stack");
    mprotect(p, kGuardBytes, PROT_NONE);
    return {static_cast<char*>(p)};
  }
};

enum class Wait { None, Barrier, Warp, Exited, Fault };

struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};

std::string where(const Site& s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Idx: return "__shfl_sync";
    case WarpOp::Up: return "__shfl_up_sync";
    case WarpOp::Down: return "__shfl_down_sync";
    case WarpOp::Xor: return "__shfl_xor_sync";
  }
  return "?";
}

// The kernel's name, from the symbol table (a hidden symbol gives its address).
std::string kernel_name_of(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr && info.dli_saddr == kernel) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  std::ostringstream s;
  s << "the kernel at " << kernel;
  return s.str();
}

std::string hex(unsigned mask) {
  std::ostringstream s;
  s << "0x" << std::hex << mask;
  return s.str();
}

struct Thread {
  unsigned tid = 0;
  uint3 idx{};
  Context context;
  Wait wait = Wait::None;
  Site site;
  const char* fault = "";  // what a faulted thread did
  // At a warp collective:
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  int param = 0, width = 32;
  uint64_t value = 0, result = 0;
#if defined(CUDA_SIM_ASAN)
  void* fake_stack = nullptr;
#endif
};

// The set of runnable threads, picked from in the schedule's order.
class RunQueue {
 public:
  void reset(unsigned n) {
    words_.assign((n + 63) / 64, 0);
    list_.clear();
    position_.assign(n, -1);
  }
  bool empty() const { return list_.empty(); }
  void add(unsigned t) {
    if (position_[t] >= 0) return;
    words_[t / 64] |= uint64_t{1} << (t % 64);
    position_[t] = static_cast<int>(list_.size());
    list_.push_back(t);
  }
  unsigned pick(Order order, std::mt19937_64& rng) {
    unsigned t = 0;
    if (order == Order::Random) {
      t = list_[std::uniform_int_distribution<size_t>(0, list_.size() - 1)(rng)];
    } else if (order == Order::Forward) {
      size_t w = 0;
      while (words_[w] == 0) ++w;
      t = static_cast<unsigned>(w * 64 + __builtin_ctzll(words_[w]));
    } else {
      size_t w = words_.size() - 1;
      while (words_[w] == 0) --w;
      t = static_cast<unsigned>(w * 64 + 63 - __builtin_clzll(words_[w]));
    }
    remove(t);
    return t;
  }

 private:
  void remove(unsigned t) {
    words_[t / 64] &= ~(uint64_t{1} << (t % 64));
    const int p = position_[t];
    list_[p] = list_.back();
    position_[list_[p]] = p;
    list_.pop_back();
    position_[t] = -1;
  }
  std::vector<uint64_t> words_;
  std::vector<unsigned> list_;
  std::vector<int> position_;
};

struct Simulator {
  Schedule schedule;
  int64_t launches_in_schedule = 0;  // the random schedule of a launch depends on its seed and this count
  Stats stats;
  std::vector<Stack> stacks;

  // The launch and block being run.
  dim3 grid, block;
  uint3 block_index{};
  std::string kernel_name;
  const std::function<void()>* body = nullptr;
  std::vector<Thread> threads;
  RunQueue run_queue;
  unsigned n_exited = 0, n_at_barrier = 0;
  Thread* current = nullptr;
  Context scheduler;
  std::mt19937_64 rng;
#if defined(CUDA_SIM_ASAN)
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_lo = nullptr;
  size_t scheduler_stack_size = 0;
#endif

  [[noreturn]] void fail(const std::string& what) {
    std::ostringstream s;
    s << "cuda_sim: " << what << " [block (" << block_index.x << "," << block_index.y << "," << block_index.z
      << ") of grid (" << grid.x << "," << grid.y << "," << grid.z << "), block (" << block.x << "," << block.y << ","
      << block.z << "), schedule "
      << (schedule.order == Order::Forward ? "forward" : schedule.order == Order::Reverse ? "reverse" : "random")
      << " seed " << schedule.seed << ", launch " << launches_in_schedule << " since set_schedule, in "
      << kernel_name << "]";
    throw Error(s.str());
  }

  unsigned n_threads() const { return static_cast<unsigned>(threads.size()); }

  // ---- Fibre side.
  Thread& self() {
    if (current == nullptr) throw Error("cuda_sim: a CUDA built-in was used outside a kernel launch");
    return *current;
  }

  // Gives the CPU back to the scheduler; returns when this thread is resumed.
  void suspend(Thread& t) {
#if defined(CUDA_SIM_ASAN)
    __sanitizer_start_switch_fiber(t.wait == Wait::Exited ? nullptr : &t.fake_stack, scheduler_stack_lo,
                                   scheduler_stack_size);
#endif
    context_switch(t.context, scheduler);
#if defined(CUDA_SIM_ASAN)
    __sanitizer_finish_switch_fiber(t.fake_stack, &scheduler_stack_lo, &scheduler_stack_size);
#endif
  }

  static void fibre_main();

  // ---- Scheduler side.
  void resume(Thread& t) {
    current = &t;
    ++stats.switches;
#if defined(CUDA_SIM_ASAN)
    __sanitizer_start_switch_fiber(&scheduler_fake_stack, stacks[t.tid].lo(), kStackBytes);
#endif
    context_switch(scheduler, t.context);
#if defined(CUDA_SIM_ASAN)
    __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
    current = nullptr;
  }

  std::string describe(const Thread& t) const {
    std::ostringstream s;
    s << "thread " << t.tid << " (warp " << t.tid / 32 << " lane " << t.tid % 32 << ")";
    switch (t.wait) {
      case Wait::None: s << " runnable"; break;
      case Wait::Exited: s << " exited"; break;
      case Wait::Barrier: s << " at __syncthreads " << where(t.site); break;
      case Wait::Warp: s << " at " << op_name(t.op) << "(mask " << hex(t.mask) << ") " << where(t.site); break;
      case Wait::Fault: s << " at " << where(t.site); break;
    }
    return s.str();
  }

  // Where every thread waits, grouped (for a deadlock).
  std::string dump() const {
    std::map<std::string, std::vector<unsigned>> groups;
    for (const Thread& t : threads) {
      std::string d = describe(t);
      groups[d.substr(d.find(')') + 1)].push_back(t.tid);
    }
    std::ostringstream s;
    for (const auto& [state, tids] : groups) {
      s << "\n  " << tids.size() << " thread(s) (" << tids.front();
      if (tids.size() > 1) s << ", ..., " << tids.back();
      s << ")" << state;
    }
    return s.str();
  }

  void make_runnable(Thread& t) {
    t.wait = Wait::None;
    run_queue.add(t.tid);
  }

  void check_barrier() {
    if (n_at_barrier == 0) return;
    if (n_exited > 0) {
      const Thread* waiting = nullptr;
      const Thread* exited = nullptr;
      for (const Thread& t : threads) {
        if (t.wait == Wait::Barrier && waiting == nullptr) waiting = &t;
        if (t.wait == Wait::Exited && exited == nullptr) exited = &t;
      }
      fail("__syncthreads not reached by every thread of the block: " + describe(*waiting) + " while " +
           describe(*exited) + " (" + std::to_string(n_exited) + " exited)");
    }
    if (n_at_barrier < n_threads()) return;
    for (const Thread& t : threads) {
      if (!(t.site == threads[0].site)) {
        fail("__syncthreads in divergent code: " + describe(threads[0]) + ", " + describe(t));
      }
    }
    n_at_barrier = 0;
    for (Thread& t : threads) make_runnable(t);
  }

  // The lanes of a warp present in the block, and those not runnable (waiting or exited), as bit masks.
  unsigned present_lanes(unsigned warp) const {
    const unsigned n = std::min(32u, n_threads() - warp * 32);
    return n == 32 ? 0xffffffffu : (1u << n) - 1;
  }
  unsigned blocked_lanes(unsigned warp) const {
    unsigned blocked = 0;
    for (unsigned lane = 0, base = warp * 32; lane < 32 && base + lane < n_threads(); ++lane) {
      if (threads[base + lane].wait != Wait::None) blocked |= 1u << lane;
    }
    return blocked;
  }

  // Called when t arrives at a warp collective: checks its own call, then releases every group of its warp
  // whose lanes have all arrived.
  void arrive_warp(Thread& t) {
    const unsigned lane = t.tid % 32, warp = t.tid / 32;
    if (!(t.mask >> lane & 1u)) fail(describe(t) + ": the calling lane is not in the mask");
    const unsigned absent = t.mask & ~present_lanes(warp);
    if (absent != 0) {
      fail(describe(t) + ": its mask names lane " + std::to_string(__builtin_ctz(absent)) +
           ", which is not in the block (" + std::to_string(n_threads()) + " threads)");
    }
    if (t.width < 1 || t.width > 32 || (t.width & (t.width - 1)) != 0) {
      fail(describe(t) + ": width " + std::to_string(t.width) + " is not a power of two <= 32");
    }
    resolve_warp(warp);
  }

  // Releases every group of the warp whose lanes all wait at the same collective (op, mask, width). A lane
  // of a complete mask that has exited or waits at __syncthreads is an error now; lanes that wait at
  // different collectives may still be released by other groups, so they are reported only when nothing
  // can run (diagnose_warps).
  void resolve_warp(unsigned warp) {
    const unsigned base = warp * 32;
    for (bool released = true; released;) {
      released = false;
      const unsigned blocked = blocked_lanes(warp);
      for (unsigned lane = 0; lane < 32 && base + lane < n_threads(); ++lane) {
        Thread& t = threads[base + lane];
        if (t.wait != Wait::Warp || (t.mask & ~blocked) != 0) continue;  // some lane of its mask still runs
        bool ready = true;
        for (unsigned m = t.mask; m != 0; m &= m - 1) {
          const Thread& o = threads[base + __builtin_ctz(m)];
          if (o.wait == Wait::Exited) fail(describe(t) + " waits for lane " + std::to_string(o.tid % 32) + ", which has exited");
          if (o.wait == Wait::Barrier) fail("warp collective in divergent code: " + describe(t) + ", " + describe(o));
          ready = ready && o.op == t.op && o.mask == t.mask && (t.op == WarpOp::Sync || o.width == t.width);
        }
        if (!ready) continue;
        const unsigned group = t.mask;
        for (unsigned m = group; m != 0; m &= m - 1) shuffle_result(threads[base + __builtin_ctz(m)], group);
        for (unsigned m = group; m != 0; m &= m - 1) make_runnable(threads[base + __builtin_ctz(m)]);
        released = true;
        break;
      }
    }
  }

  // Nothing can run: a warp whose lanes wait at collectives that disagree says so, before the generic dump.
  void diagnose_warps() {
    for (unsigned base = 0; base < n_threads(); base += 32) {
      for (unsigned lane = 0; lane < 32 && base + lane < n_threads(); ++lane) {
        const Thread& t = threads[base + lane];
        if (t.wait != Wait::Warp) continue;
        for (unsigned m = t.mask; m != 0; m &= m - 1) {
          const Thread& o = threads[base + __builtin_ctz(m)];
          if (o.wait == Wait::Warp && (o.op != t.op || o.mask != t.mask || (t.op != WarpOp::Sync && o.width != t.width))) {
            fail("lanes of a warp disagree on a collective: " + describe(t) + ", " + describe(o));
          }
        }
      }
    }
  }

  void shuffle_result(Thread& t, unsigned group) {
    if (t.op == WarpOp::Sync) return;
    const int lane = static_cast<int>(t.tid % 32), w = t.width;
    const int segment = lane / w * w;
    const int b = t.param & 31;  // PTX reads the lane operand's low 5 bits
    int src = lane;
    switch (t.op) {
      case WarpOp::Idx: src = segment + ((t.param % w) + w) % w; break;
      case WarpOp::Up: src = lane - segment >= b ? lane - b : lane; break;
      case WarpOp::Down: src = lane - segment + b < w ? lane + b : lane; break;
      case WarpOp::Xor: src = (lane ^ b) < segment + w ? lane ^ b : lane; break;
      case WarpOp::Sync: break;
    }
    const unsigned src_tid = t.tid / 32 * 32 + static_cast<unsigned>(src);
    if (!(group >> src & 1u)) {
      fail(describe(t) + " reads lane " + std::to_string(src) + ", which is not in the mask");
    }
    t.result = threads[src_tid].value;
  }

  void exited(Thread& t) {
    ++n_exited;
    for (unsigned tid = t.tid / 32 * 32; tid < std::min(n_threads(), t.tid / 32 * 32 + 32); ++tid) {
      const Thread& o = threads[tid];
      if (o.wait == Wait::Warp && (o.mask >> (t.tid % 32) & 1u)) {
        fail(describe(o) + " waits for lane " + std::to_string(t.tid % 32) + ", which has exited");
      }
    }
    check_barrier();
  }

  void run_block(uint3 index) {
    block_index = index;
    const unsigned n = block.x * block.y * block.z;
    threads.assign(n, Thread{});
    while (stacks.size() < n) stacks.push_back(Stack::make());
    run_queue.reset(n);
    n_exited = n_at_barrier = 0;
    for (unsigned tid = 0; tid < n; ++tid) {
      Thread& t = threads[tid];
      t.tid = tid;
      t.idx = {tid % block.x, tid / block.x % block.y, tid / (block.x * block.y)};
      context_init(t.context, stacks[tid].lo(), kStackBytes, &Simulator::fibre_main);
      run_queue.add(tid);
    }
    ++stats.blocks;
    stats.threads += n;
    int yielded = -1;  // a thread that yielded, back in the queue once another has run
    int64_t yields_in_a_row = 0;
    while (n_exited < n) {
      if (run_queue.empty() && yielded >= 0) {
        run_queue.add(static_cast<unsigned>(yielded));
        yielded = -1;
      }
      if (run_queue.empty()) {
        diagnose_warps();
        fail("deadlock: no thread can run" + dump());
      }
      Thread& t = threads[run_queue.pick(schedule.order, rng)];
      if (yielded >= 0) {
        run_queue.add(static_cast<unsigned>(yielded));
        yielded = -1;
      }
      resume(t);
      if (t.wait != Wait::None) yields_in_a_row = 0;
      switch (t.wait) {
        case Wait::None:  // a yield: the others get a turn first
          yielded = static_cast<int>(t.tid);
          if (++yields_in_a_row > kMaxYieldsInARow) {
            fail("no progress: threads have only spun on memory for " + std::to_string(kMaxYieldsInARow) +
                 " turns (a spin-wait that is never released?)" + dump());
          }
          break;
        case Wait::Barrier:
          ++n_at_barrier;
          resolve_warp(t.tid / 32);  // lanes of its warp may wait for it at a collective
          check_barrier();
          break;
        case Wait::Warp: arrive_warp(t); break;
        case Wait::Exited: exited(t); break;
        case Wait::Fault: fail(std::string(t.fault) + ": " + describe(t));
      }
    }
  }

  void run(dim3 g, dim3 b, size_t param_bytes, const void* kernel, const std::function<void()>& f) {
    grid = g;
    block = b;
    block_index = {0, 0, 0};
    kernel_name = kernel_name_of(kernel);
    threads.clear();
    const uint64_t block_threads = uint64_t{b.x} * b.y * b.z;
    if (b.x == 0 || b.y == 0 || b.z == 0 || block_threads > kMaxThreadsPerBlock || b.z > 64) {
      fail("invalid launch: a block of (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) +
           ") threads (1 to 1024, z <= 64)");
    }
    if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
      fail("invalid launch: a grid of (" + std::to_string(g.x) + "," + std::to_string(g.y) + "," + std::to_string(g.z) +
           ") blocks (x 1 to 2^31 - 1, y and z 1 to 65535)");
    }
    if (param_bytes > kMaxParamBytes) fail("invalid launch: " + std::to_string(param_bytes) + " bytes of parameters");
    ++stats.launches;
    body = &f;
    ++launches_in_schedule;
    rng.seed(schedule.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(launches_in_schedule)));
    const uint64_t n_blocks = uint64_t{g.x} * g.y * g.z;
    std::vector<uint64_t> order(n_blocks);
    for (uint64_t k = 0; k < n_blocks; ++k) order[k] = k;
    if (schedule.order == Order::Reverse) std::reverse(order.begin(), order.end());
    if (schedule.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    try {
      for (uint64_t k : order) {
        run_block({static_cast<unsigned>(k % g.x), static_cast<unsigned>(k / g.x % g.y),
                   static_cast<unsigned>(k / (uint64_t{g.x} * g.y))});
      }
    } catch (...) {
#if defined(CUDA_SIM_ASAN)
      // fibres abandoned mid-kernel leave their frames' poison on stacks the next launch reuses
      for (const Stack& stack : stacks) __asan_unpoison_memory_region(stack.lo(), kStackBytes);
#endif
      threads.clear();
      body = nullptr;
      throw;
    }
    threads.clear();
    body = nullptr;
  }
};

Simulator& sim() {
  static Simulator s;
  return s;
}

void Simulator::fibre_main() {
  Simulator& s = sim();
#if defined(CUDA_SIM_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &s.scheduler_stack_lo, &s.scheduler_stack_size);
#endif
  Thread& t = s.self();
  (*s.body)();  // the kernel's code; it cannot throw (CUDA code has no exceptions)
  t.wait = Wait::Exited;
  s.suspend(t);
  __builtin_trap();  // an exited thread is never resumed
}

}  // namespace

const uint3& thread_idx() { return sim().self().idx; }
const uint3& block_idx() {
  sim().self();
  return sim().block_index;
}
const dim3& block_dim() {
  sim().self();
  return sim().block;
}
const dim3& grid_dim() {
  sim().self();
  return sim().grid;
}

void sync_block(const char* file, int line) {
  Thread& t = sim().self();
  t.wait = Wait::Barrier;
  t.site = {file, line};
  sim().suspend(t);
}

uint64_t warp_collective(WarpOp op, unsigned mask, int param, int width, uint64_t value, const char* file, int line) {
  Thread& t = sim().self();
  t.wait = Wait::Warp;
  t.site = {file, line};
  t.op = op;
  t.mask = mask;
  t.param = param;
  t.width = width;
  t.value = value;
  sim().suspend(t);
  return t.result;
}

void yield() {
  Thread& t = sim().self();
  t.wait = Wait::None;
  sim().suspend(t);
}

void fault(const char* what, const char* file, int line) {
  Thread& t = sim().self();
  t.wait = Wait::Fault;
  t.site = {file, line};
  t.fault = what;
  sim().suspend(t);
  __builtin_trap();  // a faulted thread is never resumed: its launch fails
}

void run(dim3 grid, dim3 block, size_t param_bytes, const void* kernel, const std::function<void()>& body) {
  if (sim().current != nullptr) throw Error("cuda_sim: a kernel launched from inside a kernel");
  sim().run(grid, block, param_bytes, kernel, body);
}

}  // namespace detail

void set_schedule(Schedule schedule) {
  detail::sim().schedule = schedule;
  detail::sim().launches_in_schedule = 0;
}
Schedule schedule() { return detail::sim().schedule; }
Stats stats() { return detail::sim().stats; }
void reset_stats() { detail::sim().stats = {}; }

}  // namespace cuda_sim
