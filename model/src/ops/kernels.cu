// CUDA kernels of effdet's own ops (channels-last). Each mirrors the CPU kernel of the same name
// in this folder; long sums accumulate in f64 as the CPU code does, so GPU and CPU results agree
// to float rounding. Compiled to PTX by model/build.rs under the `cuda` feature.
//
// Activation storage: the kernels that read or write activations are templates over the storage
// type T and exist three times — float under the plain name, __half with suffix `_f16`,
// __nv_bfloat16 with suffix `_bf16` (mixed precision: 16-bit activations in memory). Every load
// of a T widens to float, every store rounds the float result to nearest even, and all the
// arithmetic in between is the float/double code of the f32 kernel, so a 16-bit kernel's output
// is the f32 kernel's output on the widened inputs, rounded once. Parameters (depthwise weights,
// batch-norm scale/shift/chan/coef, bias) stay float; sums stay double; maxpool_grad's input
// gradient is a float scratch for every T (atomics), narrowed afterwards by cvt_f32_to_{f16,bf16}.
// The focal loss, optimizer and batch-norm parameter kernels are f32 only.
#include <stdint.h>
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
// (Host builds of this file — the CPU test harness — get __half, __nv_bfloat16 and their
// conversions from tests/cuda_on_cpu/shim.h.)

typedef long long i64;

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// Index decomposition uses 32-bit unsigned arithmetic (64-bit division is emulated and was the
// bulk of these kernels' instructions): the host refuses tensors over 2^32 elements
// (`cuda::f32_view`), so `(unsigned)i` is exact.
typedef unsigned int u32;

// Column-reduction blocks are 32 channels wide and RED_Y rows tall.
#define RED_Y 8

// Loads in flight per thread. A 16-bit activation is 2 bytes: with one load per thread at a
// time, even a full GPU keeps too few bytes in flight to cover memory latency (PyTorch's
// elementwise kernels vectorize for the same reason). The hot bandwidth-bound kernels below
// therefore take ILP elements per thread per round, blockDim.x apart (each warp's accesses stay
// contiguous), and issue all their loads before using any; per element the arithmetic, and in
// the reductions the order of the sums, is unchanged. Their launches use `launch::
// elementwise_ilp` (ILP there must equal this).
#define ILP 4
#define ILP_ROUNDS(base, n)                                                      \
    for (i64 base = (i64)blockIdx.x * blockDim.x * ILP + threadIdx.x; base < (n); \
         base += (i64)blockDim.x * gridDim.x * ILP)
#define ILP_AT(base, k) ((base) + (i64)(k) * blockDim.x)

// Activation loads (exact widening) and stores (round to nearest even).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// The ILP elements of one round starting at `base`, widened (0 past the end): every load of a
// round is issued before any of them is used.
template <class T>
__device__ __forceinline__ void ilp_load(const T* __restrict__ p, i64 base, i64 n, float* v) {
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
        const i64 i = ILP_AT(base, k);
        v[k] = i < n ? to_f32(p[i]) : 0.0f;
    }
}

// Column c of the ILP rows r, r + stride, … of a [rows, C] buffer, widened (0 past the end):
// the column reductions' round, loads first as in `ilp_load`.
template <class T>
__device__ __forceinline__ void ilp_load_column(const T* __restrict__ p, i64 r, i64 stride,
                                                i64 rows, int C, int c, float* v) {
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
        const i64 rk = r + k * stride;
        v[k] = rk < rows ? to_f32(p[rk * C + c]) : 0.0f;
    }
}

// M(T, SUFFIX) for each activation storage type: the extern "C" kernels of one template.
#define FOR_EACH_ACT(M) \
    M(float, )          \
    M(__half, _f16)     \
    M(__nv_bfloat16, _bf16)

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// Sums v over the RED_Y rows of a (32 × RED_Y) block; thread row 0 gets the total.
__device__ __forceinline__ double block_col_sum(double v, double (*sh)[33]) {
    sh[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.y == 0) {
        for (int r = 0; r < RED_Y; ++r) total += sh[r][threadIdx.x];
    }
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------- depthwise convolution

#define DW_PARAMS int B, int H, int W, int C, int K, int S, int OH, int OW, int PT, int PL
#define DW_PASS B, H, W, C, K, S, OH, OW, PT, PL

template <class T>
__device__ __forceinline__ void dw_fwd_t(const T* __restrict__ x, const float* __restrict__ w,
                                         T* __restrict__ y, DW_PARAMS) {
    i64 n = (i64)B * OH * OW * C;
    GRID_STRIDE(i, n) {
        u32 r = (u32)i;
        int c = (int)(r % (u32)C);
        r /= (u32)C;
        int ox = (int)(r % (u32)OW);
        r /= (u32)OW;
        int oy = (int)(r % (u32)OH);
        int b = (int)(r / (u32)OH);
        float acc = 0.0f;
        for (int ky = 0; ky < K; ++ky) {
            int iy = oy * S + ky - PT;
            if (iy < 0 || iy >= H) continue;
            for (int kx = 0; kx < K; ++kx) {
                int ix = ox * S + kx - PL;
                if (ix < 0 || ix >= W) continue;
                acc += to_f32(x[(((i64)b * H + iy) * W + ix) * C + c]) * w[(ky * K + kx) * C + c];
            }
        }
        y[i] = from_f32<T>(acc);
    }
}

template <class T>
__device__ __forceinline__ void dw_grad_input_t(const T* __restrict__ g,
                                                const float* __restrict__ w, T* __restrict__ gx,
                                                DW_PARAMS) {
    i64 n = (i64)B * H * W * C;
    GRID_STRIDE(i, n) {
        u32 r = (u32)i;
        int c = (int)(r % (u32)C);
        r /= (u32)C;
        int ix = (int)(r % (u32)W);
        r /= (u32)W;
        int iy = (int)(r % (u32)H);
        int b = (int)(r / (u32)H);
        float acc = 0.0f;
        for (int ky = 0; ky < K; ++ky) {
            int oyn = iy + PT - ky;
            if (oyn < 0 || oyn % S != 0) continue;
            int oy = oyn / S;
            if (oy >= OH) continue;
            for (int kx = 0; kx < K; ++kx) {
                int oxn = ix + PL - kx;
                if (oxn < 0 || oxn % S != 0) continue;
                int ox = oxn / S;
                if (ox >= OW) continue;
                acc += to_f32(g[(((i64)b * OH + oy) * OW + ox) * C + c]) * w[(ky * K + kx) * C + c];
            }
        }
        gx[i] = from_f32<T>(acc);
    }
}

// grid (ceil(C/32), K·K, chunks), block (32, RED_Y); gw (f64, zeroed) [K, K, C]. Thread rows
// walk output rows (b, oy); each sums its row's OW positions, so no division per position.
template <class T>
__device__ __forceinline__ void dw_grad_weight_t(const T* __restrict__ x, const T* __restrict__ g,
                                                 double* __restrict__ gw, DW_PARAMS) {
    __shared__ double sh[RED_Y][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    int tap = blockIdx.y;
    int ky = tap / K, kx = tap % K;
    int rows = B * OH;
    double acc = 0.0;
    if (c < C) {
        for (int row = blockIdx.z * RED_Y + threadIdx.y; row < rows; row += gridDim.z * RED_Y) {
            int oy = row % OH, b = row / OH;
            int iy = oy * S + ky - PT;
            if (iy < 0 || iy >= H) continue;
            const T* xr = x + ((i64)b * H + iy) * W * C + c;
            const T* gr = g + (i64)row * OW * C + c;
            float part = 0.0f;
            for (int ox = 0; ox < OW; ++ox) {
                int ix = ox * S + kx - PL;
                if (ix < 0 || ix >= W) continue;
                part += to_f32(xr[(i64)ix * C]) * to_f32(gr[(i64)ox * C]);
            }
            acc += (double)part;
        }
    }
    double total = block_col_sum(acc, sh);
    if (threadIdx.y == 0 && c < C) atomicAdd(&gw[(i64)tap * C + c], total);
}

#define DW_GENERIC(T, SFX)                                                                        \
    extern "C" __global__ void dw_fwd##SFX(const T* __restrict__ x, const float* __restrict__ w,  \
                                           T* __restrict__ y, DW_PARAMS) {                        \
        dw_fwd_t<T>(x, w, y, DW_PASS);                                                            \
    }                                                                                             \
    extern "C" __global__ void dw_grad_input##SFX(                                                \
        const T* __restrict__ g, const float* __restrict__ w, T* __restrict__ gx, DW_PARAMS) {    \
        dw_grad_input_t<T>(g, w, gx, DW_PASS);                                                    \
    }                                                                                             \
    extern "C" __global__ void dw_grad_weight##SFX(                                               \
        const T* __restrict__ x, const T* __restrict__ g, double* __restrict__ gw, DW_PARAMS) {   \
        dw_grad_weight_t<T>(x, g, gw, DW_PASS);                                                   \
    }
