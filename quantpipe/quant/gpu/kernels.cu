// quantpipe GPU codec kernels (CUDA C++, compiled at run time by NVRTC through CuPy's RawModule).
//
// Same semantics as the numpy reference (quantpipe/quant/primitives.py + packing.py) and the numba
// kernels (quantpipe/quant/_kernels.py):
//   encode: t = (x - lo) * inv + 0.5, t = clamp(t, 0, L) (NaN -> 0), code = (int) t      (floor: t >= 0)
//   decode: y = code * step + lo
// every operation rounded separately (__fadd_rn / __fmul_rn never contract into an FMA), so the codes
// and floats are bit-identical to the CPU's. Bitstream: value i at stream bits [i*B, (i+1)*B), stream
// bit k = bit k % 8 of byte k / 8, the last byte zero-padded; 16 bits = little-endian uint16.
//
// Plain kernels: one thread per group of 8 values (8 values of B bits = B bytes, so every group starts
// on a byte boundary of the stream). Rotated kernels (the randomized Hadamard x @ R of
// quantpipe.quant.rotation.Rotation, fused with quantization): one warp per "unit" of 32 * Q values,
// each lane holding Q consecutive channels of one row: x * scaled_signs, the Walsh-Hadamard butterfly
// across the G lanes of a row (warp shuffles, the same adds and subtracts in the same order as the CPU's
// butterfly), the Q x Q base product (fmaf with +-1 entries: round(acc +- t), summed over k in order),
// then quantize; the codes go through shared memory so that the warp packs whole groups of 8.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

template <int B> struct CodeT { typedef u8 T; };
template <> struct CodeT<16> { typedef u16 T; };

template <int B>
__device__ __forceinline__ u32 quantize1(float v, float lo, float inv, u32 &nans) {
    const float L = (float)((1u << B) - 1u);
    nans += (v != v);
    float t = __fadd_rn(__fmul_rn(__fsub_rn(v, lo), inv), 0.5f);
    t = t > 0.0f ? t : 0.0f;  // also NaN -> 0
    t = t < L ? t : L;
    return (u32)t;
}

template <int B>
__device__ __forceinline__ void store_packed(u8 *__restrict__ out, long long g, u64 w, int keep);

// Store the packed group g (8 codes) at out + g * B bytes (B < 16) or g * 16 bytes (B == 16);
// `keep` = bytes of this group that lie inside the stream (all of them except in the last group).
template <int B>
__device__ __forceinline__ void store_group(u8 *__restrict__ out, long long g, const u32 (&c)[8], int keep) {
    if (B == 16) {
        u8 *dst = out + g * 16;
        if (keep >= 16) {
            uint4 w;
            w.x = c[0] | (c[1] << 16); w.y = c[2] | (c[3] << 16);
            w.z = c[4] | (c[5] << 16); w.w = c[6] | (c[7] << 16);
            *reinterpret_cast<uint4 *>(dst) = w;
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (i < keep) dst[i] = (u8)((c[i >> 1] >> ((i & 1) * 8)) & 0xFF);
        }
        return;
    }
    u64 w = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) w |= (u64)c[k] << (k * B);
    store_packed<B>(out, g, w, keep);
}

// Store the B bytes of packed group g (B < 16), `keep` of them inside the stream.
template <int B>
__device__ __forceinline__ void store_packed(u8 *__restrict__ out, long long g, u64 w, int keep) {
    u8 *dst = out + g * B;
    if (keep >= B) {
        if (B == 1) { *dst = (u8)w; return; }
        if (B == 2) { *reinterpret_cast<u16 *>(dst) = (u16)w; return; }
        if (B == 4) { *reinterpret_cast<u32 *>(dst) = (u32)w; return; }
        if (B == 8) { *reinterpret_cast<u64 *>(dst) = w; return; }
        if (B == 6) {
            u16 *d16 = reinterpret_cast<u16 *>(dst);  // g * 6 is even
            d16[0] = (u16)w; d16[1] = (u16)(w >> 16); d16[2] = (u16)(w >> 32);
            return;
        }
#pragma unroll
        for (int i = 0; i < B; ++i) dst[i] = (u8)(w >> (8 * i));
    } else {
        for (int i = 0; i < keep; ++i) dst[i] = (u8)(w >> (8 * i));
    }
}

