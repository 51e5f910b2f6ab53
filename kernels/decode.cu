// Decode attention (one new query per query head) over a KV cache made of two row ranges
// per KV head: part A (the compacted global keys S_G: rows [0, nA) of A, count from
// device memory when countA != nullptr) and part B (the window: rows [0, nB) of B).
// Dense decode passes the full K, V as part A and nB = 0.
// Split over KV: CTA (split s, KV head kv; 256 threads) takes keys [s * KC, (s + 1) * KC)
// of the concatenated range and reads each key and value row once for all G query heads
// of the group (GQA); every thread issues all its 16-byte K and V loads up front. Partials (m, l in log2 units; unnormalised o) are merged by
// tca_decode_combine, which writes O (f32) and the log-sum-exp (natural log).

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF (-__int_as_float(0x7f800000))
#define KC 128
#define NT 256

__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((u32)x) << 16); }

template <int D, int G>
__device__ __forceinline__ void decode_body(const u16* __restrict__ Qd, long long q_stride,
                                            const u16* __restrict__ KA, const u16* __restrict__ VA,
                                            const int* __restrict__ countA, int nA_const,
                                            long long strideA, const u16* __restrict__ KB,
                                            const u16* __restrict__ VB, int nB, long long strideB,
                                            float* __restrict__ part_o, float* __restrict__ part_ml,
                                            float scale_log2) {
    constexpr int LPK = D / 8;        // lanes per row (16 bytes each)
    constexpr int SLOTS = NT / LPK;   // rows in flight per CTA step
    constexpr int NI = KC / SLOTS;    // rows per thread
    constexpr int NW = NT / 32;
    __shared__ float sc[G][KC];
    __shared__ float red[NW][G][D];
    __shared__ float sm[G], sl[G];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, nsplit = gridDim.x, kv = blockIdx.y;
    const int sub = tid % LPK, slot = tid / LPK;
    const int nA = countA ? countA[kv] : nA_const;
    const int n = nA + nB;
    const int k0 = split * KC, k1 = min(n, k0 + KC);
    const int cnt = k1 - k0;
    if (cnt <= 0) {  // CTA-uniform
        for (int idx = tid; idx < G * D; idx += NT)
            part_o[(((size_t)(kv * G + idx / D)) * nsplit + split) * D + idx % D] = 0.f;
        if (tid < G) {
            const size_t o = ((size_t)(kv * G + tid) * nsplit + split) * 2;
            part_ml[o] = NEG_INF;
            part_ml[o + 1] = 0.f;
        }
        return;
    }
    const u16* Ka = KA + (size_t)kv * strideA * D;
    const u16* Va = VA + (size_t)kv * strideA * D;
    const u16* Kb = KB ? KB + (size_t)kv * strideB * D : nullptr;
    const u16* Vb = VB ? VB + (size_t)kv * strideB * D : nullptr;

    uint4 kr[NI], vr[NI];
#pragma unroll
    for (int i = 0; i < NI; i++) {
        const int kc = k0 + min(slot + i * SLOTS, cnt - 1);
        const size_t off = (kc < nA ? (size_t)kc : (size_t)(kc - nA)) * D + sub * 8;
        kr[i] = *reinterpret_cast<const uint4*>((kc < nA ? Ka : Kb) + off);
        vr[i] = *reinterpret_cast<const uint4*>((kc < nA ? Va : Vb) + off);
    }
    float q[G][8];
#pragma unroll
    for (int gi = 0; gi < G; gi++) {
        uint4 u = *reinterpret_cast<const uint4*>(Qd + (size_t)(kv * G + gi) * q_stride + sub * 8);
        const u16* e = reinterpret_cast<const u16*>(&u);
#pragma unroll
        for (int t = 0; t < 8; t++) q[gi][t] = bf2f(e[t]) * scale_log2;
    }
    // Scores.
#pragma unroll
    for (int i = 0; i < NI; i++) {
        const u16* e = reinterpret_cast<const u16*>(&kr[i]);
        float kf[8];
#pragma unroll
        for (int t = 0; t < 8; t++) kf[t] = bf2f(e[t]);
        const int kl = slot + i * SLOTS;
#pragma unroll
        for (int gi = 0; gi < G; gi++) {
            float acc = 0.f;
#pragma unroll
            for (int t = 0; t < 8; t++) acc = fmaf(q[gi][t], kf[t], acc);
#pragma unroll
            for (int off = LPK / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
            if (sub == 0 && kl < cnt) sc[gi][kl] = acc;
        }
    }
    __syncthreads();
    // Max and sum per head: warp gi handles head gi (G <= 8 warps).
    for (int gi = warp; gi < G; gi += NW) {
        float m = NEG_INF;
        for (int i = lane; i < cnt; i += 32) m = fmaxf(m, sc[gi][i]);
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
        float l = 0.f;
        for (int i = lane; i < cnt; i += 32) {
            const float p = exp2f(sc[gi][i] - m);
            sc[gi][i] = p;
            l += p;
        }
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffff, l, off);
        if (lane == 0) {
            sm[gi] = m;
            sl[gi] = l;
        }
    }
    __syncthreads();
    // o[g][dims of this lane] += p * v.
    float acc[G][8];
#pragma unroll
    for (int gi = 0; gi < G; gi++)
#pragma unroll
        for (int t = 0; t < 8; t++) acc[gi][t] = 0.f;
#pragma unroll
    for (int i = 0; i < NI; i++) {
        const int kl = slot + i * SLOTS;
        if (kl < cnt) {
            const u16* e = reinterpret_cast<const u16*>(&vr[i]);
            float vf[8];
#pragma unroll
            for (int t = 0; t < 8; t++) vf[t] = bf2f(e[t]);
#pragma unroll
            for (int gi = 0; gi < G; gi++) {
                const float p = sc[gi][kl];
#pragma unroll
                for (int t = 0; t < 8; t++) acc[gi][t] = fmaf(p, vf[t], acc[gi][t]);
            }
        }
    }
    // Reduce over the row slots of the warp, then over the warps.
#pragma unroll
    for (int gi = 0; gi < G; gi++)
#pragma unroll
        for (int t = 0; t < 8; t++) {
            float x = acc[gi][t];
#pragma unroll
            for (int off = LPK; off < 32; off <<= 1) x += __shfl_xor_sync(0xffffffff, x, off);
            acc[gi][t] = x;
        }
    if (lane < LPK) {
#pragma unroll
        for (int gi = 0; gi < G; gi++)
#pragma unroll
            for (int t = 0; t < 8; t++) red[warp][gi][sub * 8 + t] = acc[gi][t];
    }
    __syncthreads();
    for (int idx = tid; idx < G * D; idx += NT) {
        const int gi = idx / D, dd = idx % D;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) v += red[w][gi][dd];
        part_o[(((size_t)(kv * G + gi)) * nsplit + split) * D + dd] = v;
    }
    if (tid < G) {
        const size_t o = ((size_t)(kv * G + tid) * nsplit + split) * 2;
        part_ml[o] = sm[tid];
        part_ml[o + 1] = sl[tid];
    }
}