FOR_EACH_ACT(DW_GENERIC)

// Specializations for D0's depthwise shapes (k 3 or 5, stride 1 or 2): the taps unroll, the
// stride tests become shifts, and threads walk rows — grid y over output (or input) rows, grid x
// over one row's positions × channels — so the (b, y) split happens once per row instead of
// per element. Same sums in the same tap order as the generic kernels above. This one, the
// input gradient at stride 2, takes one element per thread; the blocked kernels below take
// DW_R.

template <class T, int K, int S>
__device__ __forceinline__ void dw_grad_input_rows(const T* __restrict__ g,
                                                   const float* __restrict__ w,
                                                   T* __restrict__ gx, int B, int H, int W,
                                                   int C, int OH, int OW, int PT, int PL) {
    const u32 row_len = (u32)W * (u32)C;
    const u32 rows = (u32)B * (u32)H;
    for (u32 row = blockIdx.y; row < rows; row += gridDim.y) {
        const int iy = (int)(row % (u32)H), b = (int)(row / (u32)H);
        T* gr = gx + (i64)row * row_len;
        for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < row_len;
             j += gridDim.x * blockDim.x) {
            const int c = (int)(j % (u32)C), ix = (int)(j / (u32)C);
            float acc = 0.0f;
#pragma unroll
            for (int ky = 0; ky < K; ++ky) {
                const int oyn = iy + PT - ky;
                if (oyn < 0 || (S == 2 && (oyn & 1))) continue;
                const int oy = S == 2 ? oyn >> 1 : oyn;
                if (oy >= OH) continue;
                const T* grow = g + ((i64)b * OH + oy) * OW * C + c;
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    const int oxn = ix + PL - kx;
                    if (oxn < 0 || (S == 2 && (oxn & 1))) continue;
                    const int ox = S == 2 ? oxn >> 1 : oxn;
                    if (ox >= OW) continue;
                    acc += to_f32(grow[(i64)ox * C]) * w[(ky * K + kx) * C + c];
                }
            }
            gr[j] = from_f32<T>(acc);
        }
    }
}

// Outputs per thread of the blocked row kernels below (`DW_ROW_BLOCK` in depthwise.rs).
#define DW_R 4

// One kernel row's products for DW_R outputs, kx ascending: acc[r] += v[m] · w[kx] with
// m = r·S + kx (the forward), or m = r − kx + K − 1 with REVERSED (the input gradient at
// stride 1, whose input r meets the gradient at ox = ix + PL − kx), over the taps whose value
// column col0 + m lies in [0, n). v[m] is the value at column col0 + m (m < NV), read from
// row[(col0 + m)·C]; out-of-range columns are not read. With EDGE false the caller has checked
// that every column is in range: no tests at all (most of a row).
template <class T, int K, int S, int NV, bool REVERSED, bool EDGE>
__device__ __forceinline__ void dw_block_taps(const T* __restrict__ row,
                                              const float* __restrict__ wrow, int C, int col0,
                                              int n, float (&acc)[DW_R]) {
    float v[NV], wk[K];
    int off = col0 * C;
#pragma unroll
    for (int m = 0; m < NV; ++m, off += C) {
        v[m] = !EDGE || (unsigned)(col0 + m) < (unsigned)n ? to_f32(row[off]) : 0.0f;
    }
#pragma unroll
    for (int kx = 0; kx < K; ++kx) wk[kx] = wrow[kx * C];
#pragma unroll
    for (int r = 0; r < DW_R; ++r) {
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
            const int m = REVERSED ? r - kx + K - 1 : r * S + kx;
            if (EDGE && (unsigned)(col0 + m) >= (unsigned)n) continue;
            acc[r] += v[m] * wk[kx];
        }
    }
}

// The forward, DW_R outputs along the row per thread: each kernel row's (DW_R − 1)·S + K input
// values and K weights are loaded once for the DW_R outputs, and addresses are 32-bit offsets
// from per-row bases. Per output the one-output kernels spent ~500 PTX instructions on 25
// products at K = 5, most of them 64-bit index arithmetic: they were instruction-bound.
// Same sums in the same tap order (ky, then kx) as the generic kernel.
template <class T, int K, int S>
__device__ __forceinline__ void dw_fwd_block(const T* __restrict__ x, const float* __restrict__ w,
                                             T* __restrict__ y, int B, int H, int W, int C,
                                             int OH, int OW, int PT, int PL) {
    constexpr int NV = (DW_R - 1) * S + K;
    const u32 items = ((u32)OW + DW_R - 1) / DW_R * (u32)C;
    const u32 rows = (u32)B * (u32)OH;
    for (u32 row = blockIdx.y; row < rows; row += gridDim.y) {
        const int oy = (int)(row % (u32)OH), b = (int)(row / (u32)OH);
        const T* xb = x + (i64)b * H * W * C;
        T* yr = y + (i64)row * OW * C;
        for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < items;
             j += gridDim.x * blockDim.x) {
            const int c = (int)(j % (u32)C), ox0 = (int)(j / (u32)C) * DW_R;
            const int ix0 = ox0 * S - PL;
            const bool inside = ix0 >= 0 && ix0 + NV <= W;
            float acc[DW_R];
#pragma unroll
            for (int r = 0; r < DW_R; ++r) acc[r] = 0.0f;
#pragma unroll
            for (int ky = 0; ky < K; ++ky) {
                const int iy = oy * S - PT + ky;
                if ((unsigned)iy >= (unsigned)H) continue;
                const T* xr = xb + (u32)iy * (u32)W * (u32)C + c;
                const float* wr = w + ky * K * C + c;
                if (inside) {
                    dw_block_taps<T, K, S, NV, false, false>(xr, wr, C, ix0, W, acc);
                } else {
                    dw_block_taps<T, K, S, NV, false, true>(xr, wr, C, ix0, W, acc);
                }
            }
#pragma unroll
            for (int r = 0; r < DW_R; ++r) {
                if (ox0 + r < OW) yr[(u32)(ox0 + r) * (u32)C + c] = from_f32<T>(acc[r]);
            }
        }
    }
}

