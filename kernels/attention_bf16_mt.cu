// Prefill attention on tensor cores, variant with MT m16 row tiles per warp (BM = 64 MT
// query rows per CTA of 4 warps) and Q staged in shared memory (A fragments by
// ldmatrix), so that each K/V fragment loaded from shared memory feeds MT mma
// instructions. Same semantics, arguments and outputs as attention_bf16.cu (which holds
// the one-tile-per-warp kernel); the benchmark times both.
//
// Original description of the shared algorithm:
// Prefill attention on tensor cores: bf16 inputs, f32 accumulation (mma.sync m16n8k16
// through inline PTX), online softmax. One kernel serves both TCA's sparse prefill and
// dense causal attention:
//   sparse: query i attends to the compacted global keys with position p <= i - w (the
//           global set S_G lies in [0, L - w), and keys inside the window are taken from
//           the window part only, so no key counts twice) plus its window
//           [max(0, i - w + 1), i];
//   dense:  no global part and w >= L, i.e. plain causal attention.
// It writes O (bf16) and the log-sum-exp (natural log, f32) of every query.
//
// Layout: Q [Hq, L, D], K and V [Hkv, L, D], compacted GK, GV [Hkv, gcap, D] with
// positions gpos [Hkv, gcap] (ascending) and counts gcount [Hkv]; bf16 as uint16.
// CTA = 4 warps = 64 query rows of one query head; key tiles of 64 rows, multi-
// buffered (NS stages) in shared memory with cp.async. Query head h reads KV head
// h / (Hq / Hkv).

#define BN 64
#define NS 2  // pipeline stages (cp.async)

#include "mma_common.cuh"


template <int D, int MT>
__device__ __forceinline__ void prefill_mt_body(const u16* __restrict__ Q, const u16* __restrict__ K,
                                                const u16* __restrict__ V, const u16* __restrict__ GK,
                                                const u16* __restrict__ GV, const int* __restrict__ gpos,
                                                const int* __restrict__ gcount, int gcap,
                                                u16* __restrict__ O, float* __restrict__ LSE, int L,
                                                int Hq, int Hkv, int window, float scale_log2) {
    constexpr int STR = D + 8;
    constexpr int BMT = 64 * MT;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = reinterpret_cast<u16*>(smem_raw);              // [BMT][STR]
    u16* sK = sQ + BMT * STR;                                 // [NS][BN][STR]
    u16* sV = sK + NS * BN * STR;                             // [NS][BN][STR]
    int* sPos = reinterpret_cast<int*>(sV + NS * BN * STR);   // [NS][BN]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = lane >> 2, tig = lane & 3;
    const int h = blockIdx.y;
    const int g = Hq / Hkv;
    const int kv = h / g;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int q0 = qt * BMT;
    const int qlast = min(q0 + BMT, L) - 1;
    const u16* Kh = K + (size_t)kv * L * D;
    const u16* Vh = V + (size_t)kv * L * D;

    int nG = 0;
    const int* gp = nullptr;
    const u16* GKh = nullptr;
    const u16* GVh = nullptr;
    if (gcount != nullptr) {
        int n = gcount[kv];
        gp = gpos + (size_t)kv * gcap;
        GKh = GK + (size_t)kv * gcap * D;
        GVh = GV + (size_t)kv * gcap * D;
        int lim = qlast - window;
        int lo = 0, hi = n;
        while (lo < hi) {
            int mid = (lo + hi) >> 1;
            if (gp[mid] <= lim) lo = mid + 1; else hi = mid;
        }
        nG = lo;
    }
    const int nGt = (nG + BN - 1) / BN;
    int ls = q0 - window + 1;
    if (ls < 0) ls = 0;
    ls &= ~(BN - 1);
    const int le = qlast + 1;
    const int nLt = (le - ls + BN - 1) / BN;
    const int T = nGt + nLt;
    constexpr int CPR = D / 8;

    // Q tile into shared memory (first commit group, with tile 0).
    {
        const u16* qh = Q + (size_t)h * L * D;
#pragma unroll
        for (int it = 0; it < BMT * CPR / 128; it++) {
            int c = tid + it * 128;
            int r = c / CPR, cc = c % CPR;
            int rr = min(q0 + r, L - 1);
            cp_async16(smem_u32(sQ + r * STR + cc * 8), qh + (size_t)rr * D + cc * 8);
        }
    }

    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < D / 8; j++) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        mrow[mt][0] = mrow[mt][1] = NEG_INF;
        lrow[mt][0] = lrow[mt][1] = 0.f;
    }
    const int wrow0 = warp * 16 * MT;  // first row of this warp within the tile

    auto load_tile = [&](int t, int stage) {
        const u16* ks;
        const u16* vs;
        int valid, start;
        const bool glob = t < nGt;
        if (glob) {
            start = t * BN;
            valid = min(BN, nG - start);
            ks = GKh + (size_t)start * D;
            vs = GVh + (size_t)start * D;
        } else {
            start = ls + (t - nGt) * BN;
            valid = min(BN, le - start);
            ks = Kh + (size_t)start * D;
            vs = Vh + (size_t)start * D;
        }
        u16* dk = sK + stage * BN * STR;
        u16* dv = sV + stage * BN * STR;
#pragma unroll
        for (int it = 0; it < BN * CPR / 128; it++) {
            int c = tid + it * 128;
            int r = c / CPR, cc = c % CPR;
            int rr = min(r, valid - 1);
            cp_async16(smem_u32(dk + r * STR + cc * 8), ks + (size_t)rr * D + cc * 8);
            cp_async16(smem_u32(dv + r * STR + cc * 8), vs + (size_t)rr * D + cc * 8);
        }
        if (tid < BN) {
            int p;
            if (tid >= valid) p = 0x7fffffff;
            else p = glob ? gp[start + tid] : start + tid;
            sPos[stage * BN + tid] = p;
        }
    };