#define DECODE(D, G)                                                                            \
    extern "C" __global__ void __launch_bounds__(NT) tca_decode_d##D##_g##G(                    \
        const u16* Qd, long long q_stride, const u16* KA, const u16* VA, const int* countA,     \
        int nA_const, long long strideA, const u16* KB, const u16* VB, int nB, long long strideB, \
        float* part_o, float* part_ml, float sl2) {                                             \
        decode_body<D, G>(Qd, q_stride, KA, VA, countA, nA_const, strideA, KB, VB, nB, strideB, \
                          part_o, part_ml, sl2);                                                \
    }
DECODE(64, 1) DECODE(64, 2) DECODE(64, 3) DECODE(64, 4) DECODE(64, 8)
DECODE(128, 1) DECODE(128, 2) DECODE(128, 3) DECODE(128, 4) DECODE(128, 8)

// grid Hq, 256 threads: merge the splits of one query head. Thread (part, d) sums the
// splits part, part + P, ... (P = 256 / D), then the parts are added in shared memory.
extern "C" __global__ void __launch_bounds__(256) tca_decode_combine(const float* part_o,
                                                                     const float* part_ml, float* O,
                                                                     float* lse, int nsplit, int D) {
    __shared__ float sh[256];
    __shared__ float so[256];
    const int h = blockIdx.x, tid = threadIdx.x;
    const float* ml = part_ml + (size_t)h * nsplit * 2;
    float M = NEG_INF;
    for (int s = tid; s < nsplit; s += 256) M = fmaxf(M, ml[2 * s]);
    sh[tid] = M;
    __syncthreads();
    for (int off = 128; off > 0; off >>= 1) {
        if (tid < off) sh[tid] = fmaxf(sh[tid], sh[tid + off]);
        __syncthreads();
    }
    M = sh[0];
    __syncthreads();
    const int P = 256 / D;
    const int d = tid % D, part = tid / D;
    float l = 0.f, o = 0.f;
    if (part < P) {
        for (int s = part; s < nsplit; s += P) {
            const float m = ml[2 * s];
            if (m == NEG_INF) continue;
            const float w = exp2f(m - M);
            l += w * ml[2 * s + 1];
            o += w * part_o[((size_t)h * nsplit + s) * D + d];
        }
    }
    so[tid] = o;
    sh[tid] = l;
    __syncthreads();
    if (tid < D) {
        float ot = 0.f, lt = 0.f;
        for (int p = 0; p < P; p++) {
            ot += so[p * D + tid];
            lt += sh[p * D + tid];
        }
        O[(size_t)h * D + tid] = ot / lt;
        if (tid == 0) lse[h] = M * 0.69314718055994531f + logf(lt);
    }
}