// Load group g's codes (the mirror of store_group); bytes past `keep` read as zero.
template <int B>
__device__ __forceinline__ void load_group(const u8 *__restrict__ in, long long g, u32 (&c)[8], int keep) {
    if (B == 16) {
        const u8 *src = in + g * 16;
        if (keep >= 16) {
            uint4 w = *reinterpret_cast<const uint4 *>(src);
            c[0] = w.x & 0xFFFF; c[1] = w.x >> 16; c[2] = w.y & 0xFFFF; c[3] = w.y >> 16;
            c[4] = w.z & 0xFFFF; c[5] = w.z >> 16; c[6] = w.w & 0xFFFF; c[7] = w.w >> 16;
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) c[k] = 0;
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if (i < keep) c[i >> 1] |= (u32)src[i] << ((i & 1) * 8);
        }
        return;
    }
    const u8 *src = in + g * B;
    u64 w = 0;
    if (keep >= B) {
        if (B == 1) w = *src;
        else if (B == 2) w = *reinterpret_cast<const u16 *>(src);
        else if (B == 4) w = *reinterpret_cast<const u32 *>(src);
        else if (B == 8) w = *reinterpret_cast<const u64 *>(src);
        else if (B == 6) {
            const u16 *s16 = reinterpret_cast<const u16 *>(src);
            w = (u64)s16[0] | ((u64)s16[1] << 16) | ((u64)s16[2] << 32);
        } else {
#pragma unroll
            for (int i = 0; i < B; ++i) w |= (u64)src[i] << (8 * i);
        }
    } else {
        for (int i = 0; i < keep; ++i) w |= (u64)src[i] << (8 * i);
    }
    const u64 mask = (1ull << B) - 1ull;
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = (u32)((w >> (k * B)) & mask);
}

template <int B>
__device__ __forceinline__ int group_keep(long long g, long long nbytes) {
    const int gb = (B == 16) ? 16 : B;
    long long left = nbytes - g * gb;
    return left >= gb ? gb : (int)left;
}

__device__ __forceinline__ void add_nans(u32 nans, u32 *nan_count) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) nans += __shfl_xor_sync(0xFFFFFFFFu, nans, o);
    if ((threadIdx.x & 31) == 0 && nans) atomicAdd(nan_count, nans);
}

// ------------------------------------------------------------------------------------------- plain
// x: n float32 values (16-byte aligned), channel of value i = i % C (C = 1: per tensor). Each lane
// handles 4 values (one float4: a warp reads 512 contiguous bytes per load); the two lanes of a group
// of 8 combine their codes with one shuffle and the even lane stores the group's B bytes. At 16 bits
// every lane stores its own 8 bytes.
template <int B>
__global__ void enc_plain(const float *__restrict__ x, long long n, const float *__restrict__ lo,
                          const float *__restrict__ inv, int C, u8 *__restrict__ out, long long nbytes,
                          u32 *__restrict__ nan_count) {
    const long long quads = (n + 3) >> 2;
    u32 nans = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    // every lane runs the same number of iterations (shuffles and the NaN reduction need all of them)
    for (long long f0 = (long long)blockIdx.x * blockDim.x; f0 < quads; f0 += stride) {
        const long long f = f0 + threadIdx.x;
        const bool valid = f < quads;
        const long long i0 = f << 2;
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (valid) {
            if (i0 + 4 <= n) {
                float4 a = reinterpret_cast<const float4 *>(x)[f];
                v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            } else {
                for (int k = 0; k < 4; ++k) v[k] = (i0 + k < n) ? x[i0 + k] : 0.0f;
            }
        }
        int c = (C == 1 || !valid) ? 0 : (int)(i0 % C);
        u64 w = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            u32 code = quantize1<B>(v[k], __ldg(lo + c), __ldg(inv + c), nans);
            w |= (u64)((valid && i0 + k < n) ? code : 0u) << (k * B);
            if (++c == C) c = 0;
        }
        if (B == 16) {
            if (valid) {
                long long left = nbytes - f * 8;
                u8 *dst = out + f * 8;
                if (left >= 8) {
                    *reinterpret_cast<u64 *>(dst) = w;
                } else {
                    for (int i = 0; i < 8; ++i) if (i < left) dst[i] = (u8)(w >> (8 * i));
                }
            }
        } else {
            const u32 mine = (u32)w;  // 4 codes of <= 8 bits
            const u32 partner = __shfl_down_sync(0xFFFFFFFFu, mine, 1);
            if (valid && (f & 1) == 0) {
                const u64 group = (u64)mine | ((u64)partner << (4 * B));
                const long long g = f >> 1;
                store_packed<B>(out, g, group, group_keep<B>(g, nbytes));
            }
        }
    }
    add_nans(nans, nan_count);
}

