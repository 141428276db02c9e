// The LSTM recurrence (recurrence.h), compiled once per instruction set:
// CMake builds this file with BRNN_ISA=3 (AVX-512), 2 (AVX2 + FMA) and 1
// (portable), each into its own namespace, and dispatch.cc picks one at run
// time.
//
// Per time step and row the four gate pre-activations of `width` units are
// summed in registers, `bias + x_t @ kernel + h @ recurrent_kernel`, by a
// microkernel over a tile of `kRowTile` rows by `kTileVectors` vectors whose
// weights are packed once per call (block by block, on first use) so that
// each k reads consecutive vectors; the gate maths and the state update
// follow on the tile. Nothing is written per step but the outputs.
//
// The backward pass walks each block of steps in reverse with the same
// microkernel (dh = dgates @ recurrent^T, and dx = dgates @ kernel^T), then
// sums the block's weight gradients `[x, h]^T @ dgates` with it, the gate
// gradients standing in as the packed operand.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>

#if BRNN_ISA >= 2
// GCC 12's AVX-512 intrinsics give the unused source operand of a masked
// instruction as `__m512 __Y = __Y;`, and once inlined here it warns that
// this variable is used uninitialised, pointing into its own header (GCC bug
// 105593, fixed in later releases). Only the header's lines are exempt.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
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
// The register tile of every product: kRowTile rows by kTileVectors vectors
// of accumulators. Each vector of weights loaded then serves kRowTile rows,
// and each float of a row broadcast serves kTileVectors vectors. AVX-512 has
// 32 vector registers: 6 x 4 = 24 accumulators, 4 weights and a broadcast,
// the four gates of a block of units at once. AVX2 and the portable build
// have 16: 6 x 2 = 12, 2 weights and a broadcast, a block's gates in two
// halves. (A 2 x 4 tile there loaded a weight vector per two multiply-adds and
// ran at half the rate of this one, at the load ports' limit; NOTES entry 19.)
constexpr int kRowTile = 6;
constexpr int kTileVectors = BRNN_ISA == 3 ? 4 : 2;
constexpr int kGateGroups = kGates / kTileVectors;  // passes over the k-rows per block
static_assert(kGates % kTileVectors == 0, "a pass sums whole gates");

using std::int64_t;

int64_t blocks(int64_t units, int64_t per_block) { return (units + per_block - 1) / per_block; }

