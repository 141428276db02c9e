// The XLA FFI handlers (handlers.h): the shape checks of each target, and
// each call's work split over groups of weights and then between threads.

#include "handlers.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>

#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"
#include "recurrence.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace banded_rnn {
namespace {

using std::int64_t;

// Runs the forward kernel over every row and unit, split between threads.
// Over several steps, each thread takes a contiguous range of rows and runs
// every step of them with every unit. A single step (a streamed frame) carries
// nothing from step to step, so there the threads split the units instead:
// each reads only its share of the weights, where a split of the rows has
// every thread read all of them (7.2 MB a sub-band frame; NOTES entry 17).
// Either way every row and unit runs the same instructions.
void ForwardOverThreads(ffi::ThreadPool& pool, const IsaBuild& isa, const ForwardArgs& args) {
  const int64_t R = args.rows, H = args.units, blocks = isa.forward_blocks(H);
  const int64_t work = args.time * R * (args.features + H) * 4 * H;
  const bool split_units = args.time == 1 && blocks > 1;
  const int threads =
      split_units ? ThreadsFor(pool, blocks, work, 1) : ThreadsFor(pool, R, work, isa.row_tile);
  SetLastThreads(threads);
  RunParallel(pool, threads, threads, [&](int index) {
    int64_t begin = 0, end = R, first = 0, last = blocks;
    if (split_units) {
      first = blocks * index / threads;
      last = blocks * (index + 1) / threads;
    } else {
      std::tie(begin, end) = RowRange(index, threads, R, isa.row_tile);
    }
    if (begin >= end || first >= last) return;
    Buffer<ScratchTag> scratch(static_cast<std::size_t>(end - begin) * forward_scratch(H));
    const int64_t row_block = ForwardRowBlock(isa, args.features, H, end - begin);
    isa.forward(args, begin, end, first, last, row_block, scratch.data());
  });
}

// ----------------------------------------------------------------- shapes

int64_t Product(ffi::AnyBuffer::Dimensions dims, std::size_t begin, std::size_t end) {
  int64_t product = 1;
  for (std::size_t i = begin; i < end; ++i) product *= dims[i];
  return product;
}

std::string Mismatch(const char* name, int64_t expected, std::size_t received) {
  return std::string(name) + ": expected " + std::to_string(expected) + " elements; received " +
         std::to_string(received);
}

#define BRNN_RETURN_IF_ERROR(expr)       \
  do {                                   \
    ffi::Error error_ = (expr);          \
    if (error_.failure()) return error_; \
  } while (false)

// Groups, units and the checks every target shares: recurrent is [G..., H, 4H].
struct Groups {
  int rank;  // number of group axes
  int64_t count;
  int64_t units;
};

ffi::Error GroupsOf(const ffi::Buffer<ffi::F32>& recurrent, Groups& groups) {
  const auto dims = recurrent.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 1] != 4 * dims[dims.size() - 2]) {
    return ffi::Error::InvalidArgument("recurrent: expected [..., units, 4 * units]");
  }
  const int rank = static_cast<int>(dims.size()) - 2;
  groups = Groups{rank, Product(dims, 0, rank), dims[rank]};
  return ffi::Error::Success();
}

// The sizes of a call: G groups and H units from `recurrent`, then T steps,
// R rows and F features from x [G..., time, rows..., features].
struct CallShape {
  int64_t G, T, R, F, H;
};

ffi::Error ShapeOf(const ffi::Buffer<ffi::F32>& recurrent, const ffi::Buffer<ffi::F32>& x,
                   CallShape& shape) {
  Groups groups{};
  BRNN_RETURN_IF_ERROR(GroupsOf(recurrent, groups));
  const auto dims = x.dimensions();
  if (static_cast<int>(dims.size()) < groups.rank + 2) {
    return ffi::Error::InvalidArgument("x: expected [..., time, rows..., features]");
  }
  shape =
      CallShape{groups.count, dims[groups.rank], Product(dims, groups.rank + 1, dims.size() - 1),
                dims[dims.size() - 1], groups.units};
  return ffi::Error::Success();
}

