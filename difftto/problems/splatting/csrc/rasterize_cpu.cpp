// Compiled CPU kernels of difftto's tile rasterizer and of its Gauss-Newton products.
//
// The pure-PyTorch rasterizer (rasterize.py) is the reference twin of every function
// here; the conventions are the same (gsplat's): alpha = min(0.999, o·exp(-σ)), pairs
// with alpha < 1/255 skipped, a pixel stops (exclusive) once its transmittance would
// reach 1e-4, front-to-back compositing, pixel centres at +0.5.
//
// Data layout shared by all kernels:
//   feats  [I·N, F]  per (image, Gaussian): mx, my, conic a b c, log-opacity, colours[D],
//                     depth  (F = 7 + D), image i = b·C + c, flat id i·N + n.
//   tile_ptr [I·T+1], pair_gauss [M]: CSR of the (tile, Gaussian) pairs, tiles in image
//                     order, each tile's Gaussians front to back.
//   alpha, trans [M, P]: the per-(pair, pixel) cache of a render: the pair's alpha at
//                     the pixel (0 where the pair is inactive) and the transmittance
//                     before it. P = tile_size². Backward, J·v, Jᵀ·w and the Gram
//                     (diagonal) kernels all read this cache instead of recomputing exp.
//   out    [I, H, W, D+2]: colour sums, depth sum, alpha sum (Σ α·T) per pixel.
//
// Parallelism: tiles are handed out to torch's intra-op threads (at::parallel_for, which
// is OpenMP in torch's CPU builds, so torch.set_num_threads applies) from an atomic
// counter, because the work per tile varies a lot. Each tile's pixels form the inner,
// vectorized loop (`omp simd`): a 4×4 tile is one AVX-512 register of floats.
// Gradients are first written per pair (one writer per pair: no atomics) and then
// reduced per Gaussian in a fixed order, so results are deterministic.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

constexpr double kAlphaMax = 0.999;
constexpr double kTransMin = 1e-4;
constexpr double kLn255 = 5.541263545158426;  // -log(1/255): alpha >= 1/255 <=> σ' <= ln 255

// exp that the compiler can vectorize. Why not std::exp: without -ffast-math (which we
// avoid: it would change NaN handling and the comparisons of the thresholds) GCC keeps a
// scalar libm call inside the pixel loop. Cody-Waite reduction x = n·ln2 + r, |r| <= ln2/2,
// then a Taylor polynomial (degree 7 for float, 13 for double: truncation below half an
// ulp) and 2^n assembled in the exponent bits. Inputs below the range give 0.
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
  using Int = int32_t;
  static constexpr float lo = -87.0f, hi = 88.0f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float shift = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  static constexpr int mantissa = 23, bias = 127, degree = 7;
};
template <>
struct ExpTraits<double> {
  using Int = int64_t;
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double shift = 6755399441055744.0;  // 1.5·2^52
  static constexpr int mantissa = 52, bias = 1023, degree = 13;
};

// By-value min/max: std::min/max return references, which made GCC keep the operands in
// stack slots and gather them, and then give up vectorizing the pixel loops.
template <typename T>
inline T min_v(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max_v(T a, T b) {
  return a < b ? b : a;
}

// ⟨g, v⟩ of a pair at a pixel (the cotangent of its weight α·T) is bounded to ±2⁻⁶⁴ of the
// largest finite value (±1.8e19 in float32, ±9.7e288 in float64). Why: a finite but huge
// colour (3.4e38) made the suffix sums Σ w·⟨g, v⟩, their division by 1 − α and the sums over
// pixels overflow to ±inf, and inf − inf put NaN into the geometry gradients. The bound
// leaves 2⁶⁴ of headroom for that chain and for the projection backward; cotangents of any
// sane scene are far below it, so their gradients are bit-identical. (The sum over channels
// of finite products may reach ±inf, never NaN; the bound then makes it finite.) The torch
// twin bounds the same quantity (rasterize._BoundCotangent).
template <typename T>
inline T bound_cotangent(T x) {
  constexpr T bound = std::numeric_limits<T>::max() / T(18446744073709551616.0);  // max · 2⁻⁶⁴
  return min_v(max_v(x, -bound), bound);
}

template <typename T>
inline T fast_exp(T x) {
  using E = ExpTraits<T>;
  const T xc = min_v(max_v(x, T(E::lo)), T(E::hi));
  // Round to nearest by the add-and-subtract trick: GCC does not vectorize std::floor
  // unless -ffast-math (it may not raise the inexact flag).
  const T n = (xc * T(1.4426950408889634) + E::shift) - E::shift;
  const T r = (xc - n * E::ln2_hi) - n * E::ln2_lo;
  T p = T(1);
#pragma GCC unroll 16
  for (int k = E::degree; k >= 1; --k) p = T(1) + p * r * (T(1) / T(k));
  typename E::Int bits = (static_cast<typename E::Int>(n) + E::bias) << E::mantissa;
  const T scale = __builtin_bit_cast(T, bits);
  return x < T(E::lo) ? T(0) : p * scale;
}

struct Grid {
  int64_t I, H, W, ts, tw, th, n_tiles, P;
  Grid(int64_t I_, int64_t H_, int64_t W_, int64_t ts_)
      : I(I_), H(H_), W(W_), ts(ts_), tw((W_ + ts_ - 1) / ts_), th((H_ + ts_ - 1) / ts_),
        n_tiles(tw * th), P(ts_ * ts_) {}
  // origin of tile t (global tile id i·n_tiles + local)
  void origin(int64_t t, int64_t& i, int64_t& ox, int64_t& oy) const {
    i = t / n_tiles;
    const int64_t local = t % n_tiles;
    ox = (local % tw) * ts;
    oy = (local / tw) * ts;
  }
};

// Runs fn(t) for every t in [0, n) on torch's threads, tiles taken from a shared counter.
template <typename Fn>
void for_each_dynamic(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  constexpr int64_t chunk = 4;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t start = next.fetch_add(chunk);
      if (start >= n) break;
      const int64_t stop = std::min(n, start + chunk);
      for (int64_t t = start; t < stop; ++t) fn(t);
    }
  });
}

void check_cpu_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ------------------------------------------------------------------------ binning

// The per-Gaussian constants of reaches_tile.
template <typename T>
struct Footprint {
  T mx, my, a, b, c, b_over_a, b_over_c, bound;
  Footprint(T mx_, T my_, const T* conic, T log_op) : mx(mx_), my(my_), a(conic[0]), b(conic[1]), c(conic[2]) {
    b_over_a = b / a;
    b_over_c = b / c;
    const T threshold = log_op + T(kLn255);
    bound = threshold + T(1e-3) * (T(1) + std::abs(threshold));
  }
};

template <typename T>
bool reaches_tile(const Footprint<T>& fp, int64_t tx, int64_t ty, int64_t ts) {
  // Same test as rasterize._reaches_tile: exact minimum of the (convex) exponent over the
  // rectangle spanned by the tile's pixel centres, with the same conservative margin (which
  // also covers that b/c·dx here rounds apart from the twin's b·dx/c).
  const T x_lo = T(tx * ts) + T(0.5) - fp.mx, y_lo = T(ty * ts) + T(0.5) - fp.my;
  const T x_hi = x_lo + T(ts - 1), y_hi = y_lo + T(ts - 1);
  if (x_lo <= 0 && x_hi >= 0 && y_lo <= 0 && y_hi >= 0) return T(0) <= fp.bound;  // the centre is inside
  auto q = [&](T dx, T dy) { return T(0.5) * (fp.a * dx * dx + fp.c * dy * dy) + fp.b * dx * dy; };
  T best = std::numeric_limits<T>::infinity();
  for (T dx : {x_lo, x_hi}) best = std::min(best, q(dx, std::min(std::max(-fp.b_over_c * dx, y_lo), y_hi)));
  for (T dy : {y_lo, y_hi}) best = std::min(best, q(std::min(std::max(-fp.b_over_a * dy, x_lo), x_hi), dy));
  return best <= fp.bound;
}

