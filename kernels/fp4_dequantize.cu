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

// MXFP4: lane v writes the 16-byte output vector v (kPer values) from its kPer/2 packed bytes, so a
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
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const int grid = nvq::grid_for(n_vec, nvq::kDequantThreads);
    nvq::mxfp4_dequantize_kernel<T><<<grid, nvq::kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const uint8_t*>(packed), scale, n_vec, static_cast<T*>(out));
  });
}
