// Reading bf16 rows into f32 registers, shared by the decode and selection kernels. The
// including file defines u16 and u32 first. NVRTC searches no include path: the launcher
// (src/cuda/mod.rs, `expand_includes`) pastes this file in place of its #include line.

__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((u32)x) << 16); }

// Lanes per row: the largest power of two <= D / 8 (16-byte pieces of a row); each lane
// holds E = D / LPK consecutive elements (8 for D = 64 and 128, 12 for D = 96).
__host__ __device__ constexpr int lanes_per_row(int d) {
    int l = 1;
    while (2 * l <= d / 8) l *= 2;
    return l;
}

// E consecutive bf16 at p (16-byte aligned when E % 8 == 0, else 8-byte aligned) to f32,
// times `mul` (exact at the default 1).
template <int E>
__device__ __forceinline__ void load_row(const u16* p, float* out, float mul = 1.f) {
    static_assert(E % 4 == 0, "E must be a multiple of 4");
    if constexpr (E % 8 == 0) {
#pragma unroll
        for (int c = 0; c < E / 8; c++) {
            const uint4 u = *reinterpret_cast<const uint4*>(p + c * 8);
            const u16* e = reinterpret_cast<const u16*>(&u);
#pragma unroll
            for (int t = 0; t < 8; t++) out[c * 8 + t] = bf2f(e[t]) * mul;
        }
    } else {
#pragma unroll
        for (int c = 0; c < E / 4; c++) {
            const uint2 u = *reinterpret_cast<const uint2*>(p + c * 4);
            const u16* e = reinterpret_cast<const u16*>(&u);
#pragma unroll
            for (int t = 0; t < 4; t++) out[c * 4 + t] = bf2f(e[t]) * mul;
        }
    }
}
