// Device helpers mirroring nvq/formats one to one: each function names the reference it equals.
// No torch headers: plain CUDA, so every source compiles with nvcc on machines without a GPU.
// Every rounding is explicit (__fdiv_rn, __fmul_rn, *_rn conversions) because bit-exactness with
// the reference is the contract; never build these with --use_fast_math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace nvq {

// dtype codes of the C ABI (nvq/ops.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr float kE2M1Max = 6.0f;           // constants.E2M1_MAX
constexpr float kFp8E4M3Max = 448.0f;      // constants.FP8_E4M3_MAX
constexpr float kGlobalNumerator = 2688.0f;  // constants.NVFP4_GLOBAL_NUMERATOR = 448 * 6
constexpr uint8_t kCtZeroBlockScale = 0x20;  // constants.CT_ZERO_BLOCK_SCALE 0.125 as E4M3
constexpr int kNvfp4Block = 16;            // constants.NVFP4_BLOCK
constexpr int kMxfp4Block = 32;            // constants.MXFP4_BLOCK
constexpr int kE8M0Bias = 127;             // constants.E8M0_BIAS
constexpr int kE2M1MaxExponent = 2;        // constants.E2M1_MAX_EXPONENT
constexpr uint32_t kFp32Bits2PowMinus127 = 0x00400000u;  // 2^-127, an fp32 subnormal
constexpr uint32_t kFp32BitsQuietNan = 0x7FC00000u;

// Per-dtype facts: how to widen, how to round an fp32 value to the dtype (and back), the
// largest finite value (the ±Inf policy), the smallest normal (CT's amax clamp) and the bit
// layout that compressed-tensors' EVEN rule reads.
template <typename T>
struct Dtype;

template <>
struct Dtype<float> {
  static constexpr float kMax = 3.4028234663852886e38f;
  static constexpr float kTiny = 1.1754943508222875e-38f;
  static constexpr int kMantissa = 23, kBias = 127, kExponentOnes = 255;
  __device__ static float widen(float x) { return x; }
  __device__ static float round(float x) { return x; }
  __device__ static float narrow(float x) { return x; }
  __device__ static uint32_t magnitude_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }
};

template <>
struct Dtype<__half> {
  static constexpr float kMax = 65504.0f;
  static constexpr float kTiny = 6.103515625e-05f;
  static constexpr int kMantissa = 10, kBias = 15, kExponentOnes = 31;
  __device__ static float widen(__half x) { return __half2float(x); }
  __device__ static float round(float x) { return __half2float(__float2half_rn(x)); }
  __device__ static __half narrow(float x) { return __float2half_rn(x); }
  __device__ static uint32_t magnitude_bits(float x) {
    return __half_as_ushort(__float2half_rn(x)) & 0x7FFFu;  // x is exact in fp16 here
  }
};

template <>
struct Dtype<__nv_bfloat16> {
  static constexpr float kMax = 3.3895313892515355e38f;
  static constexpr float kTiny = 1.1754943508222875e-38f;
  static constexpr int kMantissa = 7, kBias = 127, kExponentOnes = 255;
  __device__ static float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static float round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
  __device__ static __nv_bfloat16 narrow(float x) { return __float2bfloat16_rn(x); }
  __device__ static uint32_t magnitude_bits(float x) {
    return (__float_as_uint(x) >> 16) & 0x7FFFu;  // x is exact in bf16 here
  }
};

// _blocks.sanitize (NaN -> 0, ±Inf -> ±dtype max), split where it is cheapest:
// * amax: fmaxf ignores a NaN operand (IEEE maxNum), so a running max of |x| already treats NaN
//   as 0; clamping the finished max to the dtype max handles ±Inf.
// * encoding: a NaN fails every cutoff comparison and `< 0`, so it encodes to 0x0 exactly like
//   the 0 it stands for; only ±Inf must become ±max before encoding.
template <typename T>
__device__ __forceinline__ float finite_max(float running_max_of_abs) {
  return fminf(running_max_of_abs, Dtype<T>::kMax);
}

template <typename T>
__device__ __forceinline__ float clamp_infinite(float x) {
  return fabsf(x) > Dtype<T>::kMax ? copysignf(Dtype<T>::kMax, x) : x;
}

