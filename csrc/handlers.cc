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
  const int threads = split_units ? ThreadsFor(pool, blocks, work, 1)
                                  : ThreadsFor(pool, R, work, isa.row_tile);
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
    isa.forward(args, begin, end, first, last, scratch.data());
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

#define BRNN_RETURN_IF_ERROR(expr)          \
  do {                                      \
    ffi::Error error_ = (expr);             \
    if (error_.failure()) return error_;    \
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

// The axes of a call: G groups and H units from `recurrent`, then T steps, R
// rows and the last axis of `sequence` [G..., time, rows..., last].
struct Layout {
  int64_t G, H, T, R, last;
};

ffi::Error LayoutOf(const ffi::Buffer<ffi::F32>& recurrent, const ffi::Buffer<ffi::F32>& sequence,
                    const char* expected, Layout& layout) {
  Groups groups{};
  BRNN_RETURN_IF_ERROR(GroupsOf(recurrent, groups));
  const auto dims = sequence.dimensions();
  if (static_cast<int>(dims.size()) < groups.rank + 2) {
    return ffi::Error::InvalidArgument(expected);
  }
  layout = Layout{groups.count, groups.units, dims[groups.rank],
                  Product(dims, groups.rank + 1, dims.size() - 1), dims[dims.size() - 1]};
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

// ---------------------------------------------------------------- forward

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::Buffer<ffi::F32> recurrent, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                   ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> dropmask,
                   ffi::Result<ffi::Buffer<ffi::F32>> hs, float* cs, float* acts,
                   float* c_final, const ffi::Buffer<ffi::F32>* prepacked, bool batch_major) {
  Layout layout{};
  BRNN_RETURN_IF_ERROR(
      LayoutOf(recurrent, x, "x: expected [..., time, rows..., features]", layout));
  const int64_t G = layout.G, H = layout.H, T = layout.T, R = layout.R, F = layout.last;
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
    // [groups..., blocks, 1 + features + units, 4, width]. The width names the
    // instruction set the weights were laid out for: after a switch to a set of
    // another width they are not read, and this call packs its own.
    const auto d = prepacked->dimensions();
    const std::size_t n = d.size();
    const int64_t blocks = isa.forward_blocks(H);
    if (n < 4) {
      return ffi::Error::InvalidArgument(
          "packed: expected [..., blocks, 1 + features + units, 4, width]; received rank " +
          std::to_string(n));
    }
    if (d[n - 1] != isa.width) {
      has_prepacked = false;
    } else if (d[n - 2] != 4 || d[n - 3] != 1 + F + H || d[n - 4] != blocks) {
      return ffi::Error::InvalidArgument(
          "packed: expected [..., blocks, 1 + features + units, 4, width] = [..., " +
          std::to_string(blocks) + ", " + std::to_string(1 + F + H) + ", 4, " +
          std::to_string(isa.width) + "]; received [..., " + std::to_string(d[n - 4]) + ", " +
          std::to_string(d[n - 3]) + ", " + std::to_string(d[n - 2]) + ", " +
          std::to_string(d[n - 1]) + "]");
    } else {
      BRNN_RETURN_IF_ERROR(
          Expect("packed", *prepacked, G * static_cast<int64_t>(packed_size), false));
    }
  }
  PackedWeights packed(has_prepacked ? 0 : packed_size, isa.forward_blocks(H));
  const ReadyPanels ready(has_prepacked ? isa.forward_blocks(H) : 0);
  const bool has_valid = valid.element_count() != 0, has_dropmask = dropmask.element_count() != 0;
  for (int64_t g = 0; g < G; ++g) {
    ForwardArgs args{};
    args.time = T;
    args.rows = R;
    args.features = F;
    args.units = H;
    args.x = x.typed_data() + g * T * R * F;
    args.kernel = kernel.typed_data() + g * F * 4 * H;
    args.recurrent = recurrent.typed_data() + g * H * 4 * H;
    args.bias = bias.typed_data() + g * 4 * H;
    args.panels = has_prepacked ? ready.For(prepacked->typed_data() + g * packed_size)
                                : packed.Reset();
    args.h0 = h0.typed_data() + g * R * H;
    args.c0 = c0.typed_data() + g * R * H;
    args.valid = has_valid ? reinterpret_cast<const std::uint8_t*>(valid.typed_data()) + g * T * R
                           : nullptr;
    args.dropmask = has_dropmask ? dropmask.typed_data() + g * R * H : nullptr;
    args.hs = hs->typed_data() + g * T * R * H;
    args.hs_step = batch_major ? H : R * H;
    args.hs_row = batch_major ? T * H : H;
    args.cs = cs != nullptr ? cs + g * T * R * H : nullptr;
    args.acts = acts != nullptr ? acts + g * T * R * 4 * H : nullptr;
    args.c_final = c_final != nullptr ? c_final + g * R * H : nullptr;
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
                    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> c0,
                    ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> dropmask,
                    ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> acts,
                    ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dc_last,
                    ffi::Result<ffi::Buffer<ffi::F32>> dx, ffi::Result<ffi::Buffer<ffi::F32>> dkernel,
                    ffi::Result<ffi::Buffer<ffi::F32>> drecurrent,
                    ffi::Result<ffi::Buffer<ffi::F32>> dbias, ffi::Result<ffi::Buffer<ffi::F32>> dh0,
                    ffi::Result<ffi::Buffer<ffi::F32>> dc0) {
  Layout layout{};
  BRNN_RETURN_IF_ERROR(
      LayoutOf(recurrent, x, "x: expected [..., time, rows..., features]", layout));
  const int64_t G = layout.G, H = layout.H, T = layout.T, R = layout.R, F = layout.last;
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
  const bool has_valid = valid.element_count() != 0, has_dropmask = dropmask.element_count() != 0;
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
  Buffer<HiddenTag> h_in_block(
      weights && has_dropmask ? static_cast<std::size_t>(steps * R * H) : 0);
  PackedWeights packed(isa.transposed_packed_size(H, H), isa.transposed_blocks(H));
  PackedWeights<PackedInputTag> packed_inputs(inputs ? isa.transposed_packed_size(F, H) : 0,
                              isa.transposed_blocks(F));
  const int threads = ThreadsFor(pool, R, T * R * H * gates, isa.row_tile);
  SetLastThreads(threads);
  const int64_t column_blocks = (gates + isa.column_block - 1) / isa.column_block;
  for (int64_t g = 0; g < G; ++g) {
    BackwardArgs args{};
    args.time = T;
    args.rows = R;
    args.features = F;
    args.units = H;
    args.recurrent = recurrent.typed_data() + g * H * gates;
    args.panels = packed.Reset();
    args.kernel = kernel.typed_data() + g * F * gates;
    args.input_panels = packed_inputs.Reset();
    args.x = x.typed_data() + g * T * R * F;
    args.h0 = h0.typed_data() + g * R * H;
    args.hs = hs.typed_data() + g * T * R * H;
    args.c0 = c0.typed_data() + g * R * H;
    args.valid = has_valid ? reinterpret_cast<const std::uint8_t*>(valid.typed_data()) + g * T * R
                           : nullptr;
    args.dropmask = has_dropmask ? dropmask.typed_data() + g * R * H : nullptr;
    args.cs = cs.typed_data() + g * T * R * H;
    args.acts = acts.typed_data() + g * T * R * gates;
    args.dhs = dhs.typed_data() + g * T * R * H;
    args.dh = dh0->typed_data() + g * R * H;
    args.dc = dc0->typed_data() + g * R * H;
    std::fill(args.dh, args.dh + R * H, 0.0f);
    std::copy(dc_last.typed_data() + g * R * H, dc_last.typed_data() + (g + 1) * R * H, args.dc);
    args.step_stride = weights ? R * gates : 0;
    args.dgates = dgates_block.data();
    args.h_in = weights && has_dropmask ? h_in_block.data() : nullptr;
    args.dx = inputs ? dx->typed_data() + g * T * R * F : nullptr;
    if (weights) {
      args.dkernel = dkernel->typed_data() + g * F * gates;
      args.drecurrent = drecurrent->typed_data() + g * H * gates;
      args.dbias = dbias->typed_data() + g * gates;
      std::fill(args.dkernel, args.dkernel + F * gates, 0.0f);
      std::fill(args.drecurrent, args.drecurrent + H * gates, 0.0f);
      std::fill(args.dbias, args.dbias + gates, 0.0f);
    }
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
          const int64_t end = std::min(gates, column_blocks * (index + 1) / parts * isa.column_block);
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

#define BRNN_FORWARD_ARGS                   \
  Ctx<ffi::ThreadPool>()                    \
      .Arg<ffi::Buffer<ffi::F32>>() /*x*/   \
      .Arg<ffi::Buffer<ffi::F32>>() /*kernel*/ \
      .Arg<ffi::Buffer<ffi::F32>>() /*recurrent*/ \
      .Arg<ffi::Buffer<ffi::F32>>() /*bias*/ \
      .Arg<ffi::Buffer<ffi::F32>>() /*h0*/  \
      .Arg<ffi::Buffer<ffi::F32>>() /*c0*/  \
      .Arg<ffi::Buffer<ffi::PRED>>() /*valid*/ \
      .Arg<ffi::Buffer<ffi::F32>>() /*dropmask*/

XLA_FFI_DEFINE_HANDLER_SYMBOL(BandedRnnLstmForward, banded_rnn::ForwardInference,
                              ffi::Ffi::Bind()
                                  .BRNN_FORWARD_ARGS
                                  .Arg<ffi::Buffer<ffi::F32>>()   // packed, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c_final
                                  .Attr<bool>("batch_major"));    // hs [..., rows..., time, units]

XLA_FFI_DEFINE_HANDLER_SYMBOL(BandedRnnLstmForwardTrain, banded_rnn::ForwardTraining,
                              ffi::Ffi::Bind()
                                  .BRNN_FORWARD_ARGS
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cs
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
