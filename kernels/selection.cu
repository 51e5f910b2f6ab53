// Online core-context selection (docs/algorithm.md §1) on the GPU, per KV head.
//   tca_logits_d{D}_c{C}: x_hj = q_{L-1}^h . k_j * scale * log2(e) for C of the g query
//       heads of a KV head (K read once per chunk of C heads: once when g <= 8), plus
//       per-chunk (max, sum 2^(x - max)) partials.
//   tca_softmax_stats: per query head, the max M_h and Z_h = sum_j 2^(x_hj - M_h).
//   tca_redundancy: s_j = reduce_h 2^(x_hj - M_h) / Z_h (mean or max over the group) for
//       j in the candidate region [0, L - w), and per block m = sum s, c = 1 - sum s^2 / m^2.
//   tca_rank_budget: h_j = (1 - alpha) m_j' + alpha c_j (m' = m / max m under mass_norm =
//       max), rank (descending, ties to the lower block), budget t = table[rank] clipped to
//       the block's size, exclusive scan of budgets (offsets into S_G), |S_G|.
//   tca_select_compact: per block the t tokens of largest s (ties to the lower index),
//       copied (K, V rows and the original position) into the compacted cache, in
//       ascending position order.
//   tca_copy_rows: copies the last w rows (the window) into the decode cache.
// bf16 is stored as uint16.

typedef unsigned short u16;
typedef unsigned int u32;
#define NEG_INF (-__int_as_float(0x7f800000))
#define MAXG 16  // largest group g = Hq / Hkv (tca_redundancy keeps one value per head)

#include "bf16_rows.cuh"

__device__ __forceinline__ void merge_ms(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) return;
    s = s * exp2f(m - mn) + s2 * exp2f(m2 - mn);
    m = mn;
}

// grid (chunks of kpc keys, Hkv, ceil(g / C)), 128 threads: CTA z serves the C query
// heads kv * g + z * C + [0, C) of the group of g (the last chunk masked).
template <int D, int C>
__device__ __forceinline__ void logits_body(const u16* __restrict__ Q, const u16* __restrict__ K,
                                            float* __restrict__ X, float* __restrict__ part, int L,
                                            int Hkv, int kpc, float scale_log2, int g) {
    constexpr int LPK = lanes_per_row(D);  // lanes per key row
    constexpr int E = D / LPK;              // elements per lane
    constexpr int KPI = 128 / LPK;          // keys per CTA iteration
    static_assert(E * LPK == D, "unsupported head dimension");
    __shared__ float red[4][C][2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kv = blockIdx.y, chunk = blockIdx.x, nchunk = gridDim.x;
    const int sub = tid % LPK, slot = tid / LPK;
    const int h0 = kv * g + blockIdx.z * C;
    const int nh = min(C, g - (int)blockIdx.z * C);
    if (nh <= 0) return;
    float q[C][E];
#pragma unroll
    for (int gi = 0; gi < C; gi++) {
        if (gi < nh) {
            load_row<E>(Q + ((size_t)(h0 + gi) * L + (L - 1)) * D + sub * E, q[gi]);
        } else {
#pragma unroll
            for (int t = 0; t < E; t++) q[gi][t] = 0.f;
        }
    }
    float m[C], s[C];
#pragma unroll
    for (int gi = 0; gi < C; gi++) { m[gi] = NEG_INF; s[gi] = 0.f; }
    const u16* Kh = K + (size_t)kv * L * D;
    const int j_end = min(L, (chunk + 1) * kpc);
#pragma unroll 4
    for (int j0 = chunk * kpc; j0 < j_end; j0 += KPI) {
        const int j = j0 + slot;
        const int jc = min(j, j_end - 1);
        float kf[E];
        load_row<E>(Kh + (size_t)jc * D + sub * E, kf);
#pragma unroll
        for (int gi = 0; gi < C; gi++) {
            float acc = 0.f;
#pragma unroll
            for (int t = 0; t < E; t++) acc = fmaf(q[gi][t], kf[t], acc);
#pragma unroll
            for (int off = LPK / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
            if (sub == 0 && j < j_end && gi < nh) {
                const float x = acc * scale_log2;
                X[(size_t)(h0 + gi) * L + j] = x;
                merge_ms(m[gi], s[gi], x, 1.f);
            }
        }
    }
#pragma unroll
    for (int gi = 0; gi < C; gi++) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffff, m[gi], off);
            float s2 = __shfl_xor_sync(0xffffffff, s[gi], off);
            merge_ms(m[gi], s[gi], m2, s2);
        }
        if (lane == 0) { red[warp][gi][0] = m[gi]; red[warp][gi][1] = s[gi]; }
    }
    __syncthreads();
    if (tid < nh) {
        float mm = red[0][tid][0], ss = red[0][tid][1];
        for (int w = 1; w < 4; w++) merge_ms(mm, ss, red[w][tid][0], red[w][tid][1]);
        const size_t o = ((size_t)(h0 + tid) * nchunk + chunk) * 2;
        part[o] = mm;
        part[o + 1] = ss;
    }
}

