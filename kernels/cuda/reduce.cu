// The small kernels around the square kernels: sample lengths, the LoRA projections,
// the fixed-order reductions of the partials, and the NaN poisoning tests use.

// lens[n] = 1 + the last t whose mask is non-zero in sample n, 0 when there is none.
// One warp per sample. The square kernels stop there, so right padding is never read;
// masked rows before it are skipped row by row.
extern "C" __global__ void sample_lengths(const float* __restrict__ mask, int batch, int seq_len,
                                          int* __restrict__ lens) {
    const int n = blockIdx.x;
    if (n >= batch) return;
    int last = 0;
    for (int t = threadIdx.x; t < seq_len; t += 32)
        if (mask[(i64)n * seq_len + t] != 0.0f) last = t + 1;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) last = max(last, __shfl_down_sync(0xffffffffu, last, off));
    if (threadIdx.x == 0) lens[n] = last;
}

// out[row, j] = Σ_k y[row, k] · w[j·w_rank_stride + k·w_col_stride] for j < rank: the
// LoRA products u = x·Aᵀ (A is rank × d_in: strides d_in, 1) and δ·B (B is d_out × rank:
// strides 1, rank), without the scale. Masked rows are not read and get 0.
// Block: 8 warps, 2 rows each; the weights are staged PROJ_RC ranks × PROJ_KC columns at a
// time in shared memory and shared by the block's 16 rows; lanes stride over k (coalesced
// reads of y) and the lane partials are summed by shuffles in a fixed order.
#define PROJ_ROWS 16
#define PROJ_RC 8
#define PROJ_KC 256
extern "C" __global__ void __launch_bounds__(256)
    project_rows(const float* __restrict__ y, int rows, int d, const float* __restrict__ w,
                 i64 w_rank_stride, i64 w_col_stride, int rank, const float* __restrict__ mask,
                 float* __restrict__ out) {
    __shared__ float ws[PROJ_RC * PROJ_KC];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const i64 row0 = (i64)blockIdx.x * PROJ_ROWS + warp * 2;
    bool live[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) live[r] = row0 + r < rows && mask[row0 + r] != 0.0f;

    for (int j0 = 0; j0 < rank; j0 += PROJ_RC) {
        float acc[2][PROJ_RC];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int j = 0; j < PROJ_RC; ++j) acc[r][j] = 0.0f;
        for (int k0 = 0; k0 < d; k0 += PROJ_KC) {
            // The previous chunk's readers are done before it is overwritten.
            __syncthreads();
            for (int i = threadIdx.x; i < PROJ_RC * PROJ_KC; i += blockDim.x) {
                const int j = i / PROJ_KC;
                const int k = i - j * PROJ_KC;
                ws[i] = (j0 + j < rank && k0 + k < d)
                            ? w[(i64)(j0 + j) * w_rank_stride + (i64)(k0 + k) * w_col_stride]
                            : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (!live[r]) continue;
                const float* yr = y + (row0 + r) * (i64)d + k0;
                const int kn = min(PROJ_KC, d - k0);
                for (int k = lane; k < kn; k += 32) {
                    const float v = yr[k];
#pragma unroll
                    for (int j = 0; j < PROJ_RC; ++j) acc[r][j] = fmaf(v, ws[j * PROJ_KC + k], acc[r][j]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int j = 0; j < PROJ_RC; ++j) {
                float v = acc[r][j];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
                if (lane == 0 && row0 + r < rows && j0 + j < rank)
                    out[(row0 + r) * (i64)rank + j0 + j] = live[r] ? v : 0.0f;
            }
        }
    }
}

// s[n] = Σ_tile s_part[n·tiles + tile]: one block per sample, a fixed order (strided
// partial sums, then block_sum's tree), so the result does not depend on scheduling.
extern "C" __global__ void __launch_bounds__(256)
    sum_tiles(const float* __restrict__ s_part, int batch, int tiles, float* __restrict__ s) {
    __shared__ float red[256 / 32];
    const int n = blockIdx.x;
    if (n >= batch) return;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < tiles; i += 256) acc += s_part[(i64)n * tiles + i];
    acc = block_sum<256>(acc, red);
    if (threadIdx.x == 0) s[n] = acc;
}

// f[e] = Σ_g f_part[g·M·K + e] in group order. With `transpose`, entry (m, k) lands at
// f[k·M + m]: the LoRA B factor is computed as Uᵀ·δ (r × d_out) so that its small side is
// the tile's M, and its diagonal is wanted d_out × r.
extern "C" __global__ void sum_groups(const float* __restrict__ f_part, int groups, int m_total,
                                      int k_total, int transpose, float* __restrict__ f) {
    const i64 mk = (i64)m_total * k_total;
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= mk) return;
    float acc = 0.0f;
    for (int g = 0; g < groups; ++g) acc += f_part[(i64)g * mk + e];
    if (transpose) {
        const i64 m = e / k_total;
        const i64 k = e - m * k_total;
        f[k * m_total + m] = acc;
    } else {
        f[e] = acc;
    }
}

// Poisons a buffer (tests fill outputs with NaN so that an unwritten element fails).
extern "C" __global__ void fill_f32(float* __restrict__ p, i64 n, float v) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}
