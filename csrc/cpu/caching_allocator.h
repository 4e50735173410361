// dafast's caching allocator for large CPU tensors (see caching_allocator.cpp and
// dafast/memory.py). Bound into Python by ops.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dafast {

// Counters and peak since the allocator was last enabled; live bytes include blocks that
// tensors still hold from earlier.
struct CpuAllocatorStats {
  std::size_t live_bytes;    // large blocks held by tensors
  std::size_t cached_bytes;  // large blocks freed by tensors and kept for reuse
  std::size_t peak_bytes;    // the most live + cached there has been since reset_peak
  std::uint64_t hits;        // large requests served from the cache
  std::uint64_t misses;      // large requests that mapped fresh memory
  std::uint64_t evictions;   // cached blocks returned to the system to make room for a miss
};

// Make the caching allocator torch's CPU allocator (enable) or give the previous one back and
// return every cached block to the system (disable). Both are idempotent.
void cpu_allocator_enable();
void cpu_allocator_disable();
bool cpu_allocator_enabled();
// Return the cached (free) blocks to the system now; the cache then grows no larger than the
// live bytes' new peak.
void cpu_allocator_empty_cache();
CpuAllocatorStats cpu_allocator_stats();
void cpu_allocator_reset_peak();
// Requests of at least this many bytes are cached; smaller ones go to c10::alloc_cpu.
std::size_t cpu_allocator_min_bytes();

}  // namespace dafast
