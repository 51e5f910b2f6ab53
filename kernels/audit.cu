// Statistics the Theorem 1 audit needs over long sequences, on the device.
//   tca_prefix_far_d{D}: V bf16 [Hkv, L, D] -> far2 f32 [Hkv, L] with
//     far2[i] = max_{j < i} ||v_i - v_j||_2^2 (0 at i = 0),
//   whose running maximum is the squared l2 diameter of {v_j : j <= i}. O(L^2 D) work:
//   the host's O(L^2 D) f64 loop is out of reach at 128K tokens. Sums in f32 of exact
//   differences of bf16 values: relative error at most D 2^-24 (the host widens by that).
// grid (ceil(L / 128), Hkv), 128 threads; thread t owns row i = 128 blockIdx.x + t and
// streams the rows j < i through shared memory in tiles of TJ rows (read as broadcasts).

typedef unsigned short u16;
typedef unsigned int u32;

#define TJ 32

__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((u32)x) << 16); }

template <int D>
__device__ __forceinline__ void prefix_far(const u16* __restrict__ V, float* __restrict__ far2,
                                           int L) {
    __shared__ float4 vj[TJ][D / 4];
    const int kv = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const u16* Vh = V + (size_t)kv * L * D;
    float vi[D];
#pragma unroll
    for (int c = 0; c < D; c++) vi[c] = i < L ? bf2f(Vh[(size_t)i * D + c]) : 0.f;
    float best = 0.f;
    // Rows j < the block's last row.
    const int jend = min(L, (int)((blockIdx.x + 1) * blockDim.x)) - 1;
    for (int j0 = 0; j0 < jend; j0 += TJ) {
        __syncthreads();
        for (int t = threadIdx.x; t < TJ * D / 4; t += blockDim.x) {
            const int r = t / (D / 4), c = t % (D / 4), j = j0 + r;
            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
            if (j < L) {
                const u16* p = Vh + (size_t)j * D + 4 * c;
                x = make_float4(bf2f(p[0]), bf2f(p[1]), bf2f(p[2]), bf2f(p[3]));
            }
            vj[r][c] = x;
        }
        __syncthreads();
        const int jn = min(TJ, i - j0);
        for (int r = 0; r < jn; r++) {
            float s = 0.f;
#pragma unroll
            for (int c = 0; c < D / 4; c++) {
                const float4 x = vj[r][c];
                const float a = vi[4 * c] - x.x, b = vi[4 * c + 1] - x.y;
                const float e = vi[4 * c + 2] - x.z, f = vi[4 * c + 3] - x.w;
                s = fmaf(a, a, s);
                s = fmaf(b, b, s);
                s = fmaf(e, e, s);
                s = fmaf(f, f, s);
            }
            best = fmaxf(best, s);
        }
    }
    if (i < L) far2[(size_t)kv * L + i] = best;
}

#define PREFIX_FAR(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(128)                                         \
        tca_prefix_far_d##D(const u16* V, float* far2, int L) {                               \
        prefix_far<D>(V, far2, L);                                                            \
    }
PREFIX_FAR(64) PREFIX_FAR(96) PREFIX_FAR(128)