template <int B>
__global__ void dec_plain(const u8 *__restrict__ in, long long n, long long nbytes, const float *__restrict__ step,
                          const float *__restrict__ lo, int C, float *__restrict__ y) {
    const long long quads = (n + 3) >> 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long f = (long long)blockIdx.x * blockDim.x + threadIdx.x; f < quads; f += stride) {
        const long long i0 = f << 2;
        u32 q[4];
        if (B == 16) {
            long long left = nbytes - f * 8;
            const u8 *src = in + f * 8;
            u64 w = 0;
            if (left >= 8) {
                w = *reinterpret_cast<const u64 *>(src);
            } else {
                for (int i = 0; i < 8; ++i) if (i < left) w |= (u64)src[i] << (8 * i);
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) q[k] = (u32)((w >> (16 * k)) & 0xFFFF);
        } else {
            u32 q8[8];
            const long long g = f >> 1;
            load_group<B>(in, g, q8, group_keep<B>(g, nbytes));
#pragma unroll
            for (int k = 0; k < 4; ++k) q[k] = (f & 1) ? q8[4 + k] : q8[k];
        }
        int c = (C == 1) ? 0 : (int)(i0 % C);
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[k] = __fadd_rn(__fmul_rn((float)q[k], __ldg(step + c)), __ldg(lo + c));
            if (++c == C) c = 0;
        }
        if (i0 + 4 <= n) {
            reinterpret_cast<float4 *>(y)[f] = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            for (int k = 0; k < 4; ++k) if (i0 + k < n) y[i0 + k] = v[k];
        }
    }
}

// Count NaNs (the 32-bit path refuses NaN like the CPU codec).
__global__ void count_nan(const float *__restrict__ x, long long n, u32 *__restrict__ nan_count) {
    u32 nans = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i0 = (long long)blockIdx.x * blockDim.x; i0 < n; i0 += stride) {
        long long i = i0 + threadIdx.x;
        if (i < n) { float v = x[i]; nans += (v != v); }
    }
    add_nans(nans, nan_count);
}

#ifdef QP_ROT
// ----------------------------------------------------------------------------------------- rotated
// Compiled once per (Q, P) with the Q x Q base matrix (+-1 entries) as a literal, defined by the module's
// prefix: `#define Q`, `#define P` and `__constant__ float c_base[Q * Q]` (row-major).
//
// A row of C = G * Q channels is G butterfly groups of Q contiguous values. Each lane holds P
// consecutive groups (V = P * Q values): P = 1 when G <= 32 (a row spans G lanes, a warp holds 32 / G
// rows), P = G / 32 when G > 32 (a row spans the warp). Butterfly stage h (ascending, as on the CPU) pairs
// group g with g ^ h: inside a lane's registers for h < P, across lanes (shuffle xor h / P) for h >= P.
// A unit = the 32 * V values a warp holds; WARPS warps per block.
#define WARPS 4
#define V (P * Q)

__device__ __forceinline__ void butterfly(float (&t)[V], int lane_in_row, int G) {
#pragma unroll
    for (int h = 1; h < P; h <<= 1) {
#pragma unroll
        for (int s = 0; s < P; ++s) {
            if (s & h) continue;
#pragma unroll
            for (int j = 0; j < Q; ++j) {
                const float u = t[s * Q + j], w = t[(s ^ h) * Q + j];
                t[s * Q + j] = __fadd_rn(u, w);
                t[(s ^ h) * Q + j] = __fsub_rn(u, w);
            }
        }
    }
    for (int h = P; h < G; h <<= 1) {
        const bool bottom = ((lane_in_row * P) & h) != 0;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const float p = __shfl_xor_sync(0xFFFFFFFFu, t[i], h / P);
            t[i] = bottom ? __fsub_rn(p, t[i]) : __fadd_rn(t[i], p);
        }
    }
}

// The lane's V values of unit u, prefetched into registers (float4 i of the unit at lane + 32 * i) while
// the previous unit is computed; bounds-checked for the last, partial unit.
__device__ __forceinline__ void prefetch(const float *__restrict__ x, long long n, long long u, int lane,
                                         float4 (&pf)[V / 4]) {
    const float *src = x + u * (32LL * V);
    const long long m = n - u * (32LL * V);
    if (m >= 32 * V) {
#pragma unroll
        for (int i = 0; i < V / 4; ++i) pf[i] = reinterpret_cast<const float4 *>(src)[lane + 32 * i];
    } else {
#pragma unroll
        for (int i = 0; i < V / 4; ++i) {
            const long long e = 4LL * (lane + 32 * i);
            pf[i] = make_float4(e < m ? src[e] : 0.0f, e + 1 < m ? src[e + 1] : 0.0f, e + 2 < m ? src[e + 2] : 0.0f,
                                e + 3 < m ? src[e + 3] : 0.0f);
        }
    }
}