// The input gradient at stride 1, blocked like dw_fwd_block: DW_R inputs along the row share
// each kernel row's DW_R + K − 1 gradient values, from ox0 = ix0 + PL − K + 1 on.
template <class T, int K>
__device__ __forceinline__ void dw_grad_input_block(const T* __restrict__ g,
                                                    const float* __restrict__ w,
                                                    T* __restrict__ gx, int B, int H, int W,
                                                    int C, int OH, int OW, int PT, int PL) {
    constexpr int NV = DW_R + K - 1;
    const u32 items = ((u32)W + DW_R - 1) / DW_R * (u32)C;
    const u32 rows = (u32)B * (u32)H;
    for (u32 row = blockIdx.y; row < rows; row += gridDim.y) {
        const int iy = (int)(row % (u32)H), b = (int)(row / (u32)H);
        const T* gb = g + (i64)b * OH * OW * C;
        T* gr = gx + (i64)row * W * C;
        for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < items;
             j += gridDim.x * blockDim.x) {
            const int c = (int)(j % (u32)C), ix0 = (int)(j / (u32)C) * DW_R;
            const int ox0 = ix0 + PL - (K - 1);
            const bool inside = ox0 >= 0 && ox0 + NV <= OW;
            float acc[DW_R];
#pragma unroll
            for (int r = 0; r < DW_R; ++r) acc[r] = 0.0f;
#pragma unroll
            for (int ky = 0; ky < K; ++ky) {
                const int oy = iy + PT - ky;
                if (oy < 0 || oy >= OH) continue;
                const T* grow = gb + (u32)oy * (u32)OW * (u32)C + c;
                const float* wr = w + ky * K * C + c;
                if (inside) {
                    dw_block_taps<T, K, 1, NV, true, false>(grow, wr, C, ox0, OW, acc);
                } else {
                    dw_block_taps<T, K, 1, NV, true, true>(grow, wr, C, ox0, OW, acc);
                }
            }
#pragma unroll
            for (int r = 0; r < DW_R; ++r) {
                if (ix0 + r < W) gr[(u32)(ix0 + r) * (u32)C + c] = from_f32<T>(acc[r]);
            }
        }
    }
}

// One output row's kernel-gradient partial sums, every tap: part[ky·K + kx] += x(iy, ix) · g(ox)
// over the in-range taps (iy = oy·S + ky − PT, ix = ox·S + kx − PL), ox ascending.
template <class T, int K>
__device__ __forceinline__ void dw_row_taps(const T* __restrict__ xb, const T* __restrict__ gr,
                                            float (&part)[K * K], int oy, int H, int W, int C,
                                            int S, int OW, int PT, int PL) {
    for (int ox = 0; ox < OW; ++ox) {
        const float gv = to_f32(gr[(i64)ox * C]);
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
            const int iy = oy * S + ky - PT;
            if ((unsigned)iy >= (unsigned)H) continue;
            const T* xr = xb + (i64)iy * W * C;
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                const int ix = ox * S + kx - PL;
                if ((unsigned)ix >= (unsigned)W) continue;
                part[ky * K + kx] += to_f32(xr[(i64)ix * C]) * gv;
            }
        }
    }
}

// The same sums in the same order for a stride known at compile time: the K×K input values a
// position meets are a window that slides S columns per position, so each position loads S new
// values per kernel row instead of K, and loads them one position ahead (in flight during the
// products). Out-of-range values load as 0 and their taps are skipped as above.
template <class T, int K, int S>
__device__ __forceinline__ void dw_row_taps_window(const T* __restrict__ xb,
                                                   const T* __restrict__ gr,
                                                   float (&part)[K * K], int oy, int H, int W,
                                                   int C, int OW, int PT, int PL) {
    if (OW <= 0) return;
    const T* xr[K];
    bool row_in[K];
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
        const int iy = oy * S + ky - PT;
        row_in[ky] = (unsigned)iy < (unsigned)H;
        xr[ky] = xb + (i64)(row_in[ky] ? iy : 0) * W * C;
    }
    auto load = [&](int ky, int ix) -> float {
        return row_in[ky] && (unsigned)ix < (unsigned)W ? to_f32(xr[ky][(i64)ix * C]) : 0.0f;
    };
    float win[K][K];
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
#pragma unroll
        for (int kx = 0; kx < K; ++kx) win[ky][kx] = load(ky, kx - PL);
    }
    float gv = to_f32(gr[0]);
    for (int ox = 0; ox < OW; ++ox) {
        // Position ox + 1's new columns (ix = (ox + 1)·S + K − S − PL + j) and gradient.
        float next[K][S];
        float g_next = 0.0f;
        const bool more = ox + 1 < OW;
        const int ix_next = (ox + 1) * S + K - S - PL;
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
#pragma unroll
            for (int j = 0; j < S; ++j) next[ky][j] = more ? load(ky, ix_next + j) : 0.0f;
        }
        if (more) g_next = to_f32(gr[(i64)(ox + 1) * C]);
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
            if (!row_in[ky]) continue;
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                const int ix = ox * S + kx - PL;
                if ((unsigned)ix >= (unsigned)W) continue;
                part[ky * K + kx] += win[ky][kx] * gv;
            }
        }
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
#pragma unroll
            for (int kx = 0; kx < K - S; ++kx) win[ky][kx] = win[ky][kx + S];
#pragma unroll
            for (int j = 0; j < S; ++j) win[ky][K - S + j] = next[ky][j];
        }
        gv = g_next;
    }
}

// Kernel gradient with every tap in registers: each thread owns one channel and one output row
// per round, reads each gradient value once and each input value it meets about once per kernel
// row (the sliding window, strides 1 and 2), instead of one launch-wide pass per tap. Each round
// the block sums its rows' partials in f64 and adds them to gw: no per-thread f64 accumulators
// (50 registers at K = 5), so more warps fit per SM. grid (ceil(C/32), 1, chunks), block
// (32, RED_Y); gw (f64, zeroed) [K, K, C].
template <class T, int K>
__device__ __forceinline__ void dw_grad_weight_taps(const T* __restrict__ x,
                                                    const T* __restrict__ g,
                                                    double* __restrict__ gw, int B, int H, int W,
                                                    int C, int S, int OH, int OW, int PT,
                                                    int PL) {
    __shared__ double sh[RED_Y][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int rows = B * OH;
    // Every thread of the block takes the same number of rounds (block_col_sum synchronizes).
    for (int first = blockIdx.z * RED_Y; first < rows; first += gridDim.z * RED_Y) {
        const int row = first + threadIdx.y;
        float part[K * K];
#pragma unroll
        for (int t = 0; t < K * K; ++t) part[t] = 0.0f;
        if (c < C && row < rows) {
            const int oy = row % OH, b = row / OH;
            const T* gr = g + (i64)row * OW * C + c;
            const T* xb = x + (i64)b * H * W * C + c;
            if (S == 1) {
                dw_row_taps_window<T, K, 1>(xb, gr, part, oy, H, W, C, OW, PT, PL);
            } else if (S == 2) {
                dw_row_taps_window<T, K, 2>(xb, gr, part, oy, H, W, C, OW, PT, PL);
            } else {
                dw_row_taps<T, K>(xb, gr, part, oy, H, W, C, S, OW, PT, PL);
            }
        }
#pragma unroll
        for (int t = 0; t < K * K; ++t) {
            const double total = block_col_sum((double)part[t], sh);
            if (threadIdx.y == 0 && c < C) atomicAdd(&gw[(i64)t * C + c], total);
        }
    }
}

// DW_ROWS(K, S) / DW_GRAD_WEIGHT(K): the specialized kernels for every storage type.
#define DW_ROWS_T(K, S, T, SFX)                                                                  \
    extern "C" __global__ void dw_fwd_k##K##s##S##SFX(                                           \
        const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y, int B, int H,   \
        int W, int C, int K_, int S_, int OH, int OW, int PT, int PL) {                          \
        dw_fwd_block<T, K, S>(x, w, y, B, H, W, C, OH, OW, PT, PL);                              \
    }                                                                                            \
    extern "C" __global__ void dw_grad_input_k##K##s##S##SFX(                                    \
        const T* __restrict__ g, const float* __restrict__ w, T* __restrict__ gx, int B, int H,  \
        int W, int C, int K_, int S_, int OH, int OW, int PT, int PL) {                          \
        if (S == 1) {                                                                            \
            dw_grad_input_block<T, K>(g, w, gx, B, H, W, C, OH, OW, PT, PL);                     \
        } else {                                                                                 \
            dw_grad_input_rows<T, K, S>(g, w, gx, B, H, W, C, OH, OW, PT, PL);                   \
        }                                                                                        \
    }