#pragma unroll
    for (int s0 = 0; s0 < NS - 1; s0++) {
        if (s0 < T) load_tile(s0, s0);
        cp_async_commit();
    }

    for (int t = 0; t < T; t++) {
        const int stage = t % NS;
        if (t + NS - 1 < T) load_tile(t + NS - 1, (t + NS - 1) % NS);
        cp_async_commit();
        cp_async_wait_stages();
        __syncthreads();

        const u16* cK = sK + stage * BN * STR;
        const u16* cV = sV + stage * BN * STR;
        const int* cP = sPos + stage * BN;

        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < BN / 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int k2 = 0; k2 < D / 32; k2++) {
            u32 qa[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int kh = 0; kh < 2; kh++)
                    ldsm_x4(smem_u32(sQ + (wrow0 + mt * 16 + (lane & 15)) * STR + k2 * 32 + kh * 16 +
                                     (lane >> 4) * 8),
                            qa[mt][kh][0], qa[mt][kh][1], qa[mt][kh][2], qa[mt][kh][3]);
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(smem_u32(cK + (n * 8 + (lane & 7)) * STR + k2 * 32 + (lane >> 3) * 8), b0, b1,
                        b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(s[mt][n], qa[mt][0], b0, b1);
                    mma_bf16(s[mt][n], qa[mt][1], b2, b3);
                }
            }
        }

        const bool glob = t < nGt;
        const int pfirst = cP[0], plast = cP[BN - 1];
        bool full;
        if (glob) full = (plast != 0x7fffffff) && (plast <= q0 - window);
        else full = (plast != 0x7fffffff) && (plast <= q0) && (pfirst >= qlast - window + 1);