// Block-wide per-channel tables in shared memory (C <= 32 * V): fewer registers, more warps in flight.
__device__ __forceinline__ void load_tables(float *s_a, float *s_b, float *s_c, const float *a, const float *b,
                                            const float *c, int C, int per_channel) {
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        s_a[i] = a[i];
        s_b[i] = b[per_channel ? i : 0];
        s_c[i] = c[per_channel ? i : 0];
    }
    __syncthreads();
}

template <int B>
__global__ void __launch_bounds__(32 * WARPS) enc_rot(const float *__restrict__ x, long long rows, int C, int G,
                        const float *__restrict__ ssign, const float *__restrict__ lo, const float *__restrict__ inv,
                        int per_channel, u8 *__restrict__ out, long long nbytes, u32 *__restrict__ nan_count) {
    typedef typename CodeT<B>::T code_t;
    __shared__ code_t smem[WARPS][32 * V];
    __shared__ __align__(16) float fsm[WARPS][32 * V];
    __shared__ __align__(16) float s_sg[32 * V], s_lo[32 * V], s_inv[32 * V];
    load_tables(s_sg, s_lo, s_inv, ssign, lo, inv, C, per_channel);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int lanes_per_row = G / P;
    const int rpu = 32 / lanes_per_row;
    const long long units = (rows + rpu - 1) / rpu;
    const int lr = lane % lanes_per_row;
    const long long n = rows * (long long)C;
    u32 nans = 0;
    const long long ustride = (long long)gridDim.x * WARPS;
    float4 pf[V / 4];
    long long u = (long long)blockIdx.x * WARPS + wid;
    if (u < units) prefetch(x, n, u, lane, pf);
    for (; u < units; u += ustride) {
        const long long r = u * rpu + lane / lanes_per_row;
        const bool valid = r < rows;
        const long long m = n - u * (32LL * V);  // values of this unit inside the tensor (may exceed 32V)
        float *fs = fsm[wid];
#pragma unroll
        for (int i = 0; i < V / 4; ++i) reinterpret_cast<float4 *>(fs)[lane + 32 * i] = pf[i];
        __syncwarp();
        if (u + ustride < units) prefetch(x, n, u + ustride, lane, pf);  // in flight while this unit computes
        float t[V];
#pragma unroll
        for (int i = 0; i < V; i += 4) {
            float4 a = reinterpret_cast<const float4 *>(fs + lane * V)[i / 4];
            float4 sg = reinterpret_cast<const float4 *>(s_sg + lr * V)[i / 4];
            t[i] = __fmul_rn(a.x, sg.x); t[i + 1] = __fmul_rn(a.y, sg.y);
            t[i + 2] = __fmul_rn(a.z, sg.z); t[i + 3] = __fmul_rn(a.w, sg.w);
        }
        butterfly(t, lr, G);
        code_t *codes = smem[wid] + lane * V;
#pragma unroll
        for (int s = 0; s < P; ++s) {
#pragma unroll
            for (int j = 0; j < Q; ++j) {
                float acc = __fmul_rn(t[s * Q], c_base[j]);
#pragma unroll
                for (int k = 1; k < Q; ++k) acc = __fmaf_rn(t[s * Q + k], c_base[k * Q + j], acc);
                u32 code = quantize1<B>(acc, s_lo[lr * V + s * Q + j], s_inv[lr * V + s * Q + j], nans);
                codes[s * Q + j] = valid ? (code_t)code : (code_t)0;
            }
        }
        __syncwarp();
        // pack the unit's 4 * V groups of 8 codes
        const long long g_first = u * (4LL * V);
        for (int gi = lane; gi < 4 * V; gi += 32) {
            if ((long long)gi * 8 >= m) break;
            u32 q[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) q[k] = smem[wid][gi * 8 + k];
            store_group<B>(out, g_first + gi, q, group_keep<B>(g_first + gi, nbytes));
        }
        __syncwarp();
    }
    add_nans(nans, nan_count);
}

