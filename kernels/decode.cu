// Decode attention (one new query per query head) over a KV cache made of two row ranges
// per KV head: part A (the compacted global keys S_G: rows [0, nA) of A, count from
// device memory when countA != nullptr) and part B (the window: rows [0, nB) of B).
// Dense decode passes the full K, V as part A and nB = 0.
// Split over KV (flash-decoding): CTA (split s, KV head kv, head chunk z; 4 warps) takes
// keys [s * SK, (s + 1) * SK) of the concatenated range; each warp streams steps of 16
// rows with an online softmax through its own ring of NSD shared-memory stages filled by
// cp.async (two steps in flight while it computes one), and reads each row once for the
// C query heads of its chunk (GQA). The group of g = Hq / Hkv query heads is cut into
// ceil(g / C) chunks of C heads (the last one masked when C does not divide g); chunk z
// covers heads kv * g + z * C + [0, C) and is done by the CTAs with blockIdx.z = z: the
// grid's z extent must be ceil(g / C) (src/cuda/decode.rs, `launch_config`); heads a
// smaller grid leaves out get NaN partials. (A loop over chunks inside the CTA cost up to
// 150 more registers: the compiler hoists the cp.async addresses.) The warps' states are merged in shared memory into one partial (m, l in log2
// units; unnormalised o) per (query head, split); tca_decode_combine merges the splits
// and writes O (f32) and the log-sum-exp (natural log).
//
// Row layout in a warp: LPK lanes share a row (a power of two), each holding E = D / LPK
// consecutive elements (E = 8 for D = 64 and 128: one 16-byte load; E = 12 for D = 96:
// three 8-byte loads).
//
// Programmatic dependent launch (src/cuda/launch.rs): both kernels wait for the previous
// kernel of the stream to complete and its writes to be visible (griddepcontrol.wait)
// before any global memory access: the decode kernel's inputs (Q, the cache, |S_G|) may
// be written by the kernel before it, its partials are read by the previous token's
// combine. Each lets the next kernel be launched (griddepcontrol.launch_dependents): the
// combine at once (its grid is Hq CTAs), the decode kernel only after its streaming loop,
// so that the combine's CTAs, and through the combine's early trigger the next decode's,
// do not take SM slots from the decode grid's later waves (triggered at the start, the
// next decode's CTAs sat waiting beside this one's: SmolLM2's dense decode at 128K went
// from 35 to 46 us). Launched without the attribute, both instructions return at once.
// They exist from sm_90 on; older targets compile without them (and are launched plainly).

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF (-__int_as_float(0x7f800000))
#define NW 4
#define ROWS 16  // rows per warp step
#define NSD 3    // cp.async stages of each warp's ring (dynamic shared memory)

