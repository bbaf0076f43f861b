// Native CPU codec: NVFP4 (compressed-tensors profile) and MXFP4 (EVEN rule) quantize and
// dequantize, byte for byte equal to nvq.formats. It is kernels/fp4.cuh ported to host C: float
// division and multiplication on the host are the IEEE round-to-nearest of __fdiv_rn/__fmul_rn,
// and every rounding to bf16/fp16 is done explicitly on the bits (RNE).
// Build without -ffast-math and with -ffp-contract=off: a fused multiply-add would round once
// where the reference rounds twice. nvq/ops_cpu.py builds, caches and loads this file.
#include <math.h>
#include <stdint.h>
#include <string.h>

// OpenMP when the compiler has it (-fopenmp); serial loops otherwise. Used in statement position
// where `threads` and `n_blocks` are in scope (the serial form marks them used).
#ifdef _OPENMP
#define NVQ_OMP(text) _Pragma(text)
#else
#define NVQ_OMP(text) (void)threads, (void)n_blocks, (void)kParallelMin;
#endif
// Splits the loop over `n_blocks` blocks among `threads` threads (both in scope where it is used).
#define NVQ_PARALLEL_FOR_BLOCKS \
  NVQ_OMP("omp parallel for num_threads(threads) schedule(static) if (n_blocks > kParallelMin)")

// dtype codes of the C ABI (nvq/ops.py DTYPE_CODES).
enum { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Below this many blocks one thread does it all: starting the team costs more than it saves.
static const int64_t kParallelMin = 4096;
static const float kE2M1Max = 6.0f;             // constants.E2M1_MAX
static const float kFp8E4M3Max = 448.0f;        // constants.FP8_E4M3_MAX
static const float kGlobalNumerator = 2688.0f;  // constants.NVFP4_GLOBAL_NUMERATOR
static const uint8_t kCtZeroBlockScale = 0x20;  // constants.CT_ZERO_BLOCK_SCALE (0.125)
enum { kNvfp4Block = 16, kMxfp4Block = 32, kE8M0Bias = 127, kE2M1MaxExponent = 2 };

// Per-dtype facts (fp4.cuh Dtype<T>): largest finite value (the ±Inf policy), smallest normal
// (CT's amax clamp), and the bit layout compressed-tensors' EVEN rule reads.
typedef struct {
  float max, tiny;
  int mantissa, bias, exponent_ones;
} DtypeInfo;

static const DtypeInfo kDtypes[3] = {
    [kFloat32] = {3.4028234663852886e38f, 1.1754943508222875e-38f, 23, 127, 255},
    [kFloat16] = {65504.0f, 6.103515625e-05f, 10, 15, 31},
    [kBFloat16] = {3.3895313892515355e38f, 1.1754943508222875e-38f, 7, 127, 255},
};

#define INLINE static inline __attribute__((always_inline))

INLINE uint32_t as_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
}

INLINE float as_float(uint32_t b) {
  float x;
  memcpy(&x, &b, 4);
  return x;
}

// --- bf16 / fp16 <-> fp32 ------------------------------------------------------------------

INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
  if (em >= 0x7C00u) return as_float(sign | 0x7F800000u | ((em & 0x3FFu) << 13));  // Inf, NaN
  if (em >= 0x0400u) return as_float(sign | ((em << 13) + (112u << 23)));         // rebias 15 -> 127
  return as_float(sign | as_bits((float)em * 0x1p-24f));  // subnormal: em · 2^-24, exact
}

// fp32 -> fp16 bits, round to nearest even; NaN -> 0x7E00 with its sign, as torch's scalar cast.
INLINE uint16_t float_to_half(float x) {
  const uint32_t b = as_bits(x), a = b & 0x7FFFFFFFu;
  const uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds (ties to even) to Inf
  if (a < 0x38800000u) {
    // Below 2^-14: ulp(0.5) is 2^-24, the fp16 subnormal step, so this add rounds RNE there.
    const float f = as_float(a) + 0.5f;
    return sign | (uint16_t)(as_bits(f) - 0x3F000000u);
  }
  return sign | (uint16_t)((a + 0xFFFu + ((a >> 13) & 1u) - (112u << 23)) >> 13);
}

// fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0, as torch's scalar cast.
INLINE uint16_t float_to_bfloat(float x) {
  const uint32_t b = as_bits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

INLINE void store(void* out, int64_t i, float v, int dtype) {
  switch (dtype) {
    case kFloat16: ((uint16_t*)out)[i] = float_to_half(v); break;
    case kBFloat16: ((uint16_t*)out)[i] = float_to_bfloat(v); break;
    default: ((float*)out)[i] = v;
  }
}

// Dtype<T>::round: the fp32 value rounded to the dtype and widened back (exact).
INLINE float round_to(float x, int dtype) {
  switch (dtype) {
    case kFloat16: return half_to_float(float_to_half(x));
    case kBFloat16: return as_float((uint32_t)float_to_bfloat(x) << 16);
    default: return x;
  }
}

// Dtype<T>::magnitude_bits: the dtype's own bit pattern of |x| (x is exact in the dtype).
INLINE uint32_t magnitude_bits(float x, int dtype) {
  switch (dtype) {
    case kFloat16: return float_to_half(x) & 0x7FFFu;
    case kBFloat16: return (as_bits(x) >> 16) & 0x7FFFu;
    default: return as_bits(x) & 0x7FFFFFFFu;
  }
}

// --- element and scale codecs ----------------------------------------------------------------

// e2m1.decode, codes 0..15 (0x8 is -0.0).
static const float kE2M1Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// scales.fp8_e4m3_encode for 0 <= x (the only inputs here): clamp to 448, round to nearest even.
INLINE uint8_t fp8_e4m3_encode(float x) {
  x = fminf(x, kFp8E4M3Max);
  if (x < 0x1p-6f) {
    // Subnormal step 2^-9 is ulp(2^14): the add rounds RNE, the subtraction is exact.
    return (uint8_t)((x + 16384.0f - 16384.0f) * 512.0f);  // 8 (= 2^-6) is also the right byte
  }
  const uint32_t b = as_bits(x);
  const uint32_t r = b + 0x7FFFFu + ((b >> 20) & 1u);  // RNE to 3 mantissa bits; a carry bumps E
  return (uint8_t)(((((r >> 23) - 127u + 7u) & 0xFu) << 3) | ((r >> 20) & 7u));
}

INLINE float fp8_e4m3_decode(uint8_t byte) {
  const int e = (byte >> 3) & 0xF, m = byte & 7;
  const float magnitude = e == 0 ? (float)m * 0x1p-9f : ldexpf((float)(8 + m), e - 10);
  return (byte & 0x80) ? -magnitude : magnitude;
}

// nvfp4._ct_global_scale: A = max(amax, tiny_dt); g = rnd_dt(rnd_dt(1/A) · 2688); NaN/Inf -> 1.
INLINE float ct_global_scale(float amax, int dtype) {
  const DtypeInfo* d = &kDtypes[dtype];
  const float a = fmaxf(round_to(fminf(fmaxf(amax, 0.0f), d->max), dtype), d->tiny);
  const float r = round_to(1.0f / a, dtype);
  const float g = round_to(r * kGlobalNumerator, dtype);
  return isfinite(g) ? g : 1.0f;
}

// scales._even_exponent + e8m0_from_amax (fp4.cuh e8m0_even_byte).
INLINE uint32_t e8m0_even_byte(float amax, int dtype) {
  const DtypeInfo* d = &kDtypes[dtype];
  if (!isfinite(amax)) return 255u;
  const uint32_t bits = magnitude_bits(amax, dtype);
  const int field = (int)((bits + (1u << (d->mantissa - 2))) >> d->mantissa);
  if (field == 0) return 0u;
  if (field >= d->exponent_ones) return 255u;
  const int byte = field - d->bias + kE8M0Bias - kE2M1MaxExponent;
  return (uint32_t)(byte < 0 ? 0 : byte > 255 ? 255 : byte);
}

// scales.e8m0_decode in fp32: 2^(byte-127) from bits; 0 -> 2^-127, 255 -> NaN.
INLINE float e8m0_decode(uint32_t byte) {
  if (byte == 0u) return as_float(0x00400000u);
  if (byte == 255u) return as_float(0x7FC00000u);
  return as_float(byte << 23);
}

// --- kernels ---------------------------------------------------------------------------------
// K is a multiple of the block, so the tensor is a flat run of blocks and rows do not matter:
// threads split the blocks, each block reads its elements once and writes its bytes once.

// nvfp4.tensor_amax: max |x| over the non-NaN elements, on the dtype's magnitude bits (which
// order like the values), then Inf -> the dtype's largest finite value. `inf` is Inf's bits.
#define NVQ_AMAX_LOOP(word, mask, inf)                                   \
  do {                                                                 \
    const word* v = (const word*)x;                                    \
    word best = 0;                                                     \
    const int64_t n_blocks = n / kNvfp4Block;                          \
    NVQ_OMP("omp parallel for num_threads(threads) schedule(static) reduction(max : best) if (n_blocks > kParallelMin)") \
    for (int64_t i = 0; i < n; ++i) {                                  \
      const word m = v[i] & (mask);                                    \
      const word finite_or_inf = m > (inf) ? 0 : m;                    \
      best = finite_or_inf > best ? finite_or_inf : best;              \
    }                                                                  \
    bits = best == (inf) ? (inf) - 1u : best;                          \
  } while (0)

int nvq_cpu_amax(const void* x, int64_t n, int dtype, int threads, float* amax) {
  uint32_t bits;
  switch (dtype) {
    case kFloat32: NVQ_AMAX_LOOP(uint32_t, 0x7FFFFFFFu, 0x7F800000u); *amax = as_float(bits); break;
    case kFloat16: NVQ_AMAX_LOOP(uint16_t, 0x7FFFu, 0x7C00u); *amax = half_to_float((uint16_t)bits); break;
    case kBFloat16: NVQ_AMAX_LOOP(uint16_t, 0x7FFFu, 0x7F80u); *amax = as_float(bits << 16); break;
    default: return 1;
  }
  return n < 0;
}

// Whether every element is finite (the convert pipeline's NaN/Inf check): no element has an
// all-ones exponent field. `exponent` is that field's mask.
#define NVQ_FINITE_LOOP(word, exponent)                                              \
  do {                                                                              \
    const word* v = (const word*)x;                                                 \
    const int64_t n_blocks = n / kNvfp4Block;                                       \
    int bad = 0;                                                                    \
    NVQ_OMP("omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (n_blocks > kParallelMin)") \
    for (int64_t i = 0; i < n; ++i) bad |= (v[i] & (exponent)) == (exponent);      \
    *all_finite = !bad;                                                             \
  } while (0)

int nvq_cpu_all_finite(const void* x, int64_t n, int dtype, int threads, int* all_finite) {
  switch (dtype) {
    case kFloat32: NVQ_FINITE_LOOP(uint32_t, 0x7F800000u); break;
    case kFloat16: NVQ_FINITE_LOOP(uint16_t, 0x7C00u); break;
    case kBFloat16: NVQ_FINITE_LOOP(uint16_t, 0x7F80u); break;
    default: return 1;
  }
  return n < 0;
}

int nvq_cpu_nvfp4_global_scale(float amax, int dtype, float* global_scale) {
  if (dtype < 0 || dtype > 2) return 1;
  *global_scale = ct_global_scale(amax, dtype);
  return 0;
}

// --- 4-lane vectors (GCC/clang vector extensions: SSE2 on x86-64, NEON on arm64, no -march) ----
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));
#define SPLAT(type, x) ((type){(x), (x), (x), (x)})

