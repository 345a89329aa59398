// int4 weights times a few rows of bfloat16 activations on tensor cores (sm_80+).
//
// Decoding multiplies one row (or a few) by every weight once, so the product is bound by
// the bytes of weights read, and the work per byte decides whether it keeps up: here each
// thread turns 8 codes into bfloat16 with 3 shifts and 4 logic ops and hands them to one
// mma.sync per 8 rows of activations; nothing goes through shared memory until the final
// sum over warps. Compiled by NVRTC at first use (int4_mma.py), so no CUDA headers.
//
// Layout (int4_mma.py's `mma_layout`): one 16-byte load per lane holds, for a tile of 16
// output rows and 64 inputs, the 32 codes that lane feeds to four m16n8k16 products:
// lane = 4 g + t takes rows g and g + 8 and inputs 16 t .. 16 t + 15 of the 64, and the
// activations x[g, 16 t .. 16 t + 15] (row g of an 8-row slice; zero past the last), so
// both sides are plain contiguous loads. Inputs are permuted within the product, which
// the sum does not notice: k-step s, element e of a lane stands for input 16 t + 4 s + e.
// Word s of a lane's load has its 8 codes in the slots (nibbles) that one `lop3` each
// turns into the bfloat16 pairs of the A fragment:
//   a0 = (row g, inputs +0, +1)   slots 0, 4
//   a1 = (row g+8, +0, +1)        slots 1, 5
//   a2 = (row g, +2, +3)          slots 2, 6
//   a3 = (row g+8, +2, +3)        slots 3, 7
// (code | 0x4300) read as bfloat16 is 128 + code exactly, so the tensor cores sum
// (128 + code) * x in float32; a second product with all-ones weights sums x itself, and
// at each group's end the row's scale and zero turn both into the group's contribution:
//   sum((code - 8) * s + z) * x = s * sum((128 + code) x) + (z - 136 s) * sum(x).
// The float32 correction subtracts terms ~136 times the result's scale: ~1e-5 relative.
//
// Scales and zeros: (tiles, groups, 16 rows) pairs of bfloat16, scale in the low half.
// Each block does TILES tiles of 16 rows for SLICES slices of 8 rows of the batch: each
// warp converts a tile's codes once and multiplies them by every slice's activations, over
// a share of the input groups, and the warps add up through shared memory. A batch of
// more than 8 * SLICES rows takes several blocks per tile, launched next to each other so
// that they read the tiles from L2.
// Grid: tiles / TILES * ceil(m / (8 * SLICES)); blockDim.x = 32 * warps; shared memory
// 512 * TILES * SLICES * warps bytes.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 to_bf16x2(u32 word) {
    u32 out;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(word), "n"(0x000F000F), "n"(0x43004300));
    return out;  // (word & 0x000F000F) | 0x43004300
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf16_lo(u32 pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(u32 pair) { return __uint_as_float(pair & 0xFFFF0000u); }

// At most 16 warps a block: the compiler keeps the registers a thread uses within what
// 512 threads can have (128 each), which the 4-tile and 2-slice variants reach.
template <int TILES, int SLICES>
__global__ void __launch_bounds__(512) int4_mma_matvec(
        const u16* __restrict__ x,     // (m, k) bfloat16
        const uint4* __restrict__ w,   // (n / 16, k / 64, 32 lanes) 16-byte loads
        const u32* __restrict__ sz,    // (n / 16, k / group, 16) (scale, zero) pairs
        u16* __restrict__ out,         // (m, n) bfloat16
        int m, int n, int k, int group) {
    extern __shared__ float partial[];  // (warps, TILES, SLICES, 16 rows, 8 batch rows)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int row_blocks = (m + 8 * SLICES - 1) / (8 * SLICES), rows = blockIdx.x % row_blocks;
    const int tile = blockIdx.x / row_blocks * TILES;
    const int g = lane >> 2, t = lane & 3;
    m -= 8 * SLICES * rows;  // rows left from this block's first
    x += (size_t)rows * 8 * SLICES * k;
    out += (size_t)rows * 8 * SLICES * n;
    const int chunks = k >> 6, groups = k / group, per_group = group >> 6;
    const int first = groups * warp / warps, last = groups * (warp + 1) / warps;
    const int begin = first * per_group, end = last * per_group;

    const uint4* wp = w + (size_t)tile * chunks * 32 + lane;
    const u32* szp = sz + (size_t)tile * groups * 16;
    const uint4* xp[SLICES];
    bool row[SLICES];
#pragma unroll
    for (int q = 0; q < SLICES; ++q) {
        xp[q] = reinterpret_cast<const uint4*>(x + (size_t)(8 * q + g) * k + 16 * t);
        row[q] = 8 * q + g < m;
    }
    const u32 ones = 0x3F803F80u;  // bfloat16 1.0, twice
    const uint4 zero4 = make_uint4(0, 0, 0, 0);

    // The next chunk's loads (every tile's codes and the activations) go out before this
    // chunk's arithmetic, so each warp keeps TILES + 1 loads of 512 bytes in flight.
    uint4 next[TILES], next_xa[SLICES], next_xb[SLICES];
#pragma unroll
    for (int i = 0; i < TILES; ++i)
        next[i] = begin < end ? wp[(size_t)i * chunks * 32 + begin * 32] : zero4;
#pragma unroll
    for (int q = 0; q < SLICES; ++q) {
        next_xa[q] = row[q] && begin < end ? xp[q][begin * 8] : zero4;
        next_xb[q] = row[q] && begin < end ? xp[q][begin * 8 + 1] : zero4;
    }

    // Each group's scales and zeros are loaded a group ahead too: waiting for them at the
    // group's end would stall every warp once per group.
    u32 next_lo[TILES], next_hi[TILES];
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
        const u32* pairs = szp + ((size_t)i * groups + first) * 16;
        next_lo[i] = first < last ? pairs[g] : 0u;
        next_hi[i] = first < last ? pairs[g + 8] : 0u;
    }

    float acc[TILES][SLICES][4] = {};
    for (int grp = first; grp < last; ++grp) {
        u32 lo[TILES], hi[TILES];
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
            lo[i] = next_lo[i];
            hi[i] = next_hi[i];
            if (grp + 1 < last) {
                const u32* pairs = szp + ((size_t)i * groups + grp + 1) * 16;
                next_lo[i] = pairs[g];
                next_hi[i] = pairs[g + 8];
            }
        }
        float c[TILES][SLICES][4] = {}, sum_x[SLICES][4] = {};
        for (int j = 0; j < per_group; ++j) {
            const int chunk = grp * per_group + j;
            uint4 codes[TILES];
#pragma unroll
            for (int i = 0; i < TILES; ++i) codes[i] = next[i];
            u32 xs[SLICES][8];
#pragma unroll
            for (int q = 0; q < SLICES; ++q) {
                const uint4 xa = next_xa[q], xb = next_xb[q];
                xs[q][0] = xa.x; xs[q][1] = xa.y; xs[q][2] = xa.z; xs[q][3] = xa.w;
                xs[q][4] = xb.x; xs[q][5] = xb.y; xs[q][6] = xb.z; xs[q][7] = xb.w;
            }
            if (chunk + 1 < end) {
#pragma unroll
                for (int i = 0; i < TILES; ++i)
                    next[i] = wp[(size_t)i * chunks * 32 + (chunk + 1) * 32];
#pragma unroll
                for (int q = 0; q < SLICES; ++q) {
                    if (row[q]) {
                        next_xa[q] = xp[q][(chunk + 1) * 8];
                        next_xb[q] = xp[q][(chunk + 1) * 8 + 1];
                    }
                }
            }
#pragma unroll
            for (int s = 0; s < 4; ++s) {
#pragma unroll
                for (int i = 0; i < TILES; ++i) {
                    const u32 word = s == 0   ? codes[i].x
                                     : s == 1 ? codes[i].y
                                     : s == 2 ? codes[i].z
                                              : codes[i].w;
                    const u32 a0 = to_bf16x2(word), a1 = to_bf16x2(word >> 4);
                    const u32 a2 = to_bf16x2(word >> 8), a3 = to_bf16x2(word >> 12);
#pragma unroll
                    for (int q = 0; q < SLICES; ++q)  // converted once for every slice
                        mma(c[i][q], a0, a1, a2, a3, xs[q][2 * s], xs[q][2 * s + 1]);
                }
#pragma unroll
                for (int q = 0; q < SLICES; ++q)
                    mma(sum_x[q], ones, ones, ones, ones, xs[q][2 * s], xs[q][2 * s + 1]);
            }
        }
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
            const float s_lo = bf16_lo(lo[i]), s_hi = bf16_lo(hi[i]);
            const float z_lo = bf16_hi(lo[i]) - 136.f * s_lo, z_hi = bf16_hi(hi[i]) - 136.f * s_hi;
#pragma unroll
            for (int q = 0; q < SLICES; ++q) {
                acc[i][q][0] += s_lo * c[i][q][0] + z_lo * sum_x[q][0];
                acc[i][q][1] += s_lo * c[i][q][1] + z_lo * sum_x[q][1];
                acc[i][q][2] += s_hi * c[i][q][2] + z_hi * sum_x[q][2];
                acc[i][q][3] += s_hi * c[i][q][3] + z_hi * sum_x[q][3];
            }
        }
    }
    // C fragment: acc[.][0..1] = (row g, batch rows 2t, 2t+1), [2..3] = (row g+8, same).
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int q = 0; q < SLICES; ++q) {
            float* mine = partial + ((warp * TILES + i) * SLICES + q) * 128;
            mine[g * 8 + 2 * t] = acc[i][q][0];
            mine[g * 8 + 2 * t + 1] = acc[i][q][1];
            mine[(g + 8) * 8 + 2 * t] = acc[i][q][2];
            mine[(g + 8) * 8 + 2 * t + 1] = acc[i][q][3];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILES * SLICES * 128; idx += blockDim.x) {
        const int i = idx / (SLICES * 128), q = (idx >> 7) % SLICES;
        const int r = (idx >> 3) & 15, b = 8 * q + (idx & 7);
        if (b >= m) continue;
        float total = 0.f;
        for (int v = 0; v < warps; ++v) total += partial[v * TILES * SLICES * 128 + idx];
        u16 bits;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(total));
        out[(size_t)b * n + (tile + i) * 16 + r] = bits;
    }
}

