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
// x: n float32 values (16-byte aligned), channel of value i = i % C (C = 1: per tensor).
template <int B>
__global__ void enc_plain(const float *__restrict__ x, long long n, const float *__restrict__ lo,
                          const float *__restrict__ inv, int C, u8 *__restrict__ out, long long nbytes,
                          u32 *__restrict__ nan_count) {
    const long long groups = (n + 7) >> 3;
    u32 nans = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    // every lane runs the same number of iterations, so the warp reduction below sees all lanes
    for (long long g0 = (long long)blockIdx.x * blockDim.x; g0 < groups; g0 += stride) {
        long long g = g0 + threadIdx.x;
        if (g < groups) {
            const long long i0 = g << 3;
            float v[8];
            if (i0 + 8 <= n) {
                float4 a = reinterpret_cast<const float4 *>(x)[2 * g];
                float4 b = reinterpret_cast<const float4 *>(x)[2 * g + 1];
                v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] = (i0 + k < n) ? x[i0 + k] : 0.0f;
            }
            int c = (C == 1) ? 0 : (int)(i0 % C);
            u32 q[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                u32 code = quantize1<B>(v[k], __ldg(lo + c), __ldg(inv + c), nans);
                q[k] = (i0 + k < n) ? code : 0u;
                if (++c == C) c = 0;
            }
            store_group<B>(out, g, q, group_keep<B>(g, nbytes));
        }
    }
    add_nans(nans, nan_count);
}

