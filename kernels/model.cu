// The llama forward's glue on the GPU (everything but the projections, which are cuBLAS
// GEMMs, and the attention, which is kernels/attention_bf16.cu). Row-major activations;
// the residual stream x is f32 [L, hidden], GEMM inputs are f16 and the attention's Q,
// K, V, O bf16 (both as uint16 bit patterns).
//   tca_embed:        x[t, :] = E[token[t], :] (E f16 [vocab, hidden]).
//   tca_rmsnorm:      y[t, :] = f16(x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w).
//   tca_rope_split:   qkv f32 [L, (Hq + 2 Hkv) d] (the fused Q|K|V projection) of the
//                     positions p0 .. p0 + L to Q [Hq, L, d] and rows p0 .. p0 + L of K, V
//                     [Hkv, S, d] (bf16, S >= p0 + L rows per head: a cache), rotating the
//                     adjacent pairs (2i, 2i+1) of each Q and K head by the angle of
//                     (cos, sin)[p0 + t, i] (llama.rs's convention for the GGUF-permuted
//                     rows); V is copied.
//   tca_to_f16:       f32 to f16 through bf16 (a decode output [H d], rounded as the
//                     prefill's bf16 attention output is).
//   tca_merge_heads:  O [H, L, d] (bf16) to [L, H d] (f16; exact: bf16 values fit f16
//                     unless beyond its range, which the caller's finite check reports).
//   tca_silu_mul:     gu f32 [L, 2 F] (gate | up) to f16 silu(gate) * up [L, F].
//   tca_count_nonfinite: adds the number of NaN/inf values of x[0..n) to *count.
//   tca_row_nll:      per row i of a logits chunk (f32 [R, V]), target row r = r0 + i:
//                     lse - logit[target[r]] (f64) and the arg-max (first index on ties).
// One CTA per row for the row kernels; blockDim.x = 256.

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((u32)x) << 16); }

// f32 to bf16, round to nearest even; NaN stays NaN (as half::bf16::from_f32).
__device__ __forceinline__ u16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// f32 to f16 (round to nearest even) and back, in PTX (NVRTC needs no header for it).
__device__ __forceinline__ u16 f2h(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void tca_embed(const u16* __restrict__ E, const u32* __restrict__ tok,
                                     float* __restrict__ x, int hidden) {
    const size_t t = blockIdx.x;
    const u16* e = E + (size_t)tok[t] * hidden;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) x[t * hidden + j] = h2f(e[j]);
}

extern "C" __global__ void tca_rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                                       u16* __restrict__ y, int hidden, float eps) {
    const size_t t = blockIdx.x;
    const float* r = x + t * hidden;
    float s = 0.f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) s += r[j] * r[j];
    s = block_sum(s);
    const float inv = 1.f / sqrtf(s / (float)hidden + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) y[t * hidden + j] = f2h(r[j] * inv * w[j]);
}

extern "C" __global__ void tca_rope_split(const float* __restrict__ qkv,
                                          const float* __restrict__ cos_t,
                                          const float* __restrict__ sin_t, u16* __restrict__ Q,
                                          u16* __restrict__ K, u16* __restrict__ V, int L, int hq,
                                          int hkv, int d, int S, int p0) {
    const size_t t = blockIdx.x, pos = (size_t)p0 + t;
    const int half = d / 2, heads = hq + 2 * hkv;
    const float* row = qkv + t * (size_t)heads * d;
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        const int h = p / half, i = p % half;
        const float x0 = row[h * d + 2 * i], x1 = row[h * d + 2 * i + 1];
        float y0 = x0, y1 = x1;
        u16* dst;
        if (h < hq + hkv) {
            const float c = cos_t[pos * half + i], s = sin_t[pos * half + i];
            y0 = x0 * c - x1 * s;
            y1 = x0 * s + x1 * c;
            dst = h < hq ? Q + ((size_t)h * L + t) * d : K + ((size_t)(h - hq) * S + pos) * d;
        } else {
            dst = V + ((size_t)(h - hq - hkv) * S + pos) * d;
        }
        dst[2 * i] = f2bf(y0);
        dst[2 * i + 1] = f2bf(y1);
    }
}

extern "C" __global__ void tca_merge_heads(const u16* __restrict__ O, u16* __restrict__ y, int L,
                                           int H, int d) {
    const size_t t = blockIdx.x;
    for (int c = threadIdx.x; c < H * d; c += blockDim.x) {
        const int h = c / d, j = c % d;
        y[t * (size_t)H * d + c] = f2h(bf2f(O[((size_t)h * L + t) * d + j]));
    }
}

extern "C" __global__ void tca_to_f16(const float* __restrict__ x, u16* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = f2h(bf2f(f2bf(x[i])));
}

extern "C" __global__ void tca_silu_mul(const float* __restrict__ gu, u16* __restrict__ y, int F) {
    const size_t t = blockIdx.x;
    const float* g = gu + t * 2 * (size_t)F;
    for (int j = threadIdx.x; j < F; j += blockDim.x) {
        const float a = g[j];
        y[t * F + j] = f2h(a / (1.f + expf(-a)) * g[F + j]);
    }
}

extern "C" __global__ void tca_count_nonfinite(const float* __restrict__ x, unsigned long long n,
                                               u32* __restrict__ count) {
    u32 bad = 0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        bad += !isfinite(x[i]);
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(count, bad);
}

extern "C" __global__ void tca_row_nll(const float* __restrict__ logits,
                                       const u32* __restrict__ target, double* __restrict__ nll,
                                       u32* __restrict__ arg, int V, int r0) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    __shared__ double bs[32];
    const float* z = logits + (size_t)blockIdx.x * V;
    const size_t r = (size_t)r0 + blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    // Arg-max, first index on ties (NaN never wins; a NaN row is caught by the caller).
    float best = -__int_as_float(0x7f800000);
    int bidx = 0x7fffffff;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        if (z[j] > best) { best = z[j]; bidx = j; }
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffffu, best, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, bidx, o);
        if (v2 > best || (v2 == best && i2 < bidx)) { best = v2; bidx = i2; }
    }
    if (lane == 0) { bv[warp] = best; bi[warp] = bidx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; ++w)
            if (bv[w] > bv[0] || (bv[w] == bv[0] && bi[w] < bi[0])) { bv[0] = bv[w]; bi[0] = bi[w]; }
    }
    __syncthreads();
    best = bv[0];
    bidx = bi[0];
    double s = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += exp((double)(z[j] - best));
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) bs[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double tot = 0.0;
        for (int w = 0; w < nw; ++w) tot += bs[w];
        nll[r] = (double)best + log(tot) - (double)z[target[r]];
        arg[r] = (u32)bidx;
    }
}
