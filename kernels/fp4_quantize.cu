// NVFP4 (compressed-tensors profile) and MXFP4 (EVEN rule) quantize kernels, byte for byte equal
// to nvq.formats.nvfp4.quantize / nvq.formats.mxfp4.quantize followed by e2m1.pack_pairs.
//
// Every launcher takes a stack of `experts` equal-shaped tensors laid end to end (1 for a plain
// tensor): blockIdx.y is the expert, and each expert has its own amax and NVFP4 global scale.
//
// NVFP4 takes two passes because block scales are encoded against the tensor (or fusion-group)
// amax: nvq_amax, then nvq_nvfp4_global_scale, then nvq_nvfp4_quantize, which first tabulates
// per expert, for every E4M3 scale byte, the cutoffs where the E2M1 code changes (a small kernel),
// then encodes by comparing against them. MXFP4 multiplies by the exact inverse of a power of two.
// bf16 inputs take paths that work on two values per 32-bit word (fp4.cuh); fp16 and fp32 the
// float paths.
#include "fp4.cuh"

namespace nvq {

constexpr int kThreads = 256;
constexpr int kQuantizeItems = 2;  // 16-value groups per thread and loop step in the bf16 kernels
constexpr int kTableWords = kScaleBytes * kCutoffs;  // cutoff words per expert
constexpr uint32_t kBf16AbsMask2 = 0x7FFF7FFFu;
constexpr uint32_t kBf16Max2 = 0x7F7F7F7Fu;  // the largest finite bf16, in both halves
constexpr uint32_t kBf16One2 = 0x3F803F80u;
constexpr uint32_t kSignBits2 = 0x80008000u;

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x_all, long long n, float* __restrict__ amax_all) {
  constexpr int kPer = Vec<T>::kPerVec;
  const T* __restrict__ x = x_all + blockIdx.y * n;
  float m = 0.0f;
  const long long n_vec = n / kPer;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  // Four independent 16-byte loads in flight per thread before any is used.
  for (; i + 3 * stride < n_vec; i += 4 * stride) {
    float v[4][kPer];
#pragma unroll
    for (int u = 0; u < 4; ++u) load_block<T, kPer>(x + (i + u * stride) * kPer, v[u]);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int j = 0; j < kPer; ++j) m = fmaxf(m, fabsf(v[u][j]));
    }
  }
  for (; i < n_vec; i += stride) {
    float v[kPer];
    load_block<T, kPer>(x + i * kPer, v);
#pragma unroll
    for (int j = 0; j < kPer; ++j) m = fmaxf(m, fabsf(v[j]));
  }
  for (i = n_vec * kPer + blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    m = fmaxf(m, fabsf(Dtype<T>::widen(x[i])));
  }
  m = finite_max<T>(m);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
  __shared__ float warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) m = fmaxf(m, warp_max[w]);
    // Non-negative floats order like their bit patterns, so an integer max is a float max.
    atomicMax(reinterpret_cast<unsigned int*>(amax_all + blockIdx.y), __float_as_uint(m));
  }
}

template <typename T>
__global__ void nvfp4_global_scale_kernel(const float* __restrict__ amax, int n, float* __restrict__ global_scale) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) global_scale[i] = ct_global_scale<T>(amax[i]);
}

// Per expert and E4M3 byte s (0..126), the 8 cutoffs of fp4.cuh's smallest_reaching for the step
// fp32(s / g): as floats for the float path, as rounded-up bf16 pairs for the bf16 path.
template <typename T>
__global__ void nvfp4_cutoff_table_kernel(const float* __restrict__ global_scale, uint32_t* __restrict__ table) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= kTableWords) return;
  const float step = __fdiv_rn(fp8_e4m3_decode(static_cast<uint8_t>(t / kCutoffs)), global_scale[blockIdx.y]);
  const float c = smallest_reaching(step, t % kCutoffs);
  table[blockIdx.y * static_cast<long long>(kTableWords) + t] =
      std::is_same<T, __nv_bfloat16>::value ? bf16_cutoff_pair(c) : __float_as_uint(c);
}

