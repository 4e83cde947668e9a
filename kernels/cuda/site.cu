// One launch per site's squares: every product of the site (a LoRA site's two factors, or
// a dense layer's one) in one grid, the sample lengths read by each block from the mask,
// and the fixed-order reductions of the partials done by the blocks that finish last
// (the "last block done" pattern: partials written, __threadfence, an atomic count of
// finished blocks; the block that brings a count to its total sums the partials). Only
// the counters are atomic; the sums are taken in a fixed order (group by group, tile by
// tile) by whichever block is last, so results are bitwise reproducible run to run.
//
// Grid: 1-D, blocks [0, blocks0) on p[0] and [blocks0, blocks) on p[1]; block b of a
// product owns tile b % tiles and sample group b / tiles. The host sizes the groups from
// the kernel's occupancy so that the whole grid is resident at once (one wave).

// Σ_g f_part[g] over the entries of one tile, in a fixed order, into f_out. Reads go
// through L2 (__ldcg): the partials were written by other blocks, on other SMs. Eight
// running sums per entry (g ≡ 0..7 mod 8, combined in index order at the end) keep eight
// loads in flight per entry rather than one dependent chain of `groups` loads, which
// would make this tail, run by one block per tile after the rest of the grid, as long
// as the kernel itself at 64 groups.
template <int THREADS, int BM, int BK>
__device__ __forceinline__ void reduce_tile(const Product& p, int m0, int k0) {
    const i64 mk = (i64)p.m * p.k;
    for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
        const int m = m0 + e / BK;
        const int k = k0 + e % BK;
        if (m >= p.m || k >= p.k) continue;
        const float* src = p.f_part + (i64)m * p.k + k;
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        int g = 0;
        for (; g + 8 <= p.groups; g += 8) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += __ldcg(src + (g + j) * mk);
        }
        // Static indices only (unrolled, predicated): a run-time index would put `acc` in
        // local memory.
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (g + j < p.groups) acc[j] += __ldcg(src + (g + j) * mk);
        float total = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) total += acc[j];
        p.f_out[f_index(p, m, k)] = total;
    }
}

// s_out[n] = Σ_tile s_part[n·tiles + tile]: one warp per sample, lanes over the tiles in
// a fixed assignment, then a fixed shuffle tree.
template <int THREADS>
__device__ __forceinline__ void reduce_samples(const Product& p, int batch) {
    const int tiles = p.tiles_m * p.tiles_k;
    const int lane = threadIdx.x & 31;
    for (int n = threadIdx.x >> 5; n < batch; n += THREADS / 32) {
        const float* src = p.s_part + (i64)n * tiles;
        float acc = 0.0f;
        for (int i = lane; i < tiles; i += 32) acc += __ldcg(src + i);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) p.s_out[n] = acc;
    }
}

// Whether this block is the one that brings `*counter` to `total`; every thread gets the
// answer. Each thread fences its own writes, the barrier orders them before thread 0,
// and thread 0 fences again before the count (a device-scope fence is cumulative: it
// also orders the writes thread 0 observed through the barrier), so the block that sees
// the final count sees every partial.
__device__ __forceinline__ bool last_to_finish(unsigned* counter, unsigned total,
                                               unsigned* flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        *flag = atomicAdd(counter, 1u) == total - 1 ? 1u : 0u;
    }
    __syncthreads();
    const bool last = *flag != 0u;
    if (last) {
        // Orders the reads of the other blocks' partials after the count.
        __threadfence();
        // Counters are zero again for the next launch on the stream.
        if (threadIdx.x == 0) *counter = 0u;
    }
    // `flag` is rewritten by the next call.
    __syncthreads();
    return last;
}

template <class Tile>
__device__ __forceinline__ void site_body(const Site& s) {
    __shared__ unsigned flag;
    int b = blockIdx.x;
    const int which = b < s.blocks0 ? 0 : 1;
    if (which == 1) b -= s.blocks0;
    const Product& p = s.p[which];
    const int tiles = p.tiles_m * p.tiles_k;
    const int tile = b % tiles;
    const int group = b / tiles;
    const int tm = tile / p.tiles_k;
    const int tk = tile - tm * p.tiles_k;
    const int n_begin = group_begin(group, p.groups, s.batch);
    const int n_end = group_begin(group + 1, p.groups, s.batch);
    Tile::run(p, s.mask, s.seq_len, tm, tk, tile, group, n_begin, n_end);

    if (p.groups > 1 && last_to_finish(p.tile_done + tile, (unsigned)p.groups, &flag))
        reduce_tile<Tile::THREADS, Tile::BM, Tile::BK>(p, tm * Tile::BM, tk * Tile::BK);
    if (s.all_done != nullptr && last_to_finish(s.all_done, (unsigned)s.blocks, &flag)) {
        for (int i = 0; i < s.nprod; ++i)
            if (s.p[i].tiles_m * s.p[i].tiles_k > 1) reduce_samples<Tile::THREADS>(s.p[i], s.batch);
    }
}

// __grid_constant__: the blocks index s.p[which] at run time; without it the compiler
// would copy the 216-byte parameter block into each thread's local memory to do so.
extern "C" __global__ void __launch_bounds__(TileM8::THREADS)
    sq_site_f32_m8(const __grid_constant__ Site s) {
    site_body<TileM8>(s);
}

extern "C" __global__ void __launch_bounds__(TileM16::THREADS)
    sq_site_f32_m16(const __grid_constant__ Site s) {
    site_body<TileM16>(s);
}

extern "C" __global__ void __launch_bounds__(TileM64::THREADS)
    sq_site_f32_m64(const __grid_constant__ Site s) {
    site_body<TileM64>(s);
}

// At least 4 resident blocks (128 registers a thread): NVRTC 13.5's ptxas otherwise
// squeezed this kernel to 96 registers for sm_80 and spilled (NVRTC 13.0 used 124).
extern "C" __global__ void __launch_bounds__(Tf32Tile::THREADS, 4)
    sq_site_tf32(const __grid_constant__ Site s) {
    site_body<Tf32Tile>(s);
}