template <class Buffer>
ffi::Error Expect(const char* name, const Buffer& buffer, int64_t expected, bool may_be_empty) {
  const std::size_t count = buffer.element_count();
  if (static_cast<int64_t>(count) == expected || (may_be_empty && count == 0)) {
    return ffi::Error::Success();
  }
  return ffi::Error::InvalidArgument(Mismatch(name, expected, count));
}

// ----------------------------------------------------------- group arrays

// Group g's part of `first`, an array of groups of `size` elements each; null
// (an array the call does not have) stays null.
template <class T>
T* GroupPart(T* first, int64_t g, int64_t size) {
  return first != nullptr ? first + g * size : nullptr;
}

// A call's arrays, each of which holds G groups of the same size one after
// the other: the pointers are to group 0, null for an array the call does not
// have. ArraysOf fills in the shape and the inputs of both passes, Forward and
// Backward the arrays of their own targets; ForwardGroup(g) and
// BackwardGroup(g) give the recurrence group g's part of every one.
struct GroupArrays {
  CallShape shape{};
  // Inputs of both passes.
  const float* x = nullptr;             // [T, R, F]
  const float* kernel = nullptr;        // [F, 4H]
  const float* recurrent = nullptr;     // [H, 4H]
  const float* h0 = nullptr;            // [R, H]
  const float* c0 = nullptr;            // [R, H]
  const std::uint8_t* valid = nullptr;  // [T, R]
  const float* dropmask = nullptr;      // [R, H]
  // The forward pass's bias and outputs; the backward pass reads hs, cs, acts.
  const float* bias = nullptr;  // [4H]
  float* hs = nullptr;          // [T, R, H]
  float* cs = nullptr;          // [T, R, H]
  float* acts = nullptr;        // [T, R, 4H]
  float* c_final = nullptr;     // [R, H]
  // The backward pass's cotangents and gradients.
  const float* dhs = nullptr;      // [T, R, H]
  const float* dc_last = nullptr;  // [R, H]
  float* dx = nullptr;             // [T, R, F]
  float* dkernel = nullptr;        // [F, 4H]
  float* drecurrent = nullptr;     // [H, 4H]
  float* dbias = nullptr;          // [4H]
  float* dh0 = nullptr;            // [R, H]
  float* dc0 = nullptr;            // [R, H]

  // Group g's arguments of the forward pass, all but the panels and hs's
  // strides.
  ForwardArgs ForwardGroup(int64_t g) const;
  // Group g's arguments of the backward pass, all but the panels and the
  // block of steps (block_begin, step_stride, dgates, h_in). Writes the
  // starting values of what the blocks update: dh0 = 0 and dc0 = dc_last
  // (the running cotangents), and zero weight gradients (they accumulate).
  BackwardArgs BackwardGroup(int64_t g) const;
};

// The fields that ForwardArgs and BackwardArgs share, for group g.
template <class Args>
Args SharedArgs(const GroupArrays& a, int64_t g) {
  const int64_t T = a.shape.T, R = a.shape.R, F = a.shape.F, H = a.shape.H;
  Args args{};
  args.time = T;
  args.rows = R;
  args.features = F;
  args.units = H;
  args.x = GroupPart(a.x, g, T * R * F);
  args.kernel = GroupPart(a.kernel, g, F * 4 * H);
  args.recurrent = GroupPart(a.recurrent, g, H * 4 * H);
  args.h0 = GroupPart(a.h0, g, R * H);
  args.c0 = GroupPart(a.c0, g, R * H);
  args.valid = GroupPart(a.valid, g, T * R);
  args.dropmask = GroupPart(a.dropmask, g, R * H);
  args.hs = GroupPart(a.hs, g, T * R * H);
  args.cs = GroupPart(a.cs, g, T * R * H);
  args.acts = GroupPart(a.acts, g, T * R * 4 * H);
  return args;
}

ForwardArgs GroupArrays::ForwardGroup(int64_t g) const {
  ForwardArgs args = SharedArgs<ForwardArgs>(*this, g);
  args.bias = GroupPart(bias, g, 4 * shape.H);
  args.c_final = GroupPart(c_final, g, shape.R * shape.H);
  return args;
}