// One step of the float quantize kernels' software pipeline: take the vector loaded last step into
// `e` (±Inf clamped), start loading the next one, and return the amax of the scale block, reduced
// over the block's lanes (whole warps iterate together, so every lane takes part).
template <typename T, int kPer, int kLanes>
__device__ __forceinline__ float take_vector_and_block_amax(const T* __restrict__ x, long long v, long long stride,
                                                            long long n_vec, float (&next)[kPer], float (&e)[kPer]) {
  const bool active = v < n_vec;
#pragma unroll
  for (int j = 0; j < kPer; ++j) e[j] = next[j];
  if (v + stride < n_vec) load_block<T, kPer>(x + (v + stride) * kPer, next);
  float m = 0.0f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    e[j] = active ? clamp_infinite<T>(e[j]) : 0.0f;
    m = fmaxf(m, fabsf(e[j]));  // NaN-ignoring: the reference's NaN -> 0
  }
  return group_max<kLanes>(m);
}

// Float path (fp16, fp32). Little pieces of one scale block live in neighbouring lanes: lane v
// reads the 16-byte vector v (kPer elements), so a warp's loads and stores are contiguous. The
// block amax is a shuffle reduction over the block's lanes; each lane writes its own codes, the
// first lane the scale. Cutoffs come from the expert's table (read through L1).
template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_kernel(const T* __restrict__ x_all, long long n_vec,
                                                                  const float* __restrict__ global_scale,
                                                                  const uint32_t* __restrict__ table_all,
                                                                  uint8_t* __restrict__ packed_all,
                                                                  uint8_t* __restrict__ block_scale_all) {
  constexpr int kPer = Vec<T>::kPerVec;
  constexpr int kLanes = kNvfp4Block / kPer;
  const long long expert = blockIdx.y;
  const T* __restrict__ x = x_all + expert * n_vec * kPer;
  uint8_t* __restrict__ packed = packed_all + expert * n_vec * (kPer / 2);
  uint8_t* __restrict__ block_scale = block_scale_all + expert * (n_vec / kLanes);
  const uint32_t* __restrict__ table = table_all + expert * kTableWords;
  const float g = global_scale[expert];
  const int lane = threadIdx.x & 31;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  long long base = blockIdx.x * static_cast<long long>(blockDim.x) + (threadIdx.x - lane);
  float next[kPer];
  if (base + lane < n_vec) load_block<T, kPer>(x + (base + lane) * kPer, next);
  for (; base < n_vec; base += stride) {
    const long long v = base + lane;
    const bool active = v < n_vec;
    float e[kPer];
    const float m = take_vector_and_block_amax<T, kPer, kLanes>(x, v, stride, n_vec, next, e);
    if (!active) continue;
    const uint8_t s = ct_block_scale<T>(m, g);
    float cut[kCutoffs];
#pragma unroll
    for (int i = 0; i < kCutoffs; ++i) cut[i] = __uint_as_float(__ldg(table + s * kCutoffs + i));
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) word |= e2m1_encode_by_cutoffs(e[j], cut) << (4 * j);
    if constexpr (kPer == 8) {
      reinterpret_cast<uint32_t*>(packed)[v] = word;
    } else {
      reinterpret_cast<uint16_t*>(packed)[v] = static_cast<uint16_t>(word);
    }
    if (lane % kLanes == 0) block_scale[v / kLanes] = s;
  }
}

// 16 bf16 values (two 16-byte loads) as 8 words.
__device__ __forceinline__ void load16_bf16(const uint4* __restrict__ p, uint32_t (&w)[8]) {
  const uint4 a = __ldg(p), b = __ldg(p + 1);
  w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}

