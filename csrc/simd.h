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

inline Vec splat(float value) { return Vec{} + value; }

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

inline Vec clamp(Vec x, float low, float high) {
  // A NaN compares false both times and goes through unchanged.
  x = select(x < low, splat(low), x);
  return select(x > high, splat(high), x);
}

// e^x, Cephes' single-precision polynomial (about 1 ulp on [-88.4, 88.4]).
inline Vec exp(Vec x) {
  x = clamp(x, -88.3762626647949f, 88.3762626647949f);
  Vec scaled = fma(x, splat(1.44269504088896341f), splat(0.5f));
  Vec n = __builtin_convertvector(__builtin_convertvector(scaled, IVec), Vec);
  n = select(n > scaled, n - 1.0f, n);  // floor
  Vec r = fma(n, splat(-0.693359375f), x);
  r = fma(n, splat(2.12194440e-4f), r);
  Vec p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  Vec y = fma(p, r * r, r) + 1.0f;
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec power;
  std::memcpy(&power, &bits, sizeof power);
  return y * power;
}

inline Vec sigmoid(Vec x) { return 1.0f / (1.0f + exp(-x)); }

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
  return select(magnitude < 0.0004f, tiny, p / q);
}