template <int B>
__global__ void __launch_bounds__(32 * WARPS) dec_rot(const u8 *__restrict__ in, long long rows, int C, int G,
                        const float *__restrict__ ssign, const float *__restrict__ step, const float *__restrict__ lo,
                        int per_channel, long long nbytes, float *__restrict__ y) {
    typedef typename CodeT<B>::T code_t;
    __shared__ code_t smem[WARPS][32 * V];
    __shared__ __align__(16) float fsm[WARPS][32 * V];
    __shared__ __align__(16) float s_sg[32 * V], s_lo[32 * V], s_st[32 * V];
    load_tables(s_sg, s_lo, s_st, ssign, lo, step, C, per_channel);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int lanes_per_row = G / P;
    const int rpu = 32 / lanes_per_row;
    const long long units = (rows + rpu - 1) / rpu;
    const int lr = lane % lanes_per_row;
    const long long n = rows * (long long)C;
    const float *sg = s_sg + lr * V, *lo_r = s_lo + lr * V, *st_r = s_st + lr * V;
    for (long long u = (long long)blockIdx.x * WARPS + wid; u < units; u += (long long)gridDim.x * WARPS) {
        const long long g_first = u * (4LL * V);
        const long long m = n - u * (32LL * V);
        for (int gi = lane; gi < 4 * V; gi += 32) {
            u32 q[8];
            if ((long long)gi * 8 < m) {
                load_group<B>(in, g_first + gi, q, group_keep<B>(g_first + gi, nbytes));
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) q[k] = 0;
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) smem[wid][gi * 8 + k] = (code_t)q[k];
        }
        __syncwarp();
        float v[V], t[V];
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = __fadd_rn(__fmul_rn((float)smem[wid][lane * V + i], st_r[i]), lo_r[i]);
        __syncwarp();
        // per group: y @ base.T, t[j] = sum_k v[k] * base[j][k]
#pragma unroll
        for (int s = 0; s < P; ++s) {
#pragma unroll
            for (int j = 0; j < Q; ++j) {
                float acc = __fmul_rn(v[s * Q], c_base[j * Q]);
#pragma unroll
                for (int k = 1; k < Q; ++k) acc = __fmaf_rn(v[s * Q + k], c_base[j * Q + k], acc);
                t[s * Q + j] = acc;
            }
        }
        butterfly(t, lr, G);
        float *fs = fsm[wid];
#pragma unroll
        for (int i = 0; i < V; i += 4)
            reinterpret_cast<float4 *>(fs + lane * V)[i / 4] =
                make_float4(__fmul_rn(t[i], sg[i]), __fmul_rn(t[i + 1], sg[i + 1]), __fmul_rn(t[i + 2], sg[i + 2]),
                            __fmul_rn(t[i + 3], sg[i + 3]));
        __syncwarp();
        float *dst = y + u * (32LL * V);
        if (m >= 32 * V) {
            for (int i = lane; i < 8 * V; i += 32) reinterpret_cast<float4 *>(dst)[i] = reinterpret_cast<const float4 *>(fs)[i];
        } else {
            for (int i = lane; i < 32 * V && i < m; i += 32) dst[i] = fs[i];
        }
        __syncwarp();
    }
}
#endif  // QP_ROT

#ifdef QP_TILED
// ------------------------------------------------------------------------------- rotated, tiled
// The same transform and arithmetic as the warp kernels above (x * scaled_signs, the butterfly over the
// G = 2^LOG_G groups in ascending stages, the Q x Q base product summed over k in order, quantize), but
// a block works on a tile of R rows staged in shared memory, and each phase maps threads to the data the
// way that phase needs it, so the butterfly runs in registers instead of through warp shuffles.
// Encode:
//   load   float4 reads of the tile, times the signs; the stages of the FIRST_BITS low group bits
//          (adjacent groups, G > 32 only) in registers; into the tile (row stride SROW floats);
//   wht    per (row, channel j, low group bits): the values of the top LAST_BITS (<= 5) bits' groups in
//          registers, their stages in order;
//   base   per (row, 8-value-aligned unit of 1 or 2 groups): the base product, quantization, packing,
//          stores of whole groups of 8 codes.
// Decode mirrors it: unpack + dequantize into the tile; per (row, block of 2^FIRST_BITS adjacent groups)
// the transposed base product and the low stages; the top stages; times the signs, coalesced stores.
// Compiled once per (Q, LOG_G) with `#define Q`, `#define LOG_G`, `#define SROW` and
// `__constant__ float c_base[Q * Q]` in the module's prefix. SROW (>= C, a multiple of 4) makes the top
// butterfly pass free of shared-memory bank conflicts. C must be a multiple of 8 and LOG_G <= 7. R and
// the block size are launch parameters; the dynamic shared memory is R * SROW floats. Rows past the
// tensor's end (the last tile) are neither loaded nor computed.
#define TG (1 << LOG_G)
#define TC (TG * Q)
#define LAST_BITS (LOG_G < 5 ? LOG_G : 5)
#define FIRST_BITS (LOG_G - LAST_BITS)
#define FB (1 << FIRST_BITS)
#define UNIT ((Q % 8) == 0 ? 1 : 2)  // groups per encode item, so that it starts on a group of 8 codes
#define S8 (UNIT * Q / 8)  // groups of 8 codes per encode unit (1 to 7)
#define LU (FB >= 4 ? 1 : 4 / FB)  // load items in flight per thread (float4 loads: LU * FB)