// tca_logits_d{D}_c{C}: C query heads per CTA (1 <= C <= 8), g given at run time (the
// launcher picks C = g for g <= 8 and C = ceil(g / 2) for 8 < g <= 16).
#define LOGITS(D, C)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) tca_logits_d##D##_c##C(                     \
        const u16* Q, const u16* K, float* X, float* part, int L, int Hkv, int kpc, float sl2,    \
        int g) {                                                                                  \
        logits_body<D, C>(Q, K, X, part, L, Hkv, kpc, sl2, g);                                    \
    }
#define LOGITS_ALL_C(D) \
    LOGITS(D, 1) LOGITS(D, 2) LOGITS(D, 3) LOGITS(D, 4) LOGITS(D, 5) LOGITS(D, 6) LOGITS(D, 7) LOGITS(D, 8)
LOGITS_ALL_C(64)
LOGITS_ALL_C(96)
LOGITS_ALL_C(128)

// grid Hq, 32 threads: combine the chunk partials of one query head.
extern "C" __global__ void tca_softmax_stats(const float* part, float* hstats, int nchunk) {
    const int h = blockIdx.x, lane = threadIdx.x;
    float m = NEG_INF, s = 0.f;
    for (int c = lane; c < nchunk; c += 32) {
        const size_t o = ((size_t)h * nchunk + c) * 2;
        merge_ms(m, s, part[o], part[o + 1]);
    }
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, off);
        float s2 = __shfl_xor_sync(0xffffffff, s, off);
        merge_ms(m, s, m2, s2);
    }
    if (lane == 0) { hstats[2 * h] = m; hstats[2 * h + 1] = s; }
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < nw; w++) t += sh[w];
    return t;
}

