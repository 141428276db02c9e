#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "dispatch.h"
#include "xla/ffi/api/ffi.h"

namespace banded_rnn {

namespace ffi = xla::ffi;
using std::int64_t;

void RunParallel(ffi::ThreadPool& pool, int workers, int64_t count,
                 const std::function<void(int)>& work) {
  if (workers <= 1 || count <= 1) {
    for (int i = 0; i < count; ++i) work(i);
    return;
  }
  struct Shared {
    std::atomic<int> next{0};
    int count = 0;
    int done = 0;
    std::mutex mutex;
    std::condition_variable finished;
    const std::function<void(int)>* work = nullptr;  // used only while indices remain
  };
  auto shared = std::make_shared<Shared>();
  shared->count = static_cast<int>(count);
  shared->work = &work;
  auto drain = [](Shared& s) {
    for (int i; (i = s.next.fetch_add(1)) < s.count;) {
      (*s.work)(i);
      std::lock_guard<std::mutex> lock(s.mutex);
      if (++s.done == s.count) s.finished.notify_all();
    }
  };
  for (int i = 1; i < std::min<int64_t>(workers, count); ++i) {
    pool.Schedule([shared, drain] { drain(*shared); });
  }
  drain(*shared);
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done == shared->count; });
}

int ThreadsFor(ffi::ThreadPool& pool, int64_t rows, int64_t work, int row_tile) {
  int threads = ThreadSetting();
  if (threads <= 0) threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  const int64_t tiles = (rows + row_tile - 1) / row_tile;
  const int64_t worth = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min({int64_t{threads}, tiles, worth})));
}

}  // namespace banded_rnn