#include "bf16_rows.cuh"

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <int D, int C>
__device__ __forceinline__ void decode_body(const u16* __restrict__ Qd, long long q_stride,
                                            const u16* __restrict__ KA, const u16* __restrict__ VA,
                                            const int* __restrict__ countA, int nA_const,
                                            long long strideA, const u16* __restrict__ KB,
                                            const u16* __restrict__ VB, int nB, long long strideB,
                                            int SK, float* __restrict__ part_o,
                                            float* __restrict__ part_ml, float scale_log2, int g) {
    constexpr int LPK = lanes_per_row(D);  // lanes per row (a power of two)
    constexpr int E = D / LPK;              // elements per lane
    constexpr int SPW = 32 / LPK;           // rows per warp load instruction
    constexpr int NI = ROWS / SPW;          // rows per lane per step
    constexpr int CPR = D / 8;              // 16-byte chunks of a row
    constexpr int CH = ROWS * CPR;          // 16-byte chunks of one step's K (or V)
    static_assert(E * LPK == D && (2 * CH) % 32 == 0, "unsupported head dimension");
    __shared__ float wm[NW][C], wl[NW][C];
    __shared__ float wo[NW][C][D];
    extern __shared__ uint4 dsm[];
    pdl_wait();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, nsplit = gridDim.x, kv = blockIdx.y;
    const int sub = lane % LPK, slot = lane / LPK;
    const int nA = countA ? countA[kv] : nA_const;
    const int n = nA + nB;
    const u16* Ka = KA + (size_t)kv * strideA * D;
    const u16* Va = VA + (size_t)kv * strideA * D;
    const u16* Kb = KB ? KB + (size_t)kv * strideB * D : nullptr;
    const u16* Vb = VB ? VB + (size_t)kv * strideB * D : nullptr;
    // This warp's ring of NSD stages, each ROWS rows of K then ROWS rows of V.
    u16* ring = reinterpret_cast<u16*>(dsm) + (size_t)warp * NSD * 2 * ROWS * D;
    const int nchunks = (g + C - 1) / C;

    // A grid with too few chunks leaves heads uncovered: their partials are made NaN so
    // that the output is visibly wrong rather than silently stale.
    if ((int)gridDim.z < nchunks && blockIdx.z == gridDim.z - 1) {
        for (int hh = gridDim.z * C + tid; hh < g; hh += NW * 32) {
            const size_t h = (size_t)(kv * g + hh);
            part_ml[(h * nsplit + split) * 2] = __int_as_float(0x7fc00000);
            part_ml[(h * nsplit + split) * 2 + 1] = __int_as_float(0x7fc00000);
        }
    }
    const int z = blockIdx.z;
    if (z >= nchunks) return;
    {
    const int k0 = split * SK;
    const int k1 = min(n, k0 + SK);
    const int first = k0 + warp * ROWS;
    const int nsteps = first < k1 ? (k1 - first + NW * ROWS - 1) / (NW * ROWS) : 0;
    auto issue = [&](int j) {
        if (j < nsteps) {
            const int base = first + j * NW * ROWS;
            u16* st = ring + (size_t)(j % NSD) * 2 * ROWS * D;
#pragma unroll
            for (int i = 0; i < 2 * CH / 32; i++) {
                const int c = lane + 32 * i;
                const int which = c / CH, cr = c % CH;
                const int r = cr / CPR, cc = cr % CPR;
                const int k = min(base + r, k1 - 1);
                const u16* src = which == 0 ? (k < nA ? Ka + (size_t)k * D : Kb + (size_t)(k - nA) * D)
                                            : (k < nA ? Va + (size_t)k * D : Vb + (size_t)(k - nA) * D);
                const u32 dst = (u32)__cvta_generic_to_shared(st + which * ROWS * D + r * D + cc * 8);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src + cc * 8));
            }
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

        const int h0 = kv * g + z * C;        // first query head of this chunk
        const int nh = min(C, g - z * C);     // heads of this chunk (<= C)
#pragma unroll
        for (int j = 0; j < NSD - 1; j++) issue(j);

        float q[C][E];
#pragma unroll
        for (int gi = 0; gi < C; gi++) {
            if (gi < nh) {
                load_row<E>(Qd + (size_t)(h0 + gi) * q_stride + sub * E, q[gi], scale_log2);
            } else {
#pragma unroll
                for (int t = 0; t < E; t++) q[gi][t] = 0.f;
            }
        }
        float m[C], l[C], acc[C][E];
#pragma unroll
        for (int gi = 0; gi < C; gi++) {
            m[gi] = NEG_INF;
            l[gi] = 0.f;
#pragma unroll
            for (int t = 0; t < E; t++) acc[gi][t] = 0.f;
        }
#pragma unroll 1
        for (int j = 0; j < nsteps; j++) {
            issue(j + NSD - 1);
            asm volatile("cp.async.wait_group %0;\n" ::"n"(NSD - 1));
            __syncwarp();
            const u16* sk = ring + (size_t)(j % NSD) * 2 * ROWS * D;
            const u16* sv = sk + ROWS * D;
            const int base = first + j * NW * ROWS;
            float sc[C][NI];
#pragma unroll
            for (int i = 0; i < NI; i++) {
                float kf[E];
                load_row<E>(sk + (slot + i * SPW) * D + sub * E, kf, 1.f);
                const bool ok = base + slot + i * SPW < k1;
#pragma unroll
                for (int gi = 0; gi < C; gi++) {
                    float a = 0.f;
#pragma unroll
                    for (int t = 0; t < E; t++) a = fmaf(q[gi][t], kf[t], a);
#pragma unroll
                    for (int off = LPK / 2; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffff, a, off);
                    sc[gi][i] = ok ? a : NEG_INF;
                }
            }
#pragma unroll
            for (int gi = 0; gi < C; gi++) {
                float mx = sc[gi][0];
#pragma unroll
                for (int i = 1; i < NI; i++) mx = fmaxf(mx, sc[gi][i]);
#pragma unroll
                for (int off = LPK; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, off));
                const float mn = fmaxf(m[gi], mx);
                const float mu = mn == NEG_INF ? 0.f : mn;
                const float al = exp2f(m[gi] - mu);
                m[gi] = mn;
                l[gi] *= al;
#pragma unroll
                for (int t = 0; t < E; t++) acc[gi][t] *= al;
#pragma unroll
                for (int i = 0; i < NI; i++) sc[gi][i] = exp2f(sc[gi][i] - mu);
            }
#pragma unroll
            for (int i = 0; i < NI; i++) {
                float vf[E];
                load_row<E>(sv + (slot + i * SPW) * D + sub * E, vf, 1.f);
#pragma unroll
                for (int gi = 0; gi < C; gi++) {
                    const float p = sc[gi][i];
                    l[gi] += p;
#pragma unroll
                    for (int t = 0; t < E; t++) acc[gi][t] = fmaf(p, vf[t], acc[gi][t]);
                }
            }
            __syncwarp();
        }
        asm volatile("cp.async.wait_group 0;\n" ::);
        pdl_launch_dependents();  // only the merge and the partials' stores are left
        // Merge the row slots of the warp (m is warp-uniform), then the warps.
#pragma unroll
        for (int gi = 0; gi < C; gi++) {
#pragma unroll
            for (int off = LPK; off < 32; off <<= 1) {
                l[gi] += __shfl_xor_sync(0xffffffff, l[gi], off);
#pragma unroll
                for (int t = 0; t < E; t++) acc[gi][t] += __shfl_xor_sync(0xffffffff, acc[gi][t], off);
            }
        }
        __syncthreads();  // the previous chunk's merge has read wo, wm, wl
        if (lane < LPK) {
#pragma unroll
            for (int gi = 0; gi < C; gi++) {
#pragma unroll
                for (int t = 0; t < E; t++) wo[warp][gi][sub * E + t] = acc[gi][t];
                if (lane == 0) {
                    wm[warp][gi] = m[gi];
                    wl[warp][gi] = l[gi];
                }
            }
        }
        __syncthreads();
        for (int idx = tid; idx < nh * D; idx += NW * 32) {
            const int gi = idx / D, dd = idx % D;
            float M = NEG_INF;
#pragma unroll
            for (int w = 0; w < NW; w++) M = fmaxf(M, wm[w][gi]);
            const float mu = M == NEG_INF ? 0.f : M;
            float o = 0.f, lt = 0.f;
#pragma unroll
            for (int w = 0; w < NW; w++) {
                const float f = exp2f(wm[w][gi] - mu);
                o += f * wo[w][gi][dd];
                lt += f * wl[w][gi];
            }
            const size_t h = (size_t)(h0 + gi);
            part_o[(h * nsplit + split) * D + dd] = o;
            if (dd == 0) {
                part_ml[(h * nsplit + split) * 2] = M;
                part_ml[(h * nsplit + split) * 2 + 1] = lt;
            }
        }
    }
}