// Calls f(std::integral_constant<int, n>) for 1 <= n <= N: a tile's rows
// or vectors as a compile-time count.
template <int N, class F>
void with_count(int n, F&& f) {
  if constexpr (N >= 1) {
    if (n == N) {
      f(std::integral_constant<int, N>{});
    } else {
      with_count<N - 1>(n, f);
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
    with_count<kRowTile - 1>(static_cast<int>(end - row), [&](auto m) { tile(m, row); });
  }
}

// M rows of a left operand: element k of row m at rows[m][k * step], for k < depth.
template <int M>
struct Rows {
  const float* rows[M];
  int64_t step;
  int64_t depth;
};

// acc[m][v] += sum_k a[m][k] * b[k * b_step + v * W] for v < V, where a
// concatenates the parts' rows (each part's depth in turn, and b runs on):
// a tile of M rows by V vectors, each k broadcasting one float of each row.
// The sums live in locals for the whole loop: through the reference GCC
// cannot prove that the loads do not alias them, and would store all M * V
// of them on every k (and between parts, spill them).
template <int M, int V, int P>
inline void multiply_add(Vec (&acc)[M][V], const Rows<M> (&parts)[P], const float* b,
                         int64_t b_step) {
  Vec sum[M][V];
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < V; ++v) sum[m][v] = acc[m][v];
  }
  for (const Rows<M>& part : parts) {
    for (int64_t k = 0; k < part.depth; ++k, b += b_step) {
      Vec bv[V];
      for (int v = 0; v < V; ++v) bv[v] = load(b + v * W);
      for (int m = 0; m < M; ++m) {
        const Vec am = splat(part.rows[m][k * part.step]);
        for (int v = 0; v < V; ++v) sum[m][v] = fma(am, bv[v], sum[m][v]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < V; ++v) acc[m][v] = sum[m][v];
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

// packed[block][group][k][v][lane] holds gate group * kTileVectors + v: k =
// 0 is the bias, 1..features the kernel, then the recurrent kernel; lanes
// past `units` are zero. Each pass of a tile reads one group's k-rows in
// order, kTileVectors consecutive vectors each.
int64_t forward_blocks(int64_t units) { return blocks(units, W); }

std::size_t forward_packed_size(int64_t features, int64_t units) {
  return static_cast<std::size_t>(forward_blocks(units) * (1 + features + units) * kGates * W);
}

void pack_forward_block(const ForwardArgs& a, int64_t block, float* packed) {
  const int64_t F = a.features, H = a.units, gates = kGates * H, unit = block * W;
  const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
  for (int group = 0; group < kGateGroups; ++group) {
    for (int64_t k = 0; k < 1 + F + H; ++k) {
      const float* source = k == 0   ? a.bias
                            : k <= F ? a.kernel + (k - 1) * gates
                                     : a.recurrent + (k - 1 - F) * gates;
      for (int v = 0; v < kTileVectors; ++v, packed += W) {
        const int gate = group * kTileVectors + v;
        store(packed, load_units(source + gate * H + unit, n));  // zero past `units`
      }
    }
  }
}

struct ForwardStep {
  const ForwardArgs* args;
  int64_t t;
  const float* h_prev;  // row r at h_prev + r * h_prev_row
  int64_t h_prev_row;
  const float* c_prev;  // [rows, units]
  float* c_out;         // [rows, units]
  const float* h_in;    // h_prev, or h_prev * dropmask in scratch: row r at
  int64_t h_in_row;     // h_in + (r - h_in_origin) * h_in_row
  int64_t h_in_origin;
};

template <int M>
void forward_tile(const ForwardStep& s, const float* block, int64_t row, int64_t unit) {
  const ForwardArgs& a = *s.args;
  const int64_t R = a.rows, F = a.features, H = a.units;
  const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
  Rows<M> parts[2] = {{{}, 1, F}, {{}, 1, H}};  // x_t, then h: the packed k-rows' order
  for (int m = 0; m < M; ++m) {
    parts[0].rows[m] = a.x + (s.t * R + row + m) * F;
    parts[1].rows[m] = s.h_in + (row + m - s.h_in_origin) * s.h_in_row;
  }
  Vec acc[M][kGates];
  for (int group = 0; group < kGateGroups; ++group) {
    const float* panel = block + group * (1 + F + H) * kTileVectors * W;
    Vec sums[M][kTileVectors];
    for (int m = 0; m < M; ++m) {
      for (int v = 0; v < kTileVectors; ++v) sums[m][v] = load(panel + v * W);  // the bias
    }
    multiply_add<M, kTileVectors>(sums, parts, panel + kTileVectors * W, kTileVectors * W);
    for (int m = 0; m < M; ++m) {
      for (int v = 0; v < kTileVectors; ++v) acc[m][group * kTileVectors + v] = sums[m][v];
    }
  }

  for (int m = 0; m < M; ++m) {
    const int64_t r = row + m;
    const Vec i = sigmoid(acc[m][0]), f = sigmoid(acc[m][1]), g = tanh(acc[m][2]),
              o = sigmoid(acc[m][3]);
    const Vec c_prev = load_units(s.c_prev + r * H + unit, n);
    Vec c = fma(f, c_prev, i * g);
    Vec h = o * tanh(c);
    if (a.valid != nullptr && !a.valid[s.t * R + r]) {
      c = c_prev;
      h = load_units(s.h_prev + r * s.h_prev_row + unit, n);
    }
    store_units(a.hs + s.t * a.hs_step + r * a.hs_row + unit, h, n);
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

void forward(const ForwardArgs& a, int64_t begin, int64_t end, int64_t block_begin,
             int64_t block_end, int64_t row_block, float* scratch) {
  const int64_t R = a.rows, F = a.features, H = a.units;
  const int64_t block_size = (1 + F + H) * kGates * W, count = block_end - block_begin;
  const int64_t first = first_block(begin, R, count);
  const bool training = a.cs != nullptr;
  for (int64_t t = 0; t < a.time; ++t) {
    ForwardStep s{&a, t, nullptr, 0, nullptr, nullptr, nullptr, 0, 0};
    s.h_prev = t == 0 ? a.h0 : a.hs + (t - 1) * a.hs_step;
    s.h_prev_row = t == 0 ? H : a.hs_row;
    if (training) {
      s.c_prev = t == 0 ? a.c0 : a.cs + (t - 1) * R * H;
      s.c_out = a.cs + t * R * H;
    } else {
      s.c_prev = t == 0 ? a.c0 : a.c_final;
      s.c_out = a.c_final;  // in place: a tile reads its units' c before writing them
    }
    if (a.dropmask != nullptr) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t u = 0; u < H; ++u) {
          scratch[(r - begin) * H + u] = s.h_prev[r * s.h_prev_row + u] * a.dropmask[r * H + u];
        }
      }
      s.h_in = scratch;
      s.h_in_row = H;
      s.h_in_origin = begin;
    } else {
      s.h_in = s.h_prev;
      s.h_in_row = s.h_prev_row;
    }
    // A block of rows with every block of units before the next block of
    // rows: the rows' inputs and state stay in L2 while every unit block's
    // weights pass over them. No row depends on another, so the order does
    // not change any result.
    for (int64_t rows = begin; rows < end; rows += row_block) {
      const int64_t rows_end = std::min(end, rows + row_block);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t block = block_begin + (first + j) % count;
        // Every block is ready once this thread has visited it at t = 0.
        const float* panel =
            t == 0 ? ready_panel(a.panels, block, block_size,
                                 [&](float* out) { pack_forward_block(a, block, out); })
                   : a.panels.packed + block * block_size;
        over_tiles(rows, rows_end, [&](auto m, int64_t row) {
          forward_tile<decltype(m)::value>(s, panel, row, block * W);
        });
      }
    }
  }
}

// ---------------------------------------------------------------- backward

// packed[block][j][vector][lane] = matrix[i][j] with i = block * B + vector *
// W + lane, B = kTileVectors * W (zero past `count`): `matrix` [count, 4 *
// units] transposed, for dh = dgates @ recurrent^T (count = units) and dx =
// dgates @ kernel^T (count = features).
constexpr int64_t kTransposedBlock = kTileVectors * W;

int64_t transposed_blocks(int64_t count) { return blocks(count, kTransposedBlock); }

std::size_t transposed_packed_size(int64_t count, int64_t units) {
  return static_cast<std::size_t>(transposed_blocks(count) * kGates * units * kTransposedBlock);
}

void pack_transposed_block(const float* matrix, int64_t count, int64_t units, int64_t block,
                           float* packed) {
  const int64_t gates = kGates * units;
  for (int64_t j = 0; j < gates; ++j) {
    for (int lane = 0; lane < kTransposedBlock; ++lane) {
      const int64_t i = block * kTransposedBlock + lane;
      *packed++ = i < count ? matrix[i * gates + j] : 0.0f;
    }
  }
}

// acc = dgates rows [row, row + M) of step t @ the panel's transposed block:
// kTransposedBlock outputs per row.
template <int M>
void transposed_product(const BackwardArgs& a, int64_t t, const float* panel, int64_t row,
                        Vec (&acc)[M][kTileVectors]) {
  const int64_t G = kGates * a.units;
  Rows<M> dgates[1] = {{{}, 1, G}};
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < kTileVectors; ++v) acc[m][v] = splat(0.0f);
    dgates[0].rows[m] = a.dgates + (t - a.block_begin) * a.step_stride + (row + m) * G;
  }
  multiply_add<M, kTileVectors>(acc, dgates, panel, kTileVectors * W);
}

