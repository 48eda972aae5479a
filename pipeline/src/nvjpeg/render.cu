// The GPU decode stage's render kernel: decoded interleaved RGB (one arena, one job per image)
// → flipped, bilinear-resized (half-pixel centres, clamped taps), cropped, padded and
// normalized CHW f32 planes in the batch tensor. The arithmetic mirrors
// `effdet_pipeline::deferred::render_reference` operation for operation, with explicitly
// rounded multiplies and adds so the compiler cannot fuse them: GPU and CPU give the same bits.

#define JOB_WORDS 10

__device__ __forceinline__ void tap(unsigned int o, float scale, unsigned int size,
                                    unsigned int* lo, unsigned int* hi, float* frac) {
    float src = __fsub_rn(__fmul_rn(__fadd_rn((float)o, 0.5f), scale), 0.5f);
    float fl = floorf(src);
    *frac = __fsub_rn(src, fl);
    int f = (int)fl;
    int last = (int)size - 1;
    *lo = (unsigned int)max(0, min(f, last));
    *hi = (unsigned int)max(0, min(f + 1, last));
}

__device__ __forceinline__ float lerp_rn(float a, float b, float t) {
    return __fadd_rn(a, __fmul_rn(__fsub_rn(b, a), t));
}

extern "C" __global__ void effdet_render_batch(
    const unsigned char* __restrict__ arena, const unsigned int* __restrict__ jobs,
    float* __restrict__ out, unsigned int out_h, unsigned int out_w,
    float mean_r, float mean_g, float mean_b, float std_r, float std_g, float std_b) {
    const unsigned int* j = jobs + blockIdx.y * JOB_WORDS;
    const unsigned int slot = j[0];
    const unsigned long long offset =
        (unsigned long long)j[1] | ((unsigned long long)j[2] << 32);
    const unsigned int src_h = j[3], src_w = j[4], scaled_h = j[5], scaled_w = j[6];
    const unsigned int off_y = j[7], off_x = j[8], flip = j[9];
    const unsigned int plane = out_h * out_w;
    float* o = out + (unsigned long long)slot * 3ull * plane;
    const unsigned int rows = min(out_h, scaled_h - off_y);
    const unsigned int cols = min(out_w, scaled_w - off_x);
    const float scale_y = __fdiv_rn((float)src_h, (float)scaled_h);
    const float scale_x = __fdiv_rn((float)src_w, (float)scaled_w);
    const unsigned char* src = arena + offset;
    const unsigned int pitch = 3u * src_w;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < plane;
         i += gridDim.x * blockDim.x) {
        const unsigned int y = i / out_w, x = i - y * out_w;
        float v[3] = {0.0f, 0.0f, 0.0f};
        if (src_w != 0 && y < rows && x < cols) {
            unsigned int y0, y1, x0, x1;
            float fy, fx;
            tap(y + off_y, scale_y, src_h, &y0, &y1, &fy);
            unsigned int sx = x + off_x;
            if (flip) sx = scaled_w - 1u - sx;
            tap(sx, scale_x, src_w, &x0, &x1, &fx);
            const unsigned char* r0 = src + (unsigned long long)y0 * pitch;
            const unsigned char* r1 = src + (unsigned long long)y1 * pitch;
            const float mean[3] = {mean_r, mean_g, mean_b};
            const float stdd[3] = {std_r, std_g, std_b};
#pragma unroll
            for (int c = 0; c < 3; ++c) {
                float top = lerp_rn((float)r0[x0 * 3 + c], (float)r0[x1 * 3 + c], fx);
                float bottom = lerp_rn((float)r1[x0 * 3 + c], (float)r1[x1 * 3 + c], fx);
                v[c] = __fdiv_rn(__fsub_rn(lerp_rn(top, bottom, fy), mean[c]), stdd[c]);
            }
        }
        o[i] = v[0];
        o[plane + i] = v[1];
        o[2 * plane + i] = v[2];
    }
}
