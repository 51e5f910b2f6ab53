// Per-query key-set attention for the two peer policies that choose keys per query
// (docs/algorithm.md §5), at TCA's per-query budget k_i (ks [Hkv, L], i32, computed on
// the host from TCA's S_G with selection::kept_count):
//   oracle top-k  (sinks < 0): the k_i keys j <= i of largest score q_i.k_j (ties: lower
//                  index), found by a radix select over the f32 scores;
//   StreamingLLM (sinks >= 0): keys [0, s) and [r, i] with s = min(sinks, k_i - 1),
//                  r = max(i + 1 - (k_i - s), s) (the CPU's StreamingLlm::keys).
// Then softmax over the kept keys and O = sum_j p_j v_j. Writes what the prefill kernels
// (attention_bf16.cu) write: O [Hq, L, D] bf16 and the natural log-sum-exp of the scaled
// scores [Hq, L] f32.
//
// Layout: Q [Hq, L, D], K and V [Hkv, L, D], bf16 as uint16; query head h reads KV head
// h / (Hq / Hkv). One CTA of PT threads per (query row i, query head h); a launch serves
// rows [row0, row1) (grid.x = row1 - row0, late rows first), with dynamic shared memory
// for (row1) f32 scores: the launcher cuts L into bands so short rows ask for less.
// Scores are f32 dot products of the bf16 values (8 lanes per key, 8-byte chunks
// interleaved, a fixed summation order), stored once and reused for the select, the max
// and the weights, so the kept set and the softmax see the same numbers. -0 is stored
// as +0 (equal scores tie, as on the CPU). With a non-null mask [Hq, L, ceil(L / 32)]
// (zeroed by the caller) the kept keys of every row are also OR-ed in as bits (checks).

typedef unsigned short u16;
typedef unsigned int u32;

#define PT 512
#define NW (PT / 32)
#define NEG_INF_F (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf(u32 x) { return __uint_as_float(x << 16); }

// Four bf16 (8 bytes, in memory order) as f32.
__device__ __forceinline__ void unpack4(uint2 w, float* f) {
    f[0] = bf(w.x & 0xffffu);
    f[1] = bf(w.x >> 16);
    f[2] = bf(w.y & 0xffffu);
    f[3] = bf(w.y >> 16);
}

// f32 -> bf16 bits, round to nearest even.
__device__ __forceinline__ u16 to_bf16(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}

