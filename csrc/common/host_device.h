// MTP_HD marks the shared maths as host and device code when nvcc compiles it, plain inline
// otherwise. This is the one place that tells the two compilers apart.
#pragma once

#if defined(__CUDACC__)
#define MTP_HD __host__ __device__ __forceinline__
#else
#define MTP_HD inline
#endif
