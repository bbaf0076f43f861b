// NVFP4 and MXFP4 dequantize kernels, equal to nvq.formats.nvfp4.dequantize /
// nvq.formats.mxfp4.dequantize: each value is e2m1 · step in fp32, rounded once to the output
// dtype.
#include "fp4.cuh"

namespace nvq {

constexpr int kDequantThreads = 256;

// NVFP4: one thread per 16-value scale block (one 8-byte load of codes, two 16-byte stores),
// which measured faster here than one lane per output vector.
template <typename T>
__global__ void nvfp4_dequantize_kernel(const uint2* __restrict__ packed, const uint8_t* __restrict__ block_scale,
                                        const float* __restrict__ global_scale, long long n_blocks, T* __restrict__ out) {
  const float g = global_scale[0];
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; b < n_blocks; b += stride) {
    const uint2 codes = __ldg(packed + b);
    // nvfp4.block_step: fp32(s / g), one IEEE division (compressed-tensors' decompression order).
    const float step = __fdiv_rn(fp8_e4m3_decode(__ldg(block_scale + b)), g);
    float v[kNvfp4Block];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = __fmul_rn(e2m1_decode((codes.x >> (4 * j)) & 0xFu), step);
      v[8 + j] = __fmul_rn(e2m1_decode((codes.y >> (4 * j)) & 0xFu), step);
    }
    store_block<T, kNvfp4Block>(out + b * kNvfp4Block, v);
  }
}

// 16-bit outputs (bf16, fp16): one lane per 8 values. The 8 magnitudes times the step are rounded
// to the output dtype once per lane (a table of 16-bit values, as low and high bytes in two
// register pairs); then every 4 codes are 2 byte permutes of the table, an XOR for the signs
// ((-v)·step is exactly -(v·step)) and 2 permutes that interleave low and high bytes. Measured on
// the H200 (8192×28672 bf16): 154-157 µs against 182 µs for one thread per 16 values with two
// strided 16-byte stores, and 250 µs with four such blocks per thread.
template <typename T>
__device__ __forceinline__ uint32_t round_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t round_pair<__nv_bfloat16>(float lo, float hi) {
  return as_u32(__floats2bfloat162_rn(lo, hi));
}

template <>
__device__ __forceinline__ uint32_t round_pair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, 4);
  return r;
}

// The 8 magnitudes times step, rounded to T: low bytes of 0..3 and 4..7, high bytes likewise.
struct DecodeTable {
  uint32_t lo0, lo1, hi0, hi1;
};

template <typename T>
__device__ __forceinline__ DecodeTable decode_table(float step) {
  // e2m1.decode magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, times step in fp32, then rounded once.
  const uint32_t w0 = round_pair<T>(__fmul_rn(0.0f, step), __fmul_rn(0.5f, step));
  const uint32_t w1 = round_pair<T>(__fmul_rn(1.0f, step), __fmul_rn(1.5f, step));
  const uint32_t w2 = round_pair<T>(__fmul_rn(2.0f, step), __fmul_rn(3.0f, step));
  const uint32_t w3 = round_pair<T>(__fmul_rn(4.0f, step), __fmul_rn(6.0f, step));
  return {prmt(w0, w1, 0x6420), prmt(w2, w3, 0x6420), prmt(w0, w1, 0x7531), prmt(w2, w3, 0x7531)};
}

// Codes 0..3 in the low 16 bits of c (one nibble each) -> values 0, 1 in r0 and 2, 3 in r1.
__device__ __forceinline__ void decode4(const DecodeTable& t, uint32_t c, uint32_t& r0, uint32_t& r1) {
  const uint32_t magnitude = c & 0x7777u;
  const uint32_t lo = prmt(t.lo0, t.lo1, magnitude);
  // A selector nibble with bit 3 set (a negative code) replicates the picked byte's top bit:
  // 0x80 becomes 0xFF, whose bit 0, moved to bit 7, is the sign.
  const uint32_t hi = prmt(t.hi0, t.hi1, magnitude) ^ ((prmt(0x80808080u, 0x80808080u, c) << 7) & 0x80808080u);
  r0 = prmt(lo, hi, 0x5140);
  r1 = prmt(lo, hi, 0x7362);
}