#define DW_ROWS(K, S)                  \
    DW_ROWS_T(K, S, float, )           \
    DW_ROWS_T(K, S, __half, _f16)      \
    DW_ROWS_T(K, S, __nv_bfloat16, _bf16)
DW_ROWS(3, 1)
DW_ROWS(3, 2)
DW_ROWS(5, 1)
DW_ROWS(5, 2)

#define DW_GRAD_WEIGHT_T(K, T, SFX)                                                              \
    extern "C" __global__ void dw_grad_weight_k##K##SFX(                                         \
        const T* __restrict__ x, const T* __restrict__ g, double* __restrict__ gw, int B, int H, \
        int W, int C, int K_, int S, int OH, int OW, int PT, int PL) {                           \
        dw_grad_weight_taps<T, K>(x, g, gw, B, H, W, C, S, OH, OW, PT, PL);                      \
    }
#define DW_GRAD_WEIGHT(K)                  \
    DW_GRAD_WEIGHT_T(K, float, )           \
    DW_GRAD_WEIGHT_T(K, __half, _f16)      \
    DW_GRAD_WEIGHT_T(K, __nv_bfloat16, _bf16)
DW_GRAD_WEIGHT(3)
DW_GRAD_WEIGHT(5)

// ---------------------------------------------------------------- stem patches

// The stem's 3×3 stride-2 "same" convolution as a product: x [B, C, H, W] (the NCHW images) →
// out [B, OH, OW, C·9], columns (c, ky, kx) like the OIHW kernel's, 0 outside the image. One
// thread per output element, so the writes are contiguous; the reads gather (cached).
template <class T>
__device__ __forceinline__ void stem_patches_t(const T* __restrict__ x, T* __restrict__ out,
                                               int B, int C, int H, int W, int OH, int OW,
                                               int PT, int PL) {
    const u32 cols = (u32)C * 9;
    const i64 n = (i64)B * OH * OW * cols;
    GRID_STRIDE(i, n) {
        u32 r = (u32)i;
        const u32 col = r % cols;
        r /= cols;
        const int ox = (int)(r % (u32)OW);
        r /= (u32)OW;
        const int oy = (int)(r % (u32)OH);
        const int b = (int)(r / (u32)OH);
        const int c = (int)(col / 9), tap = (int)(col % 9);
        const int iy = oy * 2 + tap / 3 - PT, ix = ox * 2 + tap % 3 - PL;
        const bool inside = (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W;
        out[i] = inside ? x[(((i64)b * C + c) * H + iy) * W + ix] : from_f32<T>(0.0f);
    }
}

#define STEM_KERNELS(T, SFX)                                                                      \
    extern "C" __global__ void stem_patches##SFX(const T* __restrict__ x, T* __restrict__ out,   \
                                                 int B, int C, int H, int W, int OH, int OW,      \
                                                 int PT, int PL) {                                \
        stem_patches_t<T>(x, out, B, C, H, W, OH, OW, PT, PL);                                    \
    }
FOR_EACH_ACT(STEM_KERNELS)

// ---------------------------------------------------------------- "same" max-pool

#define POOL_PARAMS \
    int B, int H, int W, int C, int KH, int KW, int SH, int SW, int OH, int OW, int PT, int PL
#define POOL_PASS B, H, W, C, KH, KW, SH, SW, OH, OW, PT, PL

template <class T>
__device__ __forceinline__ void maxpool_fwd_t(const T* __restrict__ x, T* __restrict__ y,
                                              POOL_PARAMS) {
    i64 n = (i64)B * OH * OW * C;
    GRID_STRIDE(i, n) {
        u32 r = (u32)i;
        int c = (int)(r % (u32)C);
        r /= (u32)C;
        int ox = (int)(r % (u32)OW);
        r /= (u32)OW;
        int oy = (int)(r % (u32)OH);
        int b = (int)(r / (u32)OH);
        int y0 = max(oy * SH - PT, 0), y1 = min(oy * SH - PT + KH, H);
        int x0 = max(ox * SW - PL, 0), x1 = min(ox * SW - PL + KW, W);
        float best = -INFINITY;
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) {
                float v = to_f32(x[(((i64)b * H + iy) * W + ix) * C + c]);
                if (v > best) best = v;
            }
        y[i] = from_f32<T>(best);
    }
}

// Each output gradient goes to its window's first maximum. gx is f32 (zeroed) for every T: the
// atomics accumulate in float, and cvt_f32_to_{f16,bf16} narrows the result.
template <class T>
__device__ __forceinline__ void maxpool_grad_t(const T* __restrict__ x, const T* __restrict__ g,
                                               float* __restrict__ gx, POOL_PARAMS) {
    i64 n = (i64)B * OH * OW * C;
    GRID_STRIDE(i, n) {
        u32 r = (u32)i;
        int c = (int)(r % (u32)C);
        r /= (u32)C;
        int ox = (int)(r % (u32)OW);
        r /= (u32)OW;
        int oy = (int)(r % (u32)OH);
        int b = (int)(r / (u32)OH);
        int y0 = max(oy * SH - PT, 0), y1 = min(oy * SH - PT + KH, H);
        int x0 = max(ox * SW - PL, 0), x1 = min(ox * SW - PL + KW, W);
        i64 img = (i64)b * H * W * C;
        float best = -INFINITY;
        i64 arg = 0;
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) {
                i64 off = ((i64)iy * W + ix) * C + c;
                float v = to_f32(x[img + off]);
                if (v > best) {
                    best = v;
                    arg = off;
                }
            }
        atomicAdd(&gx[img + arg], to_f32(g[i]));
    }
}

#define POOL_KERNELS(T, SFX)                                                                     \
    extern "C" __global__ void maxpool_fwd##SFX(const T* __restrict__ x, T* __restrict__ y,      \
                                                POOL_PARAMS) {                                   \
        maxpool_fwd_t<T>(x, y, POOL_PASS);                                                       \
    }                                                                                            \
    extern "C" __global__ void maxpool_grad##SFX(const T* __restrict__ x, const T* __restrict__ g, \
                                                 float* __restrict__ gx, POOL_PARAMS) {          \
        maxpool_grad_t<T>(x, g, gx, POOL_PASS);                                                  \
    }
FOR_EACH_ACT(POOL_KERNELS)

// ---------------------------------------------------------------- column sums, conversions

