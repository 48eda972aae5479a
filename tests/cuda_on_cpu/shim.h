// Compiles CUDA kernel sources as host C++ so the tests can run them on a CPU: the built-in
// indices become per-thread globals, __shared__ arrays become statics (blocks run one at a
// time), __syncthreads is a barrier across the block's std::threads, and the rounded
// intrinsics are plain IEEE operations (build with -ffp-contract=off), and the 16-bit storage
// types are opaque bit containers converted only through the intrinsics (so a kernel that
// forgets a conversion does not compile). Test-only.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
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
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
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

// 16-bit storage types: only bits, no arithmetic and no implicit conversions.
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

// binary16 through GCC's _Float16 (x86-64, GCC 12+): the conversions are IEEE, round to nearest
// even, subnormals kept, as nvcc's cvt.rn.f16.f32.
inline float __half2float(__half h) {
    _Float16 v;
    memcpy(&v, &h.bits, 2);
    return (float)v;
}
inline __half __float2half_rn(float f) {
    const _Float16 v = (_Float16)f;
    __half h;
    memcpy(&h.bits, &v, 2);
    return h;
}

// bfloat16 is the top half of a binary32: widening appends zero bits; narrowing rounds the low
// 16 bits to nearest even (a carry may ripple into the exponent, up to infinity) and keeps a NaN
// a NaN by setting its quiet bit.
inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = (uint16_t)((u >> 16) | 0x0040u);
    } else {
        h.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return h;
}