template <typename T>
void bin_impl(const T* means2d, const int32_t* radii, const T* conics, const T* log_op, const T* depths,
              const bool* valid, const Grid& g, int64_t N, std::vector<std::vector<int64_t>>& per_image) {
  at::parallel_for(0, g.I, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      // Depth order with ties by index (torch's stable argsort): (depth, index) pairs sorted
      // lexicographically, which reads no depth through an index (measured 2× faster).
      std::vector<std::pair<T, int64_t>> keyed;
      keyed.reserve(N);
      for (int64_t n = 0; n < N; ++n)
        if (valid[i * N + n]) keyed.emplace_back(depths[i * N + n], n);
      std::sort(keyed.begin(), keyed.end(), [](const std::pair<T, int64_t>& x, const std::pair<T, int64_t>& y) {
        return x.first < y.first || (!(y.first < x.first) && x.second < y.second);
      });
      std::vector<int64_t> order(keyed.size());
      for (size_t k = 0; k < keyed.size(); ++k) order[k] = keyed[k].second;
      std::vector<int64_t> keys;  // (local tile << 32 | rank) would overflow; keep two arrays
      std::vector<int64_t> gauss;
      for (int64_t n : order) {
        const int64_t id = i * N + n;
        const T mx = means2d[2 * id], my = means2d[2 * id + 1];
        const T rx = T(radii[2 * id]), ry = T(radii[2 * id + 1]);
        auto clampi = [](T v, int64_t hi) { return static_cast<int64_t>(std::min(std::max(v, T(0)), T(hi))); };
        const int64_t x0 = clampi(std::floor((mx - rx) / T(g.ts)), g.tw);
        const int64_t x1 = clampi(std::ceil((mx + rx) / T(g.ts)), g.tw);
        const int64_t y0 = clampi(std::floor((my - ry) / T(g.ts)), g.th);
        const int64_t y1 = clampi(std::ceil((my + ry) / T(g.ts)), g.th);
        const Footprint<T> fp(mx, my, conics + 3 * id, log_op[id]);
        for (int64_t ty = y0; ty < y1; ++ty)
          for (int64_t tx = x0; tx < x1; ++tx)
            if (reaches_tile<T>(fp, tx, ty, g.ts)) {
              keys.push_back(ty * g.tw + tx);
              gauss.push_back(id);
            }
      }
      // Stable counting sort by tile: each tile's list stays front to back.
      std::vector<int64_t> counts(g.n_tiles + 1, 0);
      for (int64_t k : keys) ++counts[k + 1];
      for (int64_t t = 0; t < g.n_tiles; ++t) counts[t + 1] += counts[t];
      std::vector<int64_t>& dst = per_image[i];
      dst.assign(keys.size() + g.n_tiles + 1, 0);
      // dst = [tile_ptr (n_tiles+1) | gauss ids]
      std::copy(counts.begin(), counts.end(), dst.begin());
      std::vector<int64_t> fill(counts.begin(), counts.end() - 1);
      for (size_t e = 0; e < keys.size(); ++e) dst[g.n_tiles + 1 + fill[keys[e]]++] = gauss[e];
    }
  });
}

// One tile of a render: its image and origin, its pairs [m0, m1) and a thread-local buffer
// (reused from tile to tile) of (2 + rows)·P values: the pixel centres px = buf[0, P),
// py = buf[P, 2P), then `rows`·P zeros. Kernels carve their rows out of `buf` at offsets
// from that one pointer: with a compile-time P, GCC then sees that the rows do not overlap
// (the forward ran 20% slower when px, py and the rows came as separate pointers).
template <typename T>
struct Tile {
  int64_t i, ox, oy, m0, m1;
  T* buf;
};

// Runs fn(tile) for every tile that holds at least one pair (for_each_dynamic: the
// work per tile varies a lot). Every kernel below walks the tiles this way.
template <typename T, typename Fn>
void for_each_tile(const Grid& g, const int64_t* tile_ptr, int64_t P, int64_t rows, Fn&& fn) {
  for_each_dynamic(g.I * g.n_tiles, [&](int64_t t) {
    Tile<T> tile;
    tile.m0 = tile_ptr[t];
    tile.m1 = tile_ptr[t + 1];
    if (tile.m0 == tile.m1) return;
    g.origin(t, tile.i, tile.ox, tile.oy);
    thread_local std::vector<T> buf;
    buf.assign((2 + rows) * P, T(0));
    tile.buf = buf.data();
    for (int64_t p = 0; p < P; ++p) {
      tile.buf[p] = T(tile.ox + p % g.ts) + T(0.5);
      tile.buf[P + p] = T(tile.oy + p / g.ts) + T(0.5);
    }
    fn(tile);
  });
}

// Loads a [I, H, W, Q] per-pixel tensor into a tile buffer [Q, P] (zeros outside the image).
template <typename T>
void load_tile(const T* src, int64_t Q, const Grid& g, const Tile<T>& tile, T* dst) {
  for (int64_t p = 0; p < g.P; ++p) {
    const int64_t x = tile.ox + p % g.ts, y = tile.oy + p / g.ts;
    const bool in = x < g.W && y < g.H;
    const T* s = in ? src + ((tile.i * g.H + y) * g.W + x) * Q : nullptr;
    for (int64_t q = 0; q < Q; ++q) dst[q * g.P + p] = in ? s[q] : T(0);
  }
}

// Stores a tile buffer [Q, P] into a [I, H, W, Q] per-pixel tensor (pixels inside the image).
template <typename T>
void store_tile(const T* src, int64_t Q, const Grid& g, const Tile<T>& tile, T* dst) {
  for (int64_t p = 0; p < g.P; ++p) {
    const int64_t x = tile.ox + p % g.ts, y = tile.oy + p / g.ts;
    if (x >= g.W || y >= g.H) continue;
    T* o = dst + ((tile.i * g.H + y) * g.W + x) * Q;
    for (int64_t q = 0; q < Q; ++q) o[q] = src[q * g.P + p];
  }
}

// The residuals of the 3DGS problem are r = rw·colour − rb·alpha + const per pixel and
// channel (rw = √weight, rb = √weight·background, [I, H, W, D]); the Gauss-Newton products
// move between them and the per-pixel sums [D + 2] (colours, depth, alpha) here, in the
// tile, instead of through torch temporaries.

// A tile of residual cotangents w [I, H, W, D] → the sums' cotangent go [D + 2, P]:
// rw·w per colour, 0 for depth, −Σ_ch rb·w for alpha (zeros outside the image).
template <typename T>
void load_residual_cotangent(const T* w, const T* rw, const T* rb, int64_t D, const Grid& g, const Tile<T>& tile,
                             T* go) {
  for (int64_t p = 0; p < g.P; ++p) {
    const int64_t x = tile.ox + p % g.ts, y = tile.oy + p / g.ts;
    const bool in = x < g.W && y < g.H;
    const int64_t at = in ? ((tile.i * g.H + y) * g.W + x) * D : 0;
    T alpha = 0;
    for (int64_t q = 0; q < D; ++q) {
      go[q * g.P + p] = in ? rw[at + q] * w[at + q] : T(0);
      alpha -= in ? rb[at + q] * w[at + q] : T(0);
    }
    go[D * g.P + p] = T(0);
    go[(D + 1) * g.P + p] = alpha;
  }
}

// The sums' tangent acc [D + 2, P] → residual tangents rw·dcolour − rb·dalpha [I, H, W, D].
template <typename T>
void store_residual_tangent(const T* acc, const T* rw, const T* rb, int64_t D, const Grid& g, const Tile<T>& tile,
                            T* dr) {
  for (int64_t p = 0; p < g.P; ++p) {
    const int64_t x = tile.ox + p % g.ts, y = tile.oy + p / g.ts;
    if (x >= g.W || y >= g.H) continue;
    const int64_t at = ((tile.i * g.H + y) * g.W + x) * D;
    const T dalpha = acc[(D + 1) * g.P + p];
    for (int64_t q = 0; q < D; ++q) dr[at + q] = rw[at + q] * acc[q * g.P + p] - rb[at + q] * dalpha;
  }
}

