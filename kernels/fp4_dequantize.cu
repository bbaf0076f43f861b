// NVFP4 and MXFP4 dequantize kernels, equal to nvq.formats.nvfp4.dequantize /
// nvq.formats.mxfp4.dequantize: each value is e2m1 · step in fp32, rounded once to the output
// dtype.
#include "fp4.cuh"

namespace nvq {

constexpr int kDequantThreads = 256;

// Lane v writes the 16-byte output vector v (kPer values) from its kPer/2 packed bytes, so a
// warp's loads and stores are contiguous.
template <typename T>
__device__ __forceinline__ uint32_t load_codes(const uint8_t* __restrict__ packed, long long v) {
  if constexpr (Vec<T>::kPerVec == 8) return __ldg(reinterpret_cast<const uint32_t*>(packed) + v);
  return __ldg(reinterpret_cast<const uint16_t*>(packed) + v);
}

template <typename T>
__global__ void nvfp4_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ block_scale,
                                        const float* __restrict__ global_scale, long long n_vec, T* __restrict__ out) {
  constexpr int kPer = Vec<T>::kPerVec;
  constexpr int kLanes = kNvfp4Block / kPer;
  // nvfp4.block_step: fp32(s / g), one IEEE division (compressed-tensors' decompression order),
  // tabulated once per block for the 128 non-negative E4M3 bytes (0x7F is NaN).
  __shared__ float steps[kScaleBytes + 1];
  const float g = global_scale[0];
  for (int b = threadIdx.x; b <= kScaleBytes; b += blockDim.x) steps[b] = __fdiv_rn(fp8_e4m3_decode(static_cast<uint8_t>(b)), g);
  __syncthreads();
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n_vec; v += stride) {
    const uint32_t codes = load_codes<T>(packed, v);
    const uint8_t s = __ldg(block_scale + v / kLanes);
    const float step = s <= kScaleBytes ? steps[s] : __fdiv_rn(fp8_e4m3_decode(s), g);  // sign bit set: rare
    float e[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) e[j] = __fmul_rn(e2m1_decode((codes >> (4 * j)) & 0xFu), step);
    store_block<T, kPer>(out + v * kPer, e);
  }
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

template <typename Launch>
static int dispatch_out(int dtype, Launch launch) {
  switch (dtype) {
    case nvq::kFloat32: launch(float{}); break;
    case nvq::kFloat16: launch(__half{}); break;
    case nvq::kBFloat16: launch(__nv_bfloat16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int nvq_nvfp4_dequantize(const unsigned char* packed, const unsigned char* block_scale,
                                    const float* global_scale, long long rows, long long k, int dtype, void* out,
                                    void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kNvfp4Block || !nvq::aligned16(packed) || !nvq::aligned16(out)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k == 0) return 0;
  return dispatch_out(dtype, [&](auto tag) {
    using T = decltype(tag);
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const int grid = nvq::grid_for(n_vec, nvq::kDequantThreads);
    nvq::nvfp4_dequantize_kernel<T><<<grid, nvq::kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const uint8_t*>(packed), block_scale, global_scale, n_vec, static_cast<T*>(out));
  });
}

extern "C" int nvq_mxfp4_dequantize(const unsigned char* packed, const unsigned char* scale, long long rows,
                                    long long k, int dtype, void* out, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kMxfp4Block || !nvq::aligned16(packed) || !nvq::aligned16(out)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k == 0) return 0;
  return dispatch_out(dtype, [&](auto tag) {
    using T = decltype(tag);
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const int grid = nvq::grid_for(n_vec, nvq::kDequantThreads);
    nvq::mxfp4_dequantize_kernel<T><<<grid, nvq::kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const uint8_t*>(packed), scale, n_vec, static_cast<T*>(out));
  });
}
