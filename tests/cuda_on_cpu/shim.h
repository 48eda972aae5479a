// Compiles CUDA kernel sources as host C++ so the tests can run them on a CPU: the built-in
// indices become per-thread globals, __shared__ arrays become statics (blocks run one at a
// time), __syncthreads is a barrier across the block's std::threads, and the rounded
// intrinsics are plain IEEE operations (build with -ffp-contract=off). Test-only.
#pragma once
#include <math.h>
#include <stdint.h>
#include <algorithm>
#include <atomic>
#include <barrier>

struct dim3 {
    unsigned x, y, z;
};
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim, gridDim;
extern std::barrier<>* g_block_barrier;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
using std::max;
using std::min;

inline double atomicAdd(double* p, double v) {
    std::atomic_ref<double> r(*p);
    double old = r.load();
    while (!r.compare_exchange_weak(old, old + v)) {
    }
    return old;
}
inline float atomicAdd(float* p, float v) {
    std::atomic_ref<float> r(*p);
    float old = r.load();
    while (!r.compare_exchange_weak(old, old + v)) {
    }
    return old;
}