// The sum of P per-pixel values in a fixed order. Why not `omp simd reduction`: GCC ends
// those with a sequential scalar sum of the 16 lanes (16 dependent adds), which made the
// per-pair sums of the backward most of its time. With the compile-time P of a 4×4 tile
// this is a pairwise tree (halves added as vectors), in the same order on every call, so
// results stay deterministic; a runtime P sums in order.
template <typename T, int kP>
inline T sum_pixels(const T* x, int64_t P) {
  if constexpr (kP == 16) {
    T h8[8], h4[4];
#pragma omp simd
    for (int i = 0; i < 8; ++i) h8[i] = x[i] + x[i + 8];
#pragma omp simd
    for (int i = 0; i < 4; ++i) h4[i] = h8[i] + h8[i + 4];
    return (h4[0] + h4[2]) + (h4[1] + h4[3]);
  } else {
    T s = 0;
    for (int64_t p = 0; p < P; ++p) s += x[p];
    return s;
  }
}

// False when a pair's cached alpha is 0 at every pixel (inactive, kept by the binning): it
// contributes exactly nothing to any product. (α ≥ 0, so the sum is 0 only then.)
template <typename T, int kP>
inline bool pair_alive(const T* al_m, int64_t P) {
  return sum_pixels<T, kP>(al_m, P) != T(0);
}

// dα/dσ' = -α below the clamp at kAlphaMax, 0 on it (torch's clamp passes the gradient at
// equality; a raw value of exactly 0.999 is the one case that differs). Returns the slope's
// magnitude: α or 0.
template <typename T>
inline T alpha_slope(T al) {
  return al < T(kAlphaMax) ? al : T(0);
}

// ------------------------------------------------------------------------ forward

// σ' = ½ dᵀ·conic·d − log o at the offset d = pixel − mean: α = min(0.999, exp(−σ')).
template <typename T>
inline T exponent(T dx, T dy, T a, T b, T c, T log_op) {
  return T(0.5) * (a * dx * dx + c * dy * dy) + b * dx * dy - log_op;
}

template <typename T, int kP>
void forward_impl(const T* feats, int64_t F, int64_t D, const int64_t* tile_ptr, const int64_t* pair_gauss,
                  const uint8_t* active_in, const Grid& g, T* out, T* alpha, T* trans, uint8_t* active_out) {
  const int64_t P = kP > 0 ? kP : g.P, Q = D + 2;
  const T amax = T(kAlphaMax), tmin = T(kTransMin), ln255 = T(kLn255);
  // Masks live in T-typed buffers: GCC did not vectorize the pixel loop when it mixed
  // uint8 flags with float arithmetic, and the scalar exp then dominated.
  for_each_tile<T>(g, tile_ptr, P, 5 + Q, [&](const Tile<T>& tile) {
    const int64_t m0 = tile.m0, m1 = tile.m1;
    T *px = tile.buf, *py = px + P, *tr = py + P, *w = tr + P, *live = w + P, *on = live + P, *stop = on + P, *acc = stop + P;
    std::fill(tr, tr + P, T(1));
    std::fill(live, live + P, T(1));
    int64_t n_done = 0;
    for (int64_t m = m0; m < m1; ++m) {
      const T* f = feats + pair_gauss[m] * F;
      const T mx = f[0], my = f[1], a = f[2], b = f[3], c = f[4], lo = f[5];
      T* al_m = alpha + m * P;
      T* tr_m = trans + m * P;
      if (active_in != nullptr) {
        const uint8_t* act = active_in + m * P;
        for (int64_t p = 0; p < P; ++p) on[p] = act[p] ? T(1) : T(0);
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) {
          const T s = exponent(px[p] - mx, py[p] - my, a, b, c, lo);
          const T al = min_v(fast_exp(-s), amax) * on[p];
          tr_m[p] = tr[p];
          al_m[p] = al;
          w[p] = al * tr[p];
          tr[p] = tr[p] * (T(1) - al);
        }
      } else {
        T stops = 0;
#pragma omp simd reduction(+ : stops)
        for (int64_t p = 0; p < P; ++p) {
          const T s = exponent(px[p] - mx, py[p] - my, a, b, c, lo);
          const T raw = min_v(fast_exp(-s), amax);
          const T ok = (s <= ln255) ? live[p] : T(0);  // α ≥ 1/255 and not yet stopped
          const T tn = tr[p] * (T(1) - raw);
          const T st = (tn <= tmin) ? ok : T(0);
          const T use = ok - st;
          const T al = raw * use;
          live[p] -= st;
          stop[p] = st;
          stops += st;
          on[p] = use;
          tr_m[p] = tr[p];
          al_m[p] = al;
          w[p] = al * tr[p];
          tr[p] = use > T(0) ? tn : tr[p];
        }
        uint8_t* act = active_out + m * P;
        for (int64_t p = 0; p < P; ++p) act[p] = on[p] > T(0);
        n_done += static_cast<int64_t>(stops);
      }
      for (int64_t q = 0; q < D; ++q) {
        const T v = f[6 + q];
        T* aq = acc + q * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) aq[p] += w[p] * v;
      }
      const T z = f[6 + D];
      T *ad = acc + D * P, *aa = acc + (D + 1) * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        ad[p] += w[p] * z;
        aa[p] += w[p];
      }
      if (active_in == nullptr && n_done == P) {
        // Every pixel stopped: the tile's remaining pairs are inactive (gsplat's early
        // exit of a tile).
        const int64_t rest = (m1 - m - 1) * P;
        std::fill(alpha + (m + 1) * P, alpha + (m + 1) * P + rest, T(0));
        std::fill(trans + (m + 1) * P, trans + (m + 1) * P + rest, T(0));
        std::fill(active_out + (m + 1) * P, active_out + (m + 1) * P + rest, uint8_t(0));
        break;
      }
    }
    store_tile(acc, Q, g, tile, out);
  });
}

// ------------------------------------------------------------------------ backward (Jᵀ·w)

// grad_pair [M, F]: the gradient of one pair summed over its tile's pixels.
// kD > 0: the number of colour channels known at compile time (3, the common case: the
// channel loops unroll into the pixel loop).
// load(tile, go) fills the tile's cotangent of the per-pixel sums go [D + 2, P].
template <typename T, int kP, int kD, typename Load>
void backward_impl(const T* feats, int64_t F, int64_t channels, const int64_t* tile_ptr, const int64_t* pair_gauss,
                   const T* alpha, const T* trans, Load&& load, const Grid& g, T* grad_pair) {
  const int64_t P = kP > 0 ? kP : g.P, D = kD > 0 ? kD : channels, Q = D + 2;
  for_each_tile<T>(g, tile_ptr, P, 3 + Q + 6 + Q - 1, [&](const Tile<T>& tile) {
    const int64_t m0 = tile.m0, m1 = tile.m1;
    T *px = tile.buf, *py = px + P, *rest = py + P, *gv = rest + P, *w = gv + P, *go = w + P;
    load(tile, go);
    // Back to front: `rest` = Σ over the later pairs of w_j·⟨g, v_j⟩ (v = colour, depth, 1).
    for (int64_t m = m1 - 1; m >= m0; --m) {
      const T* f = feats + pair_gauss[m] * F;
      const T mx = f[0], my = f[1], a = f[2], b = f[3], c = f[4];
      const T* al_m = alpha + m * P;
      const T* tr_m = trans + m * P;
      T* gp = grad_pair + m * F;
      if (!pair_alive<T, kP>(al_m, P)) {
        std::fill(gp, gp + F, T(0));
        continue;
      }
      const T z = f[6 + D];
      const T *gz = go + D * P, *ga = go + (D + 1) * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        T sum = gz[p] * z + ga[p];
        for (int64_t q = 0; q < D; ++q) sum += go[q * P + p] * f[6 + q];
        gv[p] = bound_cotangent(sum);
      }
      // Per pixel, the terms of the pair's 6 geometry and D + 1 colour/depth gradients, each
      // summed over the pixels by sum_pixels.
      T* terms = go + Q * P;  // [6 + Q - 1, P]
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const T al = al_m[p], tr = tr_m[p];
        const T wp = al * tr;
        w[p] = wp;
        const T d_alpha = tr * gv[p] - rest[p] / (T(1) - al);
        rest[p] += wp * gv[p];
        const T dfac = alpha_slope(al);
        const T ds = -dfac * d_alpha;  // dL/dσ', σ' = σ - log o
        const T dx = px[p] - mx, dy = py[p] - my;
        terms[0 * P + p] = -ds * (a * dx + b * dy);
        terms[1 * P + p] = -ds * (c * dy + b * dx);
        terms[2 * P + p] = ds * T(0.5) * dx * dx;
        terms[3 * P + p] = ds * dx * dy;
        terms[4 * P + p] = ds * T(0.5) * dy * dy;
        terms[5 * P + p] = -ds;
      }
      for (int64_t q = 0; q <= D; ++q) {  // colours and depth: ∂/∂v = w·g
        const T* gq = go + q * P;
        T* tq = terms + (6 + q) * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) tq[p] = w[p] * gq[p];
      }
      for (int64_t k = 0; k < 7 + D; ++k) gp[k] = sum_pixels<T, kP>(terms + k * P, P);
    }
  });
}