// Order-preserving key: a < b as floats iff okey(a) < okey(b) as unsigned (no NaN).
__device__ __forceinline__ u32 okey(float x) {
    u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Candidate c of the row -> key position (StreamingLLM skips (s, r); oracle: j = c).
__device__ __forceinline__ int key_of(int c, int s, int r) { return c < s ? c : r + (c - s); }

template <int D>
__device__ __forceinline__ void peer_body(const u16* __restrict__ Q, const u16* __restrict__ K,
                                          const u16* __restrict__ V, const int* __restrict__ ks,
                                          u16* __restrict__ O, float* __restrict__ LSE,
                                          u32* __restrict__ mask, int L, int Hq, int Hkv,
                                          int row0, int row1, int sinks, float scale_log2) {
    constexpr int C = D / 32;  // 4-element (8-byte) chunks per lane of an 8-lane key group
    extern __shared__ float sS[];  // [n] scores of the row's candidates
    __shared__ u32 hist[256];
    __shared__ u32 scan[PT];
    __shared__ float redf[NW];
    __shared__ float sO[NW][D];
    __shared__ float sL[NW];
    __shared__ u32 sel[4];  // digit, count above it, ties of the threshold, tie cutoff

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int sub = lane & 7, kg = lane >> 3;  // lane in key group, key group in warp
    const int i = row1 - 1 - (int)blockIdx.x;
    if (i < row0) return;
    const int h = blockIdx.y;
    const int kv = h / (Hq / Hkv);
    int k = ks[(size_t)kv * L + i];
    k = k < 1 ? 1 : (k > i + 1 ? i + 1 : k);
    const bool streaming = sinks >= 0;
    int s = 0, r = 0, n = i + 1;
    if (streaming) {
        s = min(sinks, k - 1);
        r = max(i + 1 - (k - s), s);
        n = s + (i + 1 - r);
    }
    const u16* Kh = K + (size_t)kv * L * D;
    const u16* Vh = V + (size_t)kv * L * D;

    // q: chunks t * 8 + sub of the row (f32).
    float qf[4 * C];
    {
        const uint2* qp = reinterpret_cast<const uint2*>(Q + ((size_t)h * L + i) * D);
#pragma unroll
        for (int t = 0; t < C; t++) unpack4(qp[t * 8 + sub], qf + 4 * t);
    }

    // Scores of every candidate: a warp takes 4 candidates per step (uniform bounds).
    float mx = NEG_INF_F;
#pragma unroll 4
    for (int c0 = warp * 4; c0 < n; c0 += NW * 4) {
        const int c = c0 + kg;
        const int j = key_of(min(c, n - 1), s, r);
        const uint2* kp = reinterpret_cast<const uint2*>(Kh + (size_t)j * D);
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < C; t++) {
            float kf[4];
            unpack4(kp[t * 8 + sub], kf);
#pragma unroll
            for (int e = 0; e < 4; e++) acc = fmaf(qf[4 * t + e], kf[e], acc);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        acc += 0.f;  // -0 -> +0
        if (c < n) {
            if (sub == 0) sS[c] = acc;
            mx = fmaxf(mx, acc);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) redf[warp] = mx;
    __syncthreads();
    float m = redf[0];
#pragma unroll
    for (int w = 1; w < NW; w++) m = fmaxf(m, redf[w]);

    // Oracle top-k: threshold key tk (the k-th largest score) by a radix select, 8 bits
    // at a time from the top; keep s > t and the lowest-index ties up to k.
    const bool all = streaming || k >= n;
    u32 tk = 0;
    int jt = 0x7fffffff;
    if (!all) {
        u32 prefix = 0, pmask = 0;
        int rem = k;  // keys still to take among those matching prefix
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += PT) hist[b] = 0;
            __syncthreads();
            for (int c0 = 0; c0 < n; c0 += PT) {
                const int c = c0 + tid;
                bool in = false;
                u32 dg = 0;
                if (c < n) {
                    u32 key = okey(sS[c]);
                    in = (key & pmask) == prefix;
                    dg = (key >> shift) & 255u;
                }
                // Warp-aggregated histogram increment.
                const u32 act = __ballot_sync(0xffffffffu, in);
                if (in) {
                    const u32 same = __match_any_sync(act, dg);
                    if ((__ffs(same) - 1) == lane) atomicAdd(&hist[dg], (u32)__popc(same));
                }
            }
            __syncthreads();
            if (warp == 0) {
                // Lane l owns digits 255 - 8l - e, e = 0..7 (descending).
                u32 cnt[8], tot = 0;
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    cnt[e] = hist[255 - 8 * lane - e];
                    tot += cnt[e];
                }
                u32 inc = tot;  // inclusive scan over lanes (counts of higher digits first)
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    u32 y = __shfl_up_sync(0xffffffffu, inc, o);
                    if (lane >= o) inc += y;
                }
                u32 above = inc - tot;
                if (above < (u32)rem && (u32)rem <= inc) {
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        if (above < (u32)rem && (u32)rem <= above + cnt[e]) {
                            sel[0] = 255u - 8u * lane - e;
                            sel[1] = above;
                            sel[2] = cnt[e];
                        }
                        above += cnt[e];
                    }
                }
            }
            __syncthreads();
            const u32 dg = sel[0];
            rem -= (int)sel[1];
            prefix |= dg << shift;
            pmask |= 255u << shift;
            __syncthreads();  // sel is rewritten by the next pass
        }
        tk = prefix;
        const int ties = (int)sel[2];  // scores equal to the threshold
        if (rem < ties) {
            // The rem-th tie by index: per-thread contiguous chunks, a block scan.
            const int chunk = (n + PT - 1) / PT;
            const int a = min(tid * chunk, n), b = min(a + chunk, n);
            u32 mine = 0;
            for (int c = a; c < b; c++) mine += okey(sS[c]) == tk;
            scan[tid] = mine;
            __syncthreads();
            if (tid == 0) {
                u32 acc = 0;
                for (int t = 0; t < PT; t++) {
                    u32 x = scan[t];
                    scan[t] = acc;
                    acc += x;
                }
            }
            __syncthreads();
            u32 before = scan[tid];
            if (before < (u32)rem && (u32)rem <= before + mine) {
                for (int c = a; c < b; c++) {
                    if (okey(sS[c]) == tk && ++before == (u32)rem) sel[3] = c;
                }
            }
            __syncthreads();
            jt = (int)sel[3];
        }
    }

    // Softmax weights and O over the kept candidates: 4 candidates per warp step, each
    // 8-lane group accumulating its pairs of V.
    float o[4 * C];