// dh before step t: (dgates_t @ recurrent^T) * dropmask for a valid row; a
// step that left the state as it was passes dh_now through.
template <int M>
void hidden_tile(const BackwardArgs& a, int64_t t, const float* dh_now, int64_t begin,
                 const float* panel, int64_t row, int64_t unit0) {
  const int64_t R = a.rows, H = a.units;
  Vec acc[M][kTileVectors];
  transposed_product<M>(a, t, panel, row, acc);
  for (int m = 0; m < M; ++m) {
    const int64_t r = row + m;
    const bool valid = a.valid == nullptr || a.valid[t * R + r];
    for (int v = 0; v < kTileVectors; ++v) {
      const int64_t unit = unit0 + v * W;
      if (unit >= H) break;
      const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
      Vec dh = acc[m][v];
      if (!valid) {
        dh = load_units(dh_now + (r - begin) * H + unit, n);
      } else if (a.dropmask != nullptr) {
        dh = dh * load_units(a.dropmask + r * H + unit, n);
      }
      store_units(a.dh + r * H + unit, dh, n);
    }
  }
}

// dx_t = dgates_t @ kernel^T (zero at an invalid step, whose dgates are zero).
template <int M>
void input_tile(const BackwardArgs& a, int64_t t, const float* panel, int64_t row,
                int64_t feature0) {
  const int64_t F = a.features;
  Vec acc[M][kTileVectors];
  transposed_product<M>(a, t, panel, row, acc);
  for (int m = 0; m < M; ++m) {
    float* dx = a.dx + (t * a.rows + row + m) * F;
    for (int v = 0; v < kTileVectors; ++v) {
      const int64_t feature = feature0 + v * W;
      if (feature >= F) break;
      store_units(dx + feature, acc[m][v], static_cast<int>(std::min<int64_t>(W, F - feature)));
    }
  }
}

