// Per-sample gradient squares of a product C_n = G_nᵀ·X_n (M × K) with the square fused
// into the epilogue, fp32 on the CUDA cores (fp32-exact mode):
//   s_part[n·tiles + tile] = Σ_{(m,k) in tile} C_n[m,k]²
//   f_part[group][m·K + k] = Σ_{n in group} C_n[m,k]²
// G is (batch·T) × M and X is (batch·T) × K, row-major. C_n is never written to memory:
// a block owns one BM × BK tile of C and walks the samples of its group one after the
// other, keeping the running F tile in registers. Per-sample and per-group partials are
// summed in a fixed order by sum_tiles / sum_groups (reduce.cu): no atomics, so results
// are bitwise reproducible.
//
// Grid: x = K tiles, y = M tiles, z = sample groups. Block: (BM/TM)·(BK/TK) threads, each
// owning a TM × TK patch of the tile. The T axis is walked in chunks of BT rows staged in
// shared memory (the classic outer-product form: per row, TM values of G and TK of X
// from shared memory feed TM·TK FMAs).
template <int BM, int BK, int BT, int TM, int TK>
__device__ __forceinline__ void sq_gemm_body(const float* __restrict__ g, int m_total,
                                             const float* __restrict__ x, int k_total,
                                             const float* __restrict__ mask,
                                             const int* __restrict__ lens, int batch, int seq_len,
                                             float gscale, int samples_per_group,
                                             float* __restrict__ s_part,
                                             float* __restrict__ f_part) {
    constexpr int TXS = BK / TK;
    constexpr int THREADS = (BM / TM) * TXS;
    __shared__ __align__(16) float gs[BT * BM];
    __shared__ __align__(16) float xs[BT * BK];
    __shared__ float red[THREADS / 32];

    const int tx = threadIdx.x % TXS;
    const int ty = threadIdx.x / TXS;
    const int m0 = blockIdx.y * BM;
    const int k0 = blockIdx.x * BK;
    const int tiles = gridDim.x * gridDim.y;
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    const int n_begin = blockIdx.z * samples_per_group;
    const int n_end = min(batch, n_begin + samples_per_group);

    float f[TM][TK];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TK; ++j) f[i][j] = 0.0f;

    for (int n = n_begin; n < n_end; ++n) {
        const i64 base = (i64)n * seq_len;
        // Rows past the last unmasked token are never read: right padding costs nothing.
        const int len = lens[n];
        float c[TM][TK];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TK; ++j) c[i][j] = 0.0f;

        for (int t0 = 0; t0 < len; t0 += BT) {
            load_tile<BT, BM, BM, THREADS, true>(gs, g, m_total, m0, base, t0, len, mask, gscale);
            load_tile<BT, BK, BK, THREADS, false>(xs, x, k_total, k0, base, t0, len, mask, 1.0f);
            __syncthreads();
#pragma unroll 4
            for (int tt = 0; tt < BT; ++tt) {
                float a[TM];
                float b[TK];
#pragma unroll
                for (int i = 0; i < TM; ++i) a[i] = gs[tt * BM + ty * TM + i];
#pragma unroll
                for (int j = 0; j < TK; ++j) b[j] = xs[tt * BK + tx * TK + j];
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TK; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
            }
            // The next chunk overwrites gs/xs.
            __syncthreads();
        }

        // Epilogue: square once, feed both the sample's norm and the group's diagonal.
        // Entries outside the matrix are exact zeros (zero-filled tiles), so they add 0.
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TK; ++j) {
                const float v = c[i][j] * c[i][j];
                s += v;
                f[i][j] += v;
            }
        s = block_sum<THREADS>(s, red);
        if (threadIdx.x == 0) s_part[(i64)n * tiles + tile] = s;
    }

    float* fp = f_part + (i64)blockIdx.z * m_total * k_total;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty * TM + i;
#pragma unroll
        for (int j = 0; j < TK; ++j) {
            const int k = k0 + tx * TK + j;
            if (m < m_total && k < k_total) fp[(i64)m * k_total + k] = f[i][j];
        }
    }
}

// Three shapes of tile, picked by the host from M: LoRA factors have M = r (8 or 16), so
// a tile as tall as r covers all of M and X is read exactly once; dense layers get the
// square 64 × 64 tile with a 4 × 4 register patch per thread.
#define SQ_GEMM_ARGS                                                                         \
    const float* __restrict__ g, int m_total, const float* __restrict__ x, int k_total,      \
        const float* __restrict__ mask, const int* __restrict__ lens, int batch, int seq_len, \
        float gscale, int samples_per_group, float* __restrict__ s_part,                     \
        float* __restrict__ f_part
#define SQ_GEMM_CALL                                                                 \
    g, m_total, x, k_total, mask, lens, batch, seq_len, gscale, samples_per_group, s_part, \
        f_part

extern "C" __global__ void __launch_bounds__(256) sq_gemm_f32_m8(SQ_GEMM_ARGS) {
    sq_gemm_body<8, 128, 32, 1, 4>(SQ_GEMM_CALL);
}

extern "C" __global__ void __launch_bounds__(256) sq_gemm_f32_m16(SQ_GEMM_ARGS) {
    sq_gemm_body<16, 128, 32, 2, 4>(SQ_GEMM_CALL);
}

extern "C" __global__ void __launch_bounds__(256) sq_gemm_f32_m64(SQ_GEMM_ARGS) {
    sq_gemm_body<64, 64, 16, 4, 4>(SQ_GEMM_CALL);
}
