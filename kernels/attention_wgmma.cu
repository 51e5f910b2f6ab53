// Prefill attention with Hopper warpgroup MMA (wgmma, sm_90a): one warpgroup (4 warps)
// per CTA and 64 query rows; S = Q K^T with Q fragments in registers and K from shared
// memory (K-major), O += P V with P in registers and V from shared memory (MN-major,
// transposed by the instruction). Shared tiles use the no-swizzle core-matrix layout
// (8 rows x 16 bytes contiguous). Same semantics, arguments and outputs as
// attention_bf16.cu, plus the descriptors' leading/stride byte offsets (k_lbo, k_sbo for
// K; v_lbo, v_sbo for V) so that the host can state the layout it wrote. Compiled for
// compute_90a.

#define BM 64
#define BN 64
#define NS 2  // pipeline stages (cp.async)

#include "mma_common.cuh"

__device__ __forceinline__ void wgmma_n64_k(float* d, const u32* a, unsigned long long desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %36, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %37, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc));
}
__device__ __forceinline__ void wgmma_n64_v(float* d, const u32* a, unsigned long long desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %36, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %37, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc));
}
__device__ __forceinline__ void wgmma_n128_v(float* d, const u32* a, unsigned long long desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %68, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %69, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(scale_d), "l"(desc));
}

