// Splitting a call's work between the calling thread and XLA's intra-op
// thread pool.
//
// Rows are independent, so each call splits them into contiguous ranges, one
// per thread, and every thread runs every time step of its rows with no
// synchronisation until the end (a one-step call splits the units instead):
// the calling thread takes a range itself, the others go to XLA's intra-op
// thread pool.

#ifndef BANDED_RNN_PARALLEL_H_
#define BANDED_RNN_PARALLEL_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace banded_rnn {

// Runs work(i) for i in [0, count): the calling thread and up to workers - 1
// pool threads claim indices until none is left. The caller then waits only
// for indices already claimed, which are running, so a pool thread that
// starts late (or never, on a busy pool) cannot hold it up.
void RunParallel(xla::ffi::ThreadPool& pool, int workers, std::int64_t count,
                 const std::function<void(int)>& work);

// A thread's share below this many multiply-adds costs more to hand over
// than it saves (a pool task starts in a few microseconds).
inline constexpr std::int64_t kMinWorkPerThread = 1 << 18;

// The threads for `work` multiply-adds over `rows` rows in tiles of
// `row_tile`: the thread setting (0: the pool's size), at most one per tile
// and one per kMinWorkPerThread, at least one.
int ThreadsFor(xla::ffi::ThreadPool& pool, std::int64_t rows, std::int64_t work, int row_tile);

// Rows [begin, end) of thread `index` out of `threads`: contiguous whole tiles.
inline std::pair<std::int64_t, std::int64_t> RowRange(int index, int threads, std::int64_t rows,
                                                      int row_tile) {
  const std::int64_t tiles = (rows + row_tile - 1) / row_tile;
  const std::int64_t begin = tiles * index / threads * row_tile;
  const std::int64_t end = std::min(rows, tiles * (index + 1) / threads * row_tile);
  return {begin, end};
}

}  // namespace banded_rnn

#endif  // BANDED_RNN_PARALLEL_H_