// out[z, c] += Σ_r x[z, r, c] (f64, zeroed) for x [Z, rows, C].
// grid (ceil(C/32), chunks, Z), block (32, RED_Y).
template <class T>
__device__ __forceinline__ void col_sum_t(const T* __restrict__ x, double* __restrict__ out,
                                          i64 rows, int C) {
    __shared__ double sh[RED_Y][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    const T* xz = x + (i64)blockIdx.z * rows * C;
    double acc = 0.0;
    if (c < C) {
        const i64 stride = (i64)gridDim.y * RED_Y;
        for (i64 r = (i64)blockIdx.y * RED_Y + threadIdx.y; r < rows; r += stride * ILP) {
            float v[ILP];
            ilp_load_column(xz, r, stride, rows, C, c, v);
#pragma unroll
            for (int k = 0; k < ILP; ++k)
                if (r + k * stride < rows) acc += (double)v[k];
        }
    }
    double total = block_col_sum(acc, sh);
    if (threadIdx.y == 0 && c < C) atomicAdd(&out[(i64)blockIdx.z * C + c], total);
}

// out[c] += Σ_r (x[r, c] − mean[c])² (f64, zeroed).
template <class T>
__device__ __forceinline__ void col_sq_dev_t(const T* __restrict__ x,
                                             const double* __restrict__ mean,
                                             double* __restrict__ out, i64 rows, int C) {
    __shared__ double sh[RED_Y][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    double acc = 0.0;
    if (c < C) {
        const double m = mean[c];
        const i64 stride = (i64)gridDim.y * RED_Y;
        for (i64 r = (i64)blockIdx.y * RED_Y + threadIdx.y; r < rows; r += stride * ILP) {
            float v[ILP];
            ilp_load_column(x, r, stride, rows, C, c, v);
#pragma unroll
            for (int k = 0; k < ILP; ++k) {
                if (r + k * stride < rows) {
                    const double d = (double)v[k] - m;
                    acc += d * d;
                }
            }
        }
    }
    double total = block_col_sum(acc, sh);
    if (threadIdx.y == 0 && c < C) atomicAdd(&out[c], total);
}

// out[z, c] += Σ_r x[z, r, c]·g[z, r, c] (f64, zeroed; each product exact in f64) for x, g
// [Z, rows, C]: the channel gate's gradient in one pass, without an activation-sized product.
template <class T>
__device__ __forceinline__ void col_dot_t(const T* __restrict__ x, const T* __restrict__ g,
                                          double* __restrict__ out, i64 rows, int C) {
    __shared__ double sh[RED_Y][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    const i64 off = (i64)blockIdx.z * rows * C;
    double acc = 0.0;
    if (c < C) {
        const i64 stride = (i64)gridDim.y * RED_Y;
        for (i64 r = (i64)blockIdx.y * RED_Y + threadIdx.y; r < rows; r += stride * ILP) {
            float xv[ILP], gv[ILP];
            ilp_load_column(x + off, r, stride, rows, C, c, xv);
            ilp_load_column(g + off, r, stride, rows, C, c, gv);
#pragma unroll
            for (int k = 0; k < ILP; ++k)
                if (r + k * stride < rows) acc += (double)xv[k] * (double)gv[k];
        }
    }
    double total = block_col_sum(acc, sh);
    if (threadIdx.y == 0 && c < C) atomicAdd(&out[(i64)blockIdx.z * C + c], total);
}

// dst = src·scale, rounded to float (and then to T, as every activation store).
template <class T>
__device__ __forceinline__ void scale_f64_to_t(const double* __restrict__ src,
                                               T* __restrict__ dst, double scale, i64 n) {
    GRID_STRIDE(i, n) { dst[i] = from_f32<T>((float)(src[i] * scale)); }
}

#define COL_KERNELS(T, SFX)                                                                      \
    extern "C" __global__ void col_sum##SFX(const T* __restrict__ x, double* __restrict__ out,   \
                                            i64 rows, int C) {                                   \
        col_sum_t<T>(x, out, rows, C);                                                           \
    }                                                                                            \
    extern "C" __global__ void col_sq_dev##SFX(const T* __restrict__ x,                          \
                                               const double* __restrict__ mean,                  \
                                               double* __restrict__ out, i64 rows, int C) {      \
        col_sq_dev_t<T>(x, mean, out, rows, C);                                                  \
    }                                                                                            \
    extern "C" __global__ void col_dot##SFX(const T* __restrict__ x, const T* __restrict__ g,    \
                                            double* __restrict__ out, i64 rows, int C) {         \
        col_dot_t<T>(x, g, out, rows, C);                                                        \
    }
FOR_EACH_ACT(COL_KERNELS)

extern "C" __global__ void scale_f64_to_f32(const double* __restrict__ src, float* __restrict__ dst,
                                            double scale, i64 n) {
    scale_f64_to_t<float>(src, dst, scale, n);
}
extern "C" __global__ void scale_f64_to_f16(const double* __restrict__ src,
                                            __half* __restrict__ dst, double scale, i64 n) {
    scale_f64_to_t<__half>(src, dst, scale, n);
}
extern "C" __global__ void scale_f64_to_bf16(const double* __restrict__ src,
                                             __nv_bfloat16* __restrict__ dst, double scale, i64 n) {
    scale_f64_to_t<__nv_bfloat16>(src, dst, scale, n);
}

// f32 → 16-bit, round to nearest even (maxpool_grad's f32 scratch into the activation type).
extern "C" __global__ void cvt_f32_to_f16(const float* __restrict__ src, __half* __restrict__ dst,
                                          i64 n) {
    GRID_STRIDE(i, n) { dst[i] = from_f32<__half>(src[i]); }
}
extern "C" __global__ void cvt_f32_to_bf16(const float* __restrict__ src,
                                           __nv_bfloat16* __restrict__ dst, i64 n) {
    GRID_STRIDE(i, n) { dst[i] = from_f32<__nv_bfloat16>(src[i]); }
}

extern "C" __global__ void scale_f64(double* __restrict__ v, double scale, i64 n) {
    GRID_STRIDE(i, n) { v[i] *= scale; }
}

// ---------------------------------------------------------------- batch norm

// inv[c] = 1/sqrt(sq[c]/n + eps) in place.
extern "C" __global__ void bn_inv_std(double* __restrict__ sq, double n, double eps, int C) {
    GRID_STRIDE(i, C) { sq[i] = 1.0 / sqrt(sq[i] / n + eps); }
}

// Folds normalization and affine into one scale and shift per channel (as the CPU code does).
extern "C" __global__ void bn_scale_shift(const float* __restrict__ gamma,
                                          const float* __restrict__ beta,
                                          const double* __restrict__ mean,
                                          const double* __restrict__ inv, float* __restrict__ scale,
                                          float* __restrict__ shift, int C) {
    GRID_STRIDE(i, C) {
        double gi = (double)gamma[i] * inv[i];
        scale[i] = (float)gi;
        shift[i] = (float)((double)beta[i] - gi * mean[i]);
    }
}

// y = act(x·scale + shift); act 0 = none, 1 = swish.
template <class T>
__device__ __forceinline__ void bn_apply_t(const T* __restrict__ x, const float* __restrict__ scale,
                                           const float* __restrict__ shift, T* __restrict__ y,
                                           i64 n, int C, int act) {
    ILP_ROUNDS(base, n) {
        float v[ILP], sc[ILP], sf[ILP];
        ilp_load(x, base, n, v);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            const int c = (int)((u32)i % (u32)C);
            sc[k] = i < n ? scale[c] : 0.0f;
            sf[k] = i < n ? shift[c] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            if (i >= n) continue;
            const float z = v[k] * sc[k] + sf[k];
            y[i] = from_f32<T>(act ? z / (1.0f + expf(-z)) : z);
        }
    }
}

// (x̂, g_z) of one element; chan = [mean, inv, gamma, beta] each [C] (f32).
__device__ __forceinline__ void bn_xhat_gz(float x, float g, int c, const float* chan, int C,
                                           int act, float* xhat, float* gz) {
    float xh = (x - chan[c]) * chan[C + c];
    *xhat = xh;
    if (act) {
        float z = chan[2 * C + c] * xh + chan[3 * C + c];
        float s = 1.0f / (1.0f + expf(-z));
        *gz = g * s * (1.0f + z * (1.0f - s));
    } else {
        *gz = g;
    }
}

