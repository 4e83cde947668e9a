// The small kernels around the site kernel: the LoRA projections (when the caller has
// none) and the NaN poisoning tests use.

// out[row, j] = Σ_k y[row, k] · w[j·w_rank_stride + k·w_col_stride] for j < rank: the
// LoRA products u = x·Aᵀ (A is rank × d_in: strides d_in, 1) and δ·B (B is d_out × rank:
// strides 1, rank), without the scale. Masked rows are not read and get 0.
// Block: 8 warps, 2 rows each; the weights are staged PROJ_RC ranks × PROJ_KC columns at a
// time in shared memory and shared by the block's 16 rows; lanes stride over k (coalesced
// reads of y) and the lane partials are summed by shuffles in a fixed order.
#define PROJ_ROWS 16
#define PROJ_RC 8
#define PROJ_KC 256
__device__ __forceinline__ void project_rows(int block, const float* __restrict__ y, int rows,
                                             int d, const float* __restrict__ w,
                                             i64 w_rank_stride, i64 w_col_stride, int rank,
                                             const float* __restrict__ mask,
                                             float* __restrict__ out) {
    __shared__ float ws[PROJ_RC * PROJ_KC];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const i64 row0 = (i64)block * PROJ_ROWS + warp * 2;
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

// Both LoRA projections in one launch: blocks [0, row_blocks) form u = x·Aᵀ (A is
// rank × d_in: strides d_in, 1), the rest δ·B (B is d_out × rank: strides 1, rank).
extern "C" __global__ void __launch_bounds__(256)
    project_pair(const float* __restrict__ x, int d_in, const float* __restrict__ a,
                 const float* __restrict__ delta, int d_out, const float* __restrict__ b,
                 int rows, int rank, const float* __restrict__ mask, int row_blocks,
                 float* __restrict__ u, float* __restrict__ db) {
    if ((int)blockIdx.x < row_blocks) {
        project_rows(blockIdx.x, x, rows, d_in, a, d_in, 1, rank, mask, u);
    } else {
        project_rows(blockIdx.x - row_blocks, delta, rows, d_out, b, 1, rank, rank, mask, db);
    }
}

// Poisons a buffer (tests fill outputs with NaN so that an unwritten element fails).
extern "C" __global__ void fill_f32(float* __restrict__ p, i64 n, float v) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}