// Sums per-pair rows [M, R] into per-Gaussian rows [num, R] through a by-Gaussian CSR
// (gauss_ptr, gauss_pairs): a segmented reduction, parallel over Gaussians, fixed order.
template <typename T>
void reduce_by_gaussian(const T* per_pair, int64_t R, const int64_t* gauss_ptr, const int64_t* gauss_pairs,
                        int64_t num, T* out) {
  at::parallel_for(0, num, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* o = out + n * R;
      for (int64_t r = 0; r < R; ++r) o[r] = T(0);
      for (int64_t e = gauss_ptr[n]; e < gauss_ptr[n + 1]; ++e) {
        const T* s = per_pair + gauss_pairs[e] * R;
        for (int64_t r = 0; r < R; ++r) o[r] += s[r];
      }
    }
  });
}

// ------------------------------------------------------------------------ J·v

// store(tile, acc) writes the tile's tangent of the per-pixel sums acc [D + 2, P].
template <typename T, int kP, typename Store>
void jvp_impl(const T* feats, const T* dfeats, int64_t F, int64_t D, const int64_t* tile_ptr,
              const int64_t* pair_gauss, const T* alpha, const T* trans, const Grid& g, Store&& store) {
  const int64_t P = kP > 0 ? kP : g.P, Q = D + 2;
  for_each_tile<T>(g, tile_ptr, P, 3 + Q, [&](const Tile<T>& tile) {
    const int64_t m0 = tile.m0, m1 = tile.m1;
    T *px = tile.buf, *py = px + P, *s = py + P, *w = s + P, *dw = w + P, *acc = dw + P;
    // Front to back: s = Σ_{j<k} dα_j / (1 - α_j), so that dT_k = -T_k·s.
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t id = pair_gauss[m];
      const T* f = feats + id * F;
      const T* df = dfeats + id * F;
      const T mx = f[0], my = f[1], a = f[2], b = f[3], c = f[4];
      const T dmx = df[0], dmy = df[1], da = df[2], db = df[3], dc = df[4], dlo = df[5];
      const T* al_m = alpha + m * P;
      const T* tr_m = trans + m * P;
      if (!pair_alive<T, kP>(al_m, P)) continue;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const T al = al_m[p], tr = tr_m[p];
        const T dx = px[p] - mx, dy = py[p] - my;
        const T dsig = -(a * dx + b * dy) * dmx - (c * dy + b * dx) * dmy +
                       T(0.5) * (dx * dx * da + dy * dy * dc) + dx * dy * db - dlo;
        const T dfac = alpha_slope(al);
        const T dal = -dfac * dsig;
        w[p] = al * tr;
        dw[p] = tr * (dal - al * s[p]);
        s[p] += dal / (T(1) - al);
      }
      for (int64_t q = 0; q <= D; ++q) {
        const T v = f[6 + q], dv = df[6 + q];
        T* aq = acc + q * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) aq[p] += dw[p] * v + w[p] * dv;
      }
      T* aa = acc + (D + 1) * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) aa[p] += dw[p];
    }
    store(tile, acc);
  });
}

// ------------------------------------------------------------------------ Gram (diag JᵀJ)

// For residuals r_ch = rw_ch·colour_ch - rb_ch·alpha (+ const) per pixel (rw = √weight,
// rb = √weight·background), the per-pair Gram matrix Σ_pixels Σ_ch u uᵀ of the feature
// gradients u = ∂r_ch/∂feats. u = e_ch·(∂α/∂geo) + rw_ch·w·(unit vector of colour ch), so
// only 21 geometry-geometry entries, 6·D geometry-colour entries and D colour-colour
// entries are accumulated (depth does not enter the residuals). Stored compactly per pair
// and expanded to full [F, F] per Gaussian after the reduction.
template <typename T, int kP>
void gram_impl(const T* feats, int64_t F, int64_t D, const int64_t* tile_ptr, const int64_t* pair_gauss,
               const T* alpha, const T* trans, const T* rw, const T* rb, const Grid& g, int64_t R, T* gram_pair) {
  const int64_t P = kP > 0 ? kP : g.P;
  // scratch: suffix alpha, suffix colours[D], rw[D], rb[D], geo[6], e[D], cw[D], se2, w, terms
  for_each_tile<T>(g, tile_ptr, P, 4 + 5 * D + 6, [&](const Tile<T>& tile) {
    const int64_t m0 = tile.m0, m1 = tile.m1;
    T *px = tile.buf, *py = px + P, *sa = py + P, *sc = sa + P, *rwt = sc + D * P, *rbt = rwt + D * P;
    T *geo = rbt + D * P, *e = geo + 6 * P, *cw = e + D * P, *se2 = cw + D * P, *w = se2 + P;
    load_tile(rw, D, g, tile, rwt);
    load_tile(rb, D, g, tile, rbt);
    for (int64_t m = m1 - 1; m >= m0; --m) {
      const T* f = feats + pair_gauss[m] * F;
      const T mx = f[0], my = f[1], a = f[2], b = f[3], c = f[4];
      const T* al_m = alpha + m * P;
      const T* tr_m = trans + m * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const T al = al_m[p], tr = tr_m[p];
        const T dfac = alpha_slope(al);
        const T dx = px[p] - mx, dy = py[p] - my;
        // ∂α/∂(mx, my, a, b, c, log o) = -dfac·∂σ'/∂(...)
        geo[0 * P + p] = dfac * (a * dx + b * dy);
        geo[1 * P + p] = dfac * (c * dy + b * dx);
        geo[2 * P + p] = -dfac * T(0.5) * dx * dx;
        geo[3 * P + p] = -dfac * dx * dy;
        geo[4 * P + p] = -dfac * T(0.5) * dy * dy;
        geo[5 * P + p] = dfac;
        w[p] = al * tr;
        se2[p] = T(0);
      }
      for (int64_t q = 0; q < D; ++q) {
        const T v = f[6 + q];
        T *eq = e + q * P, *cq = cw + q * P, *sq = sc + q * P;
        const T *rwq = rwt + q * P, *rbq = rbt + q * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) {
          const T inv = T(1) / (T(1) - al_m[p]);
          const T d_colour = tr_m[p] * v - sq[p] * inv;  // ∂colour_q/∂α
          const T d_alpha = tr_m[p] - sa[p] * inv;       // ∂alpha/∂α
          eq[p] = rwq[p] * d_colour - rbq[p] * d_alpha;
          cq[p] = rwq[p] * w[p];
          se2[p] += eq[p] * eq[p];
        }
      }
      T* out = gram_pair + m * R;
      T* t = w + P;  // one row of per-pixel terms, summed by sum_pixels
      int64_t k = 0;
      for (int64_t u = 0; u < 6; ++u)
        for (int64_t v = u; v < 6; ++v) {
          const T *gu = geo + u * P, *gv = geo + v * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) t[p] = se2[p] * gu[p] * gv[p];
          out[k++] = sum_pixels<T, kP>(t, P);
        }
      for (int64_t q = 0; q < D; ++q)
        for (int64_t u = 0; u < 6; ++u) {
          const T *gu = geo + u * P, *eq = e + q * P, *cq = cw + q * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) t[p] = eq[p] * cq[p] * gu[p];
          out[k++] = sum_pixels<T, kP>(t, P);
        }
      for (int64_t q = 0; q < D; ++q) {
        const T* cq = cw + q * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) t[p] = cq[p] * cq[p];
        out[k++] = sum_pixels<T, kP>(t, P);
      }
      // suffix sums for the pairs in front of this one
      for (int64_t q = 0; q < D; ++q) {
        const T v = f[6 + q];
        T* sq = sc + q * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) sq[p] += w[p] * v;
      }
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) sa[p] += w[p];
    }
  });
}