// out (f64, zeroed) [2, C]: Σ g_z and Σ g_z·x̂. grid (ceil(C/32), chunks), block (32, RED_Y).
template <class T>
__device__ __forceinline__ void bn_grad_reduce_t(const T* __restrict__ x, const T* __restrict__ g,
                                                 const float* __restrict__ chan,
                                                 double* __restrict__ out, i64 rows, int C,
                                                 int act) {
    __shared__ double sh[RED_Y][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    double sg = 0.0, sgx = 0.0;
    if (c < C) {
        const i64 stride = (i64)gridDim.y * RED_Y;
        for (i64 r = (i64)blockIdx.y * RED_Y + threadIdx.y; r < rows; r += stride * ILP) {
            float xv[ILP], gv[ILP];
            ilp_load_column(x, r, stride, rows, C, c, xv);
            ilp_load_column(g, r, stride, rows, C, c, gv);
#pragma unroll
            for (int k = 0; k < ILP; ++k) {
                if (r + k * stride >= rows) continue;
                float xh, gz;
                bn_xhat_gz(xv[k], gv[k], c, chan, C, act, &xh, &gz);
                sg += (double)gz;
                sgx += (double)(gz * xh);
            }
        }
    }
    double t0 = block_col_sum(sg, sh);
    double t1 = block_col_sum(sgx, sh);
    if (threadIdx.y == 0 && c < C) {
        atomicAdd(&out[c], t0);
        atomicAdd(&out[C + c], t1);
    }
}

// dx = k·g_z − off − x̂·slope; coef = [k, off, slope] each [C] (f32).
template <class T>
__device__ __forceinline__ void bn_grad_input_t(const T* __restrict__ x, const T* __restrict__ g,
                                                const float* __restrict__ chan,
                                                const float* __restrict__ coef,
                                                T* __restrict__ dx, i64 n, int C, int act) {
    ILP_ROUNDS(base, n) {
        float xv[ILP], gv[ILP];
        ilp_load(x, base, n, xv);
        ilp_load(g, base, n, gv);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            if (i >= n) continue;
            const int c = (int)((u32)i % (u32)C);
            float xh, gz;
            bn_xhat_gz(xv[k], gv[k], c, chan, C, act, &xh, &gz);
            dx[i] = from_f32<T>(coef[c] * gz - coef[C + c] - xh * coef[2 * C + c]);
        }
    }
}

#define BN_KERNELS(T, SFX)                                                                       \
    extern "C" __global__ void bn_apply##SFX(const T* __restrict__ x,                            \
                                             const float* __restrict__ scale,                    \
                                             const float* __restrict__ shift, T* __restrict__ y, \
                                             i64 n, int C, int act) {                            \
        bn_apply_t<T>(x, scale, shift, y, n, C, act);                                            \
    }                                                                                            \
    extern "C" __global__ void bn_grad_reduce##SFX(                                              \
        const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ chan,        \
        double* __restrict__ out, i64 rows, int C, int act) {                                    \
        bn_grad_reduce_t<T>(x, g, chan, out, rows, C, act);                                      \
    }                                                                                            \
    extern "C" __global__ void bn_grad_input##SFX(                                               \
        const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ chan,        \
        const float* __restrict__ coef, T* __restrict__ dx, i64 n, int C, int act) {             \
        bn_grad_input_t<T>(x, g, chan, coef, dx, n, C, act);                                     \
    }
FOR_EACH_ACT(BN_KERNELS)

// ---------------------------------------------------------------- channel broadcasts, swish

template <class T>
__device__ __forceinline__ void bias_add_t(const T* __restrict__ x, const float* __restrict__ b,
                                           T* __restrict__ y, i64 n, int C) {
    ILP_ROUNDS(base, n) {
        float v[ILP], bv[ILP];
        ilp_load(x, base, n, v);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            bv[k] = i < n ? b[(u32)i % (u32)C] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            if (i < n) y[i] = from_f32<T>(v[k] + bv[k]);
        }
    }
}

// y[b, p, c] = x[b, p, c] · gate[b, c] for x [B, HW, C] (the gate in f32 for every T).
// y = x · v[b, c] (the squeeze-and-excitation gate) or, with ADD, x + v[b, c] (a spatial mean's
// gradient added to x's other gradient): v [B, C] f32, broadcast over H and W.
template <class T, bool ADD>
__device__ __forceinline__ void channel_bcast_t(const T* __restrict__ x,
                                                const float* __restrict__ v_bc,
                                                T* __restrict__ y, i64 n, i64 hw, int C) {
    ILP_ROUNDS(base, n) {
        float v[ILP], gv[ILP];
        ilp_load(x, base, n, v);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            const u32 b = (u32)i / ((u32)hw * (u32)C);
            gv[k] = i < n ? to_f32(v_bc[(i64)b * C + (u32)i % (u32)C]) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            if (i < n) y[i] = from_f32<T>(ADD ? v[k] + gv[k] : v[k] * gv[k]);
        }
    }
}

template <class T>
__device__ __forceinline__ void swish_fwd_t(const T* __restrict__ x, T* __restrict__ y, i64 n) {
    ILP_ROUNDS(base, n) {
        float v[ILP];
        ilp_load(x, base, n, v);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            if (i < n) y[i] = from_f32<T>(v[k] / (1.0f + expf(-v[k])));
        }
    }
}

template <class T>
__device__ __forceinline__ void swish_grad_t(const T* __restrict__ x, const T* __restrict__ g,
                                             T* __restrict__ d, i64 n) {
    ILP_ROUNDS(base, n) {
        float v[ILP], gv[ILP];
        ilp_load(x, base, n, v);
        ilp_load(g, base, n, gv);
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const i64 i = ILP_AT(base, k);
            if (i >= n) continue;
            const float s = sigmoid_f(v[k]);
            d[i] = from_f32<T>(gv[k] * s * (1.0f + v[k] * (1.0f - s)));
        }
    }
}

#define ELEMENTWISE_KERNELS(T, SFX)                                                              \
    extern "C" __global__ void bias_add##SFX(const T* __restrict__ x, const float* __restrict__ b, \
                                             T* __restrict__ y, i64 n, int C) {                  \
        bias_add_t<T>(x, b, y, n, C);                                                            \
    }                                                                                            \
    extern "C" __global__ void channel_gate##SFX(const T* __restrict__ x,                        \
                                                 const float* __restrict__ gate,                 \
                                                 T* __restrict__ y,                              \
                                                 i64 n, i64 hw, int C) {                         \
        channel_bcast_t<T, false>(x, gate, y, n, hw, C);                                         \
    }                                                                                            \
    extern "C" __global__ void channel_add##SFX(const T* __restrict__ x,                         \
                                                const float* __restrict__ v,                     \
                                                T* __restrict__ y,                               \
                                                i64 n, i64 hw, int C) {                          \
        channel_bcast_t<T, true>(x, v, y, n, hw, C);                                             \
    }                                                                                            \
    extern "C" __global__ void swish_fwd##SFX(const T* __restrict__ x, T* __restrict__ y,        \
                                              i64 n) {                                           \
        swish_fwd_t<T>(x, y, n);                                                                 \
    }                                                                                            \
    extern "C" __global__ void swish_grad##SFX(const T* __restrict__ x, const T* __restrict__ g,  \
                                               T* __restrict__ d, i64 n) {                       \
        swish_grad_t<T>(x, g, d, n);                                                             \
    }
FOR_EACH_ACT(ELEMENTWISE_KERNELS)

// ---------------------------------------------------------------- focal loss

// (loss, dloss/dx) of one entry, in f64 as the CPU code computes it.
__device__ __forceinline__ void focal_entry(double x, bool positive, double alpha, double gamma,
                                            double smoothing, double* loss, double* dloss) {
    double e = exp(-fabs(x));
    double p = x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    double t = positive ? 1.0 : 0.0;
    double ys = t * (1.0 - smoothing) + 0.5 * smoothing;
    double ce = fmax(x, 0.0) + log1p(e) - x * ys;
    double a = positive ? alpha : 1.0 - alpha;
    double base = positive ? 1.0 - p : p;
    double m;
    if (gamma == 1.5) m = base * sqrt(base);
    else if (gamma == 2.0) m = base * base;
    else m = pow(base, gamma);
    double dm = positive ? -gamma * p * m : gamma * (1.0 - p) * m;
    *loss = a * m * ce;
    *dloss = a * (dm * ce + m * (p - ys));
}