// tca_decode_d{D}_c{C}: C query heads per CTA (1 <= C <= 8), g = Hq / Hkv given at run
// time (the launcher picks C = g for g <= 8 and C = ceil(g / 2) for 8 < g <= 16).
#define DECODE(D, C)                                                                            \
    extern "C" __global__ void __launch_bounds__(NW * 32) tca_decode_d##D##_c##C(               \
        const u16* Qd, long long q_stride, const u16* KA, const u16* VA, const int* countA,     \
        int nA_const, long long strideA, const u16* KB, const u16* VB, int nB, long long strideB, \
        int SK, float* part_o, float* part_ml, float sl2, int g) {                              \
        decode_body<D, C>(Qd, q_stride, KA, VA, countA, nA_const, strideA, KB, VB, nB, strideB, \
                          SK, part_o, part_ml, sl2, g);                                         \
    }
#define DECODE_ALL_C(D) \
    DECODE(D, 1) DECODE(D, 2) DECODE(D, 3) DECODE(D, 4) DECODE(D, 5) DECODE(D, 6) DECODE(D, 7) DECODE(D, 8)
DECODE_ALL_C(64)
DECODE_ALL_C(96)
DECODE_ALL_C(128)

// grid Hq, CMB threads: merge the nsplit (<= MAX_SPLITS) partials of one query head.
// One pass over (m, l): each thread loads up to MAX_SPLITS / CMB pairs at once (float2),
// the block reduces the max M and then L = sum_s w_s l_s with w_s = 2^(m_s - M) (0 for an
// empty split, m_s = -inf; a NaN m_s gives a NaN weight and output), the weights go to
// shared memory; then thread (part, d) sums w_s o_s[d] over the splits s = part (mod P),
// P = CMB / D, with U loads issued before their use (no dependent chain over the splits),
// and the parts are added in shared memory. O = sum / L (f32), lse = M ln 2 + ln L.
#define CMB 256
#define MAX_SPLITS 1024  // src/cuda/decode.rs, MAX_SPLITS
#define CMB_U 8

