// The end of a prefill CTA, shared by attention_bf16.cu (mma.sync) and
// attention_hopper.cu (wgmma): both hold a warp's output in the m16n8 accumulator
// layout, where lane (group g = lane / 4, tig = lane % 4) has rows row0 = r + g and
// row1 = r + g + 8 and, for each 8-column fragment j, o[4j], o[4j+1] (row0, columns
// 8j + 2 tig, +1) and o[4j+2], o[4j+3] (row1). The including file defines u16 and u32.
// NVRTC searches no include path: the launcher (src/cuda/mod.rs, `expand_includes`)
// pastes this file in place of its #include line.

// Two f32 to bf16x2 (round to nearest even); `lo` lands in the low half.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Sums each row's softmax denominator l over the 4 lanes of the quad, then writes
// O[h, row] = o / l (bf16, D columns; 0 where l = 0) and, from tig = 0, the log-sum-exp
// LSE[h, row] = m ln 2 + ln l (m: the row's running max in log2 units), for the rows < L.
template <int D>
__device__ __forceinline__ void store_rows(const float* o, float l0, float l1, float m0, float m1,
                                           int row0, int row1, int tig, int h, int L, u16* O,
                                           float* LSE) {
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
