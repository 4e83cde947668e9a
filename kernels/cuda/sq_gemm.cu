// Per-sample gradient squares of a product C_n = G_nᵀ·X_n (M × K) with the square fused
// into the epilogue, fp32 on the CUDA cores (fp32-exact mode). A block owns one BM × BK
// tile of C and walks the samples of its group one after the other, keeping the group's
// running diagonal tile in registers; C_n is never written to memory:
//   Σ_{(m,k) in tile} C_n[m,k]²  → s_out[n] (one tile) or s_part[n·tiles + tile]
//   Σ_{n in group} C_n[m,k]²     → f_out (one group) or f_part[group·M·K + m·K + k]
// The partials are summed in a fixed order by the site kernel's last blocks (site.cu):
// no atomics on values, so results are bitwise reproducible.
//
// Block: (BM/TM)·(BK/TK) threads, each owning a TM × TK patch of the tile. The T axis is
// walked in chunks of BT rows staged in shared memory (the classic outer-product form:
// per row, TM values of G and TK of X from shared memory feed TM·TK FMAs).
template <int BM_, int BK_, int BT, int TM, int TK>
struct F32Tile {
    static constexpr int BM = BM_;
    static constexpr int BK = BK_;
    static constexpr int THREADS = (BM / TM) * (BK / TK);

    __device__ static void run(const Product& p, const float* __restrict__ mask, int seq_len,
                               int tm, int tk, int tile, int group, int n_begin, int n_end) {
        constexpr int TXS = BK / TK;
        __shared__ __align__(16) float gs[BT * BM];
        __shared__ __align__(16) float xs[BT * BK];
        __shared__ float red[THREADS / 32];
        __shared__ int red_len[THREADS / 32];

        const int tx = threadIdx.x % TXS;
        const int ty = threadIdx.x / TXS;
        const int m0 = tm * BM;
        const int k0 = tk * BK;
        const int tiles = p.tiles_m * p.tiles_k;

        float f[TM][TK];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TK; ++j) f[i][j] = 0.0f;

        for (int n = n_begin; n < n_end; ++n) {
            const i64 base = (i64)n * seq_len;
            // Rows past the last unmasked token are never read: right padding costs nothing.
            const int len = block_len<THREADS>(mask, base, seq_len, red_len);
            float c[TM][TK];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TK; ++j) c[i][j] = 0.0f;

            for (int t0 = 0; t0 < len; t0 += BT) {
                load_tile<BT, BM, BM, THREADS, true>(gs, p.g, p.m, m0, base, t0, len, mask,
                                                     p.gscale);
                load_tile<BT, BK, BK, THREADS, false>(xs, p.x, p.k, k0, base, t0, len, mask,
                                                      1.0f);
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
            if (threadIdx.x == 0) {
                if (tiles == 1) {
                    p.s_out[n] = s;
                } else {
                    p.s_part[(i64)n * tiles + tile] = s;
                }
            }
        }

#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + ty * TM + i;
#pragma unroll
            for (int j = 0; j < TK; ++j) {
                const int k = k0 + tx * TK + j;
                if (m < p.m && k < p.k) {
                    if (p.groups == 1) {
                        p.f_out[f_index(p, m, k)] = f[i][j];
                    } else {
                        p.f_part[(i64)group * p.m * p.k + (i64)m * p.k + k] = f[i][j];
                    }
                }
            }
        }
    }
};

// Three shapes of tile, picked by the host from M: LoRA factors have M = r (8 or 16), so
// a tile as tall as r covers all of M and X is read exactly once; dense layers and larger
// ranks get the square 64 × 64 tile with a 4 × 4 register patch per thread.
typedef F32Tile<8, 128, 32, 1, 4> TileM8;
typedef F32Tile<16, 128, 32, 2, 4> TileM16;
typedef F32Tile<64, 64, 16, 4, 4> TileM64;