template <typename T>
void expand_gram(const T* compact, int64_t R, int64_t num, int64_t D, int64_t F, T* full) {
  at::parallel_for(0, num, 1024, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* s = compact + n * R;
      T* o = full + n * F * F;
      std::fill(o, o + F * F, T(0));
      int64_t k = 0;
      for (int64_t u = 0; u < 6; ++u)
        for (int64_t v = u; v < 6; ++v, ++k) o[u * F + v] = o[v * F + u] = s[k];
      for (int64_t q = 0; q < D; ++q)
        for (int64_t u = 0; u < 6; ++u, ++k) o[u * F + 6 + q] = o[(6 + q) * F + u] = s[k];
      for (int64_t q = 0; q < D; ++q, ++k) o[(6 + q) * F + 6 + q] = s[k];
    }
  });
}

}  // namespace

// ------------------------------------------------------------------------ bindings

// The 4×4 tiles (the default) get a compile-time pixel count: a fixed trip count of 16 is
// one AVX-512 register of floats, where a runtime count left GCC's scalar epilogue doing
// most of the work (measured: 3-4× slower).
#define DISPATCH_TILE(P, ...)   \
  if ((P) == 16) {              \
    constexpr int kP = 16;      \
    __VA_ARGS__;                \
  } else {                      \
    constexpr int kP = 0;       \
    __VA_ARGS__;                \
  }

std::vector<torch::Tensor> bin_tiles(torch::Tensor means2d, torch::Tensor radii, torch::Tensor conics,
                                     torch::Tensor log_opacity, torch::Tensor depths, torch::Tensor valid,
                                     int64_t I, int64_t N, int64_t width, int64_t height, int64_t tile_size) {
  for (auto* t : {&means2d, &radii, &conics, &log_opacity, &depths, &valid}) check_cpu_contiguous(*t, "bin input");
  TORCH_CHECK(radii.scalar_type() == torch::kInt32, "radii must be int32");
  TORCH_CHECK(valid.scalar_type() == torch::kBool, "valid must be bool");
  const Grid g(I, height, width, tile_size);
  std::vector<std::vector<int64_t>> per_image(I);
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "bin_tiles", [&] {
    bin_impl<scalar_t>(means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(), conics.data_ptr<scalar_t>(),
                       log_opacity.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(), valid.data_ptr<bool>(), g, N,
                       per_image);
  });
  int64_t M = 0;
  for (auto& v : per_image) M += static_cast<int64_t>(v.size()) - (g.n_tiles + 1);
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  auto tile_ptr = torch::empty({I * g.n_tiles + 1}, opts);
  auto pair_gauss = torch::empty({M}, opts);
  int64_t* tp = tile_ptr.data_ptr<int64_t>();
  int64_t* pg = pair_gauss.data_ptr<int64_t>();
  int64_t base = 0;
  for (int64_t i = 0; i < I; ++i) {
    const auto& v = per_image[i];
    for (int64_t t = 0; t < g.n_tiles; ++t) tp[i * g.n_tiles + t] = base + v[t];
    const int64_t count = v[g.n_tiles];
    std::copy(v.begin() + g.n_tiles + 1, v.end(), pg + base);
    base += count;
  }
  tp[I * g.n_tiles] = base;
  return {tile_ptr, pair_gauss};
}

std::vector<torch::Tensor> group_by_gaussian(torch::Tensor pair_gauss, int64_t num) {
  check_cpu_contiguous(pair_gauss, "pair_gauss");
  const int64_t M = pair_gauss.numel();
  const int64_t* pg = pair_gauss.data_ptr<int64_t>();
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  auto ptr = torch::zeros({num + 1}, opts);
  auto pairs = torch::empty({M}, opts);
  int64_t* pp = ptr.data_ptr<int64_t>();
  int64_t* pr = pairs.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) ++pp[pg[m] + 1];
  for (int64_t n = 0; n < num; ++n) pp[n + 1] += pp[n];
  std::vector<int64_t> fill(pp, pp + num);
  for (int64_t m = 0; m < M; ++m) pr[fill[pg[m]]++] = m;
  return {ptr, pairs};
}

std::vector<torch::Tensor> forward(torch::Tensor feats, torch::Tensor tile_ptr, torch::Tensor pair_gauss,
                                   c10::optional<torch::Tensor> active, int64_t I, int64_t height, int64_t width,
                                   int64_t tile_size, int64_t D) {
  check_cpu_contiguous(feats, "feats");
  check_cpu_contiguous(tile_ptr, "tile_ptr");
  check_cpu_contiguous(pair_gauss, "pair_gauss");
  const Grid g(I, height, width, tile_size);
  TORCH_CHECK(tile_ptr.numel() == I * g.n_tiles + 1, "tile_ptr has ", tile_ptr.numel(), " entries, expected ",
              I * g.n_tiles + 1);
  const int64_t M = pair_gauss.numel(), F = feats.size(1);
  TORCH_CHECK(F == 7 + D, "feats has ", F, " columns, expected 7 + D = ", 7 + D);
  auto out = torch::zeros({I, height, width, D + 2}, feats.options());
  auto alpha = torch::empty({M, g.P}, feats.options());
  auto trans = torch::empty({M, g.P}, feats.options());
  torch::Tensor act_out;
  const uint8_t* act_in = nullptr;
  if (active.has_value()) {
    check_cpu_contiguous(*active, "active");
    TORCH_CHECK(active->scalar_type() == torch::kUInt8 && active->numel() == M * g.P, "active must be uint8 [M, P]");
    act_in = active->data_ptr<uint8_t>();
    act_out = *active;
  } else {
    act_out = torch::empty({M, g.P}, feats.options().dtype(torch::kUInt8));
  }
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rasterize_forward", [&] {
    DISPATCH_TILE(g.P, forward_impl<scalar_t, kP>(feats.data_ptr<scalar_t>(), F, D, tile_ptr.data_ptr<int64_t>(),
                           pair_gauss.data_ptr<int64_t>(), act_in, g, out.data_ptr<scalar_t>(),
                           alpha.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(),
                           act_in ? nullptr : act_out.data_ptr<uint8_t>()));
  });
  return {out, alpha, trans, act_out};
}

namespace {
// Shared tail of backward() and residual_backward(): the per-pair feature gradients of
// backward_impl (D = 3 specialized, else run-time D) for the tile cotangents `load` writes,
// then summed per Gaussian into grad [num, F].
template <typename scalar_t, typename Load>
void backward_pairs_and_reduce(const torch::Tensor& feats, int64_t F, int64_t D, const torch::Tensor& tile_ptr,
                               const torch::Tensor& pair_gauss, const torch::Tensor& gauss_ptr,
                               const torch::Tensor& gauss_pairs, const torch::Tensor& alpha,
                               const torch::Tensor& trans, Load&& load, const Grid& g, torch::Tensor& grad_pair,
                               torch::Tensor& grad) {
  const int64_t num = feats.size(0);
  auto run = [&](auto channels) {
    DISPATCH_TILE(g.P, backward_impl<scalar_t, kP, decltype(channels)::value>(
                           feats.data_ptr<scalar_t>(), F, D, tile_ptr.data_ptr<int64_t>(),
                           pair_gauss.data_ptr<int64_t>(), alpha.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(),
                           load, g, grad_pair.data_ptr<scalar_t>()));
  };
  if (D == 3) {
    run(std::integral_constant<int, 3>{});
  } else {
    run(std::integral_constant<int, 0>{});
  }
  reduce_by_gaussian<scalar_t>(grad_pair.data_ptr<scalar_t>(), F, gauss_ptr.data_ptr<int64_t>(),
                               gauss_pairs.data_ptr<int64_t>(), num, grad.data_ptr<scalar_t>());
}
}  // namespace

