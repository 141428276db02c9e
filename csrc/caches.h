// The data caches of the CPU the kernel runs on, read once at run time, and
// the blocking of a forward call planned from them.

#ifndef BANDED_RNN_CACHES_H_
#define BANDED_RNN_CACHES_H_

#include <cstdint>

namespace banded_rnn {

// Bytes of each level's data cache as one core sees it (L3: the whole cache,
// shared); 0 where it is not known.
struct CacheSizes {
  std::int64_t l1d = 0, l2 = 0, l3 = 0;
};

// The sizes blocking plans with: those set by SetCacheSizes, else those the
// CPU reports (Linux's /sys/devices/system/cpu/cpu0/cache, else CPUID leaf 4
// on Intel or 0x8000001D on AMD), else zeros.
CacheSizes PlannedCacheSizes();

// What the CPU reports, whatever is set.
CacheSizes DetectedCacheSizes();

// Plans with `sizes` from now on; all zeros returns to the detected ones.
void SetCacheSizes(const CacheSizes& sizes);

// Rows per L2 block of a forward call over `rows` rows (one thread's), with
// `features` inputs, `units` units, unit blocks of `panel_bytes` of packed
// weights and `passes` passes over a row's inputs per unit block.
//
// Every unit block reads every row's inputs and hidden state (`passes`
// times), and a row block reads every unit block's weights once. Unblocked,
// the rows' inputs come from L2 if they fit there with a panel, else from L3
// for every unit block; blocked, a block's rows stay in L2
// (half of it, with a panel and the state they update) and the panels come
// from L3 once per row block. The plan takes the blocking (whole tiles of
// `row_tile` rows, at least four) only when its L3 traffic per unit block,
// ceil(rows / block) * panel_bytes, is below the unblocked rows' `passes *
// rows * (features + units)` floats: all the rows when L2 is not known (0),
// when they fit, or when blocking would read more.
std::int64_t RowBlock(std::int64_t rows, std::int64_t features, std::int64_t units,
                      std::int64_t panel_bytes, int passes, int row_tile, std::int64_t l2);

}  // namespace banded_rnn

#endif  // BANDED_RNN_CACHES_H_
