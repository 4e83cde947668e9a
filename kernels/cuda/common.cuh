// Shared by every kernel of fibecfed-kernels. NVRTC gets no include path: the host
// concatenates this file in front of the others (see src/device.rs), so nothing here may
// rely on a header beyond what NVRTC builds in.
//
// Layout conventions (all row-major, f32):
//   rows of a batch: row = n·T + t for sample n, token t (T = seq_len);
//   mask[row]: 0 skips the row entirely (its data is never read, so non-finite padding
//   cannot reach a sum), any other value m weights the row's product by m² — the CPU code
//   (fisher::site_fisher) multiplies both factors by the mask, so m² is what it computes.

typedef long long i64;

// Sum over the block, in a fixed tree (warp shuffles, then warps in index order), so that
// the result is bitwise reproducible. Valid in thread 0 only. `red` holds THREADS/32 floats.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* red) {
    static_assert(THREADS % 32 == 0, "whole warps only");
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int w = 0; w < THREADS / 32; ++w) total += red[w];
    }
    // `red` is reused by the next call.
    __syncthreads();
    return total;
}

// Rows t0..t0+BT of one sample (rows base+t of the batch) and columns c0..c0+W of a
// row-major matrix with `ld` columns, into shared memory s[r·LD + c]. Zeros past the
// matrix's columns, past the sample's length `len` and on masked rows, so that partial
// tiles need no special case in the arithmetic. WEIGHTED multiplies each row by m²·gscale:
// exactly one of the two factors of a product carries the token weight.
//
// 16-byte loads when every row starts 16-byte aligned (ld a multiple of 4; the buffers
// themselves come from cuMemAlloc, 256-byte aligned) and the four columns are in range.
template <int BT, int W, int LD, int THREADS, bool WEIGHTED>
__device__ __forceinline__ void load_tile(float* s, const float* __restrict__ src, int ld, int c0,
                                          i64 base, int t0, int len,
                                          const float* __restrict__ mask, float gscale) {
    static_assert(W % 4 == 0 && LD % 4 == 0, "float4 stores need 16-byte rows");
    constexpr int W4 = W / 4;
    const bool vec = (ld & 3) == 0;
    for (int i = threadIdx.x; i < BT * W4; i += THREADS) {
        const int r = i / W4;
        const int c = (i - r * W4) * 4;
        const int t = t0 + r;
        const int col = c0 + c;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (t < len && col < ld) {
            const float m = mask[base + t];
            if (m != 0.0f) {
                const float* p = src + (base + t) * (i64)ld + col;
                if (vec && col + 4 <= ld) {
                    v = *reinterpret_cast<const float4*>(p);
                } else {
                    v.x = p[0];
                    if (col + 1 < ld) v.y = p[1];
                    if (col + 2 < ld) v.z = p[2];
                    if (col + 3 < ld) v.w = p[3];
                }
                if (WEIGHTED) {
                    const float w = m * m * gscale;
                    v.x *= w;
                    v.y *= w;
                    v.z *= w;
                    v.w *= w;
                }
            }
        }
        *reinterpret_cast<float4*>(s + r * LD + c) = v;
    }
}
