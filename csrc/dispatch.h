// The instruction-set builds of the recurrence that this CPU can run and the
// one that calls run with, the thread setting, and the counters the Python
// module reports.

#ifndef BANDED_RNN_DISPATCH_H_
#define BANDED_RNN_DISPATCH_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "recurrence.h"

namespace banded_rnn {

// The builds this CPU can run, fastest first; the portable build is last.
const std::vector<const IsaBuild*>& SupportedIsas();

// The supported build called `name`, or null.
const IsaBuild* FindIsa(std::string_view name);

// The build that calls run with: the last one set, else the fastest.
const IsaBuild& CurrentIsa();
void SetIsa(const IsaBuild& isa);

// The most threads one call uses; 0: as many as XLA's intra-op pool has.
int ThreadSetting();
void SetThreadSetting(int threads);

// The threads the last call used.
int LastThreads();
void SetLastThreads(int threads);

// Rows per L2 block of `isa`'s forward over `rows` rows (one thread's share)
// with `features` inputs and `units` units, for the cache sizes planned with
// (caches.h).
std::int64_t ForwardRowBlock(const IsaBuild& isa, std::int64_t features, std::int64_t units,
                             std::int64_t rows);

// Forward calls so far in this process.
std::int64_t Calls();
void CountCall();

}  // namespace banded_rnn

#endif  // BANDED_RNN_DISPATCH_H_