// Row r's gate gradients at step t from dh = dhs_t + the running dh, and the
// running dc; leaves dh in dh_now and dc_{t-1} in the running dc.
void gate_gradients(const BackwardArgs& a, int64_t t, int64_t r, float* dh_now) {
  const int64_t R = a.rows, H = a.units, step = t * R + r;
  const bool valid = a.valid == nullptr || a.valid[step];
  const float* acts = a.acts + step * kGates * H;
  const float* c_prev = (t == 0 ? a.c0 : a.cs + (t - 1) * R * H) + r * H;
  float* dgates = a.dgates + (t - a.block_begin) * a.step_stride + r * kGates * H;
  float* dc_next = a.dc + r * H;
  for (int64_t unit = 0; unit < H; unit += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, H - unit));
    const Vec dh = load_units(a.dhs + step * H + unit, n) + load_units(a.dh + r * H + unit, n);
    store_units(dh_now + unit, dh, n);
    if (!valid) {
      for (int gate = 0; gate < kGates; ++gate) {
        store_units(dgates + gate * H + unit, splat(0.0f), n);
      }
      continue;
    }
    const Vec i = load_units(acts + unit, n), f = load_units(acts + H + unit, n),
              g = load_units(acts + 2 * H + unit, n), o = load_units(acts + 3 * H + unit, n);
    const Vec c = load_units(a.cs + step * H + unit, n);
    const Vec tanh_c = tanh(c);
    const Vec dc = fma(dh * o, 1.0f - tanh_c * tanh_c, load_units(dc_next + unit, n));
    store_units(dgates + unit, dc * g * i * (1.0f - i), n);
    store_units(dgates + H + unit, dc * load_units(c_prev + unit, n) * f * (1.0f - f), n);
    store_units(dgates + 2 * H + unit, dc * i * (1.0f - g * g), n);
    store_units(dgates + 3 * H + unit, dh * tanh_c * o * (1.0f - o), n);
    store_units(dc_next + unit, dc * f, n);
  }
  if (a.h_in != nullptr) {  // h_{t-1} * dropmask, for the weight gradients
    const float* h_prev = (t == 0 ? a.h0 : a.hs + (t - 1) * R * H) + r * H;
    float* h_in = a.h_in + ((t - a.block_begin) * R + r) * H;
    for (int64_t u = 0; u < H; ++u) h_in[u] = h_prev[u] * a.dropmask[r * H + u];
  }
}

