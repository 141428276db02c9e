#include "dispatch.h"

#include <atomic>
#include <cstdint>
#include <string_view>
#include <vector>

#include "caches.h"
#include "recurrence.h"

namespace banded_rnn {
namespace {

std::vector<const IsaBuild*> DetectIsas() {
  std::vector<const IsaBuild*> isas;
#if defined(BRNN_X86)
  __builtin_cpu_init();
  // GCC reports a feature only when the OS also saves its registers. The
  // AVX-512 build is compiled for F, VL, DQ and BW (every AVX-512 CPU since
  // Skylake-SP has them all), and with AVX2 and FMA.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
    isas.push_back(kAvx512);
  }
  if (avx2) isas.push_back(kAvx2);
#endif
  isas.push_back(kPortable);
  return isas;
}

// Each setting and counter stands alone: no other memory is published
// through it, so relaxed loads and stores are enough.
std::atomic<const IsaBuild*> g_isa{nullptr};  // null: the fastest supported
std::atomic<int> g_threads{0};
std::atomic<int> g_last_threads{0};
std::atomic<std::int64_t> g_calls{0};

}  // namespace

const std::vector<const IsaBuild*>& SupportedIsas() {
  static const std::vector<const IsaBuild*> isas = DetectIsas();
  return isas;
}

const IsaBuild* FindIsa(std::string_view name) {
  for (const IsaBuild* isa : SupportedIsas()) {
    if (name == isa->name) return isa;
  }
  return nullptr;
}

const IsaBuild& CurrentIsa() {
  const IsaBuild* isa = g_isa.load(std::memory_order_relaxed);
  return isa != nullptr ? *isa : *SupportedIsas().front();
}

void SetIsa(const IsaBuild& isa) { g_isa.store(&isa, std::memory_order_relaxed); }

int ThreadSetting() { return g_threads.load(std::memory_order_relaxed); }

void SetThreadSetting(int threads) { g_threads.store(threads, std::memory_order_relaxed); }

int LastThreads() { return g_last_threads.load(std::memory_order_relaxed); }

void SetLastThreads(int threads) { g_last_threads.store(threads, std::memory_order_relaxed); }

std::int64_t ForwardRowBlock(const IsaBuild& isa, std::int64_t features, std::int64_t units,
                             std::int64_t rows) {
  const std::int64_t panel_bytes = static_cast<std::int64_t>(
      isa.forward_packed_size(features, units) * sizeof(float) / isa.forward_blocks(units));
  return RowBlock(rows, features, units, panel_bytes, 4 / isa.tile_vectors, isa.row_tile,
                  PlannedCacheSizes().l2);
}

std::int64_t Calls() { return g_calls.load(std::memory_order_relaxed); }

void CountCall() { g_calls.fetch_add(1, std::memory_order_relaxed); }

}  // namespace banded_rnn