BackwardArgs GroupArrays::BackwardGroup(int64_t g) const {
  const int64_t T = shape.T, R = shape.R, F = shape.F, H = shape.H, gates = 4 * H;
  BackwardArgs args = SharedArgs<BackwardArgs>(*this, g);
  args.dhs = GroupPart(dhs, g, T * R * H);
  args.dh = GroupPart(dh0, g, R * H);
  args.dc = GroupPart(dc0, g, R * H);
  std::fill(args.dh, args.dh + R * H, 0.0f);
  const float* dc = GroupPart(dc_last, g, R * H);
  std::copy(dc, dc + R * H, args.dc);
  args.dx = GroupPart(dx, g, T * R * F);
  if (drecurrent != nullptr) {
    args.dkernel = GroupPart(dkernel, g, F * gates);
    args.drecurrent = GroupPart(drecurrent, g, H * gates);
    args.dbias = GroupPart(dbias, g, gates);
    std::fill(args.dkernel, args.dkernel + F * gates, 0.0f);
    std::fill(args.drecurrent, args.drecurrent + H * gates, 0.0f);
    std::fill(args.dbias, args.dbias + gates, 0.0f);
  }
  return args;
}

// The shape of a call and the inputs that both passes read; `valid` and
// `dropmask` are null when empty.
ffi::Error ArraysOf(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& kernel,
                    const ffi::Buffer<ffi::F32>& recurrent, const ffi::Buffer<ffi::F32>& h0,
                    const ffi::Buffer<ffi::F32>& c0, const ffi::Buffer<ffi::PRED>& valid,
                    const ffi::Buffer<ffi::F32>& dropmask, GroupArrays& arrays) {
  BRNN_RETURN_IF_ERROR(ShapeOf(recurrent, x, arrays.shape));
  arrays.x = x.typed_data();
  arrays.kernel = kernel.typed_data();
  arrays.recurrent = recurrent.typed_data();
  arrays.h0 = h0.typed_data();
  arrays.c0 = c0.typed_data();
  arrays.valid = valid.element_count() != 0
                     ? reinterpret_cast<const std::uint8_t*>(valid.typed_data())
                     : nullptr;
  arrays.dropmask = dropmask.element_count() != 0 ? dropmask.typed_data() : nullptr;
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- forward

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::Buffer<ffi::F32> recurrent, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> valid,
                   ffi::Buffer<ffi::F32> dropmask, ffi::Result<ffi::Buffer<ffi::F32>> hs, float* cs,
                   float* acts, float* c_final, const ffi::Buffer<ffi::F32>* prepacked,
                   bool batch_major) {
  GroupArrays arrays;
  BRNN_RETURN_IF_ERROR(ArraysOf(x, kernel, recurrent, h0, c0, valid, dropmask, arrays));
  const int64_t G = arrays.shape.G, T = arrays.shape.T, R = arrays.shape.R, F = arrays.shape.F,
                H = arrays.shape.H;
  BRNN_RETURN_IF_ERROR(Expect("kernel", kernel, G * F * 4 * H, false));
  BRNN_RETURN_IF_ERROR(Expect("bias", bias, G * 4 * H, false));
  BRNN_RETURN_IF_ERROR(Expect("h0", h0, G * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("c0", c0, G * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("valid", valid, G * T * R, true));
  BRNN_RETURN_IF_ERROR(Expect("dropmask", dropmask, G * R * H, true));
  BRNN_RETURN_IF_ERROR(Expect("hs", *hs, G * T * R * H, false));

  const IsaBuild& isa = CurrentIsa();
  CountCall();
  const std::size_t packed_size = isa.forward_packed_size(F, H);
  bool has_prepacked = prepacked != nullptr && prepacked->element_count() != 0;
  if (has_prepacked) {
    // [groups..., blocks, 4 / vectors, 1 + features + units, vectors, width].
    // The last two name the instruction set the weights were laid out for:
    // after a switch to a set with another tile they are not read, and this
    // call packs its own.
    const auto d = prepacked->dimensions();
    const std::size_t n = d.size();
    const int64_t blocks = isa.forward_blocks(H), passes = 4 / isa.tile_vectors;
    const char* const layout =
        "packed: expected [..., blocks, 4 / vectors, 1 + features + units, vectors, width]";
    if (n < 5) {
      return ffi::Error::InvalidArgument(std::string(layout) + "; received rank " +
                                         std::to_string(n));
    }
    if (d[n - 1] != isa.width || d[n - 2] != isa.tile_vectors) {
      has_prepacked = false;
    } else if (d[n - 3] != 1 + F + H || d[n - 4] != passes || d[n - 5] != blocks) {
      return ffi::Error::InvalidArgument(
          std::string(layout) + " = [..., " + std::to_string(blocks) + ", " +
          std::to_string(passes) + ", " + std::to_string(1 + F + H) + ", " +
          std::to_string(isa.tile_vectors) + ", " + std::to_string(isa.width) +
          "]; received [..., " + std::to_string(d[n - 5]) + ", " + std::to_string(d[n - 4]) + ", " +
          std::to_string(d[n - 3]) + ", " + std::to_string(d[n - 2]) + ", " +
          std::to_string(d[n - 1]) + "]");
    } else {
      BRNN_RETURN_IF_ERROR(
          Expect("packed", *prepacked, G * static_cast<int64_t>(packed_size), false));
    }
  }
  PackedWeights packed(has_prepacked ? 0 : packed_size, isa.forward_blocks(H));
  const ReadyPanels ready(has_prepacked ? isa.forward_blocks(H) : 0);
  arrays.bias = bias.typed_data();
  arrays.hs = hs->typed_data();
  arrays.cs = cs;
  arrays.acts = acts;
  arrays.c_final = c_final;
  for (int64_t g = 0; g < G; ++g) {
    ForwardArgs args = arrays.ForwardGroup(g);
    args.panels =
        has_prepacked
            ? ready.For(GroupPart(prepacked->typed_data(), g, static_cast<int64_t>(packed_size)))
            : packed.Reset();
    args.hs_step = batch_major ? H : R * H;
    args.hs_row = batch_major ? T * H : H;
    ForwardOverThreads(pool, isa, args);
  }
  return ffi::Error::Success();
}

ffi::Error ForwardInference(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> recurrent,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> valid,
                            ffi::Buffer<ffi::F32> dropmask, ffi::Buffer<ffi::F32> packed,
                            ffi::Result<ffi::Buffer<ffi::F32>> hs,
                            ffi::Result<ffi::Buffer<ffi::F32>> c_final, bool batch_major) {
  BRNN_RETURN_IF_ERROR(Expect("c_final", *c_final, c0.element_count(), false));
  return Forward(pool, x, kernel, recurrent, bias, h0, c0, valid, dropmask, hs, nullptr, nullptr,
                 c_final->typed_data(), &packed, batch_major);
}

ffi::Error ForwardTraining(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> recurrent,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> valid,
                           ffi::Buffer<ffi::F32> dropmask, ffi::Result<ffi::Buffer<ffi::F32>> hs,
                           ffi::Result<ffi::Buffer<ffi::F32>> cs,
                           ffi::Result<ffi::Buffer<ffi::F32>> acts) {
  BRNN_RETURN_IF_ERROR(Expect("cs", *cs, hs->element_count(), false));
  BRNN_RETURN_IF_ERROR(Expect("acts", *acts, 4 * hs->element_count(), false));
  return Forward(pool, x, kernel, recurrent, bias, h0, c0, valid, dropmask, hs, cs->typed_data(),
                 acts->typed_data(), nullptr, nullptr, /*batch_major=*/false);
}

// --------------------------------------------------------------- backward

// Floats of gate gradients one block of steps keeps (4 MiB): as many steps as
// fit, at least one. Phase one of a block is the recurrence over its steps,
// phase two its share of the weight gradients; the threads part at the end
// of each phase (two hand-overs per block, some microseconds each).
constexpr std::size_t kBlockFloats = (std::size_t{4} << 20) / sizeof(float);

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> recurrent,
                    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h0,
                    ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> c0,
                    ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> dropmask,
                    ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> acts, ffi::Buffer<ffi::F32> dhs,
                    ffi::Buffer<ffi::F32> dc_last, ffi::Result<ffi::Buffer<ffi::F32>> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> dkernel,
                    ffi::Result<ffi::Buffer<ffi::F32>> drecurrent,
                    ffi::Result<ffi::Buffer<ffi::F32>> dbias,
                    ffi::Result<ffi::Buffer<ffi::F32>> dh0,
                    ffi::Result<ffi::Buffer<ffi::F32>> dc0) {
  GroupArrays arrays;
  BRNN_RETURN_IF_ERROR(ArraysOf(x, kernel, recurrent, h0, c0, valid, dropmask, arrays));
  const int64_t G = arrays.shape.G, T = arrays.shape.T, R = arrays.shape.R, F = arrays.shape.F,
                H = arrays.shape.H;
  BRNN_RETURN_IF_ERROR(Expect("kernel", kernel, G * F * 4 * H, false));
  BRNN_RETURN_IF_ERROR(Expect("h0", h0, G * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("hs", hs, G * T * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("c0", c0, G * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("valid", valid, G * T * R, true));
  BRNN_RETURN_IF_ERROR(Expect("dropmask", dropmask, G * R * H, true));
  BRNN_RETURN_IF_ERROR(Expect("cs", cs, G * T * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("acts", acts, G * T * R * 4 * H, false));
  BRNN_RETURN_IF_ERROR(Expect("dhs", dhs, G * T * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("dc_last", dc_last, G * R * H, false));
  // An empty dx, or empty weight gradients, are not computed (drecurrent says
  // which: with no features, dkernel is empty either way).
  BRNN_RETURN_IF_ERROR(Expect("dx", *dx, G * T * R * F, true));
  const bool weights = drecurrent->element_count() != 0;
  BRNN_RETURN_IF_ERROR(Expect("dkernel", *dkernel, weights ? G * F * 4 * H : 0, false));
  BRNN_RETURN_IF_ERROR(Expect("drecurrent", *drecurrent, G * H * 4 * H, true));
  BRNN_RETURN_IF_ERROR(Expect("dbias", *dbias, weights ? G * 4 * H : 0, false));
  BRNN_RETURN_IF_ERROR(Expect("dh0", *dh0, G * R * H, false));
  BRNN_RETURN_IF_ERROR(Expect("dc0", *dc0, G * R * H, false));

  const IsaBuild& isa = CurrentIsa();
  const bool has_dropmask = arrays.dropmask != nullptr;
  const bool inputs = dx->element_count() != 0;
  // Steps per block: with the weight gradients, as many as kBlockFloats of gate
  // gradients hold; without, the whole chunk in one block keeping one step.
  const int64_t gates = 4 * H;
  const int64_t steps =
      weights ? std::clamp<int64_t>(static_cast<int64_t>(kBlockFloats) / (R * gates), 1, T) : T;
  const int64_t kept_steps = weights ? steps : 1;
  // `Buffer`s kept by this (the calling) thread; W floats of slack: the last
  // vector of a row may read past its end (into lanes that are never stored).
  Buffer<GatesTag> dgates_block(static_cast<std::size_t>(kept_steps * R * gates + isa.width));
  Buffer<HiddenTag> h_in_block(weights && has_dropmask ? static_cast<std::size_t>(steps * R * H)
                                                       : 0);
  PackedWeights packed(isa.transposed_packed_size(H, H), isa.transposed_blocks(H));
  PackedWeights<PackedInputTag> packed_inputs(inputs ? isa.transposed_packed_size(F, H) : 0,
                                              isa.transposed_blocks(F));
  const int threads = ThreadsFor(pool, R, T * R * H * gates, isa.row_tile);
  SetLastThreads(threads);
  const int64_t column_blocks = (gates + isa.column_block - 1) / isa.column_block;
  arrays.hs = hs.typed_data();
  arrays.cs = cs.typed_data();
  arrays.acts = acts.typed_data();
  arrays.dhs = dhs.typed_data();
  arrays.dc_last = dc_last.typed_data();
  arrays.dx = inputs ? dx->typed_data() : nullptr;
  if (weights) {
    arrays.dkernel = dkernel->typed_data();
    arrays.drecurrent = drecurrent->typed_data();
    arrays.dbias = dbias->typed_data();
  }
  arrays.dh0 = dh0->typed_data();
  arrays.dc0 = dc0->typed_data();
  for (int64_t g = 0; g < G; ++g) {
    BackwardArgs args = arrays.BackwardGroup(g);
    args.panels = packed.Reset();
    args.input_panels = packed_inputs.Reset();
    args.step_stride = weights ? R * gates : 0;
    args.dgates = dgates_block.data();
    args.h_in = weights && has_dropmask ? h_in_block.data() : nullptr;
    for (int64_t t_end = T; t_end > 0;) {
      const int64_t t_begin = std::max<int64_t>(0, t_end - steps);
      args.block_begin = weights ? t_begin : 0;
      RunParallel(pool, threads, threads, [&](int index) {
        const auto [begin, end] = RowRange(index, threads, R, isa.row_tile);
        if (begin >= end) return;
        Buffer<ScratchTag> scratch(static_cast<std::size_t>(end - begin) * backward_scratch(H));
        isa.backward(args, t_begin, t_end, begin, end, scratch.data());
      });
      if (weights) {
        // Contiguous column ranges: each reads the block's x and h once.
        const int parts = static_cast<int>(std::min<int64_t>(threads, column_blocks));
        RunParallel(pool, parts, parts, [&](int index) {
          const int64_t begin = column_blocks * index / parts * isa.column_block;
          const int64_t end =
              std::min(gates, column_blocks * (index + 1) / parts * isa.column_block);
          isa.weight_gradients(args, t_begin, t_end, begin, end);
        });
      }
      t_end = t_begin;
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace banded_rnn

#define BRNN_FORWARD_ARGS                          \
  Ctx<ffi::ThreadPool>()                           \
      .Arg<ffi::Buffer<ffi::F32>>()  /*x*/         \
      .Arg<ffi::Buffer<ffi::F32>>()  /*kernel*/    \
      .Arg<ffi::Buffer<ffi::F32>>()  /*recurrent*/ \
      .Arg<ffi::Buffer<ffi::F32>>()  /*bias*/      \
      .Arg<ffi::Buffer<ffi::F32>>()  /*h0*/        \
      .Arg<ffi::Buffer<ffi::F32>>()  /*c0*/        \
      .Arg<ffi::Buffer<ffi::PRED>>() /*valid*/     \
      .Arg<ffi::Buffer<ffi::F32>>()  /*dropmask*/

XLA_FFI_DEFINE_HANDLER_SYMBOL(BandedRnnLstmForward, banded_rnn::ForwardInference,
                              ffi::Ffi::Bind()
                                  .BRNN_FORWARD_ARGS
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_final
                                  .Attr<bool>("batch_major"));   // hs [..., rows..., time, units]

XLA_FFI_DEFINE_HANDLER_SYMBOL(BandedRnnLstmForwardTrain, banded_rnn::ForwardTraining,
                              ffi::Ffi::Bind()
                                  .BRNN_FORWARD_ARGS
                                  .Ret<ffi::Buffer<ffi::F32>>()    // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()    // cs
                                  .Ret<ffi::Buffer<ffi::F32>>());  // acts

XLA_FFI_DEFINE_HANDLER_SYMBOL(BandedRnnLstmBackward, banded_rnn::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // recurrent
                                  .Arg<ffi::Buffer<ffi::F32>>()    // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()    // hs
                                  .Arg<ffi::Buffer<ffi::F32>>()    // c0
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // valid
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dropmask
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()    // acts
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dhs
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dc_last
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dx, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dkernel, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()    // drecurrent, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dbias, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dc0