__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffff, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < CMB / 32; w++) v = is_max ? fmaxf(v, red[w]) : v + red[w];
    return v;
}

// The partials are read with coherent loads (no __restrict__, so no ld.global.nc): with
// programmatic dependent launch this kernel is resident while the decode kernel writes
// them.
extern "C" __global__ void __launch_bounds__(CMB) tca_decode_combine(const float* part_o,
                                                                     const float* part_ml, float* O,
                                                                     float* lse, int nsplit, int D) {
    __shared__ float sw[MAX_SPLITS];
    __shared__ float so[CMB];
    __shared__ float redm[CMB / 32], redl[CMB / 32];
    pdl_launch_dependents();
    pdl_wait();
    const int h = blockIdx.x, tid = threadIdx.x;
    const float2* ml = reinterpret_cast<const float2*>(part_ml) + (size_t)h * nsplit;
    constexpr int R = MAX_SPLITS / CMB;
    float2 r[R];
    float M = NEG_INF;
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int s = tid + i * CMB;
        r[i] = s < nsplit ? ml[s] : make_float2(NEG_INF, 0.f);
        M = fmaxf(M, r[i].x);
    }
    M = block_reduce(M, redm, true);
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int s = tid + i * CMB;
        if (s < nsplit) {
            const bool empty = r[i].x == NEG_INF;
            const float w = empty ? 0.f : exp2f(r[i].x - M);
            sw[s] = w;
            if (!empty) l = fmaf(w, r[i].y, l);
        }
    }
    l = block_reduce(l, redl, false);  // its barrier also publishes sw
    const int P = CMB / D;
    const int part = tid / D, d = tid - part * D;
    float o = 0.f;
    if (part < P) {
        const float* po = part_o + (size_t)h * nsplit * D + d;
        for (int s0 = part; s0 < nsplit; s0 += CMB_U * P) {
            float x[CMB_U], w[CMB_U];
#pragma unroll
            for (int u = 0; u < CMB_U; u++) {
                const int s = s0 + u * P;
                const bool ok = s < nsplit;
                x[u] = ok ? po[(size_t)s * D] : 0.f;
                w[u] = ok ? sw[s] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < CMB_U; u++) o += w[u] != 0.f ? w[u] * x[u] : 0.f;
        }
    }
    so[tid] = o;
    __syncthreads();
    if (tid < D) {
        float ot = 0.f;
        for (int p = 0; p < P; p++) ot += so[p * D + tid];
        O[(size_t)h * D + tid] = ot / l;
        if (tid == 0) lse[h] = M * 0.69314718055994531f + logf(l);
    }
}
