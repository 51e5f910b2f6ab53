// Decode attention (one new query per query head) over a KV cache made of two row ranges
// per KV head: part A (the compacted global keys S_G: rows [0, nA) of A, count from
// device memory when countA != nullptr) and part B (the window: rows [0, nB) of B).
// Dense decode passes the full K, V as part A and nB = 0.
// Split over KV: CTA (split s, KV head kv) takes keys [s * KC, (s + 1) * KC) of the
// concatenated range and reads each key and value row once for all G query heads of
// the group (GQA). Partials (m, l in log2 units; unnormalised o) are merged by
// tca_decode_combine, which writes O (f32) and the log-sum-exp (natural log).

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF (-__int_as_float(0x7f800000))
#define KC 256

__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((u32)x) << 16); }

template <int D, int G>
__device__ __forceinline__ void decode_body(const u16* __restrict__ Qd, long long q_stride,
                                            const u16* __restrict__ KA, const u16* __restrict__ VA,
                                            const int* __restrict__ countA, int nA_const,
                                            long long strideA, const u16* __restrict__ KB,
                                            const u16* __restrict__ VB, int nB, long long strideB,
                                            float* __restrict__ part_o, float* __restrict__ part_ml,
                                            float scale_log2) {
    constexpr int LPK = D / 8;
    constexpr int KPI = 128 / LPK;  // keys per CTA iteration
    constexpr int NG = 128 / LPK;   // key groups in the CTA
    __shared__ float sc[G][KC];
    __shared__ float red[NG][G][D + 1];
    __shared__ float wred[4][G];
    __shared__ float sm[G], sl[G];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, nsplit = gridDim.x, kv = blockIdx.y;
    const int sub = tid % LPK, slot = tid / LPK;
    const int nA = countA ? countA[kv] : nA_const;
    const int n = nA + nB;
    const int k0 = split * KC, k1 = min(n, k0 + KC);
    const u16* Ka = KA + (size_t)kv * strideA * D;
    const u16* Va = VA + (size_t)kv * strideA * D;
    const u16* Kb = KB ? KB + (size_t)kv * strideB * D : nullptr;
    const u16* Vb = VB ? VB + (size_t)kv * strideB * D : nullptr;

    float q[G][8];
#pragma unroll
    for (int gi = 0; gi < G; gi++) {
        uint4 u = *reinterpret_cast<const uint4*>(Qd + (size_t)(kv * G + gi) * q_stride + sub * 8);
        const u16* e = reinterpret_cast<const u16*>(&u);
#pragma unroll
        for (int t = 0; t < 8; t++) q[gi][t] = bf2f(e[t]) * scale_log2;
    }

    // Pass 1: scores into shared memory.
#pragma unroll 4
    for (int kb = k0; kb < k1; kb += KPI) {
        const int k = kb + slot;
        const int kc = min(k, k1 - 1);
        const u16* row = kc < nA ? Ka + (size_t)kc * D : Kb + (size_t)(kc - nA) * D;
        uint4 u = *reinterpret_cast<const uint4*>(row + sub * 8);
        const u16* e = reinterpret_cast<const u16*>(&u);
        float kf[8];
#pragma unroll
        for (int t = 0; t < 8; t++) kf[t] = bf2f(e[t]);
#pragma unroll
        for (int gi = 0; gi < G; gi++) {
            float acc = 0.f;
#pragma unroll
            for (int t = 0; t < 8; t++) acc = fmaf(q[gi][t], kf[t], acc);
#pragma unroll
            for (int off = LPK / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
            if (sub == 0 && k < k1) sc[gi][k - k0] = acc;
        }
    }
    __syncthreads();
    const int cnt = k1 - k0;  // may be <= 0 for trailing splits
    // Max and sum per head.
#pragma unroll
    for (int gi = 0; gi < G; gi++) {
        float v = NEG_INF;
        for (int i = tid; i < cnt; i += 128) v = fmaxf(v, sc[gi][i]);
        for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
        if (lane == 0) wred[warp][gi] = v;
    }
    __syncthreads();
    if (tid < G) sm[tid] = fmaxf(fmaxf(wred[0][tid], wred[1][tid]), fmaxf(wred[2][tid], wred[3][tid]));
    __syncthreads();
#pragma unroll
    for (int gi = 0; gi < G; gi++) {
        const float mu = sm[gi] == NEG_INF ? 0.f : sm[gi];
        float v = 0.f;
        for (int i = tid; i < cnt; i += 128) {
            const float p = exp2f(sc[gi][i] - mu);
            sc[gi][i] = p;
            v += p;
        }
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
        if (lane == 0) wred[warp][gi] = v;
    }
    __syncthreads();
    if (tid < G) sl[tid] = wred[0][tid] + wred[1][tid] + wred[2][tid] + wred[3][tid];

    // Pass 2: o[g][dims of this lane] += p * v over the keys of this key group.
    float acc[G][8];
#pragma unroll
    for (int gi = 0; gi < G; gi++)
#pragma unroll
        for (int t = 0; t < 8; t++) acc[gi][t] = 0.f;
#pragma unroll 4
    for (int i = slot; i < cnt; i += NG) {
        const int k = k0 + i;
        const u16* row = k < nA ? Va + (size_t)k * D : Vb + (size_t)(k - nA) * D;
        uint4 u = *reinterpret_cast<const uint4*>(row + sub * 8);
        const u16* e = reinterpret_cast<const u16*>(&u);
        float vf[8];
#pragma unroll
        for (int t = 0; t < 8; t++) vf[t] = bf2f(e[t]);
#pragma unroll
        for (int gi = 0; gi < G; gi++) {
            const float p = sc[gi][i];
#pragma unroll
            for (int t = 0; t < 8; t++) acc[gi][t] = fmaf(p, vf[t], acc[gi][t]);
        }
    }
#pragma unroll
    for (int gi = 0; gi < G; gi++)
#pragma unroll
        for (int t = 0; t < 8; t++) red[slot][gi][sub * 8 + t] = acc[gi][t];
    __syncthreads();
    for (int idx = tid; idx < G * D; idx += 128) {
        const int gi = idx / D, dd = idx % D;
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < NG; s++) v += red[s][gi][dd];
        part_o[(((size_t)(kv * G + gi)) * nsplit + split) * D + dd] = v;
    }
    if (tid < G) {
        const size_t o = ((size_t)(kv * G + tid) * nsplit + split) * 2;
        part_ml[o] = sm[tid];
        part_ml[o + 1] = sl[tid];
    }
}

