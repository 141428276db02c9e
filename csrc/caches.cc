#include "caches.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <string>

#if defined(BRNN_X86)
#include <cpuid.h>
#endif

namespace banded_rnn {
namespace {

using std::int64_t;

// "48K", "1024K", "32M" (sysfs's sizes) in bytes; 0 if unreadable.
int64_t ParseSize(const std::string& text) {
  std::size_t end = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &end);
  } catch (...) {
    return 0;
  }
  const char unit = end < text.size() ? text[end] : '\0';
  if (unit == 'K') return value << 10;
  if (unit == 'M') return value << 20;
  if (unit == 'G') return value << 30;
  return value;
}

std::string ReadLine(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// Linux's description of cpu0's caches.
CacheSizes FromSysfs() {
  CacheSizes sizes;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    const std::string level = ReadLine(dir + "/level"), type = ReadLine(dir + "/type");
    if (level.empty()) break;
    if (type != "Data" && type != "Unified") continue;
    const int64_t size = ParseSize(ReadLine(dir + "/size"));
    if (level == "1") sizes.l1d = size;
    if (level == "2") sizes.l2 = size;
    if (level == "3") sizes.l3 = size;
  }
  return sizes;
}

// CPUID's deterministic cache parameters: leaf 4 on Intel, 0x8000001D on AMD
// (the same layout of registers).
CacheSizes FromCpuid() {
  CacheSizes sizes;
#if defined(BRNN_X86)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x8000001Du) {
    __cpuid(0x80000001u, eax, ebx, ecx, edx);
  }
  const bool amd_leaf = (ecx & (1u << 22)) != 0;  // topology extensions
  const unsigned leaf = amd_leaf ? 0x8000001Du : 4u;
  if (!amd_leaf && __get_cpuid_max(0, nullptr) < 4) return sizes;
  for (unsigned sub = 0; sub < 16; ++sub) {
    __cpuid_count(leaf, sub, eax, ebx, ecx, edx);
    const unsigned type = eax & 0x1f, level = (eax >> 5) & 0x7;
    if (type == 0) break;
    if (type != 1 && type != 3) continue;  // data or unified
    const int64_t size = int64_t{(ebx >> 22) + 1} * (((ebx >> 12) & 0x3ff) + 1) *
                         ((ebx & 0xfff) + 1) * (int64_t{ecx} + 1);
    if (level == 1) sizes.l1d = size;
    if (level == 2) sizes.l2 = size;
    if (level == 3) sizes.l3 = size;
  }
#endif
  return sizes;
}

std::atomic<int64_t> g_l1d{0}, g_l2{0}, g_l3{0};  // set by SetCacheSizes; 0: detected

}  // namespace

CacheSizes DetectedCacheSizes() {
  static const CacheSizes detected = [] {
    const CacheSizes sysfs = FromSysfs();
    return sysfs.l2 > 0 ? sysfs : FromCpuid();
  }();
  return detected;
}

CacheSizes PlannedCacheSizes() {
  const CacheSizes set{g_l1d.load(std::memory_order_relaxed), g_l2.load(std::memory_order_relaxed),
                       g_l3.load(std::memory_order_relaxed)};
  if (set.l1d == 0 && set.l2 == 0 && set.l3 == 0) return DetectedCacheSizes();
  return set;
}

void SetCacheSizes(const CacheSizes& sizes) {
  g_l1d.store(sizes.l1d, std::memory_order_relaxed);
  g_l2.store(sizes.l2, std::memory_order_relaxed);
  g_l3.store(sizes.l3, std::memory_order_relaxed);
}

int64_t RowBlock(int64_t rows, int64_t features, int64_t units, int64_t panel_bytes, int passes,
                 int row_tile, int64_t l2) {
  constexpr int64_t kFloat = sizeof(float);
  const int64_t read_bytes = (features + units) * kFloat;  // what every unit block reads
  if (l2 <= 0 || rows * read_bytes + panel_bytes <= l2) return rows;
  // A row of a block also has the c it updates and the h it writes.
  const int64_t row_bytes = read_bytes + 2 * units * kFloat;
  const int64_t fitting = (l2 / 2 - panel_bytes) / row_bytes / row_tile * row_tile;
  const int64_t block = std::max<int64_t>(fitting, 4 * row_tile);
  if (block >= rows) return rows;
  const int64_t blocked = (rows + block - 1) / block * panel_bytes;
  const int64_t unblocked = passes * rows * read_bytes;
  return blocked < unblocked ? block : rows;
}

}  // namespace banded_rnn
