// Launchers for the CPU-compiled kernels (see shim.h): `run_<kernel>(grid, block, args…)`
// runs every block in turn; kernels that synchronize get one std::thread per block thread,
// the others run their threads one after another. Test-only.
#include "shim.h"

#include <mutex>
#include <thread>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* g_block_barrier = nullptr;
// gridDim, blockDim and the barrier are process-wide: one launch at a time (a global, not a
// static inside the template, which would be one mutex per kernel).
static std::mutex g_one_launch;

template <class F>
static void launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   bool threaded, F f) {
    std::lock_guard<std::mutex> guard(g_one_launch);
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const unsigned n = bx * by * bz;
    std::barrier<> bar(n);
    g_block_barrier = &bar;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                const dim3 b{x, y, z};
                auto body = [&](unsigned t) {
                    blockIdx = b;
                    threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                    f();
                };
                if (threaded) {
                    std::vector<std::thread> ts;
                    for (unsigned t = 0; t < n; ++t) ts.emplace_back(body, t);
                    for (auto& t : ts) t.join();
                } else {
                    for (unsigned t = 0; t < n; ++t) body(t);
                }
            }
    g_block_barrier = nullptr;
}

#define GRID unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz
#define DW_ARGS int B, int H, int W, int C, int K, int S, int OH, int OW, int PT, int PL
#define DW_PASS B, H, W, C, K, S, OH, OW, PT, PL

// Kernels templated over the activation storage T (kernels.cu): their runners exist for each
// of float (plain name), __half (`_f16`) and __nv_bfloat16 (`_bf16`).
#define DW_RUNNER(name, A, B, O, threaded)                                                     \
    extern "C" void name(const A*, const B*, O*, DW_ARGS);                                      \
    extern "C" void run_##name(GRID, const A* a, const B* b, O* out, DW_ARGS) {                 \
        launch(gx, gy, gz, bx, by, bz, threaded, [&] { name(a, b, out, DW_PASS); });           \
    }