#define DECODE(D, G)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) tca_decode_d##D##_g##G(                   \
        const u16* Qd, long long q_stride, const u16* KA, const u16* VA, const int* countA,     \
        int nA_const, long long strideA, const u16* KB, const u16* VB, int nB, long long strideB, \
        float* part_o, float* part_ml, float sl2) {                                             \
        decode_body<D, G>(Qd, q_stride, KA, VA, countA, nA_const, strideA, KB, VB, nB, strideB, \
                          part_o, part_ml, sl2);                                                \
    }
DECODE(64, 1) DECODE(64, 2) DECODE(64, 3) DECODE(64, 4) DECODE(64, 8)
DECODE(128, 1) DECODE(128, 2) DECODE(128, 3) DECODE(128, 4) DECODE(128, 8)

// grid Hq, blockDim D: merge the splits of one query head.
extern "C" __global__ void tca_decode_combine(const float* part_o, const float* part_ml, float* O,
                                              float* lse, int nsplit, int D) {
    const int h = blockIdx.x, d = threadIdx.x;
    const float* ml = part_ml + (size_t)h * nsplit * 2;
    float M = NEG_INF;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, ml[2 * s]);
    float l = 0.f, o = 0.f;
    for (int s = 0; s < nsplit; s++) {
        if (ml[2 * s] == NEG_INF) continue;
        const float w = exp2f(ml[2 * s] - M);
        l += w * ml[2 * s + 1];
        o += w * part_o[((size_t)h * nsplit + s) * D + d];
    }
    O[(size_t)h * D + d] = o / l;
    if (d == 0) lse[h] = M * 0.69314718055994531f + logf(l);
}