torch::Tensor backward(torch::Tensor feats, torch::Tensor tile_ptr, torch::Tensor pair_gauss, torch::Tensor gauss_ptr,
                       torch::Tensor gauss_pairs, torch::Tensor alpha, torch::Tensor trans, torch::Tensor grad_out,
                       int64_t tile_size) {
  for (auto* t : {&feats, &tile_ptr, &pair_gauss, &gauss_ptr, &gauss_pairs, &alpha, &trans, &grad_out})
    check_cpu_contiguous(*t, "backward input");
  const int64_t I = grad_out.size(0), H = grad_out.size(1), W = grad_out.size(2), D = grad_out.size(3) - 2;
  const Grid g(I, H, W, tile_size);
  const int64_t M = pair_gauss.numel(), F = feats.size(1), num = feats.size(0);
  auto grad_pair = torch::empty({M, F}, feats.options());
  auto grad = torch::empty({num, F}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rasterize_backward", [&] {
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    auto load = [&](const Tile<scalar_t>& tile, scalar_t* dst) { load_tile(go, D + 2, g, tile, dst); };
    backward_pairs_and_reduce<scalar_t>(feats, F, D, tile_ptr, pair_gauss, gauss_ptr, gauss_pairs, alpha, trans,
                                        load, g, grad_pair, grad);
  });
  return grad;
}

torch::Tensor jvp(torch::Tensor feats, torch::Tensor dfeats, torch::Tensor tile_ptr, torch::Tensor pair_gauss,
                  torch::Tensor alpha, torch::Tensor trans, int64_t I, int64_t height, int64_t width,
                  int64_t tile_size) {
  for (auto* t : {&feats, &dfeats, &tile_ptr, &pair_gauss, &alpha, &trans}) check_cpu_contiguous(*t, "jvp input");
  TORCH_CHECK(dfeats.sizes() == feats.sizes(), "dfeats must have the shape of feats");
  const Grid g(I, height, width, tile_size);
  const int64_t F = feats.size(1), D = F - 7;
  auto dout = torch::zeros({I, height, width, D + 2}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rasterize_jvp", [&] {
    scalar_t* out = dout.data_ptr<scalar_t>();
    auto store = [&](const Tile<scalar_t>& tile, const scalar_t* acc) { store_tile(acc, D + 2, g, tile, out); };
    DISPATCH_TILE(g.P, jvp_impl<scalar_t, kP>(feats.data_ptr<scalar_t>(), dfeats.data_ptr<scalar_t>(), F, D,
                                              tile_ptr.data_ptr<int64_t>(), pair_gauss.data_ptr<int64_t>(),
                                              alpha.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), g, store));
  });
  return dout;
}

// Jᵀ·w of the 3DGS residuals: residual cotangents w [I, H, W, D] → feature gradients
// [I·N, F] (backward() with grad_out = [rw·w, 0, −Σ rb·w], formed per tile).
torch::Tensor residual_backward(torch::Tensor feats, torch::Tensor tile_ptr, torch::Tensor pair_gauss,
                                torch::Tensor gauss_ptr, torch::Tensor gauss_pairs, torch::Tensor alpha,
                                torch::Tensor trans, torch::Tensor w, torch::Tensor rw, torch::Tensor rb,
                                int64_t tile_size) {
  for (auto* t : {&feats, &tile_ptr, &pair_gauss, &gauss_ptr, &gauss_pairs, &alpha, &trans, &w, &rw, &rb})
    check_cpu_contiguous(*t, "residual_backward input");
  TORCH_CHECK(w.sizes() == rw.sizes() && w.sizes() == rb.sizes() && w.dim() == 4,
              "w, rw and rb must all be [I, H, W, D], got ", w.sizes(), ", ", rw.sizes(), ", ", rb.sizes());
  const int64_t I = w.size(0), H = w.size(1), W = w.size(2), D = w.size(3);
  const Grid g(I, H, W, tile_size);
  const int64_t M = pair_gauss.numel(), F = feats.size(1), num = feats.size(0);
  TORCH_CHECK(F == 7 + D, "feats has ", F, " columns, expected 7 + D = ", 7 + D);
  auto grad_pair = torch::empty({M, F}, feats.options());
  auto grad = torch::empty({num, F}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "residual_backward", [&] {
    const scalar_t *wp = w.data_ptr<scalar_t>(), *rwp = rw.data_ptr<scalar_t>(), *rbp = rb.data_ptr<scalar_t>();
    auto load = [&](const Tile<scalar_t>& tile, scalar_t* dst) {
      load_residual_cotangent(wp, rwp, rbp, D, g, tile, dst);
    };
    backward_pairs_and_reduce<scalar_t>(feats, F, D, tile_ptr, pair_gauss, gauss_ptr, gauss_pairs, alpha, trans,
                                        load, g, grad_pair, grad);
  });
  return grad;
}

// J·v of the 3DGS residuals: feature tangents dfeats [I·N, F] → residual tangents
// rw·dcolour − rb·dalpha [I, H, W, D] (jvp() followed by that map, per tile).
torch::Tensor residual_jvp(torch::Tensor feats, torch::Tensor dfeats, torch::Tensor tile_ptr, torch::Tensor pair_gauss,
                           torch::Tensor alpha, torch::Tensor trans, torch::Tensor rw, torch::Tensor rb,
                           int64_t tile_size) {
  for (auto* t : {&feats, &dfeats, &tile_ptr, &pair_gauss, &alpha, &trans, &rw, &rb})
    check_cpu_contiguous(*t, "residual_jvp input");
  TORCH_CHECK(dfeats.sizes() == feats.sizes(), "dfeats must have the shape of feats");
  TORCH_CHECK(rw.sizes() == rb.sizes() && rw.dim() == 4, "rw and rb must be [I, H, W, D], got ", rw.sizes(), ", ",
              rb.sizes());
  const int64_t I = rw.size(0), H = rw.size(1), W = rw.size(2), D = rw.size(3);
  const Grid g(I, H, W, tile_size);
  const int64_t F = feats.size(1);
  TORCH_CHECK(F == 7 + D, "feats has ", F, " columns, expected 7 + D = ", 7 + D);
  // Pixels of tiles without pairs are never stored: zeros.
  auto dr = torch::zeros({I, H, W, D}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "residual_jvp", [&] {
    const scalar_t *rwp = rw.data_ptr<scalar_t>(), *rbp = rb.data_ptr<scalar_t>();
    scalar_t* out = dr.data_ptr<scalar_t>();
    auto store = [&](const Tile<scalar_t>& tile, const scalar_t* acc) {
      store_residual_tangent(acc, rwp, rbp, D, g, tile, out);
    };
    DISPATCH_TILE(g.P, jvp_impl<scalar_t, kP>(feats.data_ptr<scalar_t>(), dfeats.data_ptr<scalar_t>(), F, D,
                                              tile_ptr.data_ptr<int64_t>(), pair_gauss.data_ptr<int64_t>(),
                                              alpha.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), g, store));
  });
  return dr;
}

torch::Tensor gram(torch::Tensor feats, torch::Tensor tile_ptr, torch::Tensor pair_gauss, torch::Tensor gauss_ptr,
                   torch::Tensor gauss_pairs, torch::Tensor alpha, torch::Tensor trans, torch::Tensor rw,
                   torch::Tensor rb, int64_t tile_size) {
  for (auto* t : {&feats, &tile_ptr, &pair_gauss, &gauss_ptr, &gauss_pairs, &alpha, &trans, &rw, &rb})
    check_cpu_contiguous(*t, "gram input");
  const int64_t I = rw.size(0), H = rw.size(1), W = rw.size(2), D = rw.size(3);
  const Grid g(I, H, W, tile_size);
  const int64_t M = pair_gauss.numel(), F = feats.size(1), num = feats.size(0);
  TORCH_CHECK(F == 7 + D, "feats has ", F, " columns, expected 7 + D = ", 7 + D);
  const int64_t R = 21 + 7 * D;
  auto per_pair = torch::empty({M, R}, feats.options());
  auto compact = torch::empty({num, R}, feats.options());
  auto full = torch::empty({num, F, F}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "rasterize_gram", [&] {
    DISPATCH_TILE(g.P, gram_impl<scalar_t, kP>(feats.data_ptr<scalar_t>(), F, D, tile_ptr.data_ptr<int64_t>(), pair_gauss.data_ptr<int64_t>(),
                        alpha.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), rw.data_ptr<scalar_t>(),
                        rb.data_ptr<scalar_t>(), g, R, per_pair.data_ptr<scalar_t>()));
    reduce_by_gaussian<scalar_t>(per_pair.data_ptr<scalar_t>(), R, gauss_ptr.data_ptr<int64_t>(),
                                 gauss_pairs.data_ptr<int64_t>(), num, compact.data_ptr<scalar_t>());
    expand_gram<scalar_t>(compact.data_ptr<scalar_t>(), R, num, D, F, full.data_ptr<scalar_t>());
  });
  return full;
}

