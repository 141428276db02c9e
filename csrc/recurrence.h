// The LSTM recurrence over one chunk of time, for a range of independent rows
// (sequence, band): the interface between the instruction-set builds of
// recurrence.cc and the XLA FFI handlers in handlers.cc.
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
//   dgates   [steps, rows, 4 * units]    the gradient of the gate pre-activations,
//                                        one block of steps at a time
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
  // Floats between hs's steps and between its rows: rows * units and units
  // time-major (as the layout above); units and time * units batch-major,
  // [rows, time, units], which an inference call may ask for.
  std::int64_t hs_step, hs_row;
  float* cs;       // null in inference
  float* acts;     // null in inference
  float* c_final;  // [rows, units]: the running c in inference; null in training
};

// The backward pass runs in blocks of steps, from the last block to the first.
// For each block, `backward` walks its steps in reverse for a range of rows
// and leaves each step's gate gradients in `dgates`; then `weight_gradients`
// adds the block's share of dW, dU and db for a range of their columns:
// `[x_t, h_{t-1}]^T @ dgates_t` over the block's steps and every row, the
// kernel's own GEMM, so the gate gradients never leave a buffer that is
// reused from block to block (benchmarks/NOTES.md entry 16). Every column is
// summed in the same order whichever thread computes it.
struct BackwardArgs {
  std::int64_t time, rows, features, units;
  const float* recurrent;
  Panels panels;        // recurrent^T
  const float* kernel;  // for dx
  Panels input_panels;  // kernel^T, when dx is wanted
  const float* x;       // [time, rows, features], when the weight gradients are wanted
  const float* h0;      // [rows, units]
  const float* hs;      // [time, rows, units]
  const float* c0;
  const std::uint8_t* valid;
  const float* dropmask;
  const float* cs;
  const float* acts;
  const float* dhs;  // [time, rows, units]: the cotangent of hs
  // The cotangents of h and c before the steps walked so far ([rows, units]):
  // the cotangent of the final c at first, dh0 and dc0 at the end.
  float* dh;
  float* dc;
  // The block being walked starts at step `block_begin`. Its gate gradients:
  // step t, row r at dgates + (t - block_begin) * step_stride + r * 4 * units
  // (step_stride 0: only the step being walked is kept, when no weight
  // gradient is wanted).
  std::int64_t block_begin;
  std::int64_t step_stride;
  float* dgates;
  float* h_in;        // [block steps, rows, units]: h_{t-1} * dropmask, when both
                      // the weight gradients and dropout are on; else null
  float* dx;          // [time, rows, features], or null
  float* dkernel;     // [features, 4 * units], accumulated; null: no weight gradients
  float* drecurrent;  // [units, 4 * units], accumulated
  float* dbias;       // [4 * units], accumulated
};

// One instruction set's build of the recurrence: its vector width and tile,
// and its functions.
struct IsaBuild {
  const char* name;
  int width;         // floats per vector
  int row_tile;      // rows per microkernel tile
  int tile_vectors;  // vectors per microkernel tile: gates per pass of the forward
  // Blocks and floats of packed weights: forward, and the transposed layout
  // of dh = dgates @ recurrent^T (count = units) and dx = dgates @ kernel^T
  // (count = features).
  std::int64_t (*forward_blocks)(std::int64_t units);
  std::size_t (*forward_packed_size)(std::int64_t features, std::int64_t units);
  std::int64_t (*transposed_blocks)(std::int64_t count);
  std::size_t (*transposed_packed_size)(std::int64_t count, std::int64_t units);
  // Rows [begin, end) and the units of forward blocks [block_begin,
  // block_end) over every time step, `row_block` rows at a time (each row
  // block with every unit block before the next: dispatch.h's
  // ForwardRowBlock). `scratch` holds forward_scratch(units) floats per row.
  // A call that runs more than one step needs every block (each step reads
  // the whole h of the step before).
  void (*forward)(const ForwardArgs& args, std::int64_t begin, std::int64_t end,
                  std::int64_t block_begin, std::int64_t block_end, std::int64_t row_block,
                  float* scratch);
  // Steps [t_begin, t_end) of the block at args.block_begin, last first, for
  // rows [begin, end). `scratch` holds backward_scratch(units) floats per row.
  void (*backward)(const BackwardArgs& args, std::int64_t t_begin, std::int64_t t_end,
                   std::int64_t begin, std::int64_t end, float* scratch);
  // The weight gradients' columns [column_begin, column_end) (of 4 * units),
  // accumulated over steps [t_begin, t_end) = the whole block.
  void (*weight_gradients)(const BackwardArgs& args, std::int64_t t_begin, std::int64_t t_end,
                           std::int64_t column_begin, std::int64_t column_end);
  // Columns per unit of weight_gradients' work (a multiple of the vector width).
  int column_block;
};

inline std::size_t forward_scratch(std::int64_t units) { return units; }
inline std::size_t backward_scratch(std::int64_t units) { return units; }

// Defined in the instruction-set builds; the AVX builds exist only on x86-64.
extern const IsaBuild* const kAvx512;
extern const IsaBuild* const kAvx2;
extern const IsaBuild* const kPortable;

}  // namespace banded_rnn

#endif  // BANDED_RNN_RECURRENCE_H_