INLINE v4u select4(v4i mask, v4u yes, v4u no) { return ((v4u)mask & yes) | (~(v4u)mask & no); }

// Elements i..i+3 as fp32 bits (bf16/fp16 widening is exact).
INLINE v4u load4(const void* x, int64_t i, int dtype) {
  if (dtype == kFloat32) {
    v4u u;
    memcpy(&u, (const float*)x + i, sizeof u);
    return u;
  }
  const uint16_t* p = (const uint16_t*)x + i;
  const v4u h = {p[0], p[1], p[2], p[3]};
  if (dtype == kBFloat16) return h << 16;
  // half_to_float without branches: rebias the exponent; Inf/NaN rebias twice; a subnormal is
  // renormalised by an exact fp32 subtraction of 2^-14.
  const v4u em = h & 0x7FFFu, sign = (h & 0x8000u) << 16;
  v4u o = (em << 13) + SPLAT(v4u, 112u << 23);
  o += (v4u)(em >= 0x7C00u) & SPLAT(v4u, 112u << 23);
  const v4u sub = (v4u)((v4f)(o + SPLAT(v4u, 1u << 23)) - (v4f)SPLAT(v4u, 113u << 23));
  return select4(em < 0x0400u, sub, o) | sign;
}

// _blocks.sanitize on fp32 bits: NaN -> +0, ±Inf -> ±(dtype max).
INLINE v4u sanitize4(v4u u, uint32_t max_bits) {
  const v4i mag = (v4i)(u & 0x7FFFFFFFu);
  u &= ~(v4u)(mag > 0x7F800000);
  return select4(mag == 0x7F800000, (u & 0x80000000u) | max_bits, u);
}