// Max over 8 words of non-negative bf16 pairs, NaN ignored (an all-NaN block gives 0), as float.
__device__ __forceinline__ float bf16_max16(const uint32_t (&a)[8]) {
  __nv_bfloat162 m = __hmax2(as_bf162(a[0]), as_bf162(a[1]));
#pragma unroll
  for (int j = 2; j < 8; ++j) m = __hmax2(m, as_bf162(a[j]));
  m = __hmax2(m, as_bf162(0u));
  return fmaxf(__low2float(m), __high2float(m));
}

// e2m1_encode_by_cutoffs on a pair: the three-comparison tree of count_reached, each comparison
// a bf16x2 compare against the pair's own cutoff (halves pick theirs by mask), then the sign bit
// iff x < 0 and |x| reaches cut[0]. Returns nibble 0 at bits 0..3, nibble 1 at bits 16..19.
__device__ __forceinline__ uint32_t nvfp4_encode_pair(uint32_t w, uint32_t a, const uint32_t (&c)[8]) {
  const uint32_t m4 = ge_mask(a, c[4]);
  const uint32_t m2 = ge_mask(a, select_halves(m4, c[2], c[6]));
  const uint32_t m1 = ge_mask(a, select_halves(m4, select_halves(m2, c[1], c[3]), select_halves(m2, c[5], c[7])));
  const uint32_t sign = ge_mask(a, c[0]) & w & kSignBits2;
  return (sign >> 12) | (m4 & 0x00040004u) | (m2 & 0x00020002u) | (m1 & 0x00010001u);
}

