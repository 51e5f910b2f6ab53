// f32 attention for small shapes (the 1e-5 check against the f64 oracle): one warp per
// (query head, query). Query i attends to the global positions p in gpos (ascending,
// taken from the full K, V) with p <= i - w, then to its window [max(0, i - w + 1), i].
// Dense causal attention: ng = 0 and w >= L. Online softmax in f32; each lane owns
// D / 32 dimensions. Writes O [Hq, L, D] and the log-sum-exp [Hq, L] (natural log).

#define NEG_INF (-__int_as_float(0x7f800000))
#define MAXD 256

extern "C" __global__ void tca_attention_f32(const float* Q, const float* K, const float* V,
                                             const int* gpos, const int* gcount, int gcap, float* O,
                                             float* LSE, int L, int Hq, int Hkv, int D, int window,
                                             float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (long long)Hq * L) return;
    const int h = (int)(row / L), i = (int)(row % L);
    const int kv = h / (Hq / Hkv);
    const int per = (D + 31) / 32;
    float q[MAXD / 32], o[MAXD / 32];
    const float* qp = Q + ((size_t)h * L + i) * D;
    for (int t = 0; t < per; t++) {
        const int c = lane + 32 * t;
        q[t] = c < D ? qp[c] * scale : 0.f;
        o[t] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const float* Kh = K + (size_t)kv * L * D;
    const float* Vh = V + (size_t)kv * L * D;
    const int ng = gcount ? gcount[kv] : 0;
    const int* gp = gpos ? gpos + (size_t)kv * gcap : nullptr;
    const int lo = max(0, i - window + 1);
    // Keys: the global positions below the window, then the window.
    for (int idx = 0;; idx++) {
        int j;
        if (idx < ng) {
            j = gp[idx];
            if (j > i - window) { idx = ng - 1; continue; }
        } else {
            j = lo + (idx - ng);
            if (j > i) break;
        }
        float a = 0.f;
        for (int t = 0; t < per; t++) {
            const int c = lane + 32 * t;
            if (c < D) a = fmaf(q[t], Kh[(size_t)j * D + c], a);
        }
        for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffff, a, off);
        const float mn = fmaxf(m, a);
        const float al = expf(m - mn), p = expf(a - mn);
        l = l * al + p;
        for (int t = 0; t < per; t++) {
            const int c = lane + 32 * t;
            o[t] = o[t] * al + (c < D ? p * Vh[(size_t)j * D + c] : 0.f);
        }
        m = mn;
    }
    float* op = O + ((size_t)h * L + i) * D;
    for (int t = 0; t < per; t++) {
        const int c = lane + 32 * t;
        if (c < D) op[c] = o[t] / l;
    }
    if (lane == 0) LSE[(size_t)h * L + i] = m + logf(l);
}
