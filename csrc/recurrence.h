// The LSTM recurrence over one chunk of time, for a range of independent rows
// (sequence, band): the interface between the instruction-set builds of
// recurrence.cc and the XLA FFI handlers in ffi.cc.
//
// Layouts (row-major, time-major, as the Python side passes them):
//   x        [time, rows, features]      the layer's inputs
//   kernel   [features, 4 * units]       Keras's layout: gates i, f, g, o side by side
//   recurrent[units, 4 * units]
//   bias     [4 * units]
//   h0, c0   [rows, units]               the state before the chunk
//   valid    [time, rows] bytes          0: the step leaves the row's state as it was
//   dropmask [rows, units]               multiplies h before the recurrent kernel
//   hs       [time, rows, units]         the carried h after every step
//   cs       [time, rows, units]         the carried c after every step (training)
//   acts     [time, rows, 4 * units]     sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) (training)
//   dgates   [time, rows, 4 * units]     the gradient of the gate pre-activations
//
// Every row runs the same instructions in the same order whichever tile,
// thread or chunk it falls in, so results do not depend on the number of
// threads nor on how a sequence is cut into chunks.
//
// The weights are packed once per call, block by block of units, by the
// threads themselves: the first thread to need a block packs it (each thread
// starts at a different block), the others wait for that block only.

#ifndef BANDED_RNN_RECURRENCE_H_
#define BANDED_RNN_RECURRENCE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace banded_rnn {

// Weights packed on first use: `packed` has room for every block, and
// `state[block]` is 0 (not packed), 1 (being packed) or 2 (ready).
struct Panels {
  float* packed;
  std::atomic<std::uint8_t>* state;
};

struct ForwardArgs {
  std::int64_t time, rows, features, units;
  const float* x;
  const float* kernel;
  const float* recurrent;
  const float* bias;
  Panels panels;
  const float* h0;
  const float* c0;
  const std::uint8_t* valid;  // null: every step is valid
  const float* dropmask;      // null: no recurrent dropout
  float* hs;
  float* cs;       // null in inference
  float* acts;     // null in inference
  float* c_final;  // [rows, units]: the running c in inference; null in training
};

struct BackwardArgs {
  std::int64_t time, rows, units;
  const float* recurrent;
  Panels panels;
  const float* c0;
  const std::uint8_t* valid;
  const float* dropmask;
  const float* cs;
  const float* acts;
  const float* dhs;      // [time, rows, units]: the cotangent of hs
  const float* dc_last;  // [rows, units]: the cotangent of the final c
  float* dgates;
  float* dh0;
  float* dc0;
};

// One instruction set's build of the kernel.
struct Kernel {
  const char* name;
  int width;     // floats per vector
  int row_tile;  // rows per microkernel tile
  // Blocks and floats of packed weights for forward / backward.
  std::int64_t (*forward_blocks)(std::int64_t units);
  std::size_t (*forward_packed_size)(std::int64_t features, std::int64_t units);
  std::int64_t (*backward_blocks)(std::int64_t units);
  std::size_t (*backward_packed_size)(std::int64_t units);
  // Rows [begin, end) over every time step. `scratch` holds
  // forward_scratch(units) / backward_scratch(units) floats per row.
  void (*forward)(const ForwardArgs& args, std::int64_t begin, std::int64_t end, float* scratch);
  void (*backward)(const BackwardArgs& args, std::int64_t begin, std::int64_t end,
                   float* scratch);
};

inline std::size_t forward_scratch(std::int64_t units) { return units; }
inline std::size_t backward_scratch(std::int64_t units) { return 3 * units; }

// Defined in the instruction-set builds; null where this build has none.
extern const Kernel* const kAvx512Kernel;
extern const Kernel* const kAvx2Kernel;
extern const Kernel* const kPortableKernel;

}  // namespace banded_rnn

#endif  // BANDED_RNN_RECURRENCE_H_