// Largest |x| over the vectors (finite, sanitized bits order like the values).
INLINE float block_amax4(const v4u* u, int n) {
  v4i m = (v4i)(u[0] & 0x7FFFFFFFu);
  for (int i = 1; i < n; ++i) {
    const v4i a = (v4i)(u[i] & 0x7FFFFFFFu);
    m = (v4i)select4(a > m, (v4u)a, (v4u)m);
  }
  const int32_t lo = m[0] > m[1] ? m[0] : m[1], hi = m[2] > m[3] ? m[2] : m[3];
  return as_float((uint32_t)(lo > hi ? lo : hi));
}

// Dtype<T>::round on fp32 bits of finite values: RNE on the bits; fp16 subnormals by adding 0.5
// (ulp(0.5) = 2^-24, the fp16 subnormal step), overflow past 65520 to Inf.
INLINE v4u round4(v4u u, int dtype) {
  if (dtype == kFloat32) return u;
  if (dtype == kBFloat16) return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  const v4u mag = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
  const v4u normal = (mag + 0xFFFu + ((mag >> 13) & 1u)) & ~0x1FFFu;
  const v4u sub = (v4u)(((v4f)mag + 0.5f) - 0.5f);
  v4u r = select4((v4i)mag < 0x38800000, sub, normal);
  r = select4((v4i)mag >= 0x477FF000, SPLAT(v4u, 0x7F800000u), r);
  return r | sign;
}

// e2m1.encode, Rounding.RNE, on 4 lanes: the magnitude code counts the midpoints |y| reaches (ties
// at 0.75, 1.75, 3.5 go up to the even code, the others down), past 6 saturates at 7; the sign bit
// is set iff y < 0, so -0.0 gives 0x0. Codes land in the low 4 bits of each lane.
INLINE v4i e2m1_encode4(v4f y) {
  const v4f a = (v4f)((v4u)y & 0x7FFFFFFFu);
  const v4i count = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return -count | ((y < 0.0f) & 8);  // each comparison is -1 when true
}

// e2m1.pack_pairs for 4 codes: 2 bytes, low nibble = even element.
INLINE void pack4(v4i c, uint8_t* out) {
  out[0] = (uint8_t)(c[0] | (c[1] << 4));
  out[1] = (uint8_t)(c[2] | (c[3] << 4));
}

static const uint32_t kMaxBits[3] = {[kFloat32] = 0x7F7FFFFFu, [kFloat16] = 0x477FE000u, [kBFloat16] = 0x7F7F0000u};

