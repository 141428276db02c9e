// One SIMD vector of floats and the few operations the LSTM kernel needs,
// written once with GCC vector extensions and compiled once per instruction
// set: BRNN_ISA selects the width (3: AVX-512, 16 lanes; 2: AVX2 + FMA, 8
// lanes; 1: the portable build, 4 lanes, which GCC lowers to SSE2 on x86-64
// and to NEON on AArch64). Included only by recurrence.cc, inside the
// namespace of its instruction set.
//
// Every multiply-add is written out: fused (`fma`) where the instruction set
// has one and the translation unit is compiled with -ffp-contract=off, so the
// compiler never fuses or splits anything on its own and every row runs the
// same sequence of roundings wherever it sits in a tile or a thread.

#if BRNN_ISA >= 2
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

#if BRNN_ISA == 3
inline constexpr int kWidth = 16;
#elif BRNN_ISA == 2
inline constexpr int kWidth = 8;
#else
inline constexpr int kWidth = 4;
#endif

typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
typedef std::int32_t IVec __attribute__((vector_size(kWidth * sizeof(float))));

// `value` in every lane. (Not `Vec{} + value`: without -ffast-math the
// compiler must keep that addition, one scalar add per broadcast.)
inline Vec splat(float value) {
#if BRNN_ISA == 3
  return (Vec)_mm512_set1_ps(value);
#elif BRNN_ISA == 2
  return (Vec)_mm256_set1_ps(value);
#else
  Vec v;
  for (int lane = 0; lane < kWidth; ++lane) v[lane] = value;
  return v;
#endif
}

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// The first `n` lanes (0 < n < kWidth) from or to memory; the other lanes read as zero.
inline Vec load_n(const float* p, int n) {
  float lanes[kWidth] = {};
  std::memcpy(lanes, p, n * sizeof(float));
  return load(lanes);
}

inline void store_n(float* p, Vec v, int n) {
  float lanes[kWidth];
  store(lanes, v);
  std::memcpy(p, lanes, n * sizeof(float));
}

// a * b + c.
inline Vec fma(Vec a, Vec b, Vec c) {
#if BRNN_ISA == 3
  return (Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif BRNN_ISA == 2
  return (Vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;  // two roundings: -ffp-contract=off keeps them apart
#endif
}

// Lane-wise select: `condition ? a : b` with a NaN-propagating comparison
// left to the caller.
inline Vec select(IVec condition, Vec a, Vec b) { return condition ? a : b; }

// x limited to [low, high]; a NaN goes through unchanged.
inline Vec clamp(Vec x, float low, float high) {
#if BRNN_ISA == 3
  // max/min return their second operand when either is a NaN.
  return (Vec)_mm512_min_ps(_mm512_set1_ps(high), _mm512_max_ps(_mm512_set1_ps(low), (__m512)x));
#elif BRNN_ISA == 2
  return (Vec)_mm256_min_ps(_mm256_set1_ps(high), _mm256_max_ps(_mm256_set1_ps(low), (__m256)x));
#else
  x = select(x < low, splat(low), x);  // a NaN compares false both times
  return select(x > high, splat(high), x);
#endif
}

// The largest integer <= x, as a float (|x| < 2^31).
inline Vec floor(Vec x) {
#if BRNN_ISA == 3
  return (Vec)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif BRNN_ISA == 2
  return (Vec)_mm256_floor_ps((__m256)x);
#else
  const Vec truncated = __builtin_convertvector(__builtin_convertvector(x, IVec), Vec);
  return select(truncated > x, truncated - 1.0f, truncated);
#endif
}

// y * 2^n for an integer-valued n in [-126, 127]; n = -127 gives 0 (a
// denormal 2^-127 * y under AVX-512), which is what exp needs there.
inline Vec scale_by_power_of_two(Vec y, Vec n) {
#if BRNN_ISA == 3
  return (Vec)_mm512_scalef_ps((__m512)y, (__m512)n);
#else
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec power;
  std::memcpy(&power, &bits, sizeof power);
  return y * power;
#endif
}

// e^x, Cephes' single-precision polynomial (about 1 ulp), for x clamped to
// [-88.38, 88]: finite at the top, so that 1 + e^x has a reciprocal.
inline Vec exp(Vec x) {
  x = clamp(x, -88.3762626647949f, 88.0f);
  const Vec n = floor(fma(x, splat(1.44269504088896341f), splat(0.5f)));
  Vec r = fma(n, splat(-0.693359375f), x);
  r = fma(n, splat(2.12194440e-4f), r);
  Vec p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  return scale_by_power_of_two(fma(p, r * r, r) + 1.0f, n);
}

// r + r * (1 - x * r): one Newton step towards 1 / x, squaring the error.
inline Vec newton_reciprocal(Vec x, Vec r) { return fma(r, fma(-x, r, splat(1.0f)), r); }

// 1 / x for finite x > 0 (or a NaN, which it returns): the hardware estimate
// refined by Newton steps, within a few ulp (and 1 / 1 = 1, so a saturated
// sigmoid reaches 1); a division in the portable build. A division costs
// 10-16 cycles of one port; this, three or five instructions.
inline Vec reciprocal(Vec x) {
#if BRNN_ISA == 3
  // Relative error < 2^-14: one step.
  return newton_reciprocal(x, (Vec)_mm512_rcp14_ps((__m512)x));
#elif BRNN_ISA == 2
  // Relative error < 1.5 * 2^-12: one step leaves 1 / 1 at 1 - 2^-24, two reach it.
  return newton_reciprocal(x, newton_reciprocal(x, (Vec)_mm256_rcp_ps((__m256)x)));
#else
  return 1.0f / x;
#endif
}

inline Vec sigmoid(Vec x) { return reciprocal(1.0f + exp(-x)); }

// tanh: the rational approximation Eigen (and so XLA:CPU) uses, clamped to
// +-7.9988 where it reaches +-1 in float32; at most 3.6e-7 from the exact
// value, relative, over the whole line.
inline Vec tanh(Vec x) {
  Vec tiny = x;
  x = clamp(x, -7.99881172180175781f, 7.99881172180175781f);
  Vec x2 = x * x;
  Vec p = splat(-2.76076847742355e-16f);
  p = fma(x2, p, splat(2.00018790482477e-13f));
  p = fma(x2, p, splat(-8.60467152213735e-11f));
  p = fma(x2, p, splat(5.12229709037114e-08f));
  p = fma(x2, p, splat(1.48572235717979e-05f));
  p = fma(x2, p, splat(6.37261928875436e-04f));
  p = fma(x2, p, splat(4.89352455891786e-03f));
  p = x * p;
  Vec q = splat(1.19825839466702e-06f);
  q = fma(x2, q, splat(1.18534705686654e-04f));
  q = fma(x2, q, splat(2.26843463243900e-03f));
  q = fma(x2, q, splat(4.89352518554385e-03f));
  Vec magnitude = select(tiny < 0.0f, -tiny, tiny);
  return select(magnitude < 0.0004f, tiny, p * reciprocal(q));  // q >= 4.9e-3
}