// Class status of entry k for an id: 1 positive, 0 negative, -1 ignored, -2 invalid id.
__device__ __forceinline__ int focal_status(i64 id, int k, int K) {
    if (id == -2) return -1;
    if (id == -1) return 0;
    if (id >= 0 && id < K) return id == k ? 1 : 0;
    return -2;
}

// Class ids arrive as i32 (the pipeline's) or i64; candle's CUDA backend casts neither.
#define FOCAL_KERNELS(ID_T, SUFFIX)                                                              \
    /* out[0] += Σ loss (f64, zeroed); bad[0] = 1 on an invalid class id. */                  \
    extern "C" __global__ void focal_loss_##SUFFIX(                                             \
        const float* __restrict__ x, const ID_T* __restrict__ ids, double* __restrict__ out,    \
        int* __restrict__ bad, i64 n, int K, double alpha, double gamma, double smoothing) {    \
        __shared__ double sh[256];                                                              \
        double acc = 0.0;                                                                       \
        GRID_STRIDE(i, n) {                                                                     \
            int st = focal_status((i64)ids[(u32)i / (u32)K], (int)((u32)i % (u32)K), K);        \
            if (st == -2) {                                                                     \
                bad[0] = 1;                                                                     \
            } else if (st >= 0) {                                                               \
                double l, d;                                                                    \
                focal_entry((double)x[i], st == 1, alpha, gamma, smoothing, &l, &d);            \
                acc += l;                                                                       \
            }                                                                                   \
        }                                                                                       \
        sh[threadIdx.x] = acc;                                                                  \
        __syncthreads();                                                                        \
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {                                          \
            if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];                        \
            __syncthreads();                                                                    \
        }                                                                                       \
        if (threadIdx.x == 0) atomicAdd(out, sh[0]);                                            \
    }                                                                                           \
    /* d = scale[0] · dloss/dx (0 for ignored anchors); bad[0] = 1 on an invalid id. */        \
    extern "C" __global__ void focal_grad_##SUFFIX(                                             \
        const float* __restrict__ x, const ID_T* __restrict__ ids,                              \
        const double* __restrict__ scale, float* __restrict__ d, int* __restrict__ bad, i64 n,  \
        int K, double alpha, double gamma, double smoothing) {                                  \
        double s = scale[0];                                                                    \
        GRID_STRIDE(i, n) {                                                                     \
            int st = focal_status((i64)ids[(u32)i / (u32)K], (int)((u32)i % (u32)K), K);        \
            if (st == -2) {                                                                     \
                bad[0] = 1;                                                                     \
                d[i] = 0.0f;                                                                    \
            } else if (st < 0) {                                                                \
                d[i] = 0.0f;                                                                    \
            } else {                                                                            \
                double l, dl;                                                                   \
                focal_entry((double)x[i], st == 1, alpha, gamma, smoothing, &l, &dl);           \
                d[i] = (float)(s * dl);                                                         \
            }                                                                                   \
        }                                                                                       \
    }

FOCAL_KERNELS(int, i32)
FOCAL_KERNELS(i64, i64)

// scale/shift from params [4, C] f64 = (mean, inv_std, γ, β) (the resident batch norm).
extern "C" __global__ void bn_scale_shift_params(const double* __restrict__ p,
                                                 float* __restrict__ scale,
                                                 float* __restrict__ shift, int C) {
    GRID_STRIDE(i, C) {
        double gi = p[2 * C + i] * p[C + i];
        scale[i] = (float)gi;
        shift[i] = (float)(p[3 * C + i] - gi * p[i]);
    }
}

// ---------------------------------------------------------------- BiFPN fast normalized fusion
// n_i = relu(w_i) / (Σ relu(w) + 1e-4) in f32, summed in input order (as the CPU op).
__device__ __forceinline__ float fusion_weight(const float* __restrict__ w, int k, int i) {
    float s = 0.0f;
    for (int j = 0; j < k; ++j) s = __fadd_rn(s, fmaxf(w[j], 0.0f));
    s = __fadd_rn(s, 1e-4f);
    return __fdiv_rn(fmaxf(w[i], 0.0f), s);
}

// y = Σ_{i<k} n_i·x_i (k ≤ 4; unused input pointers are never read), products and sums in f32
// in input order, rounded once.
template <class T>
__device__ __forceinline__ void fusion_fwd_t(const T* __restrict__ x0, const T* __restrict__ x1,
                                             const T* __restrict__ x2, const T* __restrict__ x3,
                                             const float* __restrict__ w, T* __restrict__ y,
                                             i64 n, int k) {
    const float n0 = fusion_weight(w, k, 0);
    const float n1 = k > 1 ? fusion_weight(w, k, 1) : 0.0f;
    const float n2 = k > 2 ? fusion_weight(w, k, 2) : 0.0f;
    const float n3 = k > 3 ? fusion_weight(w, k, 3) : 0.0f;
    GRID_STRIDE(j, n) {
        float acc = __fmul_rn(n0, to_f32(x0[j]));
        if (k > 1) acc = __fadd_rn(acc, __fmul_rn(n1, to_f32(x1[j])));
        if (k > 2) acc = __fadd_rn(acc, __fmul_rn(n2, to_f32(x2[j])));
        if (k > 3) acc = __fadd_rn(acc, __fmul_rn(n3, to_f32(x3[j])));
        y[j] = from_f32<T>(acc);
    }
}

// Input i's gradient gx = n_i·g, and dot[i] += Σ g·x_i (f64 products and sums; dot zeroed by the
// caller). Launched with FUSION_THREADS threads per block.
#define FUSION_THREADS 256
template <class T>
__device__ __forceinline__ void fusion_grad_t(const T* __restrict__ g, const T* __restrict__ x,
                                              const float* __restrict__ w, int k, int i,
                                              T* __restrict__ gx, double* __restrict__ dot,
                                              i64 n) {
    __shared__ double part[FUSION_THREADS];
    const float ni = fusion_weight(w, k, i);
    double acc = 0.0;
    GRID_STRIDE(j, n) {
        const float gj = to_f32(g[j]);
        gx[j] = from_f32<T>(__fmul_rn(gj, ni));
        acc = __dadd_rn(acc, __dmul_rn((double)gj, (double)to_f32(x[j])));
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = FUSION_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(dot + i, part[0]);
}

#define FUSION_KERNELS(T, SFX)                                                                   \
    extern "C" __global__ void fusion_fwd##SFX(                                                  \
        const T* __restrict__ x0, const T* __restrict__ x1, const T* __restrict__ x2,            \
        const T* __restrict__ x3, const float* __restrict__ w, T* __restrict__ y, i64 n, int k) { \
        fusion_fwd_t<T>(x0, x1, x2, x3, w, y, n, k);                                             \
    }                                                                                            \
    extern "C" __global__ void fusion_grad##SFX(                                                 \
        const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ w, int k,    \
        int i, T* __restrict__ gx, double* __restrict__ dot, i64 n) {                            \
        fusion_grad_t<T>(g, x, w, k, i, gx, dot, n);                                             \
    }
FOR_EACH_ACT(FUSION_KERNELS)

// The fusion weights' gradient from dot[i] = Σ g·x_i: through n = r/s (r = relu(w),
// s = Σ r + 1e-4), dL/dr_i = dot_i/s − (Σ_j dot_j·r_j)/s², passed where w ≥ 0; f64, one thread.
extern "C" __global__ void fusion_weight_grad(const float* __restrict__ w,
                                              const double* __restrict__ dot,
                                              float* __restrict__ gw, int k) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0, through = 0.0;
    for (int j = 0; j < k; ++j) s = __dadd_rn(s, (double)fmaxf(w[j], 0.0f));
    s = __dadd_rn(s, 1e-4);
    for (int j = 0; j < k; ++j)
        through = __dadd_rn(through, __dmul_rn(dot[j], (double)fmaxf(w[j], 0.0f)));
    through = through / __dmul_rn(s, s);
    for (int i = 0; i < k; ++i) gw[i] = w[i] >= 0.0f ? (float)__dadd_rn(dot[i] / s, -through) : 0.0f;
}