// Number of cutoffs c[1..7] (ascending) that a reaches, i.e. the E2M1 magnitude code, with three
// comparisons down a binary tree instead of seven.
__device__ __forceinline__ uint32_t count_reached(float a, const float (&c)[8]) {
  const bool b4 = a >= c[4];
  const bool b2 = a >= (b4 ? c[6] : c[2]);
  const bool b1 = a >= (b4 ? (b2 ? c[7] : c[5]) : (b2 ? c[3] : c[1]));
  return (b4 ? 4u : 0u) | (b2 ? 2u : 0u) | (b1 ? 1u : 0u);
}

// e2m1.encode with Rounding.RNE for y other than ±Inf (ties to the even code, sign bit iff y < 0, so
// -0.0 gives 0x0; past 6 saturates to code 7; NaN fails every test: 0x0), as cutoffs: code >= i iff |y| >= cutoff i. The midpoints where
// RNE rounds down (0.25, 1.25, 2.5, 5.0) need |y| strictly above them: the next float up.
__device__ __forceinline__ uint32_t e2m1_encode_rne_finite(float y) {
  const float cut[8] = {0.0f, __uint_as_float(0x3E800001u), 0.75f, __uint_as_float(0x3FA00001u), 1.75f,
                        __uint_as_float(0x40200001u), 3.5f, __uint_as_float(0x40A00001u)};
  const uint32_t code = count_reached(fabsf(y), cut);
  return y < 0.0f ? (code | 0x8u) : code;
}

// e2m1.decode: codes 0..15 -> value (code 0x8 is -0.0).
// Built from bits (no table, so nothing lands in local memory): magnitude code e·2 + m is
// m·0.5 for e == 0, else (1 + m/2)·2^(e-1); the sign is bit 3.
__device__ __forceinline__ float e2m1_decode(uint32_t code) {
  const uint32_t e = (code >> 1) & 0x3u, m = code & 0x1u;
  const uint32_t magnitude = e == 0 ? (m ? 0x3F000000u : 0u) : (((e + 126u) << 23) | (m << 22));
  return __uint_as_float(magnitude | ((code & 0x8u) << 28));
}

// scales.fp8_e4m3_encode: clamp to ±448, then round to nearest even (satfinite never triggers
// after the clamp); returns the raw E4M3FN byte.
__device__ __forceinline__ uint8_t fp8_e4m3_encode(float x) {
  x = fminf(fmaxf(x, -kFp8E4M3Max), kFp8E4M3Max);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float fp8_e4m3_decode(uint8_t byte) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(byte, __NV_E4M3)));
}

// nvfp4._ct_global_scale: A = max(amax, tiny_dt); g = rnd_dt(rnd_dt(1/A) · 2688); NaN/Inf -> 1.
template <typename T>
__device__ __forceinline__ float ct_global_scale(float amax) {
  const float a = fmaxf(Dtype<T>::round(finite_max<T>(fmaxf(amax, 0.0f))), Dtype<T>::kTiny);
  const float r = Dtype<T>::round(__fdiv_rn(1.0f, a));
  const float g = Dtype<T>::round(__fmul_rn(r, kGlobalNumerator));
  return isfinite(g) ? g : 1.0f;
}

// nvfp4._ct_scales for one block: t = rnd_dt(a_b / 6); s = fp8(g · t); s == 0 -> 0x20.
template <typename T>
__device__ __forceinline__ uint8_t ct_block_scale(float block_amax, float g) {
  const float t = Dtype<T>::round(__fdiv_rn(block_amax, kE2M1Max));
  const uint8_t s = fp8_e4m3_encode(__fmul_rn(g, t));
  return s == 0 ? kCtZeroBlockScale : s;
}

// scales._even_exponent + e8m0_from_amax: compressed-tensors' round_to_power_2 on the dtype's
// own bits (a quarter-ulp add carries into the exponent iff the mantissa is >= 1.75), then
// byte = clamp(127 + E - 2, 0, 255); a zero exponent field gives byte 0, a carry into the
// all-ones field (or a non-finite amax) gives 255.
template <typename T>
__device__ __forceinline__ uint32_t e8m0_even_byte(float amax) {
  if (!isfinite(amax)) return 255u;
  const uint32_t bits = Dtype<T>::magnitude_bits(amax);
  const int field = static_cast<int>((bits + (1u << (Dtype<T>::kMantissa - 2))) >> Dtype<T>::kMantissa);
  if (field == 0) return 0u;
  if (field >= Dtype<T>::kExponentOnes) return 255u;
  const int byte = field - Dtype<T>::kBias + kE8M0Bias - kE2M1MaxExponent;
  return static_cast<uint32_t>(min(max(byte, 0), 255));
}

