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

#define BM 64
#define BN 64
#define NS 3  // pipeline stages (cp.async)

#include "mma_common.cuh"
#include "prefill_store.cuh"

template <int D>
__device__ __forceinline__ void prefill_body(const u16* __restrict__ Q, const u16* __restrict__ K,
                                             const u16* __restrict__ V, const u16* __restrict__ GK,
                                             const u16* __restrict__ GV, const int* __restrict__ gpos,
                                             const int* __restrict__ gcount, int gcap,
                                             u16* __restrict__ O, float* __restrict__ LSE, int L,
                                             int Hq, int Hkv, int window, float scale_log2) {
    constexpr int STR = D + 8;  // padded row stride (bf16): conflict-free ldmatrix
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sK = reinterpret_cast<u16*>(smem_raw);             // [NS][BN][STR]
    u16* sV = sK + NS * BN * STR;                           // [NS][BN][STR]
    int* sPos = reinterpret_cast<int*>(sV + NS * BN * STR);  // [NS][BN]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = lane >> 2, tig = lane & 3;
    const int h = blockIdx.y;
    const int g = Hq / Hkv;
    const int kv = h / g;
    const int qt = gridDim.x - 1 - blockIdx.x;  // heavy (late) tiles first
    const int q0 = qt * BM;
    const int qlast = min(q0 + BM, L) - 1;

    const u16* Kh = K + (size_t)kv * L * D;
    const u16* Vh = V + (size_t)kv * L * D;

    // Global part: compacted keys with position <= qlast - window.
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
        int lo = 0, hi = n;  // first index with pos > lim
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

    // Q fragments (A operand) straight from global memory.
    u32 qa[D / 16][4];
    {
        const int r0 = q0 + warp * 16 + group;
        const int r1 = r0 + 8;
        const u16* q0p = Q + ((size_t)h * L + min(r0, L - 1)) * D;
        const u16* q1p = Q + ((size_t)h * L + min(r1, L - 1)) * D;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            int c = kk * 16 + tig * 2;
            qa[kk][0] = *reinterpret_cast<const u32*>(q0p + c);
            qa[kk][1] = *reinterpret_cast<const u32*>(q1p + c);
            qa[kk][2] = *reinterpret_cast<const u32*>(q0p + c + 8);
            qa[kk][3] = *reinterpret_cast<const u32*>(q1p + c + 8);
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const int row0 = q0 + warp * 16 + group;
    const int row1 = row0 + 8;

    auto load_tile = [&](int t, int stage) {
        const u16* ks;
        const u16* vs;
        int valid;
        bool glob = t < nGt;
        int start;
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
        constexpr int CPR = D / 8;  // 16-byte chunks per row
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

        // S = Q K^T (16 x 64 per warp)
        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int k2 = 0; k2 < D / 32; k2++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(smem_u32(cK + (n * 8 + (lane & 7)) * STR + k2 * 32 + (lane >> 3) * 8), b0, b1,
                        b2, b3);
                mma_bf16(s[n], qa[2 * k2], b0, b1);
                mma_bf16(s[n], qa[2 * k2 + 1], b2, b3);
            }
        }

        // Mask and scale. Global keys: p <= i - w. Window keys: i - w + 1 <= p <= i.
        const bool glob = t < nGt;
        const int pfirst = cP[0], plast = cP[BN - 1];
        bool full;
        if (glob) full = (plast != 0x7fffffff) && (plast <= q0 - window);
        else full = (plast != 0x7fffffff) && (plast <= q0) && (pfirst >= qlast - window + 1);
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[n][e] * scale_log2;
                if (!full) {
                    int p = cP[n * 8 + tig * 2 + (e & 1)];
                    int i = (e < 2) ? row0 : row1;
                    bool ok = glob ? (p <= i - window) : (p <= i && p >= i - window + 1);
                    if (!ok) x = NEG_INF;
                }
                s[n][e] = x;
            }
        }

        // Online softmax (rows row0: elements 0,1; row1: elements 2,3).
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float mu0 = (mn0 == NEG_INF) ? 0.f : mn0;
        const float mu1 = (mn1 == NEG_INF) ? 0.f : mn1;
        const float a0 = exp2f(m0 - mu0), a1 = exp2f(m1 - mu1);
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = exp2f(s[n][0] - mu0);
            s[n][1] = exp2f(s[n][1] - mu0);
            s[n][2] = exp2f(s[n][2] - mu1);
            s[n][3] = exp2f(s[n][3] - mu1);
            rs0 += s[n][0] + s[n][1];
            rs1 += s[n][2] + s[n][3];
        }
        l0 = l0 * a0 + rs0;
        l1 = l1 * a1 + rs1;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[j][0] *= a0;
            o[j][1] *= a0;
            o[j][2] *= a1;
            o[j][3] *= a1;
        }

        // O += P V
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 pa[4];
            pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dd = 0; dd < D / 16; dd++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(cV + (kk * 16 + (lane & 15)) * STR + dd * 16 + (lane >> 4) * 8), b0,
                          b1, b2, b3);
                mma_bf16(o[2 * dd], pa, b0, b1);
                mma_bf16(o[2 * dd + 1], pa, b2, b3);
            }
        }
        __syncthreads();
    }
    cp_async_wait0();

    store_rows<D>(&o[0][0], l0, l1, m0, m1, row0, row1, tig, h, L, O, LSE);
}

#define PREFILL(D)                                                                               \
    extern "C" __global__ void __launch_bounds__(128) tca_prefill_bf16_d##D(                     \
        const u16* Q, const u16* K, const u16* V, const u16* GK, const u16* GV, const int* gpos, \
        const int* gcount, int gcap, u16* O, float* LSE, int L, int Hq, int Hkv, int window,     \
        float scale_log2) {                                                                      \
        prefill_body<D>(Q, K, V, GK, GV, gpos, gcount, gcap, O, LSE, L, Hq, Hkv, window,         \
                        scale_log2);                                                             \
    }

PREFILL(64)
PREFILL(96)
PREFILL(128)