// params [4, C] f64 = (mean, inv_std, γ, β) from the moments [2, C] f64 and γ, β (f32).
extern "C" __global__ void bn_stack_params(const double* __restrict__ moments,
                                           const float* __restrict__ gamma,
                                           const float* __restrict__ beta,
                                           double* __restrict__ p, int C) {
    GRID_STRIDE(i, C) {
        p[i] = moments[i];
        p[C + i] = moments[C + i];
        p[2 * C + i] = (double)gamma[i];
        p[3 * C + i] = (double)beta[i];
    }
}

// The batch-norm input gradient's constants [7, C] f32 = (mean, inv_std, γ, β, k, off, slope)
// from params [4, C] f64 and the reduction sums [2, C] f32 (Σ g_z, Σ g_z·x̂): k = γ·inv_std,
// and in training mode off = (k/rows)·Σ g_z, slope = (k/rows)·Σ g_z·x̂ (else 0), in f64 and
// rounded once, as the CPU op computes them.
extern "C" __global__ void bn_grad_consts(const double* __restrict__ p,
                                          const float* __restrict__ sums, float* __restrict__ out,
                                          int C, double rows, int train) {
    GRID_STRIDE(i, C) {
        const double k = __dmul_rn(p[2 * C + i], p[C + i]);
        double off = 0.0, slope = 0.0;
        if (train) {
            const double kk = k / rows;
            off = __dmul_rn(kk, (double)sums[i]);
            slope = __dmul_rn(kk, (double)sums[C + i]);
        }
        out[i] = (float)p[i];
        out[C + i] = (float)p[C + i];
        out[2 * C + i] = (float)p[2 * C + i];
        out[3 * C + i] = (float)p[3 * C + i];
        out[4 * C + i] = (float)k;
        out[5 * C + i] = (float)off;
        out[6 * C + i] = (float)slope;
    }
}

// x ← a·x + b·y (optimizer and moving-average updates); no fused multiply-add, as on the CPU.
extern "C" __global__ void axpby_f32(float* __restrict__ x, const float* __restrict__ y, float a,
                                     float b, i64 n) {
    GRID_STRIDE(i, n) { x[i] = __fadd_rn(__fmul_rn(x[i], a), __fmul_rn(y[i], b)); }
}

// ---------------------------------------------------------------- multi-tensor optimizer kernels
// One launch for up to MT_MAX parameter-sized f32 tensors (the table travels by value in the
// kernel parameters, as apex's multi_tensor_apply does): a D0 step's ~460 variables take a
// dozen launches instead of ~10 small ones each. Block b works on MT_CHUNK elements of the
// tensor t with block_start[t] <= b < block_start[t + 1]. Arithmetic without fused
// multiply-add, element for element as the CPU computes it.
#define MT_MAX 32
#define MT_CHUNK 4096
#define MT_THREADS 256
struct MtTable {
    unsigned long long g[MT_MAX];  // gradient (read), or y of mt_axpby
    unsigned long long w[MT_MAX];  // weight (updated), or x of mt_axpby; 0: none (sums only)
    unsigned long long m[MT_MAX];  // momentum (updated)
    i64 n[MT_MAX];
    float a[MT_MAX];  // u = a·g + b·w
    float b[MT_MAX];
    int block_start[MT_MAX + 1];
    int count;
};

__device__ __forceinline__ int mt_tensor(const MtTable& tab) {
    int t = 0;
    while (t + 1 < tab.count && tab.block_start[t + 1] <= (int)blockIdx.x) ++t;
    return t;
}

__device__ __forceinline__ float mt_combine(const float* g, const float* w, float a, float b,
                                            i64 i) {
    return w ? __fadd_rn(__fmul_rn(g[i], a), __fmul_rn(w[i], b)) : __fmul_rn(g[i], a);
}

// out[t] += Σ (a·g + b·w)² over tensor t (f64 accumulation): the gradient norms and the
// finite check of a step in one pass; launched with MT_THREADS threads per block.
extern "C" __global__ void mt_sum_squares(const MtTable tab, double* __restrict__ out) {
    __shared__ double part[MT_THREADS];
    const int t = mt_tensor(tab);
    const float* g = (const float*)tab.g[t];
    const float* w = (const float*)tab.w[t];
    const i64 lo = (i64)((int)blockIdx.x - tab.block_start[t]) * MT_CHUNK;
    const i64 hi = min(lo + (i64)MT_CHUNK, tab.n[t]);
    double acc = 0.0;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const double u = (double)mt_combine(g, w, tab.a[t], tab.b[t], i);
        acc += u * u;
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = MT_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(out + t, part[0]);
}

// SGD with momentum: u = a·g + b·w (unscaling, clipping and the L2 term), m ← μ·m + u,
// w ← w − lr·m, as the per-variable axpby passes compute it.
extern "C" __global__ void mt_sgd(const MtTable tab, float momentum, float neg_lr) {
    const int t = mt_tensor(tab);
    const float* g = (const float*)tab.g[t];
    float* w = (float*)tab.w[t];
    float* m = (float*)tab.m[t];
    const i64 lo = (i64)((int)blockIdx.x - tab.block_start[t]) * MT_CHUNK;
    const i64 hi = min(lo + (i64)MT_CHUNK, tab.n[t]);
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float u = mt_combine(g, w, tab.a[t], tab.b[t], i);
        const float mi = __fadd_rn(__fmul_rn(m[i], momentum), __fmul_rn(u, 1.0f));
        m[i] = mi;
        w[i] = __fadd_rn(__fmul_rn(w[i], 1.0f), __fmul_rn(mi, neg_lr));
    }
}

// x ← α·x + β·y for every tensor (x in w, y in g): the moving average's update.
extern "C" __global__ void mt_axpby(const MtTable tab, float alpha, float beta) {
    const int t = mt_tensor(tab);
    const float* y = (const float*)tab.g[t];
    float* x = (float*)tab.w[t];
    const i64 lo = (i64)((int)blockIdx.x - tab.block_start[t]) * MT_CHUNK;
    const i64 hi = min(lo + (i64)MT_CHUNK, tab.n[t]);
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x)
        x[i] = __fadd_rn(__fmul_rn(x[i], alpha), __fmul_rn(y[i], beta));
}

// A training-mode BN layer's running averages from its batch moments ([2, C] f64: mean,
// 1/sqrt(var + eps)), in place and in one launch: mean ← m·mean + (1 − m)·batch_mean,
// var ← m·var + (1 − m)·bessel·(1/inv_std² − eps), in f64 and rounded to f32 once, as the
// stock-op composition computed it (~16 launches per layer).
extern "C" __global__ void bn_running_update(float* __restrict__ mean, float* __restrict__ var,
                                             const double* __restrict__ moments, int C, double m,
                                             double one_minus_m, double eps, double bessel) {
    GRID_STRIDE(i, C) {
        const double s = moments[C + i];
        const double bv = __dmul_rn(__dadd_rn(1.0 / __dmul_rn(s, s), -eps), bessel);
        mean[i] = (float)__dadd_rn(__dmul_rn((double)mean[i], m), __dmul_rn(moments[i], one_minus_m));
        var[i] = (float)__dadd_rn(__dmul_rn((double)var[i], m), __dmul_rn(bv, one_minus_m));
    }
}

// ---------------------------------------------------------------- profile markers

// Empty kernels launched at the end of each training-step phase under EFFDET_PHASE_MARKERS=1
// (ops/marker.rs): their names split a profile's launch list by phase.
extern "C" __global__ void phase_end_forward() {}
extern "C" __global__ void phase_end_backward() {}
extern "C" __global__ void phase_end_update() {}
