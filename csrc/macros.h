// One definition of the host/device qualifier, so every formula header compiles
// unchanged under g++ (CPU kernels) and nvcc (CUDA kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DBX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DBX_HOST_DEVICE inline
#endif