#pragma unroll
    for (int e = 0; e < 4 * C; e++) o[e] = 0.f;
    float l = 0.f;
#pragma unroll 2
    for (int c0 = warp * 4; c0 < n; c0 += NW * 4) {
        const int c = c0 + kg;
        if (c < n) {
            const float sc = sS[c];
            const u32 key = okey(sc);
            if (all || key > tk || (key == tk && c <= jt)) {
                const float p = exp2f((sc - m) * scale_log2);
                l += p;
                const int j = key_of(c, s, r);
                if (mask != nullptr && sub == 0) {
                    const int words = (L + 31) / 32;
                    atomicOr(&mask[((size_t)h * L + i) * words + (j >> 5)], 1u << (j & 31));
                }
                const uint2* vp = reinterpret_cast<const uint2*>(Vh + (size_t)j * D);
#pragma unroll
                for (int t = 0; t < C; t++) {
                    float vf[4];
                    unpack4(vp[t * 8 + sub], vf);
#pragma unroll
                    for (int e = 0; e < 4; e++) o[4 * t + e] = fmaf(p, vf[e], o[4 * t + e]);
                }
            }
        }
    }
    // Sum the 4 key groups of the warp, then the warps (fixed order).
#pragma unroll
    for (int e = 0; e < 4 * C; e++) {
        o[e] += __shfl_xor_sync(0xffffffffu, o[e], 8);
        o[e] += __shfl_xor_sync(0xffffffffu, o[e], 16);
    }
    l += __shfl_xor_sync(0xffffffffu, l, 8);
    l += __shfl_xor_sync(0xffffffffu, l, 16);
    if (kg == 0) {
#pragma unroll
        for (int t = 0; t < C; t++) {
#pragma unroll
            for (int e = 0; e < 4; e++) sO[warp][4 * (t * 8 + sub) + e] = o[4 * t + e];
        }
        if (sub == 0) sL[warp] = l;
    }
    __syncthreads();
    float lt = 0.f;
#pragma unroll
    for (int w = 0; w < NW; w++) lt += sL[w];
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    for (int e = tid; e < D; e += PT) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) acc += sO[w][e];
        O[((size_t)h * L + i) * D + e] = to_bf16(acc * inv);
    }
    if (tid == 0) LSE[(size_t)h * L + i] = m * scale_log2 * 0.69314718055994531f + logf(lt);
}

#define PEERS(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(PT) tca_peer_rows_d##D(                          \
        const u16* Q, const u16* K, const u16* V, const int* ks, u16* O, float* LSE, u32* mask,     \
        int L, int Hq, int Hkv, int row0, int row1, int sinks, float scale_log2) {                \
        peer_body<D>(Q, K, V, ks, O, LSE, mask, L, Hq, Hkv, row0, row1, sinks, scale_log2);      \
    }

PEERS(64)
PEERS(96)
PEERS(128)
