// The emulator's runtime: fibers, the scheduler of one block, the rendezvous rules, launch checks and the counts
// of the coalescing model. Blocks run one after another; inside a block the runnable threads run in the
// configured lane order until each reaches a rendezvous or exits, then the scheduler completes the rendezvous it
// can and reports what the hardware leaves undefined.
#include "cuemu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif

namespace cuemu {
namespace {

// sm_90's limits, as cudaLaunchKernel checks them.
constexpr uint64_t kMaxThreadsPerBlock = 1024;
constexpr uint64_t kMaxBlockDim[3] = {1024, 1024, 64};
constexpr uint64_t kMaxGridDim[3] = {2147483647, 65535, 65535};
constexpr std::size_t kStackBytes = CUEMU_ASAN ? (512u << 10) : (128u << 10);

enum class Order { Forward, Reverse, Random };

struct Config {
  Order order = Order::Forward;
  uint64_t seed = 0;
  bool strict = true;        // an exited lane named in a mask is an error (false: sm_70+ PTX rules)
  int64_t block_stride = 1;  // run every block_stride-th block only (counting on large shapes)
  bool count = false;
  int64_t mutants = 0;
};

Config g_config;
std::mutex g_mutex;  // one launch at a time: the counts and the configuration are shared

const char* op_name(Op op) {
  switch (op) {
    case Op::Shfl:
      return "__shfl_sync";
    case Op::ShflUp:
      return "__shfl_up_sync";
    case Op::ShflDown:
      return "__shfl_down_sync";
    case Op::ShflXor:
      return "__shfl_xor_sync";
    case Op::Ballot:
      return "__ballot_sync";
    case Op::Any:
      return "__any_sync";
    case Op::All:
      return "__all_sync";
    case Op::SyncWarp:
      return "__syncwarp";
    case Op::SyncThreads:
      return "__syncthreads";
  }
  return "?";
}

std::string where(const Loc& loc) {
  return std::string(loc.file_name()) + ":" + std::to_string(loc.line());
}

std::string hex(unsigned mask) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", mask);
  return buf;
}

enum class State : uint8_t { Ready, Waiting, Exited };

struct Arrival {
  Op op;
  unsigned mask;
  uint64_t word;
  int arg, width;
  Loc loc;
  uint64_t result;
};

struct Stack {
  char* base;  // lowest usable address (a guard page lies below it)
  std::size_t size;
};

struct Fiber {
  ucontext_t context;
  Stack stack;
  ThreadVars vars;
  int tid;
  State state;
  Arrival at;
  std::unordered_map<uint64_t, uint64_t> occurrences;  // per access site: how often this lane got there
};

// Stacks are kept between launches (mmap'ed once, with a guard page against overflow).
std::vector<Stack>& stack_pool() {
  static std::vector<Stack> pool;
  return pool;
}

// A stack a fiber of an aborted launch left frames on keeps their redzones poisoned; unpoisoned before reuse.
bool g_stacks_dirty = false;

Stack stack_for(std::size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    const std::size_t page = 4096;
    void* p =
        mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda emulator: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    pool.push_back({static_cast<char*>(p) + page, kStackBytes});
  }
#if CUEMU_ASAN
  if (g_stacks_dirty) {
    for (const Stack& s : pool) ASAN_UNPOISON_MEMORY_REGION(s.base, s.size);
    g_stacks_dirty = false;
  }
#endif
  return pool[i];
}

struct LaunchStats {
  std::string kernel, site;
  uint64_t grid[3], block[3];
  uint64_t blocks_run = 0, threads_run = 0;
  std::map<std::string, uint64_t> collectives;  // warp-level rendezvous per intrinsic
  std::map<std::string, uint64_t> lane_ops;     // per-lane calls per intrinsic
  std::map<char, uint64_t> requests, sectors, lane_accesses, bytes;
  struct Site {
    uint64_t requests = 0, sectors = 0, lanes = 0;
  };
  std::map<std::pair<uint64_t, char>, Site> sites;  // per instruction (or atomic's source line) and kind
};

struct Request {
  std::set<uintptr_t> sectors;
  uint64_t lanes = 0;
};

std::vector<LaunchStats> g_stats;

// The grid being run by this host thread.
struct Grid {
  const Site* site;
  const std::function<void()>* body;
  Config config;
  std::vector<Fiber> fibers;
  uint3 block;
  dim3 block_dim, grid_dim;
  ucontext_t scheduler;
  std::string error;
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
  LaunchStats* stats = nullptr;
  // warp-level requests of the block being run: (warp, site, occurrence, kind) -> 32-byte sectors touched
  std::map<std::tuple<int, uint64_t, uint64_t, char>, Request> requests;
  uintptr_t host_stack_lo = 0, host_stack_hi = 0;
};