// One lane per 8 values (a 16-byte output vector), so that a warp's stores are contiguous; the
// two (NVFP4) or four (MXFP4) lanes of a scale block each build its table.
template <typename T, bool kMx>
__global__ void dequantize8_kernel(const uint32_t* __restrict__ packed, const uint8_t* __restrict__ scale,
                                   const float* __restrict__ global_scale, long long n8, uint4* __restrict__ out) {
  const float g = kMx ? 1.0f : global_scale[0];
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n8; v += stride) {
    const uint32_t codes = __ldg(packed + v);
    const float step = kMx ? e8m0_decode(__ldg(scale + (v >> 2))) : __fdiv_rn(fp8_e4m3_decode(__ldg(scale + (v >> 1))), g);
    const DecodeTable t = decode_table<T>(step);
    uint4 o;
    decode4(t, codes, o.x, o.y);
    decode4(t, codes >> 16, o.z, o.w);
    out[v] = o;
  }
}

// fp32 MXFP4: lane v writes the 16-byte output vector v (kPer values) from its kPer/2 packed bytes, so a
// warp's loads and stores are contiguous.
template <typename T>
__device__ __forceinline__ uint32_t load_codes(const uint8_t* __restrict__ packed, long long v) {
  if constexpr (Vec<T>::kPerVec == 8) return __ldg(reinterpret_cast<const uint32_t*>(packed) + v);
  return __ldg(reinterpret_cast<const uint16_t*>(packed) + v);
}

template <typename T>
__global__ void mxfp4_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ scale,
                                        long long n_vec, T* __restrict__ out) {
  constexpr int kPer = Vec<T>::kPerVec;
  constexpr int kLanes = kMxfp4Block / kPer;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n_vec; v += stride) {
    const uint32_t codes = load_codes<T>(packed, v);
    const float s = e8m0_decode(__ldg(scale + v / kLanes));  // exact power of two, NaN for byte 255
    float e[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) e[j] = __fmul_rn(e2m1_decode((codes >> (4 * j)) & 0xFu), s);
    store_block<T, kPer>(out + v * kPer, e);
  }
}

}  // namespace nvq


extern "C" int nvq_nvfp4_dequantize(const unsigned char* packed, const unsigned char* block_scale,
                                    const float* global_scale, long long rows, long long k, int dtype, void* out,
                                    void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kNvfp4Block || !nvq::aligned16(packed) || !nvq::aligned16(out)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const long long n_blocks = rows * (k / nvq::kNvfp4Block);
  if (n_blocks == 0) return 0;
  const int grid = nvq::grid_for(n_blocks, nvq::kDequantThreads);
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
      const long long n8 = rows * k / 8;
      nvq::dequantize8_kernel<T, false><<<nvq::grid_for(n8, nvq::kDequantThreads), nvq::kDequantThreads, 0,
                                          static_cast<cudaStream_t>(stream)>>>(
          reinterpret_cast<const uint32_t*>(packed), block_scale, global_scale, n8, static_cast<uint4*>(out));
      return;
    }
    nvq::nvfp4_dequantize_kernel<T><<<grid, nvq::kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const uint2*>(packed), block_scale, global_scale, n_blocks, static_cast<T*>(out));
  });
}

extern "C" int nvq_mxfp4_dequantize(const unsigned char* packed, const unsigned char* scale, long long rows,
                                    long long k, int dtype, void* out, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kMxfp4Block || !nvq::aligned16(packed) || !nvq::aligned16(out)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k == 0) return 0;
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
      const long long n8 = rows * k / 8;
      nvq::dequantize8_kernel<T, true><<<nvq::grid_for(n8, nvq::kDequantThreads), nvq::kDequantThreads, 0,
                                         static_cast<cudaStream_t>(stream)>>>(
          reinterpret_cast<const uint32_t*>(packed), scale, nullptr, n8, static_cast<uint4*>(out));
      return;
    }
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const int grid = nvq::grid_for(n_vec, nvq::kDequantThreads);
    nvq::mxfp4_dequantize_kernel<T><<<grid, nvq::kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const uint8_t*>(packed), scale, n_vec, static_cast<T*>(out));
  });
}
