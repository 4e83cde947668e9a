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

// 1 + the last t < seq_len whose mask is non-zero in the sample starting at row `base`,
// 0 when there is none, in every thread of the block. Each block of a site launch reads
// its samples' masks itself (T floats, a few hundred bytes), so no launch of its own is
// needed for it. The square kernels stop there, so right padding is never read; masked
// rows before it are skipped row by row. `red` holds THREADS/32 ints.
template <int THREADS>
__device__ __forceinline__ int block_len(const float* __restrict__ mask, i64 base, int seq_len,
                                         int* red) {
    int last = 0;
    for (int t = threadIdx.x; t < seq_len; t += THREADS)
        if (mask[base + t] != 0.0f) last = t + 1;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) last = max(last, __shfl_down_sync(0xffffffffu, last, off));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = last;
    __syncthreads();
    int len = 0;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) len = max(len, red[w]);
    // `red` is rewritten by the next call.
    __syncthreads();
    return len;
}

// fp32 → tf32 (round to nearest, ties away: cvt.rna), kept in a float's bits. Needs
// sm_80; the fp32 kernels never call it, and below sm_80 it is never instantiated.
__device__ __forceinline__ float to_tf32(float v) {
#if __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return __uint_as_float(r);
#else
    return v;
#endif
}

// Rows t0..t0+BT of one sample (rows base+t of the batch) and columns c0..c0+W of a
// row-major matrix with `ld` columns, into shared memory s[r·LD + c]. Zeros past the
// matrix's columns, past the sample's length `len` and on masked rows, so that partial
// tiles need no special case in the arithmetic. WEIGHTED multiplies each row by m²·gscale:
// exactly one of the two factors of a product carries the token weight. TF32 rounds each
// value to tf32 as it is staged, once, so that the tensor-core loop reads operands ready
// for mma.sync (rather than 16 cvt per 8 MMAs; zeros stay zeros).
//
// 16-byte loads when every row starts 16-byte aligned (ld a multiple of 4; the buffers
// themselves come from cuMemAlloc/cuMemAllocAsync, at least 256-byte aligned) and the
// four columns are in range.
template <int BT, int W, int LD, int THREADS, bool WEIGHTED, bool TF32 = false>
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
                if (TF32) {
                    v.x = to_tf32(v.x);
                    v.y = to_tf32(v.y);
                    v.z = to_tf32(v.z);
                    v.w = to_tf32(v.w);
                }
            }
        }
        *reinterpret_cast<float4*>(s + r * LD + c) = v;
    }
}

// One product C_n = G_nᵀ·X_n (M × K) of a site launch, as the host lays it out
// (src/device.rs, `ProductArgs`, #[repr(C)]: pointers first, then 32-bit fields).
struct Product {
    const float* g;       // (batch·T) × M, weighted by m²·gscale as it is staged
    const float* x;       // (batch·T) × K
    float* s_part;        // batch × tiles per-(sample, tile) sums; unused when tiles == 1
    float* f_part;        // groups × M·K per-group diagonals; unused when groups == 1
    float* s_out;         // batch
    float* f_out;         // M·K, or K·M when transpose
    unsigned* tile_done;  // one counter per tile (groups > 1), zero between launches
    int m, k;
    float gscale;
    int transpose;
    int tiles_m, tiles_k, groups;
};

// A site launch: one product (dense) or two (a LoRA site's A and B factors) in one grid.
// Blocks [0, blocks0) work on p[0], the rest on p[1]; block b of a product owns tile
// b % tiles and sample group b / tiles.
struct Site {
    Product p[2];
    const float* mask;    // batch·T token weights
    unsigned* all_done;   // one counter (zero between launches); null when no product
                          // has more than one tile, as S then needs no second pass
    int nprod, batch, seq_len;
    int blocks0, blocks;
};
static_assert(sizeof(Product) == 88, "the host's ProductArgs has 88 bytes");
static_assert(sizeof(Site) == 216, "the host's SiteArgs has 216 bytes");

// Samples of group `group` of `groups`: an even split of the batch (sizes differ by at
// most one), so that no block of a one-wave grid carries a larger share than another.
__device__ __forceinline__ int group_begin(int group, int groups, int batch) {
    return (int)((i64)group * batch / groups);
}

// Where an entry (m, k) of a product's diagonal lands in f_out.
__device__ __forceinline__ i64 f_index(const Product& p, int m, int k) {
    return p.transpose ? (i64)k * p.m + m : (i64)m * p.k + k;
}