// bf16 NVFP4: one lane per 16-value scale block. ±Inf need no clamp here: Inf reaches exactly the
// cutoffs the largest finite bf16 reaches (unreachable ones are NaN), and a NaN reaches none.
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_bf16_kernel(const uint4* __restrict__ x_all, long long n_blocks,
                                                                       const float* __restrict__ global_scale,
                                                                       const uint32_t* __restrict__ table_all,
                                                                       uint2* __restrict__ packed_all,
                                                                       uint8_t* __restrict__ block_scale_all) {
  const long long expert = blockIdx.y;
  const uint4* __restrict__ x = x_all + expert * n_blocks * 2;
  uint2* __restrict__ packed = packed_all + expert * n_blocks;
  uint8_t* __restrict__ block_scale = block_scale_all + expert * n_blocks;
  const uint32_t* __restrict__ table = table_all + expert * kTableWords;
  const float g = global_scale[expert];
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  // kQuantizeItems blocks per thread, a grid stride apart, all loaded before any is encoded.
  for (long long b0 = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; b0 < n_blocks;
       b0 += kQuantizeItems * stride) {
    uint32_t w[kQuantizeItems][8] = {};
#pragma unroll
    for (int u = 0; u < kQuantizeItems; ++u) {
      if (b0 + u * stride < n_blocks) load16_bf16(x + 2 * (b0 + u * stride), w[u]);
    }
#pragma unroll
    for (int u = 0; u < kQuantizeItems; ++u) {
      const long long b = b0 + u * stride;
      if (b >= n_blocks) break;
      uint32_t a[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = w[u][j] & kBf16AbsMask2;
      const uint8_t s = ct_block_scale<__nv_bfloat16>(finite_max<__nv_bfloat16>(bf16_max16(a)), g);
      const uint4* row = reinterpret_cast<const uint4*>(table + s * kCutoffs);
      const uint4 lo = __ldg(row), hi = __ldg(row + 1);
      const uint32_t c[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      uint32_t n[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) n[j] = nvfp4_encode_pair(w[u][j], a[j], c);
      packed[b] = pack_nibble_pairs(n);
      block_scale[b] = s;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mxfp4_quantize_kernel(const T* __restrict__ x, long long n_vec,
                                                                  uint8_t* __restrict__ packed,
                                                                  uint8_t* __restrict__ scale) {
  constexpr int kPer = Vec<T>::kPerVec;
  constexpr int kLanes = kMxfp4Block / kPer;
  const int lane = threadIdx.x & 31;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  long long base = blockIdx.x * static_cast<long long>(blockDim.x) + (threadIdx.x - lane);
  float next[kPer];
  if (base + lane < n_vec) load_block<T, kPer>(x + (base + lane) * kPer, next);
  for (; base < n_vec; base += stride) {
    const long long v = base + lane;
    const bool active = v < n_vec;
    float e[kPer];
    const float m = take_vector_and_block_amax<T, kPer, kLanes>(x, v, stride, n_vec, next, e);
    if (!active) continue;
    uint32_t byte = e8m0_even_byte<T>(m);
    // mxfp4.quantize: the scale lives in the weight dtype; one that underflows there (fp16)
    // is replaced by 1 (byte 127), as compressed-tensors does.
    float s = Dtype<T>::round(e8m0_decode(byte));
    if (s == 0.0f) {
      byte = kE8M0Bias;
      s = 1.0f;
    }
    // s is a power of two, so 1/s is exact and w·(1/s) is the correctly rounded w/s; then the
    // quotient is rounded to the weight dtype, as torch divides in that dtype.
    // A NaN scale (byte 255, the EVEN rule's overflow) makes every quotient NaN: all codes 0x0.
    const float inverse = __frcp_rn(s);
    uint32_t word = 0;
    if (byte != 255u) {
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        word |= e2m1_encode_rne_finite(Dtype<T>::round(__fmul_rn(e[j], inverse))) << (4 * j);
      }
    }
    if constexpr (kPer == 8) {
      reinterpret_cast<uint32_t*>(packed)[v] = word;
    } else {
      reinterpret_cast<uint16_t*>(packed)[v] = static_cast<uint16_t>(word);
    }
    if (lane % kLanes == 0) scale[v / kLanes] = static_cast<uint8_t>(byte);
  }
}

// MXFP4 code pair of y = |x| / 2^X (exact in bf16: one bf16x2 multiply by 2^-X), for y < 7, which
// the EVEN scale guarantees. Adding M = 64·max(2^floor(log2 y), 1) rounds y to the E2M1 grid of
// its binade (ulp(M) is 0.5, 1 or 2) with the hardware's ties-to-even, which is the even code;
// the code is then (y + M) - M in ulps plus 2 per binade above [0, 2). The sign bit is set iff
// x < 0 and the bf16 quotient is not zero (the reference's y < 0).
__device__ __forceinline__ uint32_t mxfp4_encode_pair(uint32_t w, uint32_t a, uint32_t inverse2) {
  const uint32_t y = as_u32(__hmul2(as_bf162(a), as_bf162(inverse2)));
  const uint32_t e = as_u32(__hmax2(as_bf162(y & 0x7F807F80u), as_bf162(kBf16One2)));
  const uint32_t s = as_u32(__hadd2(as_bf162(y), as_bf162(e + 0x03000300u)));
  // Per half: s - (e + 0x300) + ((e + 0x300) >> 6) - 0x10A; no half borrows from the other, and
  // e's low 7 bits are zero, so the shift moves nothing across halves.
  const uint32_t code = s - e + (e >> 6) - 0x03FE03FEu;
  const uint32_t sign = (y + 0x7FFF7FFFu) & w & kSignBits2;  // bit 15 of y + 0x7FFF: y != 0
  return code | (sign >> 12);
}

// bf16 MXFP4: one lane per 16 values, two neighbouring lanes per 32-value scale block.
__global__ void __launch_bounds__(kThreads) mxfp4_quantize_bf16_kernel(const uint4* __restrict__ x, long long n16,
                                                                       uint2* __restrict__ packed,
                                                                       uint8_t* __restrict__ scale) {
  const int lane = threadIdx.x & 31;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const __nv_bfloat162 zero2 = as_bf162(0u), max2 = as_bf162(kBf16Max2);
  for (long long base = blockIdx.x * static_cast<long long>(blockDim.x) + (threadIdx.x - lane); base < n16;
       base += kQuantizeItems * stride) {  // whole warps iterate together, for the shuffle
    uint32_t w[kQuantizeItems][8] = {};
#pragma unroll
    for (int u = 0; u < kQuantizeItems; ++u) {
      const long long i = base + u * stride + lane;
      if (i < n16) load16_bf16(x + 2 * i, w[u]);
    }
#pragma unroll
    for (int u = 0; u < kQuantizeItems; ++u) {
      const long long i = base + u * stride + lane;
      uint32_t a[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // _blocks.sanitize: NaN -> 0, ±Inf -> ±max (on |x|)
        a[j] = as_u32(__hmin2(__hmax2(as_bf162(w[u][j] & kBf16AbsMask2), zero2), max2));
      }
      float m = bf16_max16(a);
      m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, 1));
      if (i >= n16) continue;
      const uint32_t byte = e8m0_even_byte<__nv_bfloat16>(m);
      uint2 out = make_uint2(0u, 0u);  // byte 255 (NaN scale): every code 0x0
      if (byte != 255u) {
        // 2^-X as bf16, X = byte - 127: exponent field 254 - byte (the EVEN byte of a finite bf16
        // amax is at most 252, so the field stays normal).
        const uint32_t inverse = (254u - byte) << 7;
        const uint32_t inverse2 = inverse | (inverse << 16);
        uint32_t n[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) n[j] = mxfp4_encode_pair(w[u][j], a[j], inverse2);
        out = pack_nibble_pairs(n);
      }
      packed[i] = out;
      if ((lane & 1) == 0) scale[i >> 1] = static_cast<uint8_t>(byte);
    }
  }
}

inline bool is_bf16(int dtype) { return dtype == kBFloat16; }

}  // namespace nvq


// amax[e] = max(amax[e], max |x| of expert e) for `experts` tensors of n_elements each, end to end
// (the caller zeroes amax).
extern "C" int nvq_amax(const void* x, long long experts, long long n_elements, int dtype, float* amax, void* stream) {
  if (experts < 0 || experts > 65535 || n_elements < 0 || !nvq::aligned16(x)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (experts > 1 && n_elements % 8) return static_cast<int>(cudaErrorInvalidValue);  // each expert 16-byte aligned
  if (n_elements == 0 || experts == 0) return 0;
  // Resident grid over all experts: one atomic per block, and each thread strides over many vectors.
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const long long resident = nvq::resident_grid(nvq::amax_kernel<T>, 1LL << 40, nvq::kThreads);
    const long long needed = (n_elements / 8 + nvq::kThreads - 1) / nvq::kThreads;
    const long long per_expert = (resident + experts - 1) / experts;
    const int grid_x = static_cast<int>(needed < per_expert ? (needed > 0 ? needed : 1) : per_expert);
    const dim3 grid(grid_x, static_cast<unsigned>(experts));
    nvq::amax_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_elements, amax);
  });
}