// Runs tile(m, row, panel, block) over every packed transposed block of
// `count` outputs for rows [begin, end), starting from this thread's first
// block; packs the blocks on the first step walked (the last one).
template <class Tile>
void over_transposed_blocks(const BackwardArgs& a, int64_t t, const Panels& panels,
                            const float* matrix, int64_t count, int64_t begin, int64_t end,
                            Tile&& tile) {
  const int64_t size = kGates * a.units * kTransposedBlock, total = transposed_blocks(count);
  const int64_t first = first_block(begin, a.rows, total);
  for (int64_t j = 0; j < total; ++j) {
    const int64_t block = (first + j) % total;
    // Every block is ready once this thread has visited it at the last step.
    const float* panel =
        t == a.time - 1 ? ready_panel(panels, block, size,
                                      [&](float* out) {
                                        pack_transposed_block(matrix, count, a.units, block, out);
                                      })
                        : panels.packed + block * size;
    over_tiles(begin, end,
               [&](auto m, int64_t row) { tile(m, row, panel, block * kTransposedBlock); });
  }
}

void backward(const BackwardArgs& a, int64_t t_begin, int64_t t_end, int64_t begin, int64_t end,
              float* dh_now) {
  const int64_t H = a.units;
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
    for (int64_t r = begin; r < end; ++r) gate_gradients(a, t, r, dh_now + (r - begin) * H);
    over_transposed_blocks(a, t, a.panels, a.recurrent, H, begin, end,
                           [&](auto m, int64_t row, const float* panel, int64_t unit) {
                             hidden_tile<decltype(m)::value>(a, t, dh_now, begin, panel, row, unit);
                           });
    if (a.dx != nullptr) {
      over_transposed_blocks(a, t, a.input_panels, a.kernel, a.features, begin, end,
                             [&](auto m, int64_t row, const float* panel, int64_t feature) {
                               input_tile<decltype(m)::value>(a, t, panel, row, feature);
                             });
    }
  }
}

// k-rows (step, row) of a weight-gradient GEMM summed in registers before
// they are added to the gradient in memory: 64 k-rows of kTileVectors vectors
// of gate gradients (at most 16 KiB) stay in L1 while every row tile of the
// output reads them.
constexpr int64_t kDepthChunk = 64;

