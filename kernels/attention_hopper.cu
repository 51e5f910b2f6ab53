// Prefill attention for Hopper (sm_90a): warp-specialised, asynchronous warpgroup MMA.
// Same semantics, arguments and outputs as attention_bf16.cu (TCA sparse prefill over
// the compacted global keys plus each query's window; dense causal when gcount is null
// and window = L; O in bf16, LSE in natural log).
//
// CTA = 1 producer warpgroup + NC consumer warpgroups (64 query rows each, 64 * NC rows
// per CTA, heaviest query tiles launched first), key tiles of BN = 128 rows.
// - Producer (setmaxnreg.dec): loads K/V tiles (global part from GK/GV, then the window
//   from K/V) with cp.async into an NS-stage ring in the 128-byte-swizzled layout, rows
//   past a tile's end clamped to its last valid row (finite data; masked by position),
//   plus each row's position; a tile is published on its "full" mbarrier after
//   cp.async.wait_group and fence.proxy.async, never later than the producer's next
//   wait for a free stage. (cp.async, not TMA: the clamp keeps uninitialised rows of
//   the compacted cache out of P V.)
// - Consumers (setmaxnreg.inc): Q tile in shared memory; S = Q K^T with wgmma (both
//   operands from shared memory, K-major); P V with P in registers (RS form, V MN-major).
//   The next tile's Q K^T is issued together with this tile's P V and the softmax of
//   the next tile runs while P V completes (wgmma.wait_group 1). Only tiles that cross
//   a mask boundary are masked element-wise. A stage is handed back on its "empty"
//   mbarrier once the P V that read it has completed.
// Shared tiles (rows x D, bf16): D/64 column blocks of rows x 128 bytes, the 16-byte
// chunk c of row r stored at chunk c ^ (r & 7) (the wgmma 128-byte swizzle); blocks
// 1024-byte aligned.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))
#define BN 128
#define POS_NONE 0x7fffffff