// The butterfly stages over M values in registers, ascending (stage h pairs m with m | h: top u + v,
// bottom u - v); on float4 values, the same for each component.
__device__ __forceinline__ float bf_add(float u, float v) { return __fadd_rn(u, v); }
__device__ __forceinline__ float bf_sub(float u, float v) { return __fsub_rn(u, v); }
__device__ __forceinline__ float4 bf_add(float4 u, float4 v) {
    return make_float4(__fadd_rn(u.x, v.x), __fadd_rn(u.y, v.y), __fadd_rn(u.z, v.z), __fadd_rn(u.w, v.w));
}
__device__ __forceinline__ float4 bf_sub(float4 u, float4 v) {
    return make_float4(__fsub_rn(u.x, v.x), __fsub_rn(u.y, v.y), __fsub_rn(u.z, v.z), __fsub_rn(u.w, v.w));
}

template <typename T, int M>
__device__ __forceinline__ void butterfly_regs(T (&t)[M]) {
#pragma unroll
    for (int h = 1; h < M; h <<= 1) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m & h) continue;
            const T u = t[m], v = t[m | h];
            t[m] = bf_add(u, v);
            t[m | h] = bf_sub(u, v);
        }
    }
}

// Butterfly stages of group-index bits [A, A + K), ascending, over the tile's `rows` rows.
template <int A, int K>
__device__ __forceinline__ void tiled_wht(float *__restrict__ tile, int rows) {
    constexpr int M = 1 << K;
    constexpr int PER_ROW = Q * ((TG >> K) > 0 ? (TG >> K) : 1);  // (K > LOG_G only in the unused instance when G = 1)
    const int items = rows * PER_ROW;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
        const int row = it / PER_ROW, w = it - row * PER_ROW;
        const int j = w % Q, o = w / Q;
        const int g0 = (o & ((1 << A) - 1)) | ((o >> A) << (A + K));
        float *base = tile + row * SROW + g0 * Q + j;
        float t[M];
#pragma unroll
        for (int m = 0; m < M; ++m) t[m] = base[(m << A) * Q];
        butterfly_regs(t);
#pragma unroll
        for (int m = 0; m < M; ++m) base[(m << A) * Q] = t[m];
    }
}

__device__ __forceinline__ float4 table4(const float *__restrict__ a, int c, int per_channel) {
    if (per_channel) return __ldg(reinterpret_cast<const float4 *>(a + c));
    const float v = __ldg(a);
    return make_float4(v, v, v, v);
}

// The Q values of one group from the tile (16-byte aligned), as float4 loads.
__device__ __forceinline__ void load_group_values(const float *__restrict__ p, float (&t)[Q]) {
#pragma unroll
    for (int i = 0; i < Q; i += 4) {
        const float4 a = *reinterpret_cast<const float4 *>(p + i);
        t[i] = a.x; t[i + 1] = a.y; t[i + 2] = a.z; t[i + 3] = a.w;
    }
}

__device__ __forceinline__ float4 mul4(float4 a, float4 b) {
    return make_float4(__fmul_rn(a.x, b.x), __fmul_rn(a.y, b.y), __fmul_rn(a.z, b.z), __fmul_rn(a.w, b.w));
}