// grid (nb, Hkv), blockDim = b rounded up to a multiple of 32 (<= 1024); G <= MAXG.
// Works in block-relative scale so that nothing underflows: with l_hj = x_hj - M_h -
// log2 Z_h (log2 of head h's softmax probability) and B = max over the block and the
// group of l_hj, u_j = reduce_h 2^(l_hj - B) (mean or max) so s_j = 2^B u_j. Then
// c = 1 - sum u^2 / (sum u)^2 (scale-free) and m = 2^B sum u. U (written for the
// per-block top-t, which only compares within a block) holds u; S holds s itself.
extern "C" __global__ void tca_redundancy(const float* X, const float* hstats, float* S, float* U,
                                          float* mblk, float* cblk, int L, int Lc, int b, int G,
                                          int reduce_max) {
    __shared__ float sh[32];
    const int blk = blockIdx.x, kv = blockIdx.y, nb = gridDim.x, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, nw = (blockDim.x + 31) >> 5;
    const int j = blk * b + tid;
    const bool valid = tid < b && j < Lc;
    float lh[MAXG];
    float lmax = NEG_INF;
#pragma unroll
    for (int gi = 0; gi < MAXG; gi++) {
        if (gi >= G) break;
        const int h = kv * G + gi;
        lh[gi] = valid ? X[(size_t)h * L + j] - hstats[2 * h] - log2f(hstats[2 * h + 1]) : NEG_INF;
        lmax = fmaxf(lmax, lh[gi]);
    }
    // Block max B.
    float v = lmax;
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float B = NEG_INF;
    for (int w = 0; w < nw; w++) B = fmaxf(B, sh[w]);
    float u = 0.f, s = 0.f;
    if (valid) {
#pragma unroll
        for (int gi = 0; gi < MAXG; gi++) {
            if (gi >= G) break;
            const float e = exp2f(lh[gi] - B);
            const float p = exp2f(lh[gi]);
            u = reduce_max ? fmaxf(u, e) : u + e;
            s = reduce_max ? fmaxf(s, p) : s + p;
        }
        if (!reduce_max) {
            u /= (float)G;
            s /= (float)G;
        }
        S[(size_t)kv * Lc + j] = s;
        U[(size_t)kv * Lc + j] = u;
    }
    const float su = block_sum(u, sh);
    const float sq = block_sum(u * u, sh);
    if (tid == 0) {
        mblk[(size_t)kv * nb + blk] = su > 0.f ? exp2f(B) * su : 0.f;
        cblk[(size_t)kv * nb + blk] = su > 0.f ? 1.f - sq / (su * su) : 0.f;
    }
}

// grid Hkv, 1024 threads, dynamic shared memory 2 * nb * 4 bytes.
extern "C" __global__ void __launch_bounds__(1024) tca_rank_budget(
    const float* mblk, const float* cblk, const int* table, int* budget, int* rank_out, int* offs,
    int* gcount, int nb, int Lc, int b, float alpha, int mass_norm_max) {
    extern __shared__ float shd[];
    float* hs = shd;
    int* bud = reinterpret_cast<int*>(shd + nb);
    __shared__ float red[32];
    __shared__ int scan[1024];
    const int kv = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const float* m = mblk + (size_t)kv * nb;
    const float* c = cblk + (size_t)kv * nb;
    float mmax = 0.f;
    if (mass_norm_max) {
        float v = 0.f;
        for (int j = tid; j < nb; j += nt) v = fmaxf(v, m[j]);
        for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
        if ((tid & 31) == 0) red[tid >> 5] = v;
        __syncthreads();
        for (int w = 0; w < (nt >> 5); w++) mmax = fmaxf(mmax, red[w]);
    }
    for (int j = tid; j < nb; j += nt) {
        float mj = m[j];
        if (mass_norm_max && mmax > 0.f) mj = mj / mmax;
        hs[j] = (1.f - alpha) * mj + alpha * c[j];
    }
    __syncthreads();
    for (int j = tid; j < nb; j += nt) {
        const float hj = hs[j];
        int r = 0;
        // Not unrolled: an unrolled, vectorised read of hs ran past nb at nb = 1
        // (compute-sanitizer, 2026-11-29).
#pragma unroll 1
        for (int i = 0; i < nb; i++) {
            const float hi = hs[i];
            r += (hi > hj) || (hi == hj && i < j);
        }
        const int len = min(b, Lc - j * b);
        const int t = min(table[(size_t)kv * nb + r], len);
        bud[j] = t;
        budget[(size_t)kv * nb + j] = t;
        rank_out[(size_t)kv * nb + j] = r;
    }
    __syncthreads();
    // Exclusive scan of bud[0..nb): thread tid owns a contiguous run.
    const int per = (nb + nt - 1) / nt;
    const int a = min(nb, tid * per), e = min(nb, a + per);
    int loc = 0;
    for (int j = a; j < e; j++) loc += bud[j];
    scan[tid] = loc;
    __syncthreads();
    for (int off = 1; off < nt; off <<= 1) {
        int v = tid >= off ? scan[tid - off] : 0;
        __syncthreads();
        scan[tid] += v;
        __syncthreads();
    }
    int run = scan[tid] - loc;
    for (int j = a; j < e; j++) {
        offs[(size_t)kv * nb + j] = run;
        run += bud[j];
    }
    if (tid == nt - 1) gcount[kv] = scan[tid];
}

