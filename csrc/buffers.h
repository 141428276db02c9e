// Working memory of the FFI handlers: aligned float buffers that a thread
// keeps between calls, and the weights the recurrence packs on first use or
// that XLA packed ahead of the call.

#ifndef BANDED_RNN_BUFFERS_H_
#define BANDED_RNN_BUFFERS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "recurrence.h"

namespace banded_rnn {

// The most floats (8 MiB) a thread keeps between calls, per use.
inline constexpr std::size_t kKeptFloats = (std::size_t{8} << 20) / sizeof(float);

// `size` floats, aligned to 64 bytes so that no vector load of packed weights
// spans two cache lines. Up to kKeptFloats they stay with the thread for its
// later calls (fresh memory on every call would cost a page fault per 4 KiB
// touched, 0.9 ms of a 3.7 ms streamed frame); a larger buffer belongs to
// this call only, whose work then dwarfs the faults. `Tag` gives each use
// its own kept buffer.
template <class Tag>
class Buffer {
 public:
  explicit Buffer(std::size_t size) {
    constexpr std::size_t kAlign = 64 / sizeof(float);
    std::vector<float>& storage = size <= kKeptFloats ? Kept() : own_;
    if (storage.size() < size + kAlign) storage.resize(size + kAlign);
    const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
    data_ = storage.data() + (kAlign - address / sizeof(float) % kAlign) % kAlign;
  }
  float* data() const { return data_; }

 private:
  static std::vector<float>& Kept() {
    thread_local std::vector<float> kept;
    return kept;
  }
  std::vector<float> own_;
  float* data_ = nullptr;
};

struct ScratchTag {};
struct PackedTag {};
struct PackedInputTag {};
struct GatesTag {};
struct HiddenTag {};

// Room for `size` floats of packed weights in `blocks` blocks, none packed yet.
template <class Tag = PackedTag>
class PackedWeights {
 public:
  PackedWeights(std::size_t size, std::int64_t blocks)
      : packed_(size),
        state_(new std::atomic<std::uint8_t>[static_cast<std::size_t>(blocks)]()),
        blocks_(blocks) {}

  // Panels for the next group of weights: every block unpacked.
  Panels Reset() {
    for (std::int64_t i = 0; i < blocks_; ++i) state_[i].store(0, std::memory_order_relaxed);
    return Panels{packed_.data(), state_.get()};
  }

 private:
  Buffer<Tag> packed_;
  std::unique_ptr<std::atomic<std::uint8_t>[]> state_;
  std::int64_t blocks_;
};

// Weights packed ahead of the call, by XLA (see banded_rnn/_backends/_packed.py,
// `pack_forward`): every block is ready.
class ReadyPanels {
 public:
  explicit ReadyPanels(std::int64_t blocks)
      : state_(new std::atomic<std::uint8_t>[static_cast<std::size_t>(blocks)]) {
    for (std::int64_t i = 0; i < blocks; ++i) state_[i].store(2, std::memory_order_relaxed);
  }
  // The kernel never writes to panels whose blocks are all ready.
  Panels For(const float* packed) const { return Panels{const_cast<float*>(packed), state_.get()}; }

 private:
  std::unique_ptr<std::atomic<std::uint8_t>[]> state_;
};

}  // namespace banded_rnn

#endif  // BANDED_RNN_BUFFERS_H_