extern "C" int nvq_nvfp4_global_scale(const float* amax, long long n, int dtype, float* global_scale, void* stream) {
  if (n < 0 || n > (1LL << 30)) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int grid = static_cast<int>((n + nvq::kThreads - 1) / nvq::kThreads);
    nvq::nvfp4_global_scale_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        amax, static_cast<int>(n), global_scale);
  });
}

// `table` is scratch of experts × 127 × 8 words (16-byte aligned) that the launch fills first.
extern "C" int nvq_nvfp4_quantize(const void* x, long long experts, long long rows, long long k, int dtype,
                                  const float* global_scale, unsigned int* table, unsigned char* packed,
                                  unsigned char* block_scale, void* stream) {
  if (experts < 0 || experts > 65535 || rows < 0 || k < 0 || k % nvq::kNvfp4Block || !nvq::aligned16(x) ||
      !nvq::aligned16(packed) || !nvq::aligned16(table)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k * experts == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 table_grid((nvq::kTableWords + nvq::kThreads - 1) / nvq::kThreads, static_cast<unsigned>(experts));
  const long long n_blocks = rows * k / nvq::kNvfp4Block;  // per expert
  if (nvq::is_bf16(dtype)) {
    nvq::nvfp4_cutoff_table_kernel<__nv_bfloat16><<<table_grid, nvq::kThreads, 0, s>>>(global_scale, table);
    const long long items = (n_blocks + nvq::kQuantizeItems - 1) / nvq::kQuantizeItems;
    const dim3 grid(nvq::grid_for(items, nvq::kThreads), static_cast<unsigned>(experts));
    nvq::nvfp4_quantize_bf16_kernel<<<grid, nvq::kThreads, 0, s>>>(
        static_cast<const uint4*>(x), n_blocks, global_scale, table, reinterpret_cast<uint2*>(packed), block_scale);
    return static_cast<int>(cudaGetLastError());
  }
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    nvq::nvfp4_cutoff_table_kernel<T><<<table_grid, nvq::kThreads, 0, s>>>(global_scale, table);
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const dim3 grid(nvq::grid_for(n_vec, nvq::kThreads), static_cast<unsigned>(experts));
    nvq::nvfp4_quantize_kernel<T><<<grid, nvq::kThreads, 0, s>>>(
        static_cast<const T*>(x), n_vec, global_scale, table, packed, block_scale);
  });
}