// One group of 8 codes of an encode unit (UNIT groups starting at tile pointer p, channel c0): outputs
// v = 8 * S .. 8 * S + 7 of the unit, each the base product of its group (the 1 or 2 groups those
// outputs lie in are read from the tile), quantized and stored as packed group g8. S is a template
// argument so that every index below is a compile-time constant; S >= S8 (no such part) does nothing.
template <int B, int S>
__device__ __forceinline__ void enc_part(const float *__restrict__ p, int c0, const float *__restrict__ lo,
                                         const float *__restrict__ inv, int per_channel, u8 *__restrict__ out,
                                         long long g8, int keep, u32 &nans) {
    if (S >= S8) return;
    constexpr int G_LO = (8 * S) / Q, G_HI = (8 * S + 7) / Q;
    float t[2][Q];
#pragma unroll
    for (int g = G_LO; g <= G_HI; ++g) load_group_values(p + g * Q, t[g - G_LO]);
    const float4 l0 = table4(lo, c0 + 8 * S, per_channel), l1 = table4(lo, c0 + 8 * S + 4, per_channel);
    const float4 i0 = table4(inv, c0 + 8 * S, per_channel), i1 = table4(inv, c0 + 8 * S + 4, per_channel);
    const float ls[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
    const float is[8] = {i0.x, i0.y, i0.z, i0.w, i1.x, i1.y, i1.z, i1.w};
    u32 q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int v = 8 * S + i, g = v / Q - G_LO, j = v % Q;
        float acc = __fmul_rn(t[g][0], c_base[j]);
#pragma unroll
        for (int k = 1; k < Q; ++k) acc = __fmaf_rn(t[g][k], c_base[k * Q + j], acc);
        q[i] = quantize1<B>(acc, ls[i], is[i], nans);
    }
    store_group<B>(out, g8, q, keep);
}

template <int B>
__global__ void enc_tiled(const float *__restrict__ x, long long rows, int R, const float *__restrict__ ssign,
                          const float *__restrict__ lo, const float *__restrict__ inv, int per_channel,
                          u8 *__restrict__ out, long long nbytes, u32 *__restrict__ nan_count) {
    extern __shared__ __align__(16) unsigned char tsm[];
    float *tile = reinterpret_cast<float *>(tsm);
    const long long tiles = (rows + R - 1) / R;
    u32 nans = 0;
    for (long long tl = blockIdx.x; tl < tiles; tl += gridDim.x) {
        const long long row0 = tl * R;
        const int nrows = (int)((rows - row0) < R ? (rows - row0) : R);
        const float *src = x + row0 * TC;
        // load: item = (row, block of FB adjacent groups, float4 k of a group); each thread issues the
        // loads of LU items before it uses any, so that a tile costs one global latency, not several
        constexpr int PER_ROW0 = (TG / FB) * (Q / 4);
        const int n0 = nrows * PER_ROW0;
        for (int it0 = threadIdx.x; it0 < n0; it0 += LU * blockDim.x) {
            float4 a[LU][FB];
#pragma unroll
            for (int l = 0; l < LU; ++l) {
                const int it = it0 + l * blockDim.x;
                if (it >= n0) continue;
                const int row = it / PER_ROW0, w = it - row * PER_ROW0;
                const int gb = w / (Q / 4), k = w - gb * (Q / 4);
#pragma unroll
                for (int m = 0; m < FB; ++m)
                    a[l][m] = *reinterpret_cast<const float4 *>(src + row * TC + gb * FB * Q + 4 * k + m * Q);
            }
#pragma unroll
            for (int l = 0; l < LU; ++l) {
                const int it = it0 + l * blockDim.x;
                if (it >= n0) continue;
                const int row = it / PER_ROW0, w = it - row * PER_ROW0;
                const int gb = w / (Q / 4), k = w - gb * (Q / 4);
                const int c0 = gb * FB * Q + 4 * k;
#pragma unroll
                for (int m = 0; m < FB; ++m) a[l][m] = mul4(a[l][m], __ldg(reinterpret_cast<const float4 *>(ssign + c0 + m * Q)));
                butterfly_regs(a[l]);  // the low group bits (FB adjacent groups), each component
#pragma unroll
                for (int m = 0; m < FB; ++m) *reinterpret_cast<float4 *>(tile + row * SROW + c0 + m * Q) = a[l][m];
            }
        }
        __syncthreads();
        if (LAST_BITS > 0) {
            tiled_wht<FIRST_BITS, (LAST_BITS > 0 ? LAST_BITS : 1)>(tile, nrows);
            __syncthreads();
        }
        // base + quantize + pack: item = (unit of UNIT groups, s-th group of 8 codes of it). The 32 lanes
        // of a warp take 32 units and the same s, so that s is uniform and enc_part's indices constant.
        constexpr int PER_ROW2 = TG / UNIT;
        const int n_units = nrows * PER_ROW2;
        const int n2 = ((n_units + 31) / 32) * 32 * S8;
        for (int it = threadIdx.x; it < n2; it += blockDim.x) {
            const int w = it >> 5, part = w % S8, unit = (w / S8) * 32 + (it & 31);
            if (unit >= n_units) continue;
            const int row = unit / PER_ROW2, u = unit - row * PER_ROW2;
            const float *p = tile + row * SROW + u * UNIT * Q;
            const int c0 = u * UNIT * Q;
            const long long g8 = ((row0 + row) * TC + c0) / 8 + part;
            const int keep = group_keep<B>(g8, nbytes);
            switch (part) {  // parts past S8 - 1 compile to nothing
                case 0: enc_part<B, 0>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
                case 1: enc_part<B, 1>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
                case 2: enc_part<B, 2>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
                case 3: enc_part<B, 3>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
                case 4: enc_part<B, 4>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
                case 5: enc_part<B, 5>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
                default: enc_part<B, 6>(p, c0, lo, inv, per_channel, out, g8, keep, nans); break;
            }
        }
        __syncthreads();
    }
    add_nans(nans, nan_count);
}