thread_local Grid* t_grid = nullptr;
thread_local Fiber* t_fiber = nullptr;

std::string describe(const Grid& g, const Fiber* f) {
  std::ostringstream os;
  os << "kernel " << g.site->kernel << " (launched at " << g.site->file << ":" << g.site->line << "), block ("
     << g.block.x << "," << g.block.y << "," << g.block.z << ")";
  if (f != nullptr) {
    os << ", thread (" << f->vars.thread_idx.x << "," << f->vars.thread_idx.y << "," << f->vars.thread_idx.z
       << ") = warp " << f->tid / 32 << " lane " << f->tid % 32;
  }
  return os.str();
}

[[noreturn]] void report(const Grid& g, const Fiber* f, const std::string& what, const Loc& loc) {
  const std::string at = loc.line() ? where(loc) : std::string(g.site->file) + ":" + std::to_string(g.site->line);
  TORCH_CHECK(false, "cuda emulator: ", what, "\n  in ", describe(g, f), "\n  at ", at);
  __builtin_unreachable();
}

// ---- switching between the scheduler and a fiber (annotated for AddressSanitizer) ----------------------------------

void finish_switch_into_fiber(Grid& g, void* fake_stack) {
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &g.sched_stack_bottom, &g.sched_stack_size);
#else
  (void)g;
  (void)fake_stack;
#endif
}

void resume(Grid& g, Fiber& f) {
  t_fiber = &f;
#if CUEMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.base, f.stack.size);
  swapcontext(&g.scheduler, &f.context);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&g.scheduler, &f.context);
#endif
  t_fiber = nullptr;
}

// From a fiber back to the scheduler; `last` when the fiber will not run again.
void yield(Grid& g, Fiber& f, bool last) {
#if CUEMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(last ? nullptr : &fake, g.sched_stack_bottom, g.sched_stack_size);
  swapcontext(&f.context, &g.scheduler);
  finish_switch_into_fiber(g, fake);
#else
  (void)last;
  swapcontext(&f.context, &g.scheduler);
#endif
}

void fiber_main() {
  Grid& g = *t_grid;
  finish_switch_into_fiber(g, nullptr);
  Fiber& f = *t_fiber;
  (*g.body)();
  f.state = State::Exited;
  yield(g, f, true);
  std::abort();  // an exited fiber is never resumed
}

// ---- the rendezvous rules ------------------------------------------------------------------------------------------

bool is_warp_op(Op op) {
  return op != Op::SyncThreads;
}

// The lane a shuffle reads for `lane`, or -1 when it keeps its own value.
int shuffle_source(const Arrival& a, int lane) {
  const int base = lane & ~(a.width - 1);
  switch (a.op) {
    case Op::Shfl:
      return base + (a.arg & (a.width - 1));
    case Op::ShflUp:
      return lane - a.arg >= base ? lane - a.arg : -1;
    case Op::ShflDown:
      return lane + a.arg < base + a.width ? lane + a.arg : -1;
    case Op::ShflXor: {
      const int src = lane ^ a.arg;
      return src < base + a.width ? src : -1;  // later groups are not read: the lane keeps its value
    }
    default:
      return -1;
  }
}