// --- NVFP4 without a division per element (fp4.cuh's cutoff tables) --------------------------
// The code of y = RN(|x| / step) is monotone in |x|, and a block's step = fp32(s / g) takes one of
// 127 values (the positive E4M3 bytes). So for each byte we tabulate the smallest |x| that reaches
// each code (and the smallest that makes y nonzero, for the sign bit) with the division itself,
// and encoding an element is 8 comparisons. Exact by construction.
enum { kScaleBytes = 127, kCutoffs = 8 };
static const float kCutoffThreshold[kCutoffs] = {0.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};

// Whether RN(c / step) reaches cutoff i: i == 0 asks for a nonzero quotient, i >= 1 for code >= i
// (ties at 0.75, 1.75, 3.5 go up to the even code, the others down).
static int reaches(float c, float step, int i) {
  const float y = c / step;
  const int ties_up = i == 2 || i == 4 || i == 6;
  return ties_up ? y >= kCutoffThreshold[i] : y > kCutoffThreshold[i];
}

// Smallest non-negative float c (by bit pattern, which orders them) with reaches(c): start next to
// the real-valued answer, walk a few ulps, else bisect. !reaches(0) and reaches(+Inf) bracket it.
static float smallest_reaching(float step, int i) {
  uint32_t lo = 0u, hi = 0x7F800000u;
  uint32_t c = as_bits(kCutoffThreshold[i] * step);
  c = c < 1u ? 1u : c > hi - 1u ? hi - 1u : c;
  for (int walk = 0; walk < 4 && lo < c && c < hi; ++walk) {
    if (reaches(as_float(c), step, i)) {
      hi = c--;
    } else {
      lo = c++;
    }
    if (hi - lo == 1u) return as_float(hi);
  }
  while (hi - lo > 1u) {
    const uint32_t mid = lo + (hi - lo) / 2u;
    if (reaches(as_float(mid), step, i)) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return as_float(hi);
}

// nvfp4._ct_scales and quantize for one 16-element block: t = rnd_dt(a_b / 6); s = fp8(g · t),
// 0 -> 0x20; then the codes of y = fp32(x / fp32(s / g)) from the byte's cutoffs.
INLINE void nvfp4_block(const void* x, int64_t b, int dtype, float g, const float (*cutoffs)[kCutoffs],
                        uint8_t* packed, uint8_t* block_scale) {
  v4u u[4];
  for (int i = 0; i < 4; ++i) u[i] = sanitize4(load4(x, b * kNvfp4Block + 4 * i, dtype), kMaxBits[dtype]);
  const float t = round_to(block_amax4(u, 4) / kE2M1Max, dtype);
  uint8_t s = fp8_e4m3_encode(g * t);
  s = s == 0 ? kCtZeroBlockScale : s;
  const float* cut = cutoffs[s];
  for (int i = 0; i < 4; ++i) {
    const v4f a = (v4f)(u[i] & 0x7FFFFFFFu);
    const v4i count = (a >= cut[1]) + (a >= cut[2]) + (a >= cut[3]) + (a >= cut[4]) + (a >= cut[5]) +
                      (a >= cut[6]) + (a >= cut[7]);
    const v4i negative = (v4i)(u[i] >> 31) != 0;
    pack4(-count | (negative & (a >= cut[0]) & 8), packed + b * (kNvfp4Block / 2) + 2 * i);
  }
  block_scale[b] = s;
}

INLINE void nvfp4_quantize(const void* x, int64_t n_blocks, int dtype, float g, uint8_t* packed,
                           uint8_t* block_scale, int threads) {
  float cutoffs[kScaleBytes][kCutoffs];
  for (int s = 0; s < kScaleBytes; ++s) {
    const float step = fp8_e4m3_decode((uint8_t)s) / g;  // nvfp4.block_step
    for (int i = 0; i < kCutoffs; ++i) cutoffs[s][i] = smallest_reaching(step, i);
  }
  NVQ_PARALLEL_FOR_BLOCKS
  for (int64_t b = 0; b < n_blocks; ++b) nvfp4_block(x, b, dtype, g, (const float (*)[kCutoffs])cutoffs, packed, block_scale);
}

int nvq_cpu_nvfp4_quantize(const void* x, int64_t rows, int64_t k, int dtype, float g, uint8_t* packed,
                           uint8_t* block_scale, int threads) {
  if (rows < 0 || k < 0 || k % kNvfp4Block) return 1;
  const int64_t n_blocks = rows * (k / kNvfp4Block);
  // One call per dtype with a constant code, so each gets its own inlined loop.
  switch (dtype) {
    case kFloat32: nvfp4_quantize(x, n_blocks, kFloat32, g, packed, block_scale, threads); break;
    case kFloat16: nvfp4_quantize(x, n_blocks, kFloat16, g, packed, block_scale, threads); break;
    case kBFloat16: nvfp4_quantize(x, n_blocks, kBFloat16, g, packed, block_scale, threads); break;
    default: return 1;
  }
  return 0;
}

// mxfp4.quantize for one 32-element block: E8M0 byte by the EVEN rule; the scale lives in the
// dtype (an fp16 underflow becomes byte 127, scale 1); y = rnd_dt(x / s), exact as x · (1/s)
// since s is a power of two; a NaN scale (byte 255) makes every code 0x0.
INLINE void mxfp4_block(const void* x, int64_t b, int dtype, uint8_t* packed, uint8_t* scale) {
  v4u u[8];
  for (int i = 0; i < 8; ++i) u[i] = sanitize4(load4(x, b * kMxfp4Block + 4 * i, dtype), kMaxBits[dtype]);
  uint32_t byte = e8m0_even_byte(block_amax4(u, 8), dtype);
  float s = round_to(e8m0_decode(byte), dtype);
  if (s == 0.0f) {
    byte = kE8M0Bias;
    s = 1.0f;
  }
  uint8_t* out = packed + b * (kMxfp4Block / 2);
  if (byte == 255u) {
    memset(out, 0, kMxfp4Block / 2);
  } else {
    const v4f inverse = SPLAT(v4f, 1.0f / s);
    for (int i = 0; i < 8; ++i) pack4(e2m1_encode4((v4f)round4((v4u)((v4f)u[i] * inverse), dtype)), out + 2 * i);
  }
  scale[b] = (uint8_t)byte;
}

INLINE void mxfp4_quantize(const void* x, int64_t n_blocks, int dtype, uint8_t* packed, uint8_t* scale, int threads) {
  NVQ_PARALLEL_FOR_BLOCKS
  for (int64_t b = 0; b < n_blocks; ++b) mxfp4_block(x, b, dtype, packed, scale);
}

int nvq_cpu_mxfp4_quantize(const void* x, int64_t rows, int64_t k, int dtype, uint8_t* packed, uint8_t* scale,
                           int threads) {
  if (rows < 0 || k < 0 || k % kMxfp4Block) return 1;
  const int64_t n_blocks = rows * (k / kMxfp4Block);
  switch (dtype) {
    case kFloat32: mxfp4_quantize(x, n_blocks, kFloat32, packed, scale, threads); break;
    case kFloat16: mxfp4_quantize(x, n_blocks, kFloat16, packed, scale, threads); break;
    case kBFloat16: mxfp4_quantize(x, n_blocks, kBFloat16, packed, scale, threads); break;
    default: return 1;
  }
  return 0;
}

// n codes (n/2 packed bytes) times `factor` in fp32, rounded once to the output dtype. bf16 and
// fp32 go 4 lanes at a time (NaN lanes made the canonical NaN first, so that the RNE add keeps them
// NaN); fp16 narrowing, with its subnormals, stays scalar.
INLINE void dequantize_block(const uint8_t* pairs, int n, float factor, int dtype, void* out, int64_t first) {
  if (dtype == kFloat16) {
    for (int j = 0; j < n; ++j) {
      store(out, first + j, kE2M1Values[(j & 1) ? pairs[j / 2] >> 4 : pairs[j / 2] & 0xF] * factor, dtype);
    }
    return;
  }
  const v4f f = SPLAT(v4f, factor);
  for (int j = 0; j < n; j += 4) {
    const uint8_t p0 = pairs[j / 2], p1 = pairs[j / 2 + 1];
    const v4f v = {kE2M1Values[p0 & 0xF], kE2M1Values[p0 >> 4], kE2M1Values[p1 & 0xF], kE2M1Values[p1 >> 4]};
    v4u r = (v4u)(v * f);
    if (dtype == kFloat32) {
      memcpy((float*)out + first + j, &r, sizeof r);
      continue;
    }
    r = select4((v4i)(r & 0x7FFFFFFFu) > 0x7F800000, SPLAT(v4u, 0x7FC00000u), r);
    const v4u h = (r + 0x7FFFu + ((r >> 16) & 1u)) >> 16;
    uint16_t* o = (uint16_t*)out + first + j;
    o[0] = (uint16_t)h[0], o[1] = (uint16_t)h[1], o[2] = (uint16_t)h[2], o[3] = (uint16_t)h[3];
  }
}

// nvfp4.dequantize: dtype(fp32(e2m1 · fp32(s / g))), one rounding to the output dtype.
INLINE void nvfp4_dequantize(const uint8_t* packed, const uint8_t* block_scale, float g, int64_t n_blocks,
                             int dtype, void* out, int threads) {
  NVQ_PARALLEL_FOR_BLOCKS
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float step = fp8_e4m3_decode(block_scale[b]) / g;
    dequantize_block(packed + b * (kNvfp4Block / 2), kNvfp4Block, step, dtype, out, b * kNvfp4Block);
  }
}