// Columns [column_begin, column_end) of the weight gradients, over the k-rows
// [k_begin, k_end) of the block:
//   dkernel[i][j]    += sum_k x[k][i] * dgates[k][j]
//   drecurrent[i][j] += sum_k h[k][i] * dgates[k][j]   (h: h_{t-1}, dropped)
//   dbias[j]         += sum_k dgates[k][j]
// with x, h and dgates at their k-row k_begin, in chunks of kDepthChunk
// k-rows: each output adds its chunks in order, whatever columns are asked for.
void accumulate_weight_gradients(const BackwardArgs& a, const float* x, const float* h,
                                 const float* dgates, int64_t k_rows, int64_t column_begin,
                                 int64_t column_end) {
  const int64_t F = a.features, H = a.units, G = kGates * H;
  for (int64_t k0 = 0; k0 < k_rows; k0 += kDepthChunk) {
    const int64_t chunk = std::min(kDepthChunk, k_rows - k0);
    for (int64_t j = column_begin; j < column_end; j += kTileVectors * W) {
      const int64_t width = std::min<int64_t>(kTileVectors * W, column_end - j);
      const int last = static_cast<int>(width - (width - 1) / W * W);  // lanes of the last vector
      with_count<kTileVectors>(static_cast<int>((width + W - 1) / W), [&](auto vectors) {
        constexpr int V = decltype(vectors)::value;
        // The chunk's V vectors of each k-row, side by side: rows of dgates
        // lie 4 * units floats apart, a power-of-two stride that maps them
        // onto a few sets of L1, where every row tile would miss them.
        alignas(64) float panel[kDepthChunk * kTileVectors * W];
        for (int64_t k = 0; k < chunk; ++k) {
          for (int v = 0; v < V; ++v) {
            store(panel + (k * V + v) * W, load(dgates + (k0 + k) * G + j + v * W));
          }
        }
        auto add = [&](float* out, const Vec(&acc)[V]) {
          for (int v = 0; v < V; ++v) {
            const int n = v == V - 1 ? last : W;
            store_units(out + v * W, load_units(out + v * W, n) + acc[v], n);
          }
        };
        // gradient[i][j..] += sum over the chunk of a[k][i] * panel[k]
        auto add_chunk = [&](float* gradient, const float* a_rows, int64_t count) {
          over_tiles(0, count, [&](auto m, int64_t i) {
            constexpr int M = decltype(m)::value;
            Vec acc[M][V];
            Rows<M> columns[1] = {{{}, count, chunk}};  // column i + r of a's k-rows
            for (int r = 0; r < M; ++r) {
              for (int v = 0; v < V; ++v) acc[r][v] = splat(0.0f);
              columns[0].rows[r] = a_rows + k0 * count + i + r;
            }
            multiply_add<M, V>(acc, columns, panel, V * W);
            for (int r = 0; r < M; ++r) add(gradient + (i + r) * G + j, acc[r]);
          });
        };
        add_chunk(a.dkernel, x, F);
        add_chunk(a.drecurrent, h, H);
        Vec sums[V];
        for (int v = 0; v < V; ++v) sums[v] = splat(0.0f);
        for (int64_t k = 0; k < chunk; ++k) {
          for (int v = 0; v < V; ++v) sums[v] = sums[v] + load(panel + (k * V + v) * W);
        }
        add(a.dbias + j, sums);
      });
    }
  }
}

void weight_gradients(const BackwardArgs& a, int64_t t_begin, int64_t t_end, int64_t column_begin,
                      int64_t column_end) {
  const int64_t R = a.rows, F = a.features, H = a.units, G = kGates * H;
  const int64_t k_rows = (t_end - t_begin) * R;
  const float* x = a.x + t_begin * R * F;
  const float* dgates = a.dgates + (t_begin - a.block_begin) * a.step_stride;
  auto accumulate = [&](int64_t k_begin, int64_t k_end, const float* h) {
    accumulate_weight_gradients(a, x + k_begin * F, h, dgates + k_begin * G, k_end - k_begin,
                                column_begin, column_end);
  };
  // The h each step multiplied by the recurrent kernel: dropped into h_in, or
  // h0 at step 0 and then hs.
  if (a.h_in != nullptr) {
    accumulate(0, k_rows, a.h_in);
  } else if (t_begin == 0) {
    accumulate(0, R, a.h0);
    if (k_rows > R) accumulate(R, k_rows, a.hs);
  } else {
    accumulate(0, k_rows, a.hs + (t_begin - 1) * R * H);
  }
}

constexpr IsaBuild kBuild{
    BRNN_NAME,         W,
    kRowTile,          kTileVectors,
    forward_blocks,    forward_packed_size,
    transposed_blocks, transposed_packed_size,
    forward,           backward,
    weight_gradients,  kTileVectors * W,
};

}  // namespace
}  // namespace BRNN_NAMESPACE

#if BRNN_ISA == 3
const IsaBuild* const kAvx512 = &avx512::kBuild;
#elif BRNN_ISA == 2
const IsaBuild* const kAvx2 = &avx2::kBuild;
#else
const IsaBuild* const kPortable = &portable::kBuild;
#endif

}  // namespace banded_rnn