// Completes the warp collective `first` waits at if every lane its mask names is there; reports a violation.
bool try_complete(Grid& g, int warp, Fiber& first) {
  const int n = static_cast<int>(g.fibers.size());
  const Arrival& a = first.at;
  std::vector<Fiber*> group;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(a.mask >> lane & 1u)) continue;
    const int tid = warp * 32 + lane;
    if (tid >= n) {
      report(g, &first,
             std::string(op_name(a.op)) + " mask " + hex(a.mask) + " names lane " + std::to_string(lane) +
                 ", which does not exist (the block has " + std::to_string(n) + " threads)",
             a.loc);
    }
    Fiber& o = g.fibers[tid];
    if (o.state == State::Exited) {
      if (g.config.strict) {
        report(g, &first,
               std::string(op_name(a.op)) + " mask " + hex(a.mask) + " names lane " + std::to_string(lane) +
                   ", which has exited (strict mode; sm_70+ PTX leaves its value undefined)",
               a.loc);
      }
      continue;
    }
    // a lane at the block barrier cannot come: unless the barrier completes, this is the deadlock reported later
    if (o.state != State::Waiting || o.at.op == Op::SyncThreads) return false;
    if (o.at.op != a.op) {
      report(g, &first,
             std::string("mixed intrinsics at one rendezvous: this lane calls ") + op_name(a.op) + ", lane " +
                 std::to_string(lane) + " calls " + op_name(o.at.op) + " at " + where(o.at.loc),
             a.loc);
    }
    if (o.at.mask != a.mask) {
      report(g, &first,
             std::string(op_name(a.op)) + " with mask " + hex(a.mask) + ", but lane " + std::to_string(lane) +
                 " named in it calls it with mask " + hex(o.at.mask) + " at " + where(o.at.loc) +
                 " (it does not take part in this one)",
             a.loc);
    }
    if (o.at.width != a.width) {
      report(g, &first,
             std::string(op_name(a.op)) + " with width " + std::to_string(a.width) + ", lane " + std::to_string(lane) +
                 " with width " + std::to_string(o.at.width),
             a.loc);
    }
    if (g.config.strict && (o.at.loc.line() != a.loc.line() || std::strcmp(o.at.loc.file_name(), a.loc.file_name()))) {
      report(g, &first,
             std::string(op_name(a.op)) + " reached from two call sites: lane " + std::to_string(lane) + " at " +
                 where(o.at.loc),
             a.loc);
    }
    group.push_back(&o);
  }
  uint64_t votes = 0;
  for (const Fiber* o : group) votes |= (o->at.word != 0 ? 1ull : 0ull) << (o->tid % 32);
  for (Fiber* o : group) {
    const int lane = o->tid % 32;
    switch (a.op) {
      case Op::Ballot:
        o->at.result = votes & a.mask;
        break;
      case Op::Any:
        o->at.result = votes != 0;
        break;
      case Op::All: {
        uint64_t want = 0;
        for (const Fiber* p : group) want |= 1ull << (p->tid % 32);
        o->at.result = votes == want;
        break;
      }
      case Op::SyncWarp:
        o->at.result = 0;
        break;
      default: {
        const int src = shuffle_source(o->at, lane);
        if (src < 0) {
          o->at.result = o->at.word;
          break;
        }
        const int src_tid = warp * 32 + src;
        if (!(a.mask >> src & 1u) || src_tid >= n) {
          report(g, o,
                 std::string(op_name(a.op)) + " reads lane " + std::to_string(src) + ", outside the mask " +
                     hex(a.mask) + " (its value is undefined)",
                 o->at.loc);
        }
        const Fiber& s = g.fibers[src_tid];
        if (s.state == State::Exited) {
          report(g, o, std::string(op_name(a.op)) + " reads lane " + std::to_string(src) + ", which has exited",
                 o->at.loc);
        }
        o->at.result = s.at.word;
      }
    }
  }
  if (g.stats != nullptr) {
    g.stats->collectives[op_name(a.op)] += 1;
    g.stats->lane_ops[op_name(a.op)] += group.size();
  }
  for (Fiber* o : group) o->state = State::Ready;
  return true;
}

bool try_barrier(Grid& g) {
  const Fiber* first = nullptr;
  const Fiber* exited = nullptr;
  for (const Fiber& f : g.fibers) {
    if (f.state == State::Exited) {
      exited = exited ? exited : &f;
      continue;
    }
    if (f.state != State::Waiting || f.at.op != Op::SyncThreads) return false;
    if (first == nullptr) {
      first = &f;
    } else if (f.at.loc.line() != first->at.loc.line() ||
               std::strcmp(f.at.loc.file_name(), first->at.loc.file_name())) {
      report(g, &f,
             "divergent __syncthreads: thread " + std::to_string(first->tid) + " waits at " + where(first->at.loc) +
                 ", this thread at another one",
             f.at.loc);
    }
  }
  if (first == nullptr) return false;
  if (exited != nullptr && g.config.strict) {
    report(
        g, first,
        "conditional __syncthreads: thread " + std::to_string(exited->tid) + " has exited while the others wait at it",
        first->at.loc);
  }
  if (g.stats != nullptr) g.stats->collectives["__syncthreads"] += 1;
  for (Fiber& f : g.fibers) {
    if (f.state == State::Waiting) f.state = State::Ready;
  }
  return true;
}