// The (n, k) bfloat16 matrix that the layout above stands for, (code - 8) * s + z rounded
// once: for products of many rows, which cuBLAS does faster. One thread per 16-byte load.
extern "C" __global__ void int4_mma_dequantize(
        const uint4* __restrict__ w, const u32* __restrict__ sz, u16* __restrict__ out,
        int n, int k, int group) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int chunks = k >> 6, groups = k / group;
    if (i >= (size_t)(n >> 4) * chunks * 32) return;
    const int lane = i & 31, g = lane >> 2, t = lane & 3;
    const int chunk = (i >> 5) % chunks, tile = (i >> 5) / chunks, grp = chunk * 64 / group;
    const uint4 codes = w[i];
    const u32 words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g and g + 8
        const u32 pair = sz[((size_t)tile * groups + grp) * 16 + g + 8 * h];
        const float s = bf16_lo(pair), z = bf16_hi(pair);
        u32 packed[8];
#pragma unroll
        for (int e = 0; e < 16; e += 2) {  // inputs 16 t + e, + e + 1: word e / 4
            u32 bits[2];
#pragma unroll
            for (int d = 0; d < 2; ++d) {
                const int el = (e + d) & 3, slot = h + 2 * (el >> 1) + 4 * (el & 1);
                const int code = (words[(e + d) >> 2] >> (4 * slot)) & 15;
                u16 b;
                asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"((code - 8) * s + z));
                bits[d] = b;
            }
            packed[e >> 1] = bits[0] | (bits[1] << 16);
        }
        uint4* row = reinterpret_cast<uint4*>(out + ((size_t)tile * 16 + g + 8 * h) * k
                                              + chunk * 64 + 16 * t);
        row[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        row[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
    }
}
