// The LSTM recurrence (recurrence.h), compiled once per instruction set:
// CMake builds this file with BRNN_ISA=3 (AVX-512), 2 (AVX2 + FMA) and 1
// (portable), each into its own namespace, and ffi.cc picks one at run time.
//
// Per time step and row the four gate pre-activations of `width` units are
// summed in registers, `bias + x_t @ kernel + h @ recurrent_kernel`, by a
// microkernel over a tile of `kRowTile` rows whose weights are packed once
// per call (block by block, on first use) so that each k reads four
// consecutive vectors; the gate maths and
// the state update follow in the same registers. Nothing is written per step
// but the outputs.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>

#if BRNN_ISA >= 2
#include <immintrin.h>
#endif

#include "recurrence.h"

#ifndef BRNN_ISA
#error "BRNN_ISA must be 1, 2 or 3"
#endif

#if BRNN_ISA == 3
#define BRNN_NAMESPACE avx512
#define BRNN_NAME "avx512"
#elif BRNN_ISA == 2
#define BRNN_NAMESPACE avx2
#define BRNN_NAME "avx2"
#else
#define BRNN_NAMESPACE portable
#define BRNN_NAME "portable"
#endif

namespace banded_rnn {
namespace BRNN_NAMESPACE {
namespace {

#include "simd.h"  // its system headers are already included above

constexpr int W = kWidth;
constexpr int kGates = 4;
// Rows per tile: the tile keeps kRowTile * 4 accumulators in registers
// (32 vector registers with AVX-512, 16 otherwise).
constexpr int kRowTile = BRNN_ISA == 3 ? 6 : 2;

using std::int64_t;

int64_t blocks(int64_t units, int64_t per_block) { return (units + per_block - 1) / per_block; }

// Calls f(std::integral_constant<int, m>) for 1 <= m <= M.
template <int M, class F>
void with_rows(int m, F&& f) {
  if constexpr (M >= 1) {
    if (m == M) {
      f(std::integral_constant<int, M>{});
    } else {
      with_rows<M - 1>(m, f);
    }
  }
}

// Runs tile(integral_constant<int, m>, row) over [begin, end) in tiles of
// kRowTile rows and one shorter tile.
template <class F>
void over_tiles(int64_t begin, int64_t end, F&& tile) {
  int64_t row = begin;
  for (; row + kRowTile <= end; row += kRowTile) {
    tile(std::integral_constant<int, kRowTile>{}, row);
  }
  if (row < end) {
    with_rows<kRowTile - 1>(static_cast<int>(end - row), [&](auto m) { tile(m, row); });
  }
}

// acc[m][v] += sum_k rows[m][k] * panel[k][v]: the panel holds `depth`
// k-rows of 4 consecutive vectors.
template <int M>
inline void multiply_add(Vec (&acc)[M][kGates], const float* const (&rows)[M], int64_t depth,
                         const float* panel) {
  for (int64_t k = 0; k < depth; ++k, panel += kGates * W) {
    const Vec b0 = load(panel), b1 = load(panel + W), b2 = load(panel + 2 * W),
              b3 = load(panel + 3 * W);
    for (int m = 0; m < M; ++m) {
      const Vec a = splat(rows[m][k]);
      acc[m][0] = fma(a, b0, acc[m][0]);
      acc[m][1] = fma(a, b1, acc[m][1]);
      acc[m][2] = fma(a, b2, acc[m][2]);
      acc[m][3] = fma(a, b3, acc[m][3]);
    }
  }
}

inline Vec load_units(const float* p, int n) { return n == W ? load(p) : load_n(p, n); }

// Block `block` of the packed weights, of `size` floats: packed by
// pack(panel) if no thread has begun to, else waited for (the thread packing
// it is running, so the wait is short).
template <class Pack>
const float* ready_panel(const Panels& panels, int64_t block, int64_t size, Pack&& pack) {
  float* panel = panels.packed + block * size;
  std::atomic<std::uint8_t>& state = panels.state[block];
  if (state.load(std::memory_order_acquire) == 2) return panel;
  std::uint8_t unpacked = 0;
  if (state.compare_exchange_strong(unpacked, 1, std::memory_order_acq_rel)) {
    pack(panel);
    state.store(2, std::memory_order_release);
  } else {
    while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
  }
  return panel;
}

// The first block a thread with rows from `begin` visits: threads start
// spread over the blocks, so that they pack different ones.
int64_t first_block(int64_t begin, int64_t rows, int64_t count) { return begin * count / rows; }

inline void store_units(float* p, Vec v, int n) {
  if (n == W) {
    store(p, v);
  } else {
    store_n(p, v, n);
  }
}

// ----------------------------------------------------------------- forward

// packed[block][k][gate][lane]: k = 0 is the bias, 1..features the kernel,
// then the recurrent kernel; lanes past `units` are zero.
int64_t forward_blocks(int64_t units) { return blocks(units, W); }

std::size_t forward_packed_size(int64_t features, int64_t units) {
  return static_cast<std::size_t>(forward_blocks(units) * (1 + features + units) * kGates * W);
}

void pack_forward_block(const ForwardArgs& a, int64_t block, float* packed) {
  const int64_t F = a.features, H = a.units, gates = kGates * H, unit = block * W;
  const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
  for (int64_t k = 0; k < 1 + F + H; ++k) {
    const float* source = k == 0   ? a.bias
                          : k <= F ? a.kernel + (k - 1) * gates
                                   : a.recurrent + (k - 1 - F) * gates;
    for (int gate = 0; gate < kGates; ++gate, packed += W) {
      store(packed, load_units(source + gate * H + unit, n));  // zero past `units`
    }
  }
}

struct ForwardStep {
  const ForwardArgs* args;
  int64_t t;
  const float* h_prev;  // [rows, units]
  const float* c_prev;  // [rows, units]
  float* c_out;         // [rows, units]
  const float* h_in;    // h_prev, or h_prev * dropmask in scratch
  int64_t h_in_origin;  // the row whose h_in starts at h_in
};

template <int M>
void forward_tile(const ForwardStep& s, const float* block, int64_t row, int64_t unit) {
  const ForwardArgs& a = *s.args;
  const int64_t R = a.rows, F = a.features, H = a.units;
  const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
  Vec acc[M][kGates];
  for (int m = 0; m < M; ++m) {
    for (int gate = 0; gate < kGates; ++gate) acc[m][gate] = load(block + gate * W);
  }
  const float* x_rows[M];
  const float* h_rows[M];
  for (int m = 0; m < M; ++m) {
    x_rows[m] = a.x + (s.t * R + row + m) * F;
    h_rows[m] = s.h_in + (row + m - s.h_in_origin) * H;
  }
  multiply_add<M>(acc, x_rows, F, block + kGates * W);
  multiply_add<M>(acc, h_rows, H, block + (1 + F) * kGates * W);

  for (int m = 0; m < M; ++m) {
    const int64_t r = row + m;
    const Vec i = sigmoid(acc[m][0]), f = sigmoid(acc[m][1]), g = tanh(acc[m][2]),
              o = sigmoid(acc[m][3]);
    const Vec c_prev = load_units(s.c_prev + r * H + unit, n);
    Vec c = fma(f, c_prev, i * g);
    Vec h = o * tanh(c);
    if (a.valid != nullptr && !a.valid[s.t * R + r]) {
      c = c_prev;
      h = load_units(s.h_prev + r * H + unit, n);
    }
    store_units(a.hs + (s.t * R + r) * H + unit, h, n);
    store_units(s.c_out + r * H + unit, c, n);
    if (a.acts != nullptr) {
      float* acts = a.acts + (s.t * R + r) * kGates * H + unit;
      store_units(acts, i, n);
      store_units(acts + H, f, n);
      store_units(acts + 2 * H, g, n);
      store_units(acts + 3 * H, o, n);
    }
  }
}

void forward(const ForwardArgs& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t R = a.rows, F = a.features, H = a.units;
  const int64_t block_size = (1 + F + H) * kGates * W, count = forward_blocks(H);
  const int64_t first = first_block(begin, R, count);
  const bool training = a.cs != nullptr;
  for (int64_t t = 0; t < a.time; ++t) {
    ForwardStep s{&a, t, nullptr, nullptr, nullptr, nullptr, 0};
    s.h_prev = t == 0 ? a.h0 : a.hs + (t - 1) * R * H;
    if (training) {
      s.c_prev = t == 0 ? a.c0 : a.cs + (t - 1) * R * H;
      s.c_out = a.cs + t * R * H;
    } else {
      s.c_prev = t == 0 ? a.c0 : a.c_final;
      s.c_out = a.c_final;  // in place: a tile reads its units' c before writing them
    }
    if (a.dropmask != nullptr) {
      for (int64_t i = begin * H; i < end * H; ++i) {
        scratch[i - begin * H] = s.h_prev[i] * a.dropmask[i];
      }
      s.h_in = scratch;
      s.h_in_origin = begin;
    } else {
      s.h_in = s.h_prev;
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t block = (first + j) % count;
      // Every block is ready once this thread has visited it at t = 0.
      const float* panel =
          t == 0 ? ready_panel(a.panels, block, block_size,
                               [&](float* out) { pack_forward_block(a, block, out); })
                 : a.panels.packed + block * block_size;
      over_tiles(begin, end, [&](auto m, int64_t row) {
        forward_tile<decltype(m)::value>(s, panel, row, block * W);
      });
    }
  }
}

// ---------------------------------------------------------------- backward

// packed[block][j][vector][lane] = recurrent[unit][j] with unit = block * 4W
// + vector * W + lane (zero past `units`): the recurrent kernel transposed,
// for dh = dgates @ recurrent^T.
int64_t backward_blocks(int64_t units) { return blocks(units, kGates * W); }

std::size_t backward_packed_size(int64_t units) {
  return static_cast<std::size_t>(backward_blocks(units) * kGates * units * kGates * W);
}

void pack_backward_block(const BackwardArgs& a, int64_t block, float* packed) {
  const int64_t H = a.units, gates = kGates * H;
  for (int64_t j = 0; j < gates; ++j) {
    for (int lane = 0; lane < kGates * W; ++lane) {
      const int64_t unit = block * kGates * W + lane;
      *packed++ = unit < H ? a.recurrent[unit * gates + j] : 0.0f;
    }
  }
}

struct BackwardStep {
  const BackwardArgs* args;
  int64_t t;
  int64_t begin;
  float* dh_next;       // [rows in range, units]: the cotangent of h_{t-1}, being built
  const float* dh_now;  // [rows in range, units]: the cotangent of h_t
};

// dh_next = (dgates_t @ recurrent^T) * dropmask for the valid rows; dh_now
// passes through a step that left the state as it was.
template <int M>
void backward_tile(const BackwardStep& s, const float* block, int64_t row, int64_t unit0) {
  const BackwardArgs& a = *s.args;
  const int64_t R = a.rows, H = a.units;
  Vec acc[M][kGates];
  const float* rows[M];
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < kGates; ++v) acc[m][v] = splat(0.0f);
    rows[m] = a.dgates + (s.t * R + row + m) * kGates * H;
  }
  multiply_add<M>(acc, rows, kGates * H, block);
  for (int m = 0; m < M; ++m) {
    const int64_t r = row + m, local = (r - s.begin) * H;
    const bool valid = a.valid == nullptr || a.valid[s.t * R + r];
    for (int v = 0; v < kGates; ++v) {
      const int64_t unit = unit0 + v * W;
      if (unit >= H) break;
      const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
      Vec dh = acc[m][v];
      if (!valid) {
        dh = load_units(s.dh_now + local + unit, n);
      } else if (a.dropmask != nullptr) {
        dh = dh * load_units(a.dropmask + r * H + unit, n);
      }
      store_units(s.dh_next + local + unit, dh, n);
    }
  }
}

void backward(const BackwardArgs& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t R = a.rows, H = a.units, count = end - begin;
  float* dh_next = scratch;
  float* dc_next = scratch + count * H;
  float* dh_now = scratch + 2 * count * H;
  std::fill(dh_next, dh_next + count * H, 0.0f);
  std::copy(a.dc_last + begin * H, a.dc_last + end * H, dc_next);
  const int64_t block_size = kGates * H * kGates * W, count_blocks = backward_blocks(H);
  const int64_t first = first_block(begin, R, count_blocks);
  for (int64_t t = a.time - 1; t >= 0; --t) {
    const float* c_prev_base = t == 0 ? a.c0 : a.cs + (t - 1) * R * H;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t local = (r - begin) * H, step = t * R + r;
      const bool valid = a.valid == nullptr || a.valid[step];
      const float* acts = a.acts + step * kGates * H;
      float* dgates = a.dgates + step * kGates * H;
      for (int64_t unit = 0; unit < H; unit += W) {
        const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
        const Vec dh = load_units(a.dhs + step * H + unit, n) +
                       load_units(dh_next + local + unit, n);
        store_units(dh_now + local + unit, dh, n);
        if (!valid) {
          for (int gate = 0; gate < kGates; ++gate) {
            store_units(dgates + gate * H + unit, splat(0.0f), n);
          }
          continue;
        }
        const Vec i = load_units(acts + unit, n), f = load_units(acts + H + unit, n),
                  g = load_units(acts + 2 * H + unit, n), o = load_units(acts + 3 * H + unit, n);
        const Vec c = load_units(a.cs + step * H + unit, n);
        const Vec c_prev = load_units(c_prev_base + r * H + unit, n);
        const Vec tanh_c = tanh(c);
        const Vec dc = fma(dh * o, 1.0f - tanh_c * tanh_c, load_units(dc_next + local + unit, n));
        store_units(dgates + unit, dc * g * i * (1.0f - i), n);
        store_units(dgates + H + unit, dc * c_prev * f * (1.0f - f), n);
        store_units(dgates + 2 * H + unit, dc * i * (1.0f - g * g), n);
        store_units(dgates + 3 * H + unit, dh * tanh_c * o * (1.0f - o), n);
        store_units(dc_next + local + unit, dc * f, n);
      }
    }
    BackwardStep s{&a, t, begin, dh_next, dh_now};
    for (int64_t j = 0; j < count_blocks; ++j) {
      const int64_t block = (first + j) % count_blocks;
      // Every block is ready once this thread has visited it at the last step.
      const float* panel =
          t == a.time - 1 ? ready_panel(a.panels, block, block_size,
                                        [&](float* out) { pack_backward_block(a, block, out); })
                          : a.panels.packed + block * block_size;
      over_tiles(begin, end, [&](auto m, int64_t row) {
        backward_tile<decltype(m)::value>(s, panel, row, block * kGates * W);
      });
    }
  }
  std::copy(dh_next, dh_next + count * H, a.dh0 + begin * H);
  std::copy(dc_next, dc_next + count * H, a.dc0 + begin * H);
}

constexpr Kernel kKernel{
    BRNN_NAME,           W,       kRowTile, forward_blocks, forward_packed_size, backward_blocks,
    backward_packed_size, forward, backward,
};

}  // namespace
}  // namespace BRNN_NAMESPACE

#if BRNN_ISA == 3
const Kernel* const kAvx512Kernel = &avx512::kKernel;
#elif BRNN_ISA == 2
const Kernel* const kAvx2Kernel = &avx2::kKernel;
#else
const Kernel* const kPortableKernel = &portable::kKernel;
#endif

}  // namespace banded_rnn