// scales.e8m0_decode in fp32: 2^(byte-127) built from bits; 0 -> 2^-127, 255 -> NaN.
__device__ __forceinline__ float e8m0_decode(uint32_t byte) {
  if (byte == 0u) return __uint_as_float(kFp32Bits2PowMinus127);
  if (byte == 255u) return __uint_as_float(kFp32BitsQuietNan);
  return __uint_as_float(byte << 23);
}

// 16-byte vector I/O: T elements per uint4.
template <typename T>
struct Vec {
  static constexpr int kPerVec = 16 / sizeof(T);
};

template <typename T, int N>
__device__ __forceinline__ void load_block(const T* __restrict__ src, float (&out)[N]) {
  const uint4* v = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int i = 0; i < N / Vec<T>::kPerVec; ++i) {
    uint4 word = __ldg(v + i);  // read-only path: every byte is read exactly once
    const T* e = reinterpret_cast<const T*>(&word);
#pragma unroll
    for (int j = 0; j < Vec<T>::kPerVec; ++j) out[i * Vec<T>::kPerVec + j] = Dtype<T>::widen(e[j]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_block(T* __restrict__ dst, const float (&in)[N]) {
  uint4* v = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < N / Vec<T>::kPerVec; ++i) {
    uint4 word;
    T* e = reinterpret_cast<T*>(&word);
#pragma unroll
    for (int j = 0; j < Vec<T>::kPerVec; ++j) e[j] = Dtype<T>::narrow(in[i * Vec<T>::kPerVec + j]);
    v[i] = word;
  }
}

// Max over the `Lanes` consecutive lanes that share one scale block (Lanes divides 32 and the
// groups start at multiples of Lanes); every lane of the warp must call it.
template <int Lanes>
__device__ __forceinline__ float group_max(float m) {
#pragma unroll
  for (int offset = Lanes / 2; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
  return m;
}

// --- NVFP4 without a division per element ------------------------------------------------
// The E2M1 code of y = RN(|x| / step) is monotone in |x|, and a block's step = fp32(s / g) takes
// one of 127 values (the positive E4M3 bytes). So for each byte we tabulate the smallest |x|
// that reaches each code (and the smallest that makes y nonzero, for the sign bit), using
// __fdiv_rn itself, and encoding an element is 8 comparisons. Exact by construction.
constexpr int kScaleBytes = 127;  // 0x00..0x7E: the finite non-negative E4M3 values
constexpr int kCutoffs = 8;       // y > 0, then the 7 E2M1 midpoints

// Whether RN(c / step), clamped like e2m1_encode_rne, reaches cutoff `i`: i == 0 asks for a
// nonzero quotient; i >= 1 for code >= i (ties at 0.75, 1.75, 3.5 go up, the others down).
__device__ __forceinline__ float cutoff_threshold(int i) {
  switch (i) {
    case 0: return 0.0f;
    case 1: return 0.25f;
    case 2: return 0.75f;
    case 3: return 1.25f;
    case 4: return 1.75f;
    case 5: return 2.5f;
    case 6: return 3.5f;
    default: return 5.0f;
  }
}

__device__ __forceinline__ bool reaches(float c, float step, int i) {
  const float y = __fdiv_rn(c, step);
  const bool ties_up = i == 2 || i == 4 || i == 6;  // 0.75, 1.75, 3.5: the upper code is even
  return ties_up ? y >= cutoff_threshold(i) : y > cutoff_threshold(i);
}

// Smallest non-negative float c (by bit pattern, which orders non-negative floats) with
// reaches(c): start next to the real-valued answer, walk a few ulps, else bisect.
// Invariant: !reaches(lo) (0 / step = 0 reaches nothing) and reaches(hi) (+inf reaches all).
__device__ inline float smallest_reaching(float step, int i) {
  uint32_t lo = 0u, hi = 0x7F800000u;
  uint32_t c = min(max(__float_as_uint(__fmul_rn(cutoff_threshold(i), step)), 1u), hi - 1u);
  for (int walk = 0; walk < 4 && lo < c && c < hi; ++walk) {
    if (reaches(__uint_as_float(c), step, i)) {
      hi = c--;
    } else {
      lo = c++;
    }
    if (hi - lo == 1u) return __uint_as_float(hi);
  }
  while (hi - lo > 1u) {
    const uint32_t mid = lo + (hi - lo) / 2u;
    if (reaches(__uint_as_float(mid), step, i)) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return __uint_as_float(hi);
}

// E2M1 code and sign of RN(x / step) from the tabulated cutoffs of the block's scale byte.
__device__ __forceinline__ uint32_t e2m1_encode_by_cutoffs(float x, const float (&cut)[kCutoffs]) {
  const float a = fabsf(x);
  const uint32_t code = count_reached(a, cut);
  return (x < 0.0f && a >= cut[0]) ? (code | 0x8u) : code;
}

// --- packed 16-bit helpers (bf16 fast paths) ----------------------------------------------
// Two bf16 values in one 32-bit word, element 2i in the low half, as they lie in memory.

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t w) {
  __nv_bfloat162 r;
  memcpy(&r, &w, 4);
  return r;
}

__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 v) {
  uint32_t r;
  memcpy(&r, &v, 4);
  return r;
}

// 0xFFFF in each half where a >= b (bf16 compare: NaN never reaches).
__device__ __forceinline__ uint32_t ge_mask(uint32_t a, uint32_t b) { return __hge2_mask(as_bf162(a), as_bf162(b)); }

// Per half: mask ? b : a (mask halves are all ones or all zeros).
__device__ __forceinline__ uint32_t select_halves(uint32_t mask, uint32_t a, uint32_t b) { return (b & mask) | (a & ~mask); }

// Eight words, each holding the nibble of element 2i at bits 0..3 and of element 2i+1 at bits
// 16..19, packed into 8 bytes: element j at nibble j (e2m1.pack_pairs: low nibble = even element).
__device__ __forceinline__ uint2 pack_nibble_pairs(const uint32_t (&n)[8]) {
  uint32_t q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t p = prmt(n[2 * i], n[2 * i + 1], 0x6420);  // bytes: elements 4i .. 4i+3
    q[i] = p | (p >> 4);  // bytes 0 and 2 now hold element pairs (4i, 4i+1) and (4i+2, 4i+3)
  }
  return make_uint2(prmt(q[0], q[1], 0x6420), prmt(q[2], q[3], 0x6420));
}

