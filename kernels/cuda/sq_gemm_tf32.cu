// The same per-sample squares as sq_gemm.cu with C_n = G_nᵀ·X_n on the tensor cores in
// tf32 (10-bit mantissa inputs, fp32 accumulation): the tf32 mode. Inputs are rounded to
// tf32 (round to nearest, cvt.rna) once, as they are staged into shared memory; the
// squares, the per-sample sums and the diagonal stay in fp32. Expected error: inputs carry
// about 2^-11 relative rounding each, so ≈ 3e-4 relative on C and about twice that on C²
// (see BENCHMARKS.md); the tests allow 2e-3.
//
// Inline PTX mma.sync.m16n8k8 rather than nvcuda::wmma: NVRTC has no <mma.h> unless the
// toolkit's include folder is found at run time, and the explicit fragment layout (PTX
// ISA, "Matrix fragments for mma.m16n8k8", .tf32) lets the epilogue know which (m, k)
// each accumulator register holds, so F is written straight from registers. With
// g = lane/4 and q = lane%4 (PTX's groupID and threadID_in_group):
//   A (16 × 8, m × t): a0 = (g, q), a1 = (g+8, q), a2 = (g, q+4), a3 = (g+8, q+4)
//   B (8 × 8, t × k):  b0 = (q, g), b1 = (q+4, g)
//   C (16 × 8, m × k): c0 = (g, 2q), c1 = (g, 2q+1), c2 = (g+8, 2q), c3 = (g+8, 2q+1)
//
// Block: 4 warps on a 64 × 64 tile of C; warp (wm, wn) owns rows wm·32.. and columns
// wn·32.. as 2 × 4 mma tiles of 16 × 8. Needs sm_80 or later; the host refuses tf32 below.

// Padded row of the staged tiles (floats). 72 ≡ 8 (mod 32 banks): the fragment reads
// (row q, column g) of a warp hit 32 different banks.
#define TF_LD 72

struct Tf32Tile {
    static constexpr int BM = 64;
    static constexpr int BK = 64;
    static constexpr int BT = 32;
    static constexpr int THREADS = 128;

    __device__ static void run(const Product& p, const float* __restrict__ mask, int seq_len,
                               int tm, int tk, int tile, int group, int n_begin, int n_end) {
#if __CUDA_ARCH__ >= 800
        __shared__ __align__(16) float gs[BT * TF_LD];
        __shared__ __align__(16) float xs[BT * TF_LD];
        __shared__ float red[THREADS / 32];
        __shared__ int red_len[THREADS / 32];

        const int lane = threadIdx.x & 31;
        const int warp = threadIdx.x >> 5;
        const int g8 = lane >> 2;
        const int q4 = lane & 3;
        const int wm = warp >> 1;
        const int wn = warp & 1;
        const int m0 = tm * BM;
        const int k0 = tk * BK;
        const int tiles = p.tiles_m * p.tiles_k;

        float f[2][4][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) f[mi][ni][e] = 0.0f;

        for (int n = n_begin; n < n_end; ++n) {
            const i64 base = (i64)n * seq_len;
            const int len = block_len<THREADS>(mask, base, seq_len, red_len);
            float c[2][4][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) c[mi][ni][e] = 0.0f;

            for (int t0 = 0; t0 < len; t0 += BT) {
                load_tile<BT, BM, TF_LD, THREADS, true, true>(gs, p.g, p.m, m0, base, t0, len,
                                                              mask, p.gscale);
                load_tile<BT, BK, TF_LD, THREADS, false, true>(xs, p.x, p.k, k0, base, t0, len,
                                                               mask, 1.0f);
                __syncthreads();
#pragma unroll
                for (int ks = 0; ks < BT; ks += 8) {
                    // gs holds G row by row (t-major): element (m, t) of the A operand Gᵀ
                    // sits at gs[t·LD + m]; xs[t·LD + k] is element (t, k) of the B operand
                    // X. Both are tf32 already (load_tile rounded them).
                    const float* g_lo = gs + (ks + q4) * TF_LD;
                    const float* g_hi = gs + (ks + q4 + 4) * TF_LD;
                    const float* x_lo = xs + (ks + q4) * TF_LD;
                    const float* x_hi = xs + (ks + q4 + 4) * TF_LD;
                    unsigned a[2][4];
                    unsigned b[4][2];
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        const int rb = wm * 32 + mi * 16 + g8;
                        a[mi][0] = __float_as_uint(g_lo[rb]);
                        a[mi][1] = __float_as_uint(g_lo[rb + 8]);
                        a[mi][2] = __float_as_uint(g_hi[rb]);
                        a[mi][3] = __float_as_uint(g_hi[rb + 8]);
                    }
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        const int cb = wn * 32 + ni * 8 + g8;
                        b[ni][0] = __float_as_uint(x_lo[cb]);
                        b[ni][1] = __float_as_uint(x_hi[cb]);
                    }
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                        for (int ni = 0; ni < 4; ++ni)
                            asm volatile(
                                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                                "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                                : "+f"(c[mi][ni][0]), "+f"(c[mi][ni][1]), "+f"(c[mi][ni][2]),
                                  "+f"(c[mi][ni][3])
                                : "r"(a[mi][0]), "r"(a[mi][1]), "r"(a[mi][2]), "r"(a[mi][3]),
                                  "r"(b[ni][0]), "r"(b[ni][1]));
                }
                // The next chunk overwrites gs/xs.
                __syncthreads();
            }

            float s = 0.0f;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float v = c[mi][ni][e] * c[mi][ni][e];
                        s += v;
                        f[mi][ni][e] += v;
                    }
            // The same stores as F32Tile's epilogue, written out rather than shared through
            // a helper: with one, ptxas spilled this kernel and the m64 one on some targets
            // (nvrtc_compiles_every_kernel checks).
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
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int m = m0 + wm * 32 + mi * 16 + g8 + (e >> 1) * 8;
                    const int k = k0 + wn * 32 + ni * 8 + q4 * 2 + (e & 1);
                    if (m < p.m && k < p.k) {
                        if (p.groups == 1) {
                            p.f_out[f_index(p, m, k)] = f[mi][ni][e];
                        } else {
                            p.f_part[(i64)group * p.m * p.k + (i64)m * p.k + k] = f[mi][ni][e];
                        }
                    }
                }
#else
        // Built for an architecture without tf32 tensor cores: the host never launches it.
        __trap();
#endif
    }
};