// grid (nb, Hkv), blockDim = b rounded up to a multiple of 32 (<= 1024).
extern "C" __global__ void tca_select_compact(const float* S, const int* budget, const int* offs,
                                              const u16* K, const u16* V, u16* GK, u16* GV, int* gpos,
                                              int gcap, int L, int Lc, int b, int D) {
    __shared__ float sv[1024];
    __shared__ int sel[1024];
    __shared__ int wcnt[32];
    const int blk = blockIdx.x, kv = blockIdx.y, nb = gridDim.x, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int base = blk * b;
    const int len = min(b, Lc - base);
    const float* Sh = S + (size_t)kv * Lc + base;
    if (tid < len) sv[tid] = Sh[tid];
    __syncthreads();
    const int t = budget[(size_t)kv * nb + blk];
    bool take = false;
    if (tid < len) {
        const float x = sv[tid];
        int r = 0;
        for (int i = 0; i < len; i++) {
            const float y = sv[i];
            r += (y > x) || (y == x && i < tid);
        }
        take = r < t;
    }
    const unsigned bal = __ballot_sync(0xffffffff, take);
    if (lane == 0) wcnt[warp] = __popc(bal);
    __syncthreads();
    int pre = __popc(bal & ((1u << lane) - 1u));
    for (int w = 0; w < warp; w++) pre += wcnt[w];
    if (take) sel[pre] = base + tid;
    __syncthreads();
    const int off = offs[(size_t)kv * nb + blk];
    const int cpr = D / 8;
    const uint4* Ks = reinterpret_cast<const uint4*>(K + (size_t)kv * L * D);
    const uint4* Vs = reinterpret_cast<const uint4*>(V + (size_t)kv * L * D);
    uint4* Kd = reinterpret_cast<uint4*>(GK + ((size_t)kv * gcap + off) * D);
    uint4* Vd = reinterpret_cast<uint4*>(GV + ((size_t)kv * gcap + off) * D);
    for (int c = tid; c < t * cpr; c += blockDim.x) {
        const int r = c / cpr, cc = c % cpr;
        const size_t src = (size_t)sel[r] * cpr + cc;
        Kd[(size_t)r * cpr + cc] = Ks[src];
        Vd[(size_t)r * cpr + cc] = Vs[src];
    }
    if (tid < t) gpos[(size_t)kv * gcap + off + tid] = sel[tid];
}

// Copies rows [src_row0, src_row0 + n) of every head of K and V ([H, L, D]) into
// rows [0, n) of WK, WV ([H, cap, D]). grid (ceil(n * D / 8 / 256), H), 256 threads.
extern "C" __global__ void tca_copy_rows(const u16* K, const u16* V, u16* WK, u16* WV, int L,
                                         int src_row0, int n, int cap, int D) {
    const int kv = blockIdx.y;
    const size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t cpr = D / 8;
    if (c >= (size_t)n * cpr) return;
    const uint4* Ks = reinterpret_cast<const uint4*>(K + ((size_t)kv * L + src_row0) * D);
    const uint4* Vs = reinterpret_cast<const uint4*>(V + ((size_t)kv * L + src_row0) * D);
    uint4* Kd = reinterpret_cast<uint4*>(WK + (size_t)kv * cap * D);
    uint4* Vd = reinterpret_cast<uint4*>(WV + (size_t)kv * cap * D);
    Kd[c] = Ks[c];
    Vd[c] = Vs[c];
}

// Fills n floats (or n 32-bit words) with a bit pattern (NaN poisoning).
extern "C" __global__ void tca_fill_u32(u32* p, unsigned long long n, u32 v) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        p[i] = v;
}

// Spins for about `ns` nanoseconds (%globaltimer). Launched before a timed region so
// that the host has queued the timed kernels before the GPU reaches the start event:
// the events then measure GPU execution, not host launch gaps.
extern "C" __global__ void tca_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