#include "prefill_store.cuh"

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait0() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// True when the phase of the given parity has completed (does not block).
__device__ __forceinline__ bool mbar_test(u32 bar, int parity) {
    u32 ok;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving register reads or writes of an accumulator (or of an
// A fragment still being read) across wgmma issue and wait.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(u32* r) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63).
__device__ __forceinline__ u64 desc_sw128(u32 addr, u32 lbo, u32 sbo) {
    u64 d = (u64)((addr & 0x3FFFF) >> 4);
    d |= (u64)((lbo & 0x3FFFF) >> 4) << 16;
    d |= (u64)((sbo & 0x3FFFF) >> 4) << 32;
    d |= 1ull << 62;
    return d;
}
// Byte offset of 16-byte chunk c (of D / 8) of row r in a swizzled tile of `rows` rows.
__device__ __forceinline__ u32 sw_off(int r, int c, int rows) {
    return (u32)((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// 2^x (MUFU.EX2; flushes subnormal results to 0; exact at -inf -> 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}


// d[0..64) (+)= A B, m64n128k16, A and B from shared memory (K-major), scale_d 0 overwrites.
__device__ __forceinline__ void wgmma_ss_n128(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
// d[0..32) += A B, m64n64k16, A (4 registers) from registers, B from shared memory (MN-major).
__device__ __forceinline__ void wgmma_rs_n64(float* d, const u32* a, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1));
}
// d[0..64) += A B, m64n128k16, A (4 registers) from registers, B from shared memory (MN-major).
__device__ __forceinline__ void wgmma_rs_n128(float* d, const u32* a, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1));
}

// Masks one S tile (raw Q K^T; rows row0, row1 of this thread; key k of the tile at
// position cP[k]), then the online softmax in log2 units: new running maxima m0, m1 of
// s * scale_log2, the factors a0, a1 that rescale the old O and l, and
// sc <- exp2(s * scale_log2 - m) (one FFMA and one MUFU.EX2 per element).
// Global keys count when p <= i - window, window keys when i - window + 1 <= p <= i.
__device__ __forceinline__ void softmax_tile(float* sc, const int* cP, bool glob, bool full, int row0,
                                             int row1, int window, float scale_log2, float& m0,
                                             float& m1, float& l0, float& l1, float& a0, float& a1) {
    const int tig = threadIdx.x & 3;
    if (!full) {
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int p = cP[n * 8 + tig * 2 + (e & 1)];
                const int i = (e < 2) ? row0 : row1;
                const bool ok = glob ? (p <= i - window) : (p <= i && p >= i - window + 1);
                if (!ok) sc[4 * n + e] = NEG_INF;
            }
        }
    }
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < BN / 8; n++) {
        mx0 = fmaxf(mx0, fmaxf(sc[4 * n], sc[4 * n + 1]));
        mx1 = fmaxf(mx1, fmaxf(sc[4 * n + 2], sc[4 * n + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    // scale_log2 > 0, so the maximum of the scaled row is the scaled maximum.
    const float mn0 = fmaxf(m0, mx0 * scale_log2), mn1 = fmaxf(m1, mx1 * scale_log2);
    const float mu0 = (mn0 == NEG_INF) ? 0.f : mn0;
    const float mu1 = (mn1 == NEG_INF) ? 0.f : mn1;
    a0 = ex2(m0 - mu0);
    a1 = ex2(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int n = 0; n < BN / 8; n++) {
        sc[4 * n] = ex2(fmaf(sc[4 * n], scale_log2, -mu0));
        sc[4 * n + 1] = ex2(fmaf(sc[4 * n + 1], scale_log2, -mu0));
        sc[4 * n + 2] = ex2(fmaf(sc[4 * n + 2], scale_log2, -mu1));
        sc[4 * n + 3] = ex2(fmaf(sc[4 * n + 3], scale_log2, -mu1));
        rs0 += sc[4 * n] + sc[4 * n + 1];
        rs1 += sc[4 * n + 2] + sc[4 * n + 3];
    }
    l0 = l0 * a0 + rs0;
    l1 = l1 * a1 + rs1;
}

// P (the accumulator layout of S) as the A fragments of P V, k-steps of 16 keys.
__device__ __forceinline__ void pack_p(const float* sc, u32 (*pa)[4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        pa[kk][0] = pack_bf16(sc[8 * kk], sc[8 * kk + 1]);
        pa[kk][1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[kk][2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[kk][3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
}

// Shared memory of one CTA (bytes, without the 1024 bytes of alignment slack).
template <int D, int NC, int NS>
struct HopperSmem {
    static constexpr int TILE = BN * D * 2;  // one K or V tile
    static constexpr int QT = 64 * D * 2;    // one consumer's Q tile
    static constexpr int K = 0;
    static constexpr int V = NS * TILE;
    static constexpr int Q = 2 * NS * TILE;
    static constexpr int POS = Q + NC * QT;
    static constexpr int FULL = POS + NS * BN * 4;
    static constexpr int EMPTY = FULL + NS * 8;
    static constexpr int BYTES = EMPTY + NS * 8;
};

template <int D, int NC, int NS, int PREG, int CREG>
__device__ __forceinline__ void hopper_body(const u16* __restrict__ Q, const u16* __restrict__ K,
                                            const u16* __restrict__ V, const u16* __restrict__ GK,
                                            const u16* __restrict__ GV, const int* __restrict__ gpos,
                                            const int* __restrict__ gcount, int gcap, u16* __restrict__ O,
                                            float* __restrict__ LSE, int L, int Hq, int Hkv, int window,
                                            float scale_log2) {
    using S = HopperSmem<D, NC, NS>;
    constexpr int BM = 64 * NC;
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw = smem_u32(smem_raw);
    const u32 base = (raw + 1023u) & ~1023u;
    {
        // The launcher asks for BYTES plus up to 1024 bytes of alignment slack (less at
        // d 128, where the 227 KiB limit leaves 464): stop rather than overrun.
        u32 dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
        if (base - raw + S::BYTES > dyn) __trap();
    }
    unsigned char* sm = smem_raw + (base - raw);
    const u32 sK = base + S::K, sV = base + S::V, sQ = base + S::Q;
    int* sPos = reinterpret_cast<int*>(sm + S::POS);
    const u32 barFull = base + S::FULL, barEmpty = base + S::EMPTY;

    const int h = blockIdx.y;
    const int kv = h / (Hq / Hkv);
    const int qt = gridDim.x - 1 - blockIdx.x;  // heavy (late) query tiles first
    const int q0 = qt * BM;
    const int qlast = min(q0 + BM, L) - 1;

    // Global part: compacted keys with position <= qlast - window.
    int nG = 0;
    const int* gp = nullptr;
    if (gcount != nullptr) {
        const int n = gcount[kv];
        gp = gpos + (size_t)kv * gcap;
        const int lim = qlast - window;
        int lo = 0, hi = n;  // first index with pos > lim
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (gp[mid] <= lim) lo = mid + 1; else hi = mid;
        }
        nG = lo;
    }
    const int nGt = (nG + BN - 1) / BN;
    int ls = q0 - window + 1;
    if (ls < 0) ls = 0;
    ls &= ~(BN - 1);
    const int le = qlast + 1;
    const int T = nGt + (le - ls + BN - 1) / BN;

    if (threadIdx.x == 0) {
        for (int s = 0; s < NS; s++) {
            mbar_init(barFull + 8 * s, 128);
            mbar_init(barEmpty + 8 * s, NC * 128);
        }
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // ---- producer warpgroup ----
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PREG));
        const int pt = threadIdx.x;
        const u16* Kh = K + (size_t)kv * L * D;
        const u16* Vh = V + (size_t)kv * L * D;
        const u16* GKh = gcount != nullptr ? GK + (size_t)kv * gcap * D : nullptr;
        const u16* GVh = gcount != nullptr ? GV + (size_t)kv * gcap * D : nullptr;
        // A tile is published (full barrier) once its copies have landed: after the next
        // tile is issued, or before the producer blocks on a busy stage, whichever is first.
        bool pending = false;  // tile t - 1 issued, not yet published
        for (int t = 0; t < T; t++) {
            const int s = t % NS;
            if (t >= NS) {
                const int par = (t / NS - 1) & 1;
                if (!mbar_test(barEmpty + 8 * s, par)) {
                    if (pending) {
                        cp_async_wait0();
                        fence_async_smem();
                        mbar_arrive(barFull + 8 * ((t - 1) % NS));
                        pending = false;
                    }
                    mbar_wait(barEmpty + 8 * s, par);
                }
            }
            const bool glob = t < nGt;
            const int start = glob ? t * BN : ls + (t - nGt) * BN;
            const int valid = min(BN, (glob ? nG : le) - start);
            const u16* ks = (glob ? GKh : Kh) + (size_t)start * D;
            const u16* vs = (glob ? GVh : Vh) + (size_t)start * D;
#pragma unroll 4
            for (int it = 0; it < BN * CPR / 128; it++) {
                const int c = pt + it * 128;
                const int r = c / CPR, cc = c % CPR;
                const int rr = min(r, valid - 1);
                const u32 off = s * S::TILE + sw_off(r, cc, BN);
                cp_async16(sK + off, ks + (size_t)rr * D + cc * 8);
                cp_async16(sV + off, vs + (size_t)rr * D + cc * 8);
            }
            sPos[s * BN + pt] = pt < valid ? (glob ? gp[start + pt] : start + pt) : POS_NONE;
            cp_async_commit();
            if (pending) {
                cp_async_wait1();
                fence_async_smem();
                mbar_arrive(barFull + 8 * ((t - 1) % NS));
            }
            pending = true;
        }
        if (pending) {
            cp_async_wait0();
            fence_async_smem();
            mbar_arrive(barFull + 8 * ((T - 1) % NS));
        }
        return;
    }

    // ---- consumer warpgroups: 64 query rows each ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CREG));
    const int c = threadIdx.x / 128 - 1;
    const int ct = threadIdx.x & 127;
    const int warp = ct >> 5, lane = ct & 31, group = lane >> 2, tig = lane & 3;
    const int r0w = q0 + 64 * c;  // first query row of this warpgroup
    const u32 sQc = sQ + c * S::QT;
    {
        const u16* Qh = Q + (size_t)h * L * D;
#pragma unroll
        for (int it = 0; it < 64 * CPR / 128; it++) {
            const int ci = ct + it * 128;
            const int r = ci / CPR, cc = ci % CPR;
            cp_async16(sQc + sw_off(r, cc, 64), Qh + (size_t)min(r0w + r, L - 1) * D + cc * 8);
        }
        cp_async_commit();
        cp_async_wait0();
        fence_async_smem();
        named_bar_sync(1 + c, 128);
    }

    float o[D / 2];
#pragma unroll
    for (int j = 0; j < D / 2; j++) o[j] = 0.f;
    float sc[BN / 2];
    u32 pa[BN / 16][4];
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f, a0, a1;
    const int row0 = r0w + warp * 16 + group;
    const int row1 = row0 + 8;

    // S = Q K^T for the tile in stage s (issued, not waited for).
#define ISSUE_S(s)                                                                                  \
    _Pragma("unroll") for (int kk = 0; kk < D / 16; kk++) wgmma_ss_n128(                             \
        sc, desc_sw128(sQc + (kk & 3) * 32 + (kk >> 2) * 64 * 128, 16, 1024),                       \
        desc_sw128(sK + (s) * S::TILE + (kk & 3) * 32 + (kk >> 2) * BN * 128, 16, 1024), kk > 0);
    // O += P V for the tile in stage s (issued, not waited for).
#define ISSUE_PV(s)                                                                                 \
    _Pragma("unroll") for (int kk = 0; kk < BN / 16; kk++) {                                       \
        const u64 dv = desc_sw128(sV + (s) * S::TILE + kk * 2048, BN * 128, 1024);                  \
        if constexpr (D == 128) wgmma_rs_n128(o, pa[kk], dv);                                       \
        else wgmma_rs_n64(o, pa[kk], dv);                                                           \
    }

    auto tile_full = [&](int t, const int* cP) {
        const int pfirst = cP[0], plast = cP[BN - 1];
        if (plast == POS_NONE) return false;
        if (t < nGt) return plast <= r0w - window;
        return plast <= r0w && pfirst >= r0w + 63 - window + 1;
    };

    // Tile 0: S, softmax, P.
    mbar_wait(barFull, 0);
    wg_fence();
    ISSUE_S(0);
    wg_commit();
    wg_wait<0>();
    fence_regs<BN / 2>(sc);
    softmax_tile(sc, sPos, 0 < nGt, tile_full(0, sPos), row0, row1, window, scale_log2, m0, m1, l0, l1, a0, a1);
    pack_p(sc, pa);

    for (int t = 1; t < T; t++) {
        const int s = t % NS, sp = (t - 1) % NS;
        const int* cP = sPos + s * BN;
        mbar_wait(barFull + 8 * s, (t / NS) & 1);
        wg_fence();
        ISSUE_S(s);
        wg_commit();
        ISSUE_PV(sp);
        wg_commit();
        wg_wait<1>();  // S of tile t is ready; P V of tile t - 1 may still run
        fence_regs<BN / 2>(sc);
        softmax_tile(sc, cP, t < nGt, tile_full(t, cP), row0, row1, window, scale_log2, m0, m1, l0, l1, a0, a1);
        wg_wait<0>();
        fence_regs<D / 2>(o);
        fence_regs<BN / 4>(&pa[0][0]);
        mbar_arrive(barEmpty + 8 * sp);
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[4 * j] *= a0;
            o[4 * j + 1] *= a0;
            o[4 * j + 2] *= a1;
            o[4 * j + 3] *= a1;
        }
        pack_p(sc, pa);
    }
    {
        const int sp = (T - 1) % NS;
        wg_fence();
        ISSUE_PV(sp);
        wg_commit();
        wg_wait<0>();
        fence_regs<D / 2>(o);
        fence_regs<BN / 4>(&pa[0][0]);
        mbar_arrive(barEmpty + 8 * sp);
    }
#undef ISSUE_S
#undef ISSUE_PV

    store_rows<D>(o, l0, l1, m0, m1, row0, row1, tig, h, L, O, LSE);
}

// NC consumer warpgroups, NS stages, producer / consumer register counts (the sum over
// the CTA's threads stays within 65536; __launch_bounds__ fixes the launch count).
#define PREFILL_HOPPER(D, NC, NS, PREG, CREG)                                                          \
    extern "C" __global__ void __launch_bounds__(128 * (NC + 1), 1) tca_prefill_hopper_d##D(          \
        const u16* Q, const u16* K, const u16* V, const u16* GK, const u16* GV, const int* gpos,       \
        const int* gcount, int gcap, u16* O, float* LSE, int L, int Hq, int Hkv, int window,           \
        float scale_log2) {                                                                            \
        hopper_body<D, NC, NS, PREG, CREG>(Q, K, V, GK, GV, gpos, gcount, gcap, O, LSE, L, Hq, Hkv,    \
                                           window, scale_log2);                                        \
    }

PREFILL_HOPPER(64, 2, 4, 56, 224)
PREFILL_HOPPER(128, 2, 3, 56, 224)