[[noreturn]] void deadlock(Grid& g) {
  std::ostringstream os;
  os << "deadlock: no rendezvous can complete; waiting:";
  int shown = 0;
  const Fiber* first = nullptr;
  for (const Fiber& f : g.fibers) {
    if (f.state != State::Waiting) continue;
    first = first != nullptr && first->at.op != Op::SyncThreads ? first : &f;
    if (shown++ < 6) {
      os << "\n    thread " << f.tid << " (warp " << f.tid / 32 << " lane " << f.tid % 32 << ") at " << op_name(f.at.op)
         << " mask " << hex(f.at.mask) << ", " << where(f.at.loc);
    }
  }
  report(g, first, os.str(), first->at.loc);
}

void fold_requests(Grid& g) {
  if (g.stats == nullptr) return;
  for (const auto& [key, request] : g.requests) {
    const char kind = std::get<3>(key);
    g.stats->requests[kind] += 1;
    g.stats->sectors[kind] += request.sectors.size();
    auto& site = g.stats->sites[{std::get<1>(key), kind}];
    site.requests += 1;
    site.sectors += request.sectors.size();
    site.lanes += request.lanes;
  }
  g.requests.clear();
}

void run_block(Grid& g, std::mt19937_64& rng) {
  const int n = static_cast<int>(g.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = g.fibers[t];
    f.tid = t;
    f.state = State::Ready;
    f.occurrences.clear();
    const unsigned bx = g.block_dim.x, by = g.block_dim.y;
    f.vars = {{t % bx, (t / bx) % by, t / (bx * by)}, g.block, g.block_dim, g.grid_dim};
    f.stack = stack_for(t);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.base;
    f.context.uc_stack.ss_size = f.stack.size;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (g.config.order == Order::Reverse) std::reverse(order.begin(), order.end());
  for (;;) {
    if (g.config.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    for (const int t : order) {
      if (g.fibers[t].state != State::Ready) continue;
      resume(g, g.fibers[t]);
      if (!g.error.empty()) TORCH_CHECK(false, g.error);
    }
    bool any_left = false, progress = false;
    for (int w = 0; w * 32 < n; ++w) {
      for (int lane = 0; lane < 32 && w * 32 + lane < n; ++lane) {
        Fiber& f = g.fibers[w * 32 + lane];
        if (f.state != State::Waiting) continue;
        any_left = true;
        if (is_warp_op(f.at.op) && try_complete(g, w, f)) progress = true;
      }
    }
    if (!any_left) break;
    if (!progress && !try_barrier(g)) deadlock(g);
  }
  fold_requests(g);
}

void check_config(const Grid& g, const Extent& grid, const Extent& block, std::size_t shared_bytes) {
  const uint64_t gd[3] = {grid.x, grid.y, grid.z}, bd[3] = {block.x, block.y, block.z};
  const char* axis = "xyz";
  auto bad = [&](const std::string& what) { report(g, nullptr, "invalid launch configuration: " + what, Loc()); };
  if (grid.negative || block.negative) bad("a negative dimension");
  for (int i = 0; i < 3; ++i) {
    if (gd[i] == 0) bad(std::string("empty grid (gridDim.") + axis[i] + " = 0)");
    if (bd[i] == 0) bad(std::string("empty block (blockDim.") + axis[i] + " = 0)");
    if (gd[i] > kMaxGridDim[i]) {
      bad(std::string("gridDim.") + axis[i] + " = " + std::to_string(gd[i]) + " exceeds " +
          std::to_string(kMaxGridDim[i]));
    }
    if (bd[i] > kMaxBlockDim[i]) {
      bad(std::string("blockDim.") + axis[i] + " = " + std::to_string(bd[i]) + " exceeds " +
          std::to_string(kMaxBlockDim[i]));
    }
  }
  if (bd[0] * bd[1] * bd[2] > kMaxThreadsPerBlock) {
    bad(std::to_string(bd[0] * bd[1] * bd[2]) + " threads per block exceed " + std::to_string(kMaxThreadsPerBlock));
  }
  if (shared_bytes != 0) bad("dynamic shared memory is not emulated");
}

}  // namespace

ThreadVars vars(const Loc& loc) {
  if (t_fiber == nullptr) TORCH_CHECK(false, "cuda emulator: a built-in variable read on the host at ", where(loc));
  return t_fiber->vars;
}

[[noreturn]] void fail(const std::string& what, const Loc& loc) {
  if (t_fiber == nullptr || t_grid == nullptr)
    TORCH_CHECK(false, "cuda emulator: ", what, " (host code) at ", where(loc));
  Grid& g = *t_grid;
  Fiber& f = *t_fiber;
  g.error = "cuda emulator: " + what + "\n  in " + describe(g, &f) + "\n  at " + where(loc);
  f.state = State::Exited;
  yield(g, f, true);
  std::abort();
}

uint64_t rendezvous(Op op, unsigned mask, uint64_t word, int arg, int width, const Loc& loc) {
  if (t_fiber == nullptr) fail(std::string(op_name(op)) + " called on the host", loc);
  Fiber& f = *t_fiber;
  const int lane = f.tid % 32;
  if (op != Op::SyncThreads) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      fail(std::string(op_name(op)) + " width " + std::to_string(width) + " is not a power of two <= 32", loc);
    }
    if (!(mask >> lane & 1u)) {
      fail(std::string(op_name(op)) + " called by lane " + std::to_string(lane) + ", which is not in its mask " +
               hex(mask),
           loc);
    }
  }
  f.at = {op, mask, word, arg, width, loc, 0};
  f.state = State::Waiting;
  yield(*t_grid, f, false);
  return f.at.result;
}

