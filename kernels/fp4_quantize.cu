// NVFP4 (compressed-tensors profile) and MXFP4 (EVEN rule) quantize kernels, byte for byte equal
// to nvq.formats.nvfp4.quantize / nvq.formats.mxfp4.quantize followed by e2m1.pack_pairs.
//
// NVFP4 takes two passes because block scales are encoded against the tensor (or fusion-group)
// amax: nvq_amax, then nvq_nvfp4_global_scale (one thread), then nvq_nvfp4_quantize. One thread
// owns one scale block: it reads the block with 16-byte loads, writes its packed codes as one
// 8- or 16-byte store and its scale byte; neighbouring threads own neighbouring blocks, so every
// access of a warp is contiguous.
#include "fp4.cuh"

namespace nvq {

constexpr int kThreads = 256;

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, long long n, float* __restrict__ amax) {
  constexpr int kPer = Vec<T>::kPerVec;
  float m = 0.0f;
  const long long n_vec = n / kPer;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n_vec; i += stride) {
    float v[kPer];
    load_block<T, kPer>(x + i * kPer, v);
#pragma unroll
    for (int j = 0; j < kPer; ++j) m = fmaxf(m, fabsf(sanitize<T>(v[j])));
  }
  for (long long i = n_vec * kPer + blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    m = fmaxf(m, fabsf(sanitize<T>(Dtype<T>::widen(x[i]))));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
  __shared__ float warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) m = fmaxf(m, warp_max[w]);
    // Non-negative floats order like their bit patterns, so an integer max is a float max.
    atomicMax(reinterpret_cast<unsigned int*>(amax), __float_as_uint(m));
  }
}

template <typename T>
__global__ void nvfp4_global_scale_kernel(const float* __restrict__ amax, float* __restrict__ global_scale) {
  global_scale[0] = ct_global_scale<T>(amax[0]);
}

template <typename T>
__global__ void nvfp4_quantize_kernel(const T* __restrict__ x, long long n_blocks, const float* __restrict__ global_scale,
                                      uint2* __restrict__ packed, uint8_t* __restrict__ block_scale) {
  const float g = global_scale[0];
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; b < n_blocks; b += stride) {
    float v[kNvfp4Block];
    load_block<T, kNvfp4Block>(x + b * kNvfp4Block, v);
    float block_amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kNvfp4Block; ++j) {
      v[j] = sanitize<T>(v[j]);
      block_amax = fmaxf(block_amax, fabsf(v[j]));
    }
    const uint8_t s = ct_block_scale<T>(block_amax, g);
    // nvfp4.block_step: one IEEE division e = fp32(s / g); then y = fp32(w / e), never w·g/s.
    const float step = __fdiv_rn(fp8_e4m3_decode(s), g);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) lo |= e2m1_encode_rne(__fdiv_rn(v[j], step)) << (4 * j);
#pragma unroll
    for (int j = 0; j < 8; ++j) hi |= e2m1_encode_rne(__fdiv_rn(v[8 + j], step)) << (4 * j);
    packed[b] = make_uint2(lo, hi);
    block_scale[b] = s;
  }
}

template <typename T>
__global__ void mxfp4_quantize_kernel(const T* __restrict__ x, long long n_blocks, uint4* __restrict__ packed,
                                      uint8_t* __restrict__ scale) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; b < n_blocks; b += stride) {
    float v[kMxfp4Block];
    load_block<T, kMxfp4Block>(x + b * kMxfp4Block, v);
    float block_amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kMxfp4Block; ++j) {
      v[j] = sanitize<T>(v[j]);
      block_amax = fmaxf(block_amax, fabsf(v[j]));
    }
    uint32_t byte = e8m0_even_byte<T>(block_amax);
    // mxfp4.quantize: the scale lives in the weight dtype; one that underflows there (fp16)
    // is replaced by 1 (byte 127), as compressed-tensors does.
    float s = Dtype<T>::round(e8m0_decode(byte));
    if (s == 0.0f) {
      byte = kE8M0Bias;
      s = 1.0f;
    }
    uint32_t word[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < kMxfp4Block; ++j) {
      // y = w / scale in the weight dtype: an fp32 division rounded once to the dtype.
      const float y = Dtype<T>::round(__fdiv_rn(v[j], s));
      word[j / 8] |= e2m1_encode_rne(y) << (4 * (j % 8));
    }
    packed[b] = make_uint4(word[0], word[1], word[2], word[3]);
    scale[b] = static_cast<uint8_t>(byte);
  }
}

}  // namespace nvq

using nvq::DType;

// Runs `launch` with the element type the dtype code names; unknown codes are an invalid value.
template <typename Launch>
static int dispatch(int dtype, Launch launch) {
  switch (dtype) {
    case nvq::kFloat32: launch(float{}); break;
    case nvq::kFloat16: launch(__half{}); break;
    case nvq::kBFloat16: launch(__nv_bfloat16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int nvq_amax(const void* x, long long n_elements, int dtype, float* amax, void* stream) {
  if (n_elements < 0 || !nvq::aligned16(x)) return static_cast<int>(cudaErrorInvalidValue);
  if (n_elements == 0) return 0;
  const int grid = nvq::grid_for((n_elements + 7) / 8, nvq::kThreads);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    nvq::amax_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_elements, amax);
  });
}

extern "C" int nvq_nvfp4_global_scale(const float* amax, int dtype, float* global_scale, void* stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    nvq::nvfp4_global_scale_kernel<T><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(amax, global_scale);
  });
}

extern "C" int nvq_nvfp4_quantize(const void* x, long long rows, long long k, int dtype, const float* global_scale,
                                  unsigned char* packed, unsigned char* block_scale, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kNvfp4Block || !nvq::aligned16(x) || !nvq::aligned16(packed)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const long long n_blocks = rows * (k / nvq::kNvfp4Block);
  if (n_blocks == 0) return 0;
  const int grid = nvq::grid_for(n_blocks, nvq::kThreads);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    nvq::nvfp4_quantize_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_blocks, global_scale, reinterpret_cast<uint2*>(packed), block_scale);
  });
}

extern "C" int nvq_mxfp4_quantize(const void* x, long long rows, long long k, int dtype, unsigned char* packed,
                                  unsigned char* scale, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kMxfp4Block || !nvq::aligned16(x) || !nvq::aligned16(packed)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const long long n_blocks = rows * (k / nvq::kMxfp4Block);
  if (n_blocks == 0) return 0;
  const int grid = nvq::grid_for(n_blocks, nvq::kThreads);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    nvq::mxfp4_quantize_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_blocks, reinterpret_cast<uint4*>(packed), scale);
  });
}
