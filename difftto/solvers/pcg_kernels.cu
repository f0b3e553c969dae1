// Fused vector kernels for the batched PCG of difftto (see cupy_kernels.py).
//
// Every vector is a contiguous row-major [B, n] array; per-batch-element scalars
// (alpha, beta, the active mask) are [B]. Reductions are two-pass and deterministic:
// a "partials" kernel runs one block per (batch element, chunk of n) and writes one
// partial sum per block, then a "finalize" kernel runs one block per batch element
// and adds that element's partials in a fixed order. No atomics, so a solve gives the
// same bits on every run.
//
// Compiled at run time by NVRTC through cupy.RawModule, and standalone by
// `nvcc --ptx` in the tests. No headers: NVRTC needs none for this.

#define DIFFTTO_BLOCK 256
#define DIFFTTO_FULL_MASK 0xffffffffu

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(DIFFTTO_FULL_MASK, value, offset);
    }
    return value;
}

// Sum of `value` over the block, valid in thread 0. Every thread of the block must
// call it (it synchronises). `shared` holds one value per warp (blockDim.x <= 1024).
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    value = warp_sum(value);
    if (lane == 0) {
        shared[warp] = value;
    }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    value = (threadIdx.x < warps) ? shared[threadIdx.x] : T(0);
    if (warp == 0) {
        value = warp_sum(value);
    }
    __syncthreads();  // `shared` may be reused by the caller's next block_sum
    return value;
}

// The [begin, end) range of chunk `chunk` of a length-n row split into `chunks`.
__device__ __forceinline__ void chunk_range(long long n, int chunks, int chunk,
                                            long long* begin, long long* end) {
    const long long length = (n + chunks - 1) / chunks;
    long long b = (long long)chunk * length;
    long long e = b + length;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

// partials[(batch * chunks + chunk)] = sum over the chunk of a * b.
// Grid: B * chunks blocks.
template <typename T>
__device__ void dot_partials(const T* __restrict__ a, const T* __restrict__ b,
                             T* __restrict__ partials, long long n, int chunks) {
    __shared__ T shared[32];
    const long long batch = blockIdx.x / chunks;
    const int chunk = (int)(blockIdx.x % chunks);
    long long begin, end;
    chunk_range(n, chunks, chunk, &begin, &end);
    const long long base = batch * n;
    T sum = T(0);
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        sum += a[base + i] * b[base + i];
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) {
        partials[batch * chunks + chunk] = sum;
    }
}

// The Jacobi step fused with both reductions PCG needs after it:
//   z = inverse_diagonal * r   (only when has_diagonal; otherwise z is r, not written)
//   partials[2 * (batch * chunks + chunk) + 0] = sum over the chunk of r * z
//   partials[2 * (batch * chunks + chunk) + 1] = sum over the chunk of r * r
// Grid: B * chunks blocks.
template <typename T>
__device__ void precondition_partials(const T* __restrict__ r,
                                      const T* __restrict__ inverse_diagonal,
                                      T* __restrict__ z, int has_diagonal,
                                      T* __restrict__ partials, long long n, int chunks) {
    __shared__ T shared[32];
    const long long batch = blockIdx.x / chunks;
    const int chunk = (int)(blockIdx.x % chunks);
    long long begin, end;
    chunk_range(n, chunks, chunk, &begin, &end);
    const long long base = batch * n;
    T rz = T(0);
    T rr = T(0);
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const T ri = r[base + i];
        T zi = ri;
        if (has_diagonal) {
            zi = inverse_diagonal[base + i] * ri;
            z[base + i] = zi;
        }
        rz += ri * zi;
        rr += ri * ri;
    }
    rz = block_sum(rz, shared);
    rr = block_sum(rr, shared);
    if (threadIdx.x == 0) {
        const long long slot = 2 * (batch * chunks + chunk);
        partials[slot] = rz;
        partials[slot + 1] = rr;
    }
}

// out[j * batch_size + batch] = sum over chunks of partials[(batch * chunks + c) * k + j],
// for j < k. Grid: B blocks.
template <typename T>
__device__ void finalize_sums(const T* __restrict__ partials, T* __restrict__ out,
                              int chunks, int k, long long batch_size) {
    __shared__ T shared[32];
    const long long batch = blockIdx.x;
    for (int j = 0; j < k; ++j) {
        T sum = T(0);
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
            sum += partials[(batch * chunks + c) * k + j];
        }
        sum = block_sum(sum, shared);
        if (threadIdx.x == 0) {
            out[(long long)j * batch_size + batch] = sum;
        }
    }
}

// x += alpha p and r -= alpha q, for active batch elements only (inactive ones keep
// x and r, whatever p and q hold). total = B * n, grid-stride loop.
template <typename T>
__device__ void update_solution(T* __restrict__ x, T* __restrict__ r,
                                const T* __restrict__ p, const T* __restrict__ q,
                                const T* __restrict__ alpha,
                                const unsigned char* __restrict__ active, long long n,
                                long long total) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        const long long batch = i / n;
        if (active[batch]) {
            const T a = alpha[batch];
            x[i] += a * p[i];
            r[i] -= a * q[i];
        }
    }
}

// p = z + beta p. total = B * n, grid-stride loop.
template <typename T>
__device__ void update_direction(T* __restrict__ p, const T* __restrict__ z,
                                 const T* __restrict__ beta, long long n, long long total) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        p[i] = z[i] + beta[i / n] * p[i];
    }
}

// C entry points, one per dtype, so that cupy.RawModule finds them by plain name.
#define DIFFTTO_PCG_KERNELS(T, SUFFIX)                                                     \
    extern "C" __global__ void __launch_bounds__(DIFFTTO_BLOCK)                            \
        pcg_dot_partials_##SUFFIX(const T* a, const T* b, T* partials, long long n,        \
                                  int chunks) {                                            \
        dot_partials<T>(a, b, partials, n, chunks);                                        \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(DIFFTTO_BLOCK)                            \
        pcg_precondition_partials_##SUFFIX(const T* r, const T* inverse_diagonal, T* z,    \
                                           int has_diagonal, T* partials, long long n,     \
                                           int chunks) {                                   \
        precondition_partials<T>(r, inverse_diagonal, z, has_diagonal, partials, n,        \
                                 chunks);                                                  \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(DIFFTTO_BLOCK)                            \
        pcg_finalize_##SUFFIX(const T* partials, T* out, int chunks, int k,                \
                              long long batch_size) {                                      \
        finalize_sums<T>(partials, out, chunks, k, batch_size);                            \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(DIFFTTO_BLOCK)                            \
        pcg_update_solution_##SUFFIX(T* x, T* r, const T* p, const T* q, const T* alpha,   \
                                     const unsigned char* active, long long n,             \
                                     long long total) {                                    \
        update_solution<T>(x, r, p, q, alpha, active, n, total);                           \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(DIFFTTO_BLOCK)                            \
        pcg_update_direction_##SUFFIX(T* p, const T* z, const T* beta, long long n,        \
                                      long long total) {                                   \
        update_direction<T>(p, z, beta, n, total);                                         \
    }

DIFFTTO_PCG_KERNELS(float, f32)
DIFFTTO_PCG_KERNELS(double, f64)
