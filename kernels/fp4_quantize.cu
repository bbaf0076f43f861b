// NVFP4 (compressed-tensors profile) and MXFP4 (EVEN rule) quantize kernels, byte for byte equal
// to nvq.formats.nvfp4.quantize / nvq.formats.mxfp4.quantize followed by e2m1.pack_pairs.
//
// NVFP4 takes two passes because block scales are encoded against the tensor (or fusion-group)
// amax: nvq_amax, then nvq_nvfp4_global_scale (one thread), then nvq_nvfp4_quantize.
// Neither quantize kernel divides per element: MXFP4 multiplies by the exact inverse of a power
// of two, NVFP4 compares against cutoffs tabulated per scale byte (fp4.cuh).
#include "fp4.cuh"

namespace nvq {

constexpr int kThreads = 256;

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, long long n, float* __restrict__ amax) {
  constexpr int kPer = Vec<T>::kPerVec;
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
    atomicMax(reinterpret_cast<unsigned int*>(amax), __float_as_uint(m));
  }
}

template <typename T>
__global__ void nvfp4_global_scale_kernel(const float* __restrict__ amax, float* __restrict__ global_scale) {
  global_scale[0] = ct_global_scale<T>(amax[0]);
}

// One step of the quantize kernels' software pipeline: take the vector loaded last step into `e`
// (±Inf clamped), start loading the next one, and return the amax of the scale block, reduced
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

// Little pieces of one scale block live in neighbouring lanes: lane v reads the 16-byte vector v
// (kPer elements), so a warp's loads and stores are contiguous. The block amax is a shuffle
// reduction over the block's lanes; each lane writes its own codes, the first lane the scale.
template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_kernel(const T* __restrict__ x, long long n_vec,
                                                                  const float* __restrict__ global_scale,
                                                                  uint8_t* __restrict__ packed,
                                                                  uint8_t* __restrict__ block_scale) {
  constexpr int kPer = Vec<T>::kPerVec;
  constexpr int kLanes = kNvfp4Block / kPer;
  __shared__ float cutoffs[kScaleBytes * kCutoffs];
  const float g = global_scale[0];
  for (int t = threadIdx.x; t < kScaleBytes * kCutoffs; t += blockDim.x) {
    const float step = __fdiv_rn(fp8_e4m3_decode(static_cast<uint8_t>(t / kCutoffs)), g);
    cutoffs[t] = smallest_reaching(step, t % kCutoffs);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  long long base = blockIdx.x * static_cast<long long>(blockDim.x) + (threadIdx.x - lane);
  float next[kPer];
  if (base + lane < n_vec) load_block<T, kPer>(x + (base + lane) * kPer, next);
  for (; base < n_vec; base += stride) {
    const long long v = base + lane;
    const bool active = v < n_vec;
    float e[kPer];
    const float m = take_vector_and_block_amax<T, kPer, kLanes>(x, v, stride, n_vec, next, e);  // whole warps iterate together, so every lane takes part
    if (!active) continue;
    const uint8_t s = ct_block_scale<T>(m, g);
    float cut[kCutoffs];
#pragma unroll
    for (int i = 0; i < kCutoffs; ++i) cut[i] = cutoffs[s * kCutoffs + i];
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

}  // namespace nvq


extern "C" int nvq_amax(const void* x, long long n_elements, int dtype, float* amax, void* stream) {
  if (n_elements < 0 || !nvq::aligned16(x)) return static_cast<int>(cudaErrorInvalidValue);
  if (n_elements == 0) return 0;
  // Resident grid: one atomic per block, and each thread strides over many vectors.
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int grid = nvq::resident_grid(nvq::amax_kernel<T>, (n_elements + 7) / 8, nvq::kThreads);
    nvq::amax_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_elements, amax);
  });
}

extern "C" int nvq_nvfp4_global_scale(const float* amax, int dtype, float* global_scale, void* stream) {
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    nvq::nvfp4_global_scale_kernel<T><<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(amax, global_scale);
  });
}

extern "C" int nvq_nvfp4_quantize(const void* x, long long rows, long long k, int dtype, const float* global_scale,
                                  unsigned char* packed, unsigned char* block_scale, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kNvfp4Block || !nvq::aligned16(x) || !nvq::aligned16(packed)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k == 0) return 0;
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    // Persistent grid: each block tabulates its cutoffs once, then strides over the tensor.
    const int grid = nvq::resident_grid(nvq::nvfp4_quantize_kernel<T>, n_vec, nvq::kThreads);
    nvq::nvfp4_quantize_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_vec, global_scale, packed, block_scale);
  });
}

extern "C" int nvq_mxfp4_quantize(const void* x, long long rows, long long k, int dtype, unsigned char* packed,
                                  unsigned char* scale, void* stream) {
  if (rows < 0 || k < 0 || k % nvq::kMxfp4Block || !nvq::aligned16(x) || !nvq::aligned16(packed)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows * k == 0) return 0;
  return nvq::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const long long n_vec = rows * k / nvq::Vec<T>::kPerVec;
    const int grid = nvq::grid_for(n_vec, nvq::kThreads);  // measured faster than a resident grid here
    nvq::mxfp4_quantize_kernel<T><<<grid, nvq::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n_vec, packed, scale);
  });
}