namespace {

void record(const void* addr, int bytes, char kind, uint64_t site) {
  Grid& g = *t_grid;
  Fiber& f = *t_fiber;
  const uint64_t k = f.occurrences[site]++;
  Request& request = g.requests[{f.tid / 32, site, k, kind}];
  request.lanes += 1;
  const auto a = reinterpret_cast<uintptr_t>(addr);
  for (uintptr_t s = a / 32; s <= (a + bytes - 1) / 32; ++s) request.sectors.insert(s);
  g.stats->lane_accesses[kind] += 1;
  g.stats->bytes[kind] += bytes;
}

}  // namespace

// Source lines of the atomics counted, by site key (bit 63 set: a source line, not an instruction address).
std::map<uint64_t, std::string> g_atomic_sites;

void record_atomic(const void* addr, int bytes, const Loc& loc) {
  if (t_fiber == nullptr || t_grid == nullptr || t_grid->stats == nullptr) return;
  const uint64_t site = (1ull << 63) | (std::hash<std::string>{}(loc.file_name()) & 0xffffull) << 40 |
                        (uint64_t{loc.line()} << 12) | (loc.column() & 0xfff);
  auto it = g_atomic_sites.find(site);
  if (it == g_atomic_sites.end()) g_atomic_sites.emplace(site, where(loc));
  record(addr, bytes, 'a', site);
}

void record_device_access(const void* addr, int bytes, char kind, const void* pc) {
  if (t_fiber == nullptr || t_grid == nullptr || t_grid->stats == nullptr) return;
  const auto a = reinterpret_cast<uintptr_t>(addr);
  const Stack& s = t_fiber->stack;
  const auto lo = reinterpret_cast<uintptr_t>(s.base);
  // locals (the fiber's stack) and the kernel's parameters (the launching host thread's stack) are registers and
  // the constant bank on the device, not device memory
  if ((a >= lo && a < lo + s.size) || (a >= t_grid->host_stack_lo && a < t_grid->host_stack_hi)) return;
  record(addr, bytes, kind, reinterpret_cast<uint64_t>(pc));
}

float fetch_add(float* address, float val) {
  return std::exchange(*address, *address + val);
}
double fetch_add(double* address, double val) {
  return std::exchange(*address, *address + val);
}
int fetch_add(int* address, int val) {
  return std::exchange(*address, *address + val);
}
unsigned fetch_add(unsigned* address, unsigned val) {
  return std::exchange(*address, *address + val);
}

bool mutant(int id) {
  return t_grid != nullptr && (t_grid->config.mutants >> id & 1);
}

void run_grid(const Site& site, const Extent& grid, const Extent& block, std::size_t shared_bytes,
              const std::function<void()>& body) {
  TORCH_CHECK(t_grid == nullptr, "cuda emulator: a kernel launched from device code (", site.kernel, ")");
  std::lock_guard<std::mutex> lock(g_mutex);
  Grid g;
  g.site = &site;
  g.body = &body;
  g.config = g_config;
  check_config(g, grid, block, shared_bytes);
  g.block_dim = dim3(block.x, block.y, block.z);
  g.grid_dim = dim3(grid.x, grid.y, grid.z);
  g.fibers.resize(block.x * block.y * block.z);
  if (g.config.count) {
    g_stats.push_back({site.kernel,
                       std::string(site.file) + ":" + std::to_string(site.line),
                       {grid.x, grid.y, grid.z},
                       {block.x, block.y, block.z}});
    g.stats = &g_stats.back();
  }
  if (g.stats != nullptr) {
    pthread_attr_t attr;
    void* addr = nullptr;
    std::size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    g.host_stack_lo = reinterpret_cast<uintptr_t>(addr);
    g.host_stack_hi = g.host_stack_lo + size;
  }
  std::mt19937_64 rng(g.config.seed);
  t_grid = &g;
  try {
    uint64_t index = 0;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x, ++index) {
          if (index % g.config.block_stride != 0) continue;
          g.block = {x, y, z};
          run_block(g, rng);
          if (g.stats != nullptr) {
            g.stats->blocks_run += 1;
            g.stats->threads_run += g.fibers.size();
          }
        }
      }
    }
  } catch (...) {
    t_grid = nullptr;
    g_stacks_dirty = true;
    throw;
  }
  t_grid = nullptr;
}