// ------------------------------------------------------------------------ projection Jacobian
//
// The per-(image, Gaussian) Jacobian jac [B, C, N, F, p] of the features w.r.t. the p
// parameters of the Gaussian (project_jacobian in project_cpu.cpp, once per linearization
// point) maps
// parameter vectors to feature vectors. These are the three contractions a Gauss-Newton
// product needs; tiny per-Gaussian matrices, where torch's batched matmul was slower than
// the rasterizer kernels themselves.
//
// Each is written so that its inner loop is an axpy over the contiguous axis into a local
// accumulator (J·v reads the transposed Jacobian [.., p, F] for that), with the 3DGS sizes
// F = 10 (D = 3) and p = 14 as compile-time constants: a dot product per row (a sequential
// sum, as GCC keeps float sums in order) and accumulators the compiler could not prove
// apart from the inputs made these ~4× slower. The sums run in the same order as a plain
// loop over k (J·v) or over cameras, then f (Jᵀ·g).

#define DISPATCH_JAC_SIZES(F, Pn, ...) \
  if ((F) == 10 && (Pn) == 14) {       \
    constexpr int kF = 10, kPn = 14;   \
    __VA_ARGS__;                       \
  } else {                             \
    constexpr int kF = 0, kPn = 0;     \
    __VA_ARGS__;                       \
  }

// Runs fn(b, n, e0 = (b·C)·N + n) for every Gaussian, parallel over n (no division per row).
template <typename Fn>
void for_each_gaussian(int64_t B, int64_t C, int64_t N, int64_t grain, Fn&& fn) {
  for (int64_t b = 0; b < B; ++b)
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) fn(b, n, b * C * N + n);
    });
}

template <typename T, int kF, int kPn>
void project_tangent_impl(const T* Jt, const T* x, int64_t B, int64_t C, int64_t N, int64_t F_, int64_t Pn_, T* o) {
  const int64_t F = kF > 0 ? kF : F_, Pn = kPn > 0 ? kPn : Pn_;
  for_each_gaussian(B, C, N, 256, [&](int64_t b, int64_t n, int64_t e0) {
    const T* xv = x + (b * N + n) * Pn;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = e0 + c * N;
      const T* Je = Jt + e * Pn * F;  // [Pn, F]
      if constexpr (kF > 0) {
        T acc[kF];
        for (int f = 0; f < kF; ++f) acc[f] = T(0);
        for (int k = 0; k < kPn; ++k) {
          const T xk = xv[k];
#pragma omp simd
          for (int f = 0; f < kF; ++f) acc[f] += Je[k * kF + f] * xk;
        }
        for (int f = 0; f < kF; ++f) o[e * kF + f] = acc[f];
      } else {
        T* oe = o + e * F;
        for (int64_t f = 0; f < F; ++f) oe[f] = T(0);
        for (int64_t k = 0; k < Pn; ++k)
          for (int64_t f = 0; f < F; ++f) oe[f] += Je[k * F + f] * xv[k];
      }
    }
  });
}

// jac_t [B, C, N, p, F] (the Jacobian transposed), v [B, N, p] -> jac · v [B, C, N, F].
torch::Tensor project_tangent(torch::Tensor jac_t, torch::Tensor v) {
  check_cpu_contiguous(jac_t, "jac_t");
  check_cpu_contiguous(v, "v");
  const int64_t B = jac_t.size(0), C = jac_t.size(1), N = jac_t.size(2), Pn = jac_t.size(3), F = jac_t.size(4);
  TORCH_CHECK(v.numel() == B * N * Pn && v.scalar_type() == jac_t.scalar_type(), "v must be [B, N, p] = [", B,
              ", ", N, ", ", Pn, "] of jac_t's dtype");
  auto out = torch::empty({B, C, N, F}, jac_t.options());
  AT_DISPATCH_FLOATING_TYPES(jac_t.scalar_type(), "project_tangent", [&] {
    DISPATCH_JAC_SIZES(F, Pn, project_tangent_impl<scalar_t, kF, kPn>(jac_t.data_ptr<scalar_t>(),
                                                                      v.data_ptr<scalar_t>(), B, C, N, F, Pn,
                                                                      out.data_ptr<scalar_t>()));
  });
  return out;
}

// Σ over the cameras of every Gaussian (b, n): out[b, n] [Pn] starts at zero and
// per_camera(e, Je, X, ov) adds the (image, Gaussian) row e = (b·C + c)·N + n into ov,
// where Je [F, Pn] is its Jacobian and X the data of `other` (same dtype). One task per
// Gaussian: no atomics.
template <typename PerCamera>
torch::Tensor sum_over_cameras(const torch::Tensor& jac, const torch::Tensor& other, const char* other_name,
                               int64_t grain, PerCamera per_camera) {
  check_cpu_contiguous(jac, "jac");
  check_cpu_contiguous(other, other_name);
  TORCH_CHECK(other.scalar_type() == jac.scalar_type(), other_name, " is ", other.scalar_type(), ", expected ",
              jac.scalar_type());
  const int64_t B = jac.size(0), C = jac.size(1), N = jac.size(2), F = jac.size(3), Pn = jac.size(4);
  auto out = torch::empty({B, N, Pn}, jac.options());
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "sum_over_cameras", [&] {
    const scalar_t* J = jac.data_ptr<scalar_t>();
    const scalar_t* X = other.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_gaussian(B, C, N, grain, [&](int64_t b, int64_t n, int64_t e0) {
      scalar_t* ov = o + (b * N + n) * Pn;
      std::fill(ov, ov + Pn, scalar_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = e0 + c * N;
        per_camera(e, J + e * F * Pn, X, ov);
      }
    });
  });
  return out;
}

template <typename T, int kF, int kPn>
void project_cotangent_impl(const T* J, const T* g, int64_t B, int64_t C, int64_t N, int64_t F_, int64_t Pn_, T* o) {
  const int64_t F = kF > 0 ? kF : F_, Pn = kPn > 0 ? kPn : Pn_;
  for_each_gaussian(B, C, N, 256, [&](int64_t b, int64_t n, int64_t e0) {
    T* ov = o + (b * N + n) * Pn;
    if constexpr (kF > 0) {
      T acc[kPn];
      for (int k = 0; k < kPn; ++k) acc[k] = T(0);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = e0 + c * N;
        const T* Je = J + e * kF * kPn;
        for (int f = 0; f < kF; ++f) {
          const T gv = g[e * kF + f];
#pragma omp simd
          for (int k = 0; k < kPn; ++k) acc[k] += Je[f * kPn + k] * gv;
        }
      }
      for (int k = 0; k < kPn; ++k) ov[k] = acc[k];
    } else {
      std::fill(ov, ov + Pn, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = e0 + c * N;
        const T* Je = J + e * F * Pn;
        for (int64_t f = 0; f < F; ++f) {
          const T gv = g[e * F + f];
          for (int64_t k = 0; k < Pn; ++k) ov[k] += Je[f * Pn + k] * gv;
        }
      }
    }
  });
}