// Rounded-up bf16 of a non-negative float cutoff, duplicated in both halves. A bf16 x reaches the
// float c iff it reaches this bf16 value; a cutoff past the largest finite bf16 (which the
// reference's Inf -> max clamp can never reach) becomes NaN, which nothing reaches, Inf included.
__device__ __forceinline__ uint32_t bf16_cutoff_pair(float c) {
  uint32_t h = (__float_as_uint(c) + 0xFFFFu) >> 16;
  if (h > 0x7F7Fu) h = 0x7FC0u;
  return h | (h << 16);
}

// Runs `launch` with the element type the dtype code names (a host-side generic lambda taking a
// value of that type); an unknown code is an invalid value. Returns the launch's error, if any.
template <typename Launch>
inline int dispatch_dtype(int dtype, Launch launch) {
  switch (dtype) {
    case kFloat32: launch(float{}); break;
    case kFloat16: launch(__half{}); break;
    case kBFloat16: launch(__nv_bfloat16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// A grid the GPU holds resident at once (as many blocks of `threads` as the occupancy of `kernel`
// allows on every multiprocessor), or less when the work is small: for kernels with a per-block
// prologue worth amortizing, or a per-block atomic. Sizing it from the occupancy avoids a tail
// of blocks that wait for a second wave.
template <typename Kernel>
inline int resident_grid(Kernel kernel, long long work_items, int threads) {
  int device = 0, sm_count = 132, per_sm = 1;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  }
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  const long long needed = (work_items + threads - 1) / threads;
  const long long resident = static_cast<long long>(sm_count) * (per_sm > 0 ? per_sm : 1);
  return static_cast<int>(needed < resident ? (needed > 0 ? needed : 1) : resident);
}

inline int grid_for(long long work_items, int threads) {
  // Enough blocks to fill the chip several times; kernels stride over the rest.
  const long long blocks = (work_items + threads - 1) / threads;
  return static_cast<int>(blocks < 65535LL * 16 ? (blocks > 0 ? blocks : 1) : 65535LL * 16);
}

}  // namespace nvq