namespace {

void configure(const std::string& order, int64_t seed, bool strict, int64_t block_stride, bool count, int64_t mutants) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(order == "forward" || order == "reverse" || order == "random",
              "cuda emulator: order must be forward, reverse or random, got ", order);
  TORCH_CHECK(block_stride >= 1, "cuda emulator: block_stride must be >= 1");
  g_config.order = order == "forward" ? Order::Forward : order == "reverse" ? Order::Reverse : Order::Random;
  g_config.seed = static_cast<uint64_t>(seed);
  g_config.strict = strict;
  g_config.block_stride = block_stride;
  g_config.count = count;
  g_config.mutants = mutants;
  g_stats.clear();
}

// An access site as the counts name it: "file:line" of an atomic, or "object+0xoffset" of an instruction (for
// addr2line).
std::string site_name(uint64_t site) {
  if (site >> 63) return g_atomic_sites.at(site);
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(site), &info) == 0 || info.dli_fname == nullptr) return "?";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "+0x%llx",
                static_cast<unsigned long long>(site - reinterpret_cast<uintptr_t>(info.dli_fbase)));
  return std::string(info.dli_fname) + buf;
}

// The counts of every launch since configure(), as JSON.
std::string stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::ostringstream os;
  auto kinds = [&](const std::map<char, uint64_t>& m) {
    os << "{";
    bool first = true;
    for (const auto& [k, v] : m) {
      os << (first ? "" : ", ") << "\"" << (k == 'a' ? "atomic" : k == 'l' ? "load" : "store") << "\": " << v;
      first = false;
    }
    os << "}";
  };
  auto names = [&](const std::map<std::string, uint64_t>& m) {
    os << "{";
    bool first = true;
    for (const auto& [k, v] : m) {
      os << (first ? "" : ", ") << "\"" << k << "\": " << v;
      first = false;
    }
    os << "}";
  };
  os << "[";
  for (std::size_t i = 0; i < g_stats.size(); ++i) {
    const LaunchStats& s = g_stats[i];
    os << (i ? ",\n" : "") << "{\"kernel\": \"" << s.kernel << "\", \"site\": \"" << s.site << "\", \"grid\": ["
       << s.grid[0] << ", " << s.grid[1] << ", " << s.grid[2] << "], \"block\": [" << s.block[0] << ", " << s.block[1]
       << ", " << s.block[2] << "], \"blocks_run\": " << s.blocks_run << ", \"threads_run\": " << s.threads_run
       << ", \"collectives\": ";
    names(s.collectives);
    os << ", \"lane_ops\": ";
    names(s.lane_ops);
    os << ", \"requests\": ";
    kinds(s.requests);
    os << ", \"sectors\": ";
    kinds(s.sectors);
    os << ", \"lane_accesses\": ";
    kinds(s.lane_accesses);
    os << ", \"bytes\": ";
    kinds(s.bytes);
    os << ", \"sites\": [";
    bool first = true;
    for (const auto& [key, site] : s.sites) {
      os << (first ? "" : ", ") << "{\"kind\": \""
         << (key.second == 'a'   ? "atomic"
             : key.second == 'l' ? "load"
                                 : "store")
         << "\", \"where\": \"" << site_name(key.first) << "\", \"requests\": " << site.requests
         << ", \"sectors\": " << site.sectors << ", \"lanes\": " << site.lanes << "}";
      first = false;
    }
    os << "]}";
  }
  os << "]";
  return os.str();
}

}  // namespace

}  // namespace cuemu

TORCH_LIBRARY(cuemu, m) {
  m.def("configure(str order, int seed, bool strict, int block_stride, bool count, int mutants) -> ()",
        &cuemu::configure);
  m.def("stats() -> str", &cuemu::stats);
}