// Σ_c jacᵀ · g: feature cotangents g [B, C, N, F] → parameter cotangents [B, N, p].
torch::Tensor project_cotangent(torch::Tensor jac, torch::Tensor g) {
  check_cpu_contiguous(jac, "jac");
  check_cpu_contiguous(g, "g");
  const int64_t B = jac.size(0), C = jac.size(1), N = jac.size(2), F = jac.size(3), Pn = jac.size(4);
  TORCH_CHECK(g.numel() == B * C * N * F && g.scalar_type() == jac.scalar_type(), "g must be [B, C, N, F] = [",
              B, ", ", C, ", ", N, ", ", F, "] of jac's dtype");
  auto out = torch::empty({B, N, Pn}, jac.options());
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "project_cotangent", [&] {
    DISPATCH_JAC_SIZES(F, Pn, project_cotangent_impl<scalar_t, kF, kPn>(jac.data_ptr<scalar_t>(),
                                                                        g.data_ptr<scalar_t>(), B, C, N, F, Pn,
                                                                        out.data_ptr<scalar_t>()));
  });
  return out;
}

// diag(Jgᵀ G Jg) summed over cameras: the parameter-space Gauss-Newton diagonal from the
// per-(image, Gaussian) feature-space Gram matrices G [B, C, N, F, F].
torch::Tensor gram_diagonal(torch::Tensor jac, torch::Tensor gram) {
  const int64_t F = jac.size(3), Pn = jac.size(4);
  return sum_over_cameras(jac, gram, "gram", 64, [&](int64_t e, const auto* Je, const auto* G, auto* ov) {
    using scalar_t = std::remove_pointer_t<decltype(ov)>;
    thread_local std::vector<scalar_t> gj;
    gj.assign(F * Pn, scalar_t(0));
    const scalar_t* Ge = G + e * F * F;
    for (int64_t f = 0; f < F; ++f)
      for (int64_t h = 0; h < F; ++h) {
        const scalar_t gfh = Ge[f * F + h];
        if (gfh == scalar_t(0)) continue;
        for (int64_t k = 0; k < Pn; ++k) gj[f * Pn + k] += gfh * Je[h * Pn + k];
      }
    for (int64_t f = 0; f < F; ++f)
      for (int64_t k = 0; k < Pn; ++k) ov[k] += Je[f * Pn + k] * gj[f * Pn + k];
  });
}

// The per-Gaussian blocks Σ_c Jgᵀ G Jg [B, N, p, p] of JᵀJ (the block-Jacobi
// preconditioner's) from the per-(image, Gaussian) Gram matrices G [B, C, N, F, F]:
// G·Jg, then Jgᵀ·(G·Jg), both as axpys over the contiguous p into local accumulators, and
// symmetrized (½(A + Aᵀ), as torch's contraction was), so the blocks are exactly symmetric.
template <typename T, int kF, int kPn>
void gram_blocks_impl(const T* J, const T* G, int64_t B, int64_t C, int64_t N, int64_t F_, int64_t Pn_, T* o) {
  const int64_t F = kF > 0 ? kF : F_, Pn = kPn > 0 ? kPn : Pn_;
  for_each_gaussian(B, C, N, 64, [&](int64_t b, int64_t n, int64_t e0) {
    // Local storage: fixed arrays at the compile-time sizes, else thread-local vectors.
    thread_local std::vector<T> gj_buf, acc_buf;
    T gj_fixed[kF > 0 ? kF * kPn : 1], acc_fixed[kF > 0 ? kPn * kPn : 1];
    T* gj = gj_fixed;
    T* acc = acc_fixed;
    if constexpr (kF == 0) {
      gj_buf.resize(F * Pn);
      acc_buf.resize(Pn * Pn);
      gj = gj_buf.data();
      acc = acc_buf.data();
    }
    for (int64_t i = 0; i < Pn * Pn; ++i) acc[i] = T(0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = e0 + c * N;
      const T* Je = J + e * F * Pn;
      const T* Ge = G + e * F * F;
      for (int64_t i = 0; i < F * Pn; ++i) gj[i] = T(0);
      for (int64_t f = 0; f < F; ++f)
        for (int64_t h = 0; h < F; ++h) {
          const T gfh = Ge[f * F + h];
#pragma omp simd
          for (int64_t k = 0; k < Pn; ++k) gj[f * Pn + k] += gfh * Je[h * Pn + k];
        }
      for (int64_t f = 0; f < F; ++f)
        for (int64_t q = 0; q < Pn; ++q) {
          const T jfq = Je[f * Pn + q];
#pragma omp simd
          for (int64_t k = 0; k < Pn; ++k) acc[q * Pn + k] += jfq * gj[f * Pn + k];
        }
    }
    T* ob = o + (b * N + n) * Pn * Pn;
    for (int64_t q = 0; q < Pn; ++q)
      for (int64_t k = 0; k < Pn; ++k) ob[q * Pn + k] = T(0.5) * (acc[q * Pn + k] + acc[k * Pn + q]);
  });
}

// jac [B, C, N, F, p], gram [B, C, N, F, F] -> Σ_c jacᵀ gram jac [B, N, p, p] (symmetrized).
torch::Tensor gram_blocks(torch::Tensor jac, torch::Tensor gram) {
  check_cpu_contiguous(jac, "jac");
  check_cpu_contiguous(gram, "gram");
  const int64_t B = jac.size(0), C = jac.size(1), N = jac.size(2), F = jac.size(3), Pn = jac.size(4);
  TORCH_CHECK(gram.numel() == B * C * N * F * F && gram.scalar_type() == jac.scalar_type(),
              "gram must be [B, C, N, F, F] = [", B, ", ", C, ", ", N, ", ", F, ", ", F, "] of jac's dtype");
  auto out = torch::empty({B, N, Pn, Pn}, jac.options());
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "gram_blocks", [&] {
    DISPATCH_JAC_SIZES(F, Pn, gram_blocks_impl<scalar_t, kF, kPn>(jac.data_ptr<scalar_t>(), gram.data_ptr<scalar_t>(),
                                                                  B, C, N, F, Pn, out.data_ptr<scalar_t>()));
  });
  return out;
}

// The compiled projection (project_cpu.cpp).
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                           torch::Tensor opacities, torch::Tensor colors, torch::Tensor viewmats,
                                           torch::Tensor Ks, int64_t width, int64_t height, double eps2d,
                                           double near, double far);
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                            torch::Tensor opacities, torch::Tensor colors, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t width, int64_t height, double eps2d,
                                            double near, double far, torch::Tensor grad_feats, bool view_grad);
std::vector<torch::Tensor> project_jacobian(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                            torch::Tensor opacities, torch::Tensor colors, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t width, int64_t height, double eps2d,
                                            double near, double far, torch::Tensor cols, int64_t p,
                                            torch::Tensor dviews);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "difftto's compiled CPU kernels of the tile rasterizer and its Gauss-Newton products";
  m.def("bin_tiles", &bin_tiles, "(tile, Gaussian) pairs front to back as a CSR by tile");
  m.def("group_by_gaussian", &group_by_gaussian, "CSR of the pairs by Gaussian");
  m.def("forward", &forward, "render + per-(pair, pixel) alpha/transmittance cache");
  m.def("backward", &backward, "gradient of the per-pixel sums w.r.t. the features (Jᵀ·w)");
  m.def("jvp", &jvp, "tangent of the per-pixel sums for feature tangents (J·v)");
  m.def("residual_backward", &residual_backward, "Jᵀ·w of the residuals rw·colour − rb·alpha (w [I,H,W,D])");
  m.def("residual_jvp", &residual_jvp, "J·v of the residuals rw·colour − rb·alpha -> [I,H,W,D]");
  m.def("gram", &gram, "per-Gaussian Gram matrices of the residual feature gradients");
  m.def("project_tangent", &project_tangent, "jac · v from jac_t [B,C,N,p,F] (transposed), v [B,N,p] -> [B,C,N,F]");
  m.def("project_cotangent", &project_cotangent, "Σ_c jacᵀ · g [B,C,N,F] -> [B,N,p]");
  m.def("project_forward", &project_forward, "EWA projection -> feats [B,C,N,7+D], radii, valid");
  m.def("project_backward", &project_backward, "gradients of the projection's inputs from feature gradients");
  m.def("gram_blocks", &gram_blocks, "Σ_c jacᵀ G jac -> [B,N,p,p] (symmetrized)");
  m.def("gram_diagonal", &gram_diagonal, "Σ_c diag(jacᵀ G jac) -> [B,N,p]");
  m.def("project_jacobian", &project_jacobian, "∂feats/∂(Gaussian parameters) [B,C,N,F,p] (and ∂/∂pose [..,6])");
}