__device__ __forceinline__ unsigned long long make_desc(const void* p, int lbo, int sbo) {
    const u32 a = smem_u32(p);
    unsigned long long d = 0;
    d |= (unsigned long long)((a & 0x3FFFF) >> 4);
    d |= (unsigned long long)((lbo >> 4) & 0x3FFF) << 16;
    d |= (unsigned long long)((sbo >> 4) & 0x3FFF) << 32;
    return d;  // base offset 0, no swizzle
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int D>
__device__ __forceinline__ void prefill_wg_body(const u16* __restrict__ Q, const u16* __restrict__ K,
                                                const u16* __restrict__ V, const u16* __restrict__ GK,
                                                const u16* __restrict__ GV, const int* __restrict__ gpos,
                                                const int* __restrict__ gcount, int gcap,
                                                u16* __restrict__ O, float* __restrict__ LSE, int L,
                                                int Hq, int Hkv, int window, float scale_log2,
                                                int k_lbo, int k_sbo, int v_lbo, int v_sbo) {
    constexpr int TILE = BN * D;  // elements of one K (or V) tile
    extern __shared__ __align__(128) unsigned char smem_raw[];
    u16* sK = reinterpret_cast<u16*>(smem_raw);              // [NS][TILE], core-matrix layout
    u16* sV = sK + NS * TILE;                                 // [NS][TILE]
    int* sPos = reinterpret_cast<int*>(sV + NS * TILE);       // [NS][BN]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = lane >> 2, tig = lane & 3;
    const int h = blockIdx.y;
    const int g = Hq / Hkv;
    const int kv = h / g;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int q0 = qt * BM;
    const int qlast = min(q0 + BM, L) - 1;
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
    float o[D / 2];
#pragma unroll
    for (int j = 0; j < D / 2; j++) o[j] = 0.f;
    float s[BN / 2];
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const int row0 = q0 + warp * 16 + group;
    const int row1 = row0 + 8;
    constexpr int CPR = D / 8;

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
        unsigned char* dk = reinterpret_cast<unsigned char*>(sK + stage * TILE);
        unsigned char* dv = reinterpret_cast<unsigned char*>(sV + stage * TILE);
#pragma unroll
        for (int it = 0; it < BN * CPR / 128; it++) {
            int c = tid + it * 128;
            int r = c / CPR, cc = c % CPR;
            int rr = min(r, valid - 1);
            // K: 8-row groups at 16 D bytes, K-chunks at 128 bytes, rows at 16 bytes.
            cp_async16(smem_u32(dk + (r >> 3) * (16 * D) + cc * 128 + (r & 7) * 16), ks + (size_t)rr * D + cc * 8);
            // V: d-chunks at BN * 16 bytes, 8-key groups at 128 bytes, keys at 16 bytes.
            cp_async16(smem_u32(dv + cc * (BN * 16) + (r >> 3) * 128 + (r & 7) * 16), vs + (size_t)rr * D + cc * 8);
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
        fence_async_smem();
        __syncthreads();
        const u16* cK = sK + stage * TILE;
        const u16* cV = sV + stage * TILE;
        const int* cP = sPos + stage * BN;

        // S = Q K^T: 64 x 64, k over D in steps of 16 (two 16-byte chunks each).
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wgmma_n64_k(s, qa[kk], make_desc(reinterpret_cast<const unsigned char*>(cK) + kk * 256, k_lbo, k_sbo), kk > 0);
        wg_commit();
        wg_wait0();

        const bool glob = t < nGt;
        const int pfirst = cP[0], plast = cP[BN - 1];
        bool full;
        if (glob) full = (plast != 0x7fffffff) && (plast <= q0 - window);
        else full = (plast != 0x7fffffff) && (plast <= q0) && (pfirst >= qlast - window + 1);
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[4 * n + e] * scale_log2;
                if (!full) {
                    int p = cP[n * 8 + tig * 2 + (e & 1)];
                    int i = (e < 2) ? row0 : row1;
                    bool ok = glob ? (p <= i - window) : (p <= i && p >= i - window + 1);
                    if (!ok) x = NEG_INF;
                }
                s[4 * n + e] = x;
            }
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            mx0 = fmaxf(mx0, fmaxf(s[4 * n], s[4 * n + 1]));
            mx1 = fmaxf(mx1, fmaxf(s[4 * n + 2], s[4 * n + 3]));
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
            s[4 * n] = exp2f(s[4 * n] - mu0);
            s[4 * n + 1] = exp2f(s[4 * n + 1] - mu0);
            s[4 * n + 2] = exp2f(s[4 * n + 2] - mu1);
            s[4 * n + 3] = exp2f(s[4 * n + 3] - mu1);
            rs0 += s[4 * n] + s[4 * n + 1];
            rs1 += s[4 * n + 2] + s[4 * n + 3];
        }
        l0 = l0 * a0 + rs0;
        l1 = l1 * a1 + rs1;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[4 * j] *= a0;
            o[4 * j + 1] *= a0;
            o[4 * j + 2] *= a1;
            o[4 * j + 3] *= a1;
        }
        u32 pa[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            pa[kk][0] = pack_bf16(s[8 * kk], s[8 * kk + 1]);
            pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
        }
        // O += P V: k over the 64 keys in steps of 16 (two 8-key core matrices each).
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            const unsigned long long dv = make_desc(reinterpret_cast<const unsigned char*>(cV) + kk * 256, v_lbo, v_sbo);
            if constexpr (D == 128) wgmma_n128_v(o, pa[kk], dv, 1);
            else wgmma_n64_v(o, pa[kk], dv, 1);
        }
        wg_commit();
        wg_wait0();
        __syncthreads();
    }
    cp_async_wait0();

    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const float LN2 = 0.69314718055994531f;
    if (row0 < L) {
        u16* op = O + ((size_t)h * L + row0) * D;
#pragma unroll
        for (int j = 0; j < D / 8; j++)
            *reinterpret_cast<u32*>(op + j * 8 + tig * 2) = pack_bf16(o[4 * j] * inv0, o[4 * j + 1] * inv0);
        if (tig == 0) LSE[(size_t)h * L + row0] = m0 * LN2 + logf(l0);
    }
    if (row1 < L) {
        u16* op = O + ((size_t)h * L + row1) * D;
#pragma unroll
        for (int j = 0; j < D / 8; j++)
            *reinterpret_cast<u32*>(op + j * 8 + tig * 2) = pack_bf16(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
        if (tig == 0) LSE[(size_t)h * L + row1] = m1 * LN2 + logf(l1);
    }
}

#define PREFILL_WG(D)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) tca_prefill_wgmma_d##D(                    \
        const u16* Q, const u16* K, const u16* V, const u16* GK, const u16* GV, const int* gpos, \
        const int* gcount, int gcap, u16* O, float* LSE, int L, int Hq, int Hkv, int window,     \
        float scale_log2, int k_lbo, int k_sbo, int v_lbo, int v_sbo) {                          \
        prefill_wg_body<D>(Q, K, V, GK, GV, gpos, gcount, gcap, O, LSE, L, Hq, Hkv, window,      \
                           scale_log2, k_lbo, k_sbo, v_lbo, v_sbo);                              \
    }

PREFILL_WG(64)
PREFILL_WG(128)