template <int B>
__global__ void dec_plain(const u8 *__restrict__ in, long long n, long long nbytes, const float *__restrict__ step,
                          const float *__restrict__ lo, int C, float *__restrict__ y) {
    const long long groups = (n + 7) >> 3;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const long long i0 = g << 3;
        u32 q[8];
        load_group<B>(in, g, q, group_keep<B>(g, nbytes));
        int c = (C == 1) ? 0 : (int)(i0 % C);
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            v[k] = __fadd_rn(__fmul_rn((float)q[k], __ldg(step + c)), __ldg(lo + c));
            if (++c == C) c = 0;
        }
        if (i0 + 8 <= n) {
            reinterpret_cast<float4 *>(y)[2 * g] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4 *>(y)[2 * g + 1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            for (int k = 0; k < 8 && i0 + k < n; ++k) y[i0 + k] = v[k];
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
// Compiled once per base order Q with the Q x Q base matrix (+-1 entries) as a literal, defined by the
// module's prefix: `__constant__ float c_base[Q * Q]` (row-major).
// Rows of C = G * Q channels; a unit = 32 / G rows = 32 * Q values; lane l of a unit holds channels
// (l % G) * Q .. + Q of row l / G, i.e. the unit's values l * Q .. l * Q + Q. WARPS warps per block.
#define WARPS 4

template <int B>
__global__ void __launch_bounds__(32 * WARPS) enc_rot(const float *__restrict__ x, long long rows, int C, int G,
                        const float *__restrict__ ssign, const float *__restrict__ lo, const float *__restrict__ inv,
                        int per_channel, u8 *__restrict__ out, long long nbytes, u32 *__restrict__ nan_count) {
    typedef typename CodeT<B>::T code_t;
    __shared__ code_t smem[WARPS][32 * Q];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int rpu = 32 / G;
    const long long units = (rows + rpu - 1) / rpu;
    const int g = lane % G;
    const long long n = rows * (long long)C;
    u32 nans = 0;
    float sg[Q], lo_r[Q], inv_r[Q];
#pragma unroll
    for (int j = 0; j < Q; ++j) {
        const int c = per_channel ? g * Q + j : 0;
        sg[j] = ssign[g * Q + j]; lo_r[j] = lo[c]; inv_r[j] = inv[c];
    }
    for (long long u = (long long)blockIdx.x * WARPS + wid; u < units; u += (long long)gridDim.x * WARPS) {
        const long long r = u * rpu + lane / G;
        const bool valid = r < rows;
        float t[Q];
        if (valid) {
            const float *src = x + r * C + g * Q;
            if ((Q & 3) == 0 && (C & 3) == 0) {
#pragma unroll
                for (int j = 0; j < Q; j += 4) {
                    float4 a = *reinterpret_cast<const float4 *>(src + j);
                    t[j] = a.x; t[j + 1] = a.y; t[j + 2] = a.z; t[j + 3] = a.w;
                }
            } else {
#pragma unroll
                for (int j = 0; j < Q; ++j) t[j] = src[j];
            }
        } else {
#pragma unroll
            for (int j = 0; j < Q; ++j) t[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < Q; ++j) t[j] = __fmul_rn(t[j], sg[j]);
        for (int h = 1; h < G; h <<= 1) {
            const bool bottom = (g & h) != 0;
#pragma unroll
            for (int j = 0; j < Q; ++j) {
                float p = __shfl_xor_sync(0xFFFFFFFFu, t[j], h);
                t[j] = bottom ? __fsub_rn(p, t[j]) : __fadd_rn(t[j], p);
            }
        }
        code_t *codes = smem[wid] + lane * Q;
#pragma unroll
        for (int j = 0; j < Q; ++j) {
            float acc = __fmul_rn(t[0], c_base[j]);
#pragma unroll
            for (int k = 1; k < Q; ++k) acc = __fmaf_rn(t[k], c_base[k * Q + j], acc);
            u32 code = quantize1<B>(acc, lo_r[j], inv_r[j], nans);
            codes[j] = valid ? (code_t)code : (code_t)0;
        }
        __syncwarp();
        // pack the unit's 4 * Q groups of 8 codes
        const long long g_first = u * (4LL * Q);
        const long long m = n - u * (32LL * Q);  // values of this unit inside the tensor (may exceed 32Q)
        for (int gi = lane; gi < 4 * Q; gi += 32) {
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
    __shared__ code_t smem[WARPS][32 * Q];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int rpu = 32 / G;
    const long long units = (rows + rpu - 1) / rpu;
    const int g = lane % G;
    const long long n = rows * (long long)C;
    float sg[Q], lo_r[Q], st_r[Q];
#pragma unroll
    for (int j = 0; j < Q; ++j) {
        const int c = per_channel ? g * Q + j : 0;
        sg[j] = ssign[g * Q + j]; lo_r[j] = lo[c]; st_r[j] = step[c];
    }
    for (long long u = (long long)blockIdx.x * WARPS + wid; u < units; u += (long long)gridDim.x * WARPS) {
        const long long g_first = u * (4LL * Q);
        const long long m = n - u * (32LL * Q);
        for (int gi = lane; gi < 4 * Q; gi += 32) {
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
        const long long r = u * rpu + lane / G;
        const bool valid = r < rows;
        float v[Q], t[Q];
#pragma unroll
        for (int j = 0; j < Q; ++j) {
            v[j] = __fadd_rn(__fmul_rn((float)smem[wid][lane * Q + j], st_r[j]), lo_r[j]);
        }
        __syncwarp();
        // y @ base.T: t[j] = sum_k v[k] * base[j][k]
#pragma unroll
        for (int j = 0; j < Q; ++j) {
            float acc = __fmul_rn(v[0], c_base[j * Q]);
#pragma unroll
            for (int k = 1; k < Q; ++k) acc = __fmaf_rn(v[k], c_base[j * Q + k], acc);
            t[j] = acc;
        }
        for (int h = 1; h < G; h <<= 1) {
            const bool bottom = (g & h) != 0;
#pragma unroll
            for (int j = 0; j < Q; ++j) {
                float p = __shfl_xor_sync(0xFFFFFFFFu, t[j], h);
                t[j] = bottom ? __fsub_rn(p, t[j]) : __fadd_rn(t[j], p);
            }
        }
        if (valid) {
            float *dst = y + r * C + g * Q;
#pragma unroll
            for (int j = 0; j < Q; ++j) dst[j] = __fmul_rn(t[j], sg[j]);
        }
    }
}
#endif  // QP_ROT