template <int B>
__global__ void dec_tiled(const u8 *__restrict__ in, long long rows, int R, const float *__restrict__ ssign,
                          const float *__restrict__ step, const float *__restrict__ lo, int per_channel,
                          long long nbytes, float *__restrict__ y) {
    extern __shared__ __align__(16) unsigned char tsm[];
    float *tile = reinterpret_cast<float *>(tsm);
    const long long tiles = (rows + R - 1) / R;
    for (long long tl = blockIdx.x; tl < tiles; tl += gridDim.x) {
        const long long row0 = tl * R;
        const int nrows = (int)((rows - row0) < R ? (rows - row0) : R);
        const long long g_first = row0 * TC / 8;
        for (int k = threadIdx.x; k < nrows * TC / 8; k += blockDim.x) {
            u32 q[8];
            load_group<B>(in, g_first + k, q, group_keep<B>(g_first + k, nbytes));
            const int f = k * 8, row = f / TC, c = f - row * TC;  // 8 values of one row (C % 8 == 0)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float4 s4 = table4(step, c + 4 * h, per_channel), l4 = table4(lo, c + 4 * h, per_channel);
                *reinterpret_cast<float4 *>(tile + row * SROW + c + 4 * h) = make_float4(
                    __fadd_rn(__fmul_rn((float)q[h * 4], s4.x), l4.x), __fadd_rn(__fmul_rn((float)q[h * 4 + 1], s4.y), l4.y),
                    __fadd_rn(__fmul_rn((float)q[h * 4 + 2], s4.z), l4.z), __fadd_rn(__fmul_rn((float)q[h * 4 + 3], s4.w), l4.w));
            }
        }
        __syncthreads();
        // per block of FB adjacent groups: y @ base.T (t[j] = sum_k v[k] * base[j][k]), then the low stages
        constexpr int PER_ROW2 = TG / FB;
        for (int it = threadIdx.x; it < nrows * PER_ROW2; it += blockDim.x) {
            const int row = it / PER_ROW2, gb = it - row * PER_ROW2;
            float *p = tile + row * SROW + gb * FB * Q;
            float r[FB][Q];
#pragma unroll
            for (int m = 0; m < FB; ++m) {
                float v[Q];
                load_group_values(p + m * Q, v);
#pragma unroll
                for (int j = 0; j < Q; ++j) {
                    float acc = __fmul_rn(v[0], c_base[j * Q]);
#pragma unroll
                    for (int k = 1; k < Q; ++k) acc = __fmaf_rn(v[k], c_base[j * Q + k], acc);
                    r[m][j] = acc;
                }
            }
#pragma unroll
            for (int j = 0; j < Q; ++j) {  // the low group bits (FB adjacent groups)
                float t[FB];
#pragma unroll
                for (int m = 0; m < FB; ++m) t[m] = r[m][j];
                butterfly_regs(t);
#pragma unroll
                for (int m = 0; m < FB; ++m) r[m][j] = t[m];
            }
#pragma unroll
            for (int m = 0; m < FB; ++m)
#pragma unroll
                for (int i = 0; i < Q; i += 4)
                    *reinterpret_cast<float4 *>(p + m * Q + i) = make_float4(r[m][i], r[m][i + 1], r[m][i + 2], r[m][i + 3]);
        }
        __syncthreads();
        if (LAST_BITS > 0) {
            tiled_wht<FIRST_BITS, (LAST_BITS > 0 ? LAST_BITS : 1)>(tile, nrows);
            __syncthreads();
        }
        float4 *dst = reinterpret_cast<float4 *>(y + row0 * TC);
        for (int i = threadIdx.x; i < nrows * (TC / 4); i += blockDim.x) {
            const int row = i / (TC / 4), c = (i - row * (TC / 4)) * 4;
            dst[i] = mul4(*reinterpret_cast<const float4 *>(tile + row * SROW + c),
                          __ldg(reinterpret_cast<const float4 *>(ssign + c)));
        }
        __syncthreads();
    }
}
#endif  // QP_TILED
