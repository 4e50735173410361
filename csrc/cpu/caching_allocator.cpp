// A caching allocator for large CPU tensors, installed as torch's CPU allocator while training.
//
// Why: glibc serves a training step's activations (MBs each) from its heap once its dynamic
// mmap threshold has risen, and a heap only shrinks from the top, so the holes left by
// short-lived tensors between long-lived ones stay resident: on a DPO step of SmolLM2-135M that
// was 1.3 GB of peak RSS above what the tensors needed. Mapping every large tensor afresh
// (MALLOC_MMAP_THRESHOLD_) fixes the memory but zero-fills every page again, 25% of the step.
//
// How: requests of at least kMinBytes get their own anonymous mapping, rounded to a size class.
// A freed block is kept in a cache, and the next request of its class takes it back (a
// training step asks for the same shapes layer after layer, step after step). A request that
// misses maps fresh memory, but first, if live + cached + its bytes would pass the most there
// has ever been (the high-water mark), returns the least recently freed cached blocks to the
// system until they would not. So live + cached only passes the mark when the cache is empty:
// the peak stays the peak of the live bytes (plus rounding), whatever the sizes.
// Smaller requests go to c10::alloc_cpu, as torch's own allocator does.
#include "cpu/caching_allocator.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace dafast {
namespace {

constexpr std::size_t kMinBytes = std::size_t{1} << 20;
constexpr std::size_t kHugePage = std::size_t{2} << 20;

// Size classes: 64 KiB steps below 32 MiB, 2 MiB steps above (at most ~6% rounding either way).
std::size_t size_class(std::size_t n) {
  const std::size_t step = n < (std::size_t{32} << 20) ? (std::size_t{64} << 10) : kHugePage;
  return (n + step - 1) / step * step;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t n) override {
    if (n < kMinBytes) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    void* p = acquire(size_class(n));
    return {p, p, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  // A raw pointer may come from either path; the block table tells which.
  c10::DeleterFnPtr raw_deleter() const override { return &release_any; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enable() {
    std::lock_guard<std::mutex> guard(mutex_);
    if (enabled_) return;
    previous_ = c10::GetCPUAllocator();
    // Priority 1 outranks torch's default CPU allocator (0); disable() restores it at 1.
    c10::SetCPUAllocator(this, /*priority=*/1);
    enabled_ = true;
    stats_ = CpuAllocatorStats{stats_.live_bytes, 0, stats_.live_bytes, 0, 0, 0};
  }

  void disable() {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (!enabled_) return;
      c10::SetCPUAllocator(previous_, /*priority=*/1);
      enabled_ = false;
    }
    empty_cache();  // blocks still held by tensors are unmapped when those tensors free them
  }

  bool enabled() {
    std::lock_guard<std::mutex> guard(mutex_);
    return enabled_;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> guard(mutex_);
    while (!lru_.empty()) evict_oldest();
    high_water_ = stats_.live_bytes;  // what is kept from now on is measured afresh
  }

  CpuAllocatorStats stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return stats_;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> guard(mutex_);
    stats_.peak_bytes = stats_.live_bytes + stats_.cached_bytes;
  }

  static CachingCpuAllocator& instance() {
    // Never destroyed: tensors may free their blocks during interpreter shutdown.
    static auto* allocator = new CachingCpuAllocator();
    return *allocator;
  }

 private:
  struct Cached {
    void* ptr;
    std::size_t bytes;
  };

  void* acquire(std::size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    void* p = nullptr;
    auto free_it = free_.find(bytes);
    if (free_it != free_.end() && !free_it->second.empty()) {
      p = free_it->second.back();  // the most recently freed: likeliest still in the CPU cache
      free_it->second.pop_back();
      lru_.erase(cached_at_.at(p));
      cached_at_.erase(p);
      stats_.cached_bytes -= bytes;
      ++stats_.hits;
    } else {
      ++stats_.misses;
      while (!lru_.empty() && stats_.live_bytes + stats_.cached_bytes + bytes > high_water_) {
        evict_oldest();
      }
      p = map(bytes);
    }
    live_[p] = bytes;
    stats_.live_bytes += bytes;
    high_water_ = std::max(high_water_, stats_.live_bytes + stats_.cached_bytes);
    stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.live_bytes + stats_.cached_bytes);
    return p;
  }

  void* map(std::size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {  // the cache may hold what the system lacks
      while (!lru_.empty()) evict_oldest();
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    TORCH_CHECK(p != MAP_FAILED, "dafast CPU allocator: out of memory mapping ", bytes,
                " bytes (", stats_.live_bytes, " bytes in live tensors)");
    return p;
  }

  // The mutex is held. Returns the bytes given back.
  std::size_t evict_oldest() {
    const Cached oldest = lru_.front();
    lru_.pop_front();
    cached_at_.erase(oldest.ptr);
    auto& same_size = free_.at(oldest.bytes);
    same_size.erase(std::find(same_size.begin(), same_size.end(), oldest.ptr));
    munmap(oldest.ptr, oldest.bytes);
    stats_.cached_bytes -= oldest.bytes;
    ++stats_.evictions;
    return oldest.bytes;
  }

  // Returns false if `ptr` is not a block of this allocator.
  bool release(void* ptr) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = live_.find(ptr);
    if (it == live_.end()) return false;
    const std::size_t bytes = it->second;
    live_.erase(it);
    stats_.live_bytes -= bytes;
    if (!enabled_) {  // nothing will ask for it again
      munmap(ptr, bytes);
      return true;
    }
    free_[bytes].push_back(ptr);
    cached_at_[ptr] = lru_.insert(lru_.end(), Cached{ptr, bytes});
    stats_.cached_bytes += bytes;
    return true;
  }

  static void release_block(void* ptr) {
    const bool ours = instance().release(ptr);
    TORCH_INTERNAL_ASSERT(ours, "dafast CPU allocator: freeing a block it does not own");
  }

  static void release_any(void* ptr) {
    if (ptr != nullptr && !instance().release(ptr)) c10::free_cpu(ptr);
  }

  std::mutex mutex_;
  bool enabled_ = false;
  c10::Allocator* previous_ = nullptr;
  std::unordered_map<void*, std::size_t> live_;                       // block -> bytes
  std::unordered_map<std::size_t, std::vector<void*>> free_;          // size class -> cached
  std::list<Cached> lru_;                                             // cached, oldest first
  std::unordered_map<void*, std::list<Cached>::iterator> cached_at_;  // cached -> lru_ entry
  std::size_t high_water_ = 0;  // the most live + cached bytes ever: misses stay below it
  CpuAllocatorStats stats_{};
};

}  // namespace

void cpu_allocator_enable() { CachingCpuAllocator::instance().enable(); }
void cpu_allocator_disable() { CachingCpuAllocator::instance().disable(); }
bool cpu_allocator_enabled() { return CachingCpuAllocator::instance().enabled(); }
void cpu_allocator_empty_cache() { CachingCpuAllocator::instance().empty_cache(); }
CpuAllocatorStats cpu_allocator_stats() { return CachingCpuAllocator::instance().stats(); }
void cpu_allocator_reset_peak() { CachingCpuAllocator::instance().reset_peak(); }
std::size_t cpu_allocator_min_bytes() { return kMinBytes; }

}  // namespace dafast