#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int row0 = q0 + wrow0 + mt * 16 + group;
            const int row1 = row0 + 8;
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[mt][n][e] * scale_log2;
                    if (!full) {
                        int p = cP[n * 8 + tig * 2 + (e & 1)];
                        int i = (e < 2) ? row0 : row1;
                        bool ok = glob ? (p <= i - window) : (p <= i && p >= i - window + 1);
                        if (!ok) x = NEG_INF;
                    }
                    s[mt][n][e] = x;
                }
            }
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
            const float mn0 = fmaxf(mrow[mt][0], mx0), mn1 = fmaxf(mrow[mt][1], mx1);
            const float mu0 = (mn0 == NEG_INF) ? 0.f : mn0;
            const float mu1 = (mn1 == NEG_INF) ? 0.f : mn1;
            const float a0 = exp2f(mrow[mt][0] - mu0), a1 = exp2f(mrow[mt][1] - mu1);
            mrow[mt][0] = mn0;
            mrow[mt][1] = mn1;
            float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                s[mt][n][0] = exp2f(s[mt][n][0] - mu0);
                s[mt][n][1] = exp2f(s[mt][n][1] - mu0);
                s[mt][n][2] = exp2f(s[mt][n][2] - mu1);
                s[mt][n][3] = exp2f(s[mt][n][3] - mu1);
                rs0 += s[mt][n][0] + s[mt][n][1];
                rs1 += s[mt][n][2] + s[mt][n][3];
            }
            lrow[mt][0] = lrow[mt][0] * a0 + rs0;
            lrow[mt][1] = lrow[mt][1] * a1 + rs1;
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                o[mt][j][0] *= a0;
                o[mt][j][1] *= a0;
                o[mt][j][2] *= a1;
                o[mt][j][3] *= a1;
            }
        }

#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < D / 16; dd++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(cV + (kk * 16 + (lane & 15)) * STR + dd * 16 + (lane >> 4) * 8), b0,
                          b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(o[mt][2 * dd], pa[mt], b0, b1);
                    mma_bf16(o[mt][2 * dd + 1], pa[mt], b2, b3);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait0();

    const float LN2 = 0.69314718055994531f;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        float l0 = lrow[mt][0], l1 = lrow[mt][1];
        l0 += __shfl_xor_sync(0xffffffff, l0, 1);
        l0 += __shfl_xor_sync(0xffffffff, l0, 2);
        l1 += __shfl_xor_sync(0xffffffff, l1, 1);
        l1 += __shfl_xor_sync(0xffffffff, l1, 2);
        const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
        const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
        const int row0 = q0 + wrow0 + mt * 16 + group;
        const int row1 = row0 + 8;
        if (row0 < L) {
            u16* op = O + ((size_t)h * L + row0) * D;
#pragma unroll
            for (int j = 0; j < D / 8; j++)
                *reinterpret_cast<u32*>(op + j * 8 + tig * 2) =
                    pack_bf16(o[mt][j][0] * inv0, o[mt][j][1] * inv0);
            if (tig == 0) LSE[(size_t)h * L + row0] = mrow[mt][0] * LN2 + logf(l0);
        }
        if (row1 < L) {
            u16* op = O + ((size_t)h * L + row1) * D;
#pragma unroll
            for (int j = 0; j < D / 8; j++)
                *reinterpret_cast<u32*>(op + j * 8 + tig * 2) =
                    pack_bf16(o[mt][j][2] * inv1, o[mt][j][3] * inv1);
            if (tig == 0) LSE[(size_t)h * L + row1] = mrow[mt][1] * LN2 + logf(l1);
        }
    }
}

#define PREFILL_MT(D, MT)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) tca_prefill_bf16_mt##MT##_d##D(              \
        const u16* Q, const u16* K, const u16* V, const u16* GK, const u16* GV, const int* gpos,   \
        const int* gcount, int gcap, u16* O, float* LSE, int L, int Hq, int Hkv, int window,       \
        float scale_log2) {                                                                        \
        prefill_mt_body<D, MT>(Q, K, V, GK, GV, gpos, gcount, gcap, O, LSE, L, Hq, Hkv, window,    \
                               scale_log2);                                                        \
    }

PREFILL_MT(64, 2)
PREFILL_MT(96, 2)
PREFILL_MT(128, 2)