#define DW_RUNNERS(T, SFX)                                        \
    DW_RUNNER(dw_fwd##SFX, T, float, T, false)                    \
    DW_RUNNER(dw_grad_input##SFX, T, float, T, false)             \
    DW_RUNNER(dw_grad_weight##SFX, T, T, double, true)            \
    DW_RUNNER(dw_fwd_k3s1##SFX, T, float, T, false)               \
    DW_RUNNER(dw_fwd_k3s2##SFX, T, float, T, false)               \
    DW_RUNNER(dw_fwd_k5s1##SFX, T, float, T, false)               \
    DW_RUNNER(dw_fwd_k5s2##SFX, T, float, T, false)               \
    DW_RUNNER(dw_grad_input_k3s1##SFX, T, float, T, false)        \
    DW_RUNNER(dw_grad_input_k3s2##SFX, T, float, T, false)        \
    DW_RUNNER(dw_grad_input_k5s1##SFX, T, float, T, false)        \
    DW_RUNNER(dw_grad_input_k5s2##SFX, T, float, T, false)        \
    DW_RUNNER(dw_grad_weight_k3##SFX, T, T, double, true)         \
    DW_RUNNER(dw_grad_weight_k5##SFX, T, T, double, true)
#define FOR_EACH_ACT(M) \
    M(float, )          \
    M(__half, _f16)     \
    M(__nv_bfloat16, _bf16)
FOR_EACH_ACT(DW_RUNNERS)

extern "C" void effdet_render_batch(const unsigned char*, const unsigned int*, float*, unsigned int,
                                    unsigned int, float, float, float, float, float, float);
extern "C" void run_effdet_render_batch(GRID, const unsigned char* arena, const unsigned int* jobs,
                                        float* out, unsigned int out_h, unsigned int out_w,
                                        const float* norm) {
    launch(gx, gy, gz, bx, by, bz, false, [&] {
        effdet_render_batch(arena, jobs, out, out_h, out_w, norm[0], norm[1], norm[2], norm[3],
                            norm[4], norm[5]);
    });
}

// Pooling, elementwise and optimizer kernels (their 32-bit index arithmetic changed after the
// last GPU check).
#define POOL_ARGS                                                                             \
    int B, int H, int W, int C, int KH, int KW, int SH, int SW, int OH, int OW, int PT, int PL
#define POOL_PASS B, H, W, C, KH, KW, SH, SW, OH, OW, PT, PL
typedef long long i64;
#define POOL_RUNNERS(T, SFX)                                                                    \
    extern "C" void maxpool_fwd##SFX(const T*, T*, POOL_ARGS);                                  \
    extern "C" void maxpool_grad##SFX(const T*, const T*, float*, POOL_ARGS);                   \
    extern "C" void run_maxpool_fwd##SFX(GRID, const T* x, T* y, POOL_ARGS) {                   \
        launch(gx, gy, gz, bx, by, bz, false, [&] { maxpool_fwd##SFX(x, y, POOL_PASS); });      \
    }                                                                                           \
    extern "C" void run_maxpool_grad##SFX(GRID, const T* x, const T* g, float* gx_, POOL_ARGS) { \
        launch(gx, gy, gz, bx, by, bz, false,                                                   \
               [&] { maxpool_grad##SFX(x, g, gx_, POOL_PASS); });                               \
    }
FOR_EACH_ACT(POOL_RUNNERS)

#define ELEMENTWISE_RUNNERS(T, SFX)                                                             \
    extern "C" void swish_fwd##SFX(const T*, T*, i64);                                          \
    extern "C" void swish_grad##SFX(const T*, const T*, T*, i64);                               \
    extern "C" void bias_add##SFX(const T*, const float*, T*, i64, int);                        \
    extern "C" void channel_gate##SFX(const T*, const float*, T*, i64, i64, int);               \
    extern "C" void run_swish_fwd##SFX(GRID, const T* x, T* y, i64 n) {                         \
        launch(gx, gy, gz, bx, by, bz, false, [&] { swish_fwd##SFX(x, y, n); });                \
    }                                                                                           \
    extern "C" void run_swish_grad##SFX(GRID, const T* x, const T* g, T* d, i64 n) {            \
        launch(gx, gy, gz, bx, by, bz, false, [&] { swish_grad##SFX(x, g, d, n); });            \
    }                                                                                           \
    extern "C" void run_bias_add##SFX(GRID, const T* x, const float* b, T* y, i64 n, int C) {   \
        launch(gx, gy, gz, bx, by, bz, false, [&] { bias_add##SFX(x, b, y, n, C); });           \
    }                                                                                           \
    extern "C" void run_channel_gate##SFX(GRID, const T* x, const float* g, T* y, i64 n, i64 hw, \
                                          int C) {                                              \
        launch(gx, gy, gz, bx, by, bz, false, [&] { channel_gate##SFX(x, g, y, n, hw, C); });   \
    }                                                                                           \
    extern "C" void channel_add##SFX(const T*, const float*, T*, i64, i64, int);                \
    extern "C" void run_channel_add##SFX(GRID, const T* x, const float* v, T* y, i64 n, i64 hw,  \
                                         int C) {                                               \
        launch(gx, gy, gz, bx, by, bz, false, [&] { channel_add##SFX(x, v, y, n, hw, C); });    \
    }
FOR_EACH_ACT(ELEMENTWISE_RUNNERS)

#define STEM_RUNNERS(T, SFX)                                                                   \
    extern "C" void stem_patches##SFX(const T*, T*, int, int, int, int, int, int, int, int);   \
    extern "C" void run_stem_patches##SFX(GRID, const T* x, T* out, int B, int C, int H, int W, \
                                          int OH, int OW, int PT, int PL) {                    \
        launch(gx, gy, gz, bx, by, bz, false,                                                  \
               [&] { stem_patches##SFX(x, out, B, C, H, W, OH, OW, PT, PL); });                \
    }
FOR_EACH_ACT(STEM_RUNNERS)

extern "C" void axpby_f32(float*, const float*, float, float, i64);
extern "C" void run_axpby_f32(GRID, float* x, const float* y, float a, float b, i64 n) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { axpby_f32(x, y, a, b, n); });
}

// Column reductions, conversions and batch norm.
#define COL_BN_RUNNERS(T, SFX)                                                                  \
    extern "C" void col_sum##SFX(const T*, double*, i64, int);                                  \
    extern "C" void col_sq_dev##SFX(const T*, const double*, double*, i64, int);                \
    extern "C" void col_dot##SFX(const T*, const T*, double*, i64, int);                        \
    extern "C" void run_col_dot##SFX(GRID, const T* x, const T* g, double* out, i64 rows,       \
                                     int C) {                                                   \
        launch(gx, gy, gz, bx, by, bz, true, [&] { col_dot##SFX(x, g, out, rows, C); });        \
    }                                                                                           \
    extern "C" void bn_apply##SFX(const T*, const float*, const float*, T*, i64, int, int);     \
    extern "C" void bn_grad_reduce##SFX(const T*, const T*, const float*, double*, i64, int,    \
                                        int);                                                   \
    extern "C" void bn_grad_input##SFX(const T*, const T*, const float*, const float*, T*, i64, \
                                       int, int);                                               \
    extern "C" void run_col_sum##SFX(GRID, const T* x, double* out, i64 rows, int C) {          \
        launch(gx, gy, gz, bx, by, bz, true, [&] { col_sum##SFX(x, out, rows, C); });           \
    }                                                                                           \
    extern "C" void run_col_sq_dev##SFX(GRID, const T* x, const double* mean, double* out,      \
                                        i64 rows, int C) {                                      \
        launch(gx, gy, gz, bx, by, bz, true, [&] { col_sq_dev##SFX(x, mean, out, rows, C); });  \
    }                                                                                           \
    extern "C" void run_bn_apply##SFX(GRID, const T* x, const float* scale, const float* shift, \
                                      T* y, i64 n, int C, int act) {                            \
        launch(gx, gy, gz, bx, by, bz, false,                                                   \
               [&] { bn_apply##SFX(x, scale, shift, y, n, C, act); });                          \
    }                                                                                           \
    extern "C" void run_bn_grad_reduce##SFX(GRID, const T* x, const T* g, const float* chan,    \
                                            double* out, i64 rows, int C, int act) {            \
        launch(gx, gy, gz, bx, by, bz, true,                                                    \
               [&] { bn_grad_reduce##SFX(x, g, chan, out, rows, C, act); });                    \
    }                                                                                           \
    extern "C" void run_bn_grad_input##SFX(GRID, const T* x, const T* g, const float* chan,     \
                                           const float* coef, T* dx, i64 n, int C, int act) {   \
        launch(gx, gy, gz, bx, by, bz, false,                                                   \
               [&] { bn_grad_input##SFX(x, g, chan, coef, dx, n, C, act); });                   \
    }
FOR_EACH_ACT(COL_BN_RUNNERS)

extern "C" void bn_inv_std(double*, double, double, int);
extern "C" void bn_scale_shift(const float*, const float*, const double*, const double*, float*,
                               float*, int);
extern "C" void bn_scale_shift_params(const double*, float*, float*, int);
extern "C" void run_bn_inv_std(GRID, double* sq, double n, double eps, int C) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { bn_inv_std(sq, n, eps, C); });
}
extern "C" void run_bn_scale_shift(GRID, const float* gamma, const float* beta, const double* mean,
                                   const double* inv, float* scale, float* shift, int C) {
    launch(gx, gy, gz, bx, by, bz, false,
           [&] { bn_scale_shift(gamma, beta, mean, inv, scale, shift, C); });
}
extern "C" void run_bn_scale_shift_params(GRID, const double* p, float* scale, float* shift,
                                          int C) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { bn_scale_shift_params(p, scale, shift, C); });
}

// f64 → f32/f16/bf16 with a scale, and f32 → f16/bf16.
#define SCALE_RUNNER(T, SFX)                                                                    \
    extern "C" void scale_f64_to##SFX(const double*, T*, double, i64);                          \
    extern "C" void run_scale_f64_to##SFX(GRID, const double* src, T* dst, double scale,        \
                                          i64 n) {                                              \
        launch(gx, gy, gz, bx, by, bz, false, [&] { scale_f64_to##SFX(src, dst, scale, n); });  \
    }
SCALE_RUNNER(float, _f32)
SCALE_RUNNER(__half, _f16)
SCALE_RUNNER(__nv_bfloat16, _bf16)
#define CVT_RUNNER(T, SFX)                                                                      \
    extern "C" void cvt_f32_to##SFX(const float*, T*, i64);                                     \
    extern "C" void run_cvt_f32_to##SFX(GRID, const float* src, T* dst, i64 n) {                \
        launch(gx, gy, gz, bx, by, bz, false, [&] { cvt_f32_to##SFX(src, dst, n); });           \
    }
CVT_RUNNER(__half, _f16)
CVT_RUNNER(__nv_bfloat16, _bf16)

// The shim's own conversions, one value per call, for the tests against the `half` crate.
extern "C" uint16_t shim_f32_to_f16(float f) { return __float2half_rn(f).bits; }
extern "C" float shim_f16_to_f32(uint16_t b) { return __half2float(__half{b}); }
extern "C" uint16_t shim_f32_to_bf16(float f) { return __float2bfloat16_rn(f).bits; }
extern "C" float shim_bf16_to_f32(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

// Focal loss (class ids as i32 or i64).
#define FOCAL_RUNNERS(ID_T, SUFFIX)                                                             \
    extern "C" void focal_loss_##SUFFIX(const float*, const ID_T*, double*, int*, i64, int,     \
                                        double, double, double);                                \
    extern "C" void focal_grad_##SUFFIX(const float*, const ID_T*, const double*, float*, int*, \
                                        i64, int, double, double, double);                      \
    extern "C" void run_focal_loss_##SUFFIX(GRID, const float* x, const ID_T* ids, double* out, \
                                            int* bad, i64 n, int K, double a, double g,          \
                                            double s) {                                          \
        launch(gx, gy, gz, bx, by, bz, true,                                                     \
               [&] { focal_loss_##SUFFIX(x, ids, out, bad, n, K, a, g, s); });                   \
    }                                                                                            \
    extern "C" void run_focal_grad_##SUFFIX(GRID, const float* x, const ID_T* ids,              \
                                            const double* scale, float* d, int* bad, i64 n,     \
                                            int K, double a, double g, double s) {               \
        launch(gx, gy, gz, bx, by, bz, false,                                                    \
               [&] { focal_grad_##SUFFIX(x, ids, scale, d, bad, n, K, a, g, s); });              \
    }
FOCAL_RUNNERS(int, i32)
FOCAL_RUNNERS(i64, i64)

// The multi-tensor optimizer kernels take their table by value; this is kernels.cu's layout.
#define MT_MAX 32
struct MtTable {
    unsigned long long g[MT_MAX];
    unsigned long long w[MT_MAX];
    unsigned long long m[MT_MAX];
    i64 n[MT_MAX];
    float a[MT_MAX];
    float b[MT_MAX];
    int block_start[MT_MAX + 1];
    int count;
};
extern "C" void mt_sum_squares(const MtTable, double*);
extern "C" void mt_sgd(const MtTable, float, float);
extern "C" void mt_axpby(const MtTable, float, float);
extern "C" void run_mt_sum_squares(GRID, const MtTable tab, double* out) {
    launch(gx, gy, gz, bx, by, bz, true, [&] { mt_sum_squares(tab, out); });
}
extern "C" void run_mt_sgd(GRID, const MtTable tab, float momentum, float neg_lr) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { mt_sgd(tab, momentum, neg_lr); });
}
extern "C" void run_mt_axpby(GRID, const MtTable tab, float alpha, float beta) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { mt_axpby(tab, alpha, beta); });
}

extern "C" void bn_running_update(float*, float*, const double*, int, double, double, double,
                                  double);
extern "C" void run_bn_running_update(GRID, float* mean, float* var, const double* moments, int C,
                                      double m, double omm, double eps, double bessel) {
    launch(gx, gy, gz, bx, by, bz, false,
           [&] { bn_running_update(mean, var, moments, C, m, omm, eps, bessel); });
}

extern "C" void bn_stack_params(const double*, const float*, const float*, double*, int);
extern "C" void run_bn_stack_params(GRID, const double* moments, const float* gamma,
                                    const float* beta, double* p, int C) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { bn_stack_params(moments, gamma, beta, p, C); });
}
extern "C" void bn_grad_consts(const double*, const float*, float*, int, double, int);
extern "C" void run_bn_grad_consts(GRID, const double* p, const float* sums, float* out, int C,
                                   double rows, int train) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { bn_grad_consts(p, sums, out, C, rows, train); });
}

// BiFPN fast normalized fusion.
#define FUSION_RUNNERS(T, SFX)                                                                  \
    extern "C" void fusion_fwd##SFX(const T*, const T*, const T*, const T*, const float*, T*,   \
                                    i64, int);                                                  \
    extern "C" void fusion_grad##SFX(const T*, const T*, const float*, int, int, T*, double*,  \
                                     i64);                                                      \
    extern "C" void run_fusion_fwd##SFX(GRID, const T* x0, const T* x1, const T* x2,           \
                                        const T* x3, const float* w, T* y, i64 n, int k) {      \
        launch(gx, gy, gz, bx, by, bz, false,                                                   \
               [&] { fusion_fwd##SFX(x0, x1, x2, x3, w, y, n, k); });                           \
    }                                                                                           \
    extern "C" void run_fusion_grad##SFX(GRID, const T* g, const T* x, const float* w, int k,   \
                                         int i, T* gx_, double* dot, i64 n) {                   \
        launch(gx, gy, gz, bx, by, bz, true,                                                    \
               [&] { fusion_grad##SFX(g, x, w, k, i, gx_, dot, n); });                          \
    }
FOR_EACH_ACT(FUSION_RUNNERS)
extern "C" void fusion_weight_grad(const float*, const double*, float*, int);
extern "C" void run_fusion_weight_grad(GRID, const float* w, const double* dot, float* gw, int k) {
    launch(gx, gy, gz, bx, by, bz, false, [&] { fusion_weight_grad(w, dot, gw, k); });
}