extern "C" int nvq_mxfp4_quantize(const void* x, long long rows, long long k, int dtype, unsigned char* packed,
                                  unsigned char* scale, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kMxfp4Block || !nvq::aligned16(x) || !nvq::aligned16(packed)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (nvq::is_bf16(dtype)) {
    const long long n16 = rows * k / 16;
    const long long items = (n16 + nvq::kQuantizeItems - 1) / nvq::kQuantizeItems;
    nvq::mxfp4_quantize_bf16_kernel<<<nvq::grid_for(items, nvq::kThreads), nvq::kThreads, 0, s>>>(
        static_cast<const uint4*>(x), n16, reinterpret_cast<uint2*>(packed), scale);
    return static_cast<int>(cudaGetLastError());
  }
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const int grid = nvq::grid_for(n_vec, nvq::kThreads);  // measured faster than a resident grid here
    nvq::mxfp4_quantize_kernel<T><<<grid, nvq::kThreads, 0, s>>>(static_cast<const T*>(x), n_vec, packed, scale);
  });
}

// The whole NVFP4 path for a stack in one call: each expert's amax (into amax_scratch, zeroed here)
// unless amax is given (already rounded to the weight dtype), its global scale into global_scale,
// the cutoff tables, the codes and block scales.
extern "C" int nvq_nvfp4_quantize_auto(const void* x, long long experts, long long rows, long long k, int dtype,
                                       const float* amax, float* amax_scratch, float* global_scale, unsigned int* table,
                                       unsigned char* packed, unsigned char* block_scale, void* stream) {
  if (experts < 0 || experts > 65535 || rows < 0 || k < 0 || k % nvq::kNvfp4Block) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (experts == 0) return 0;
  if (amax == nullptr) {
    const cudaError_t e = cudaMemsetAsync(amax_scratch, 0, experts * sizeof(float), static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return static_cast<int>(e);
    if (const int e2 = nvq_amax(x, experts, rows * k, dtype, amax_scratch, stream)) return e2;
    amax = amax_scratch;
  }
  if (const int e = nvq_nvfp4_global_scale(amax, experts, dtype, global_scale, stream)) return e;
  return nvq_nvfp4_quantize(x, experts, rows, k, dtype, global_scale, table, packed, block_scale, stream);
}