int nvq_cpu_nvfp4_dequantize(const uint8_t* packed, const uint8_t* block_scale, float g, int64_t rows, int64_t k,
                             int dtype, void* out, int threads) {
  if (rows < 0 || k < 0 || k % kNvfp4Block) return 1;
  const int64_t n_blocks = rows * (k / kNvfp4Block);
  switch (dtype) {
    case kFloat32: nvfp4_dequantize(packed, block_scale, g, n_blocks, kFloat32, out, threads); break;
    case kFloat16: nvfp4_dequantize(packed, block_scale, g, n_blocks, kFloat16, out, threads); break;
    case kBFloat16: nvfp4_dequantize(packed, block_scale, g, n_blocks, kBFloat16, out, threads); break;
    default: return 1;
  }
  return 0;
}

// mxfp4.dequantize: dtype(e2m1 · 2^(byte-127)), the fp32 product exact, one rounding.
INLINE void mxfp4_dequantize(const uint8_t* packed, const uint8_t* scale, int64_t n_blocks, int dtype, void* out,
                             int threads) {
  NVQ_PARALLEL_FOR_BLOCKS
  for (int64_t b = 0; b < n_blocks; ++b) {
    dequantize_block(packed + b * (kMxfp4Block / 2), kMxfp4Block, e8m0_decode(scale[b]), dtype, out, b * kMxfp4Block);
  }
}

int nvq_cpu_mxfp4_dequantize(const uint8_t* packed, const uint8_t* scale, int64_t rows, int64_t k, int dtype,
                             void* out, int threads) {
  if (rows < 0 || k < 0 || k % kMxfp4Block) return 1;
  const int64_t n_blocks = rows * (k / kMxfp4Block);
  switch (dtype) {
    case kFloat32: mxfp4_dequantize(packed, scale, n_blocks, kFloat32, out, threads); break;
    case kFloat16: mxfp4_dequantize(packed, scale, n_blocks, kFloat16, out, threads); break;
    case kBFloat16: mxfp4_dequantize(packed, scale, n_blocks, kBFloat16, out, threads); break;
    default: return 1;
  }
  return 0;
}

// Test hook: Dtype<T>::round on n values, so the bit tricks above can be checked against torch.
int nvq_cpu_round(const float* x, int64_t n, int dtype, float* out) {
  if (n < 0 || dtype < 0 || dtype > 2) return 1;
  for (int64_t i = 0; i < n; ++i) out[i] = round_to(x[i], dtype);
  return 0;
}
