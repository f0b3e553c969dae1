// Compiled EWA projection of difftto's CPU rasterizer, forward and backward.
//
// The twin is projection.py's project_gaussians plus gaussians.py's activations (the
// torch path of rasterize); every formula below follows theirs, in the same order where
// rounding matters, so float64 agrees to ~1e-15 and float32 to a few ulps:
//   q̂ = (q / max|q|) / max(‖q / max|q|‖, 1e-12),  R_q = R(q̂),  s = exp(clamp(log s, ±15)),
//   M = R_q·diag(s),  t = R_w μ + t_w,  F = R_w M,  (x, y, z) = t, or (0, 0, 1) when the
//   depth is outside (near, far),  u = x/z, v = y/z,  mean2d = (fx u + cx, fy v + cy),
//   J = [[fx/z, 0, -fx u_c/z], [0, fy/z, -fy v_c/z]] (u_c, v_c clamped to 1.3× the field
//   of view),  Σ' = (J F)(J F)ᵀ + eps2d·I,  conic = (c, -b, a) / (det_n·s) with the
//   entries normalized by s = max(a, c) (not differentiated) before the determinant.
// Outputs are the features the compositing kernels read (rasterize_cpu.cpp):
//   feats [B, C, N, 7 + D] = mean2d (2), conic (3), log-opacity, colours (D), depth,
// and the opacity-aware footprint radii [B, C, N, 2] (int32) and valid flags [B, C, N].
//
// Parallelism: at::parallel_for over the B·N Gaussians (OpenMP in torch's CPU builds);
// the backward visits every camera of one Gaussian in one task, so the per-Gaussian
// gradients need no atomics. Camera gradients are written per (image, Gaussian) and summed
// by the caller.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr double kLogScaleBound = 15.0;
constexpr double kFootprintSigmas = 3.33;
constexpr double kAlphaThreshold = 1.0 / 255.0;

// The per-Gaussian part shared by all cameras: q̂, R(q̂), the scales and M = R·diag(s).
template <typename T>
struct Shape {
  T largest, q1[4], norm1, qn[4], R[9], s[3], M[9];

  Shape(const T* q, const T* log_s) {
    largest = std::max(std::max(std::abs(q[0]), std::abs(q[1])), std::max(std::abs(q[2]), std::abs(q[3])));
    const T div = largest > T(0) ? largest : T(1);
    T sq = 0;
    for (int k = 0; k < 4; ++k) {
      q1[k] = q[k] / div;
      sq += q1[k] * q1[k];
    }
    norm1 = std::sqrt(sq);
    const T norm = std::max(norm1, T(1e-12));
    for (int k = 0; k < 4; ++k) qn[k] = q1[k] / norm;
    const T w = qn[0], x = qn[1], y = qn[2], z = qn[3];
    const T xx = x * x, yy = y * y, zz = z * z, xy = x * y, xz = x * z, yz = y * z, wx = w * x, wy = w * y,
            wz = w * z;
    const T rot[9] = {1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),     2 * (xy + wz),    1 - 2 * (xx + zz),
                      2 * (yz - wx),     2 * (xz - wy), 2 * (yz + wx),     1 - 2 * (xx + yy)};
    std::copy(rot, rot + 9, R);
    for (int k = 0; k < 3; ++k)
      s[k] = std::exp(std::min(std::max(log_s[k], T(-kLogScaleBound)), T(kLogScaleBound)));
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 3; ++k) M[3 * j + k] = R[3 * j + k] * s[k];
  }
};

// One camera's view of one Gaussian: everything the forward computes and the backward
// needs again.
template <typename T>
struct View {
  const T *Rw, *K;
  T mc[3], x, y, z, rz, u, v, uc, vc, lim[4], Fc[9], jm[6], a, b, c, scale, an, bn, cn, det_raw, det_n, conic[3];
  bool in_range;

  View(const Shape<T>& sh, const T* mean, const T* viewmat, const T* K_, T eps2d, T near, T far, int64_t width,
       int64_t height)
      : Rw(viewmat), K(K_) {
    for (int i = 0; i < 3; ++i)
      mc[i] = Rw[4 * i] * mean[0] + Rw[4 * i + 1] * mean[1] + Rw[4 * i + 2] * mean[2] + Rw[4 * i + 3];
    in_range = mc[2] > near && mc[2] < far;
    // A culled Gaussian sits on the optical axis before any division (as the twin), so no
    // inf or NaN reaches a value or a gradient.
    x = in_range ? mc[0] : T(0);
    y = in_range ? mc[1] : T(0);
    z = in_range ? mc[2] : T(1);
    const T fx = K[0], fy = K[4], cx = K[2], cy = K[5];
    rz = T(1) / z;
    u = x * rz;
    v = y * rz;
    lim[0] = (T(width) - cx) / fx + T(0.3) * (T(0.5) * T(width) / fx);  // x positive
    lim[1] = cx / fx + T(0.3) * (T(0.5) * T(width) / fx);              // x negative
    lim[2] = (T(height) - cy) / fy + T(0.3) * (T(0.5) * T(height) / fy);
    lim[3] = cy / fy + T(0.3) * (T(0.5) * T(height) / fy);
    uc = std::min(std::max(u, -lim[1]), lim[0]);
    vc = std::min(std::max(v, -lim[3]), lim[2]);
    for (int i = 0; i < 3; ++i)
      for (int k = 0; k < 3; ++k)
        Fc[3 * i + k] = Rw[4 * i] * sh.M[k] + Rw[4 * i + 1] * sh.M[3 + k] + Rw[4 * i + 2] * sh.M[6 + k];
    const T j00 = fx * rz, j02 = -fx * uc * rz, j11 = fy * rz, j12 = -fy * vc * rz;
    for (int k = 0; k < 3; ++k) {
      jm[k] = j00 * Fc[k] + j02 * Fc[6 + k];
      jm[3 + k] = j11 * Fc[3 + k] + j12 * Fc[6 + k];
    }
    a = jm[0] * jm[0] + jm[1] * jm[1] + jm[2] * jm[2] + eps2d;
    b = jm[0] * jm[3] + jm[1] * jm[4] + jm[2] * jm[5];
    c = jm[3] * jm[3] + jm[4] * jm[4] + jm[5] * jm[5] + eps2d;
    // Normalized before the determinant: a·c overflows for huge covariances.
    scale = std::max(std::max(a, c), T(1e-30));
    if (std::isnan(a) || std::isnan(c)) scale = std::numeric_limits<T>::quiet_NaN();
    an = a / scale;
    bn = b / scale;
    cn = c / scale;
    det_raw = an * cn - bn * bn;
    det_n = std::max(det_raw, T(1e-12));
    const T denom = det_n * scale;
    conic[0] = cn / denom;
    conic[1] = -bn / denom;
    conic[2] = an / denom;
  }
};

// d max(a, b) / d a as torch computes it: 1 above, 0 below, ½ on a tie.
template <typename T>
inline T above(T value, T bound) {
  return value > bound ? T(1) : (value == bound ? T(0.5) : T(0));
}

template <typename T>
inline T log_sigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
void project_forward_impl(const T* means, const T* log_scales, const T* quats, const T* opacities, const T* colors,
                          bool colors_per_camera, const T* viewmats, const T* Ks, int64_t B, int64_t C, int64_t N,
                          int64_t D, int64_t width, int64_t height, T eps2d, T near, T far, T* feats, int32_t* radii,
                          bool* valid) {
  const int64_t F = 7 + D;
  at::parallel_for(0, B * N, 64, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t b = e / N, n = e % N;
      const Shape<T> sh(quats + 4 * e, log_scales + 3 * e);
      const T logit = opacities[e];
      const T log_op = log_sigmoid(logit);
      const T op = T(1) / (T(1) + std::exp(-logit));
      T extend = T(kFootprintSigmas);
      const T ratio = std::max(op / T(kAlphaThreshold), T(1));
      extend = std::min(extend, std::sqrt(T(2) * std::log(ratio)));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t bc = b * C + c, id = bc * N + n;
        const View<T> vw(sh, means + 3 * e, viewmats + 16 * bc, Ks + 9 * bc, eps2d, near, far, width, height);
        T* f = feats + id * F;
        f[0] = vw.K[0] * vw.u + vw.K[2];
        f[1] = vw.K[4] * vw.v + vw.K[5];
        std::copy(vw.conic, vw.conic + 3, f + 2);
        f[5] = log_op;
        const T* col = colors + (colors_per_camera ? id : e) * D;
        std::copy(col, col + D, f + 6);
        f[6 + D] = vw.mc[2];
        const T rx = std::ceil(extend * std::sqrt(std::max(vw.a, T(0))));
        const T ry = std::ceil(extend * std::sqrt(std::max(vw.c, T(0))));
        bool ok = vw.in_range && std::isfinite(vw.a) && std::isfinite(vw.c) && op >= T(kAlphaThreshold);
        ok = ok && (rx > 0 || ry > 0);
        ok = ok && (f[0] + rx > 0) && (f[0] - rx < T(width)) && (f[1] + ry > 0) && (f[1] - ry < T(height));
        const T big = T(1 << 30);
        valid[id] = ok;
        radii[2 * id] = ok ? static_cast<int32_t>(std::min(rx, big)) : 0;
        radii[2 * id + 1] = ok ? static_cast<int32_t>(std::min(ry, big)) : 0;
      }
    }
  });
}

// Reverse mode of one (camera, Gaussian) feature row g [F]: accumulates into the
// Gaussian's gradients of its mean (3), of M (9) and, when view_grad is given, writes the
// camera's [3, 4] gradient.
template <typename T>
void project_view_backward(const Shape<T>& sh, const View<T>& vw, const T* mean, const T* g, int64_t D, T* g_mean,
                           T* g_M, T* view_grad) {
  const T fx = vw.K[0], fy = vw.K[4];
  // conic = (cn, -bn, an) / (det_n·s)
  const T denom = vw.det_n * vw.scale;
  const T g_det = vw.det_raw >= T(1e-12)
                      ? -(g[2] * vw.conic[0] + g[3] * vw.conic[1] + g[4] * vw.conic[2]) / vw.det_n
                      : T(0);
  const T g_an = g[4] / denom + g_det * vw.cn;
  const T g_cn = g[2] / denom + g_det * vw.an;
  const T g_bn = -g[3] / denom - T(2) * g_det * vw.bn;
  const T g_a = g_an / vw.scale, g_b = g_bn / vw.scale, g_c = g_cn / vw.scale;
  // Σ' = jm jmᵀ: rows jm0, jm1
  T g_jm[6];
  for (int k = 0; k < 3; ++k) {
    g_jm[k] = T(2) * g_a * vw.jm[k] + g_b * vw.jm[3 + k];
    g_jm[3 + k] = T(2) * g_c * vw.jm[3 + k] + g_b * vw.jm[k];
  }
  // jm = J Fc
  const T j00 = fx * vw.rz, j02 = -fx * vw.uc * vw.rz, j11 = fy * vw.rz, j12 = -fy * vw.vc * vw.rz;
  T g_j00 = 0, g_j02 = 0, g_j11 = 0, g_j12 = 0, g_Fc[9];
  for (int k = 0; k < 3; ++k) {
    g_j00 += g_jm[k] * vw.Fc[k];
    g_j02 += g_jm[k] * vw.Fc[6 + k];
    g_j11 += g_jm[3 + k] * vw.Fc[3 + k];
    g_j12 += g_jm[3 + k] * vw.Fc[6 + k];
    g_Fc[k] = j00 * g_jm[k];
    g_Fc[3 + k] = j11 * g_jm[3 + k];
    g_Fc[6 + k] = j02 * g_jm[k] + j12 * g_jm[3 + k];
  }
  T g_rz = g_j00 * fx - g_j02 * fx * vw.uc + g_j11 * fy - g_j12 * fy * vw.vc;
  const T g_uc = -g_j02 * fx * vw.rz, g_vc = -g_j12 * fy * vw.rz;
  const T g_u = g[0] * fx + g_uc * above(vw.u, -vw.lim[1]) * above(vw.lim[0], std::max(vw.u, -vw.lim[1]));
  const T g_v = g[1] * fy + g_vc * above(vw.v, -vw.lim[3]) * above(vw.lim[2], std::max(vw.v, -vw.lim[3]));
  g_rz += g_u * vw.x + g_v * vw.y;
  T g_mc[3] = {T(0), T(0), g[6 + D]};  // the depth feature is the raw camera z
  if (vw.in_range) {
    g_mc[0] += g_u * vw.rz;
    g_mc[1] += g_v * vw.rz;
    g_mc[2] += -g_rz * (vw.rz * vw.rz);
  }
  // mc = Rw μ + t, Fc = Rw M
  for (int j = 0; j < 3; ++j) {
    g_mean[j] += vw.Rw[j] * g_mc[0] + vw.Rw[4 + j] * g_mc[1] + vw.Rw[8 + j] * g_mc[2];
    for (int k = 0; k < 3; ++k)
      g_M[3 * j + k] += vw.Rw[j] * g_Fc[k] + vw.Rw[4 + j] * g_Fc[3 + k] + vw.Rw[8 + j] * g_Fc[6 + k];
  }
  if (view_grad != nullptr) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j)
        view_grad[4 * i + j] = g_mc[i] * mean[j] + g_Fc[3 * i] * sh.M[3 * j] + g_Fc[3 * i + 1] * sh.M[3 * j + 1] +
                               g_Fc[3 * i + 2] * sh.M[3 * j + 2];
      view_grad[4 * i + 3] = g_mc[i];
    }
  }
}

// From ∂/∂M to the log-scales and quaternions (through R(q̂) and the normalization).
template <typename T>
void shape_backward(const Shape<T>& sh, const T* g_M, const T* log_s, T* g_log_s, T* g_q) {
  T g_R[9];
  for (int k = 0; k < 3; ++k) {
    T g_s = 0;
    for (int j = 0; j < 3; ++j) {
      g_s += g_M[3 * j + k] * sh.R[3 * j + k];
      g_R[3 * j + k] = g_M[3 * j + k] * sh.s[k];
    }
    const bool inside = log_s[k] >= T(-kLogScaleBound) && log_s[k] <= T(kLogScaleBound);
    g_log_s[k] = inside ? g_s * sh.s[k] : T(0);
  }
  const T w = sh.qn[0], x = sh.qn[1], y = sh.qn[2], z = sh.qn[3];
  const T g_qn[4] = {
      2 * (-z * g_R[1] + y * g_R[2] + z * g_R[3] - x * g_R[5] - y * g_R[6] + x * g_R[7]),
      2 * (y * g_R[1] + z * g_R[2] + y * g_R[3] - 2 * x * g_R[4] - w * g_R[5] + z * g_R[6] + w * g_R[7] -
           2 * x * g_R[8]),
      2 * (-2 * y * g_R[0] + x * g_R[1] + w * g_R[2] + x * g_R[3] + z * g_R[5] - w * g_R[6] + z * g_R[7] -
           2 * y * g_R[8]),
      2 * (-2 * z * g_R[0] - w * g_R[1] + x * g_R[2] + w * g_R[3] - 2 * z * g_R[4] + y * g_R[5] + x * g_R[6] +
           y * g_R[7]),
  };
  // q̂ = q1 / max(‖q1‖, 1e-12), q1 = q / max|q| (the divisor is not differentiated)
  const T norm = std::max(sh.norm1, T(1e-12));
  T dot = 0;
  for (int k = 0; k < 4; ++k) dot += g_qn[k] * sh.q1[k];
  const T g_norm = sh.norm1 >= T(1e-12) ? -dot / (norm * norm) : T(0);
  const T div = sh.largest > T(0) ? sh.largest : T(1);
  for (int k = 0; k < 4; ++k) {
    const T radial = sh.norm1 >= T(1e-12) ? g_norm * sh.q1[k] / sh.norm1 : T(0);
    g_q[k] = (g_qn[k] / norm + radial) / div;
  }
}

template <typename T>
void project_backward_impl(const T* means, const T* log_scales, const T* quats, const T* opacities,
                           bool colors_per_camera, const T* viewmats, const T* Ks, const T* grad_feats, int64_t B,
                           int64_t C, int64_t N, int64_t D, int64_t width, int64_t height, T eps2d, T near, T far,
                           T* g_means, T* g_log_scales, T* g_quats, T* g_opacities, T* g_colors, T* g_view) {
  const int64_t F = 7 + D;
  at::parallel_for(0, B * N, 64, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t b = e / N, n = e % N;
      T* gm = g_means + 3 * e;
      T g_M[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      T g_logit = 0;
      std::fill(gm, gm + 3, T(0));
      if (!colors_per_camera) std::fill(g_colors + e * D, g_colors + (e + 1) * D, T(0));
      std::optional<Shape<T>> shape;  // made once, for the first camera that saw the Gaussian
      for (int64_t c = 0; c < C; ++c) {
        const int64_t bc = b * C + c, id = bc * N + n;
        const T* g = grad_feats + id * F;
        T* vg = g_view != nullptr ? g_view + 12 * id : nullptr;
        T* gc = g_colors + (colors_per_camera ? id : e) * D;
        for (int64_t q = 0; q < D; ++q) gc[q] = (colors_per_camera ? T(0) : gc[q]) + g[6 + q];
        g_logit += g[5];
        bool zero = true;  // a Gaussian no pixel saw: exactly zero, no recomputation
        for (int64_t k = 0; k < 5; ++k) zero = zero && g[k] == T(0);
        zero = zero && g[6 + D] == T(0);
        if (zero) {
          if (vg != nullptr) std::fill(vg, vg + 12, T(0));
          continue;
        }
        if (!shape.has_value()) shape.emplace(quats + 4 * e, log_scales + 3 * e);
        const View<T> vw(*shape, means + 3 * e, viewmats + 16 * bc, Ks + 9 * bc, eps2d, near, far, width, height);
        project_view_backward(*shape, vw, means + 3 * e, g, D, gm, g_M, vg);
      }
      // d logsigmoid(x) / dx = sigmoid(-x)
      g_opacities[e] = g_logit / (T(1) + std::exp(opacities[e]));
      if (shape.has_value()) {
        shape_backward(*shape, g_M, log_scales + 3 * e, g_log_scales + 3 * e, g_quats + 4 * e);
      } else {
        std::fill(g_log_scales + 3 * e, g_log_scales + 3 * e + 3, T(0));
        std::fill(g_quats + 4 * e, g_quats + 4 * e + 4, T(0));
      }
    }
  });
}

// The projection Jacobian of the Gauss-Newton linearization (kernel_linearization.py):
// per (image, Gaussian) the [F, p] matrix ∂feats/∂(the Gaussian's parameters), and with
// dviews the [F, 6] matrix ∂feats/∂(its camera's pose deltas). Row by row: the geometric
// features (mean2d, conic, depth) are the reverse pass above with a unit cotangent (six
// passes per camera, the same tie and clamp conventions as torch's derivatives, so equal
// to the twin's forward mode); log-opacity and colours are elementwise.
// cols: the first column of means, log_scales, quats, opacities, colors in the p columns.
template <typename T>
void project_jacobian_impl(const T* means, const T* log_scales, const T* quats, const T* opacities,
                           const T* viewmats, const T* Ks, const T* dviews, int64_t B, int64_t C, int64_t N,
                           int64_t D, int64_t width, int64_t height, T eps2d, T near, T far, const int64_t* cols,
                           int64_t P, T* jac, T* jac_pose) {
  const int64_t F = 7 + D;
  at::parallel_for(0, B * N, 16, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t b = e / N, n = e % N;
      const Shape<T> sh(quats + 4 * e, log_scales + 3 * e);
      const T d_logit = T(1) / (T(1) + std::exp(opacities[e]));  // d logsigmoid(x) / dx
      for (int64_t c = 0; c < C; ++c) {
        const int64_t bc = b * C + c, id = bc * N + n;
        T* J = jac + id * F * P;
        std::fill(J, J + F * P, T(0));
        T* Jp = jac_pose != nullptr ? jac_pose + id * F * 6 : nullptr;
        if (Jp != nullptr) std::fill(Jp, Jp + F * 6, T(0));
        const View<T> vw(sh, means + 3 * e, viewmats + 16 * bc, Ks + 9 * bc, eps2d, near, far, width, height);
        for (int r = 0; r < 6; ++r) {
          const int64_t row = r < 5 ? r : 6 + D;
          T g[7] = {0, 0, 0, 0, 0, 0, 0};
          g[r < 5 ? r : 6] = T(1);  // D = 0 below: g[6] is the depth
          T g_mean[3] = {0, 0, 0}, g_M[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, g_log_s[3], g_q[4], g_view[12];
          project_view_backward(sh, vw, means + 3 * e, g, 0, g_mean, g_M, Jp != nullptr ? g_view : nullptr);
          shape_backward(sh, g_M, log_scales + 3 * e, g_log_s, g_q);
          T* Jr = J + row * P;
          for (int k = 0; k < 3; ++k) {
            if (cols[0] >= 0) Jr[cols[0] + k] = g_mean[k];
            if (cols[1] >= 0) Jr[cols[1] + k] = g_log_s[k];
          }
          if (cols[2] >= 0)
            for (int k = 0; k < 4; ++k) Jr[cols[2] + k] = g_q[k];
          if (Jp != nullptr) {
            const T* dv = dviews + bc * 6 * 16;  // [6, 4, 4]: ∂viewmat / ∂pose_j
            for (int j = 0; j < 6; ++j) {
              T acc = 0;
              for (int i = 0; i < 12; ++i) acc += g_view[i] * dv[16 * j + i];
              Jp[row * 6 + j] = acc;
            }
          }
        }
        if (cols[3] >= 0) J[5 * P + cols[3]] = d_logit;
        if (cols[4] >= 0)
          for (int64_t q = 0; q < D; ++q) J[(6 + q) * P + cols[4] + q] = T(1);
      }
    }
  });
}

void check_input(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " is ", t.scalar_type(), ", expected ",
              like.scalar_type());
}

}  // namespace

// means [B,N,3], log_scales [B,N,3], quats [B,N,4], opacities [B,N] (logits), colors [B,N,D]
// or [B,C,N,D], viewmats [B,C,4,4], Ks [B,C,3,3] -> feats [B,C,N,7+D], radii, valid.
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                           torch::Tensor opacities, torch::Tensor colors, torch::Tensor viewmats,
                                           torch::Tensor Ks, int64_t width, int64_t height, double eps2d,
                                           double near, double far) {
  for (auto* t : {&log_scales, &quats, &opacities, &colors, &viewmats, &Ks}) check_input(*t, means, "projection input");
  check_input(means, means, "means");
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1), D = colors.size(-1);
  const bool per_camera = colors.dim() == 4;
  auto feats = torch::empty({B, C, N, 7 + D}, means.options());
  auto radii = torch::empty({B, C, N, 2}, means.options().dtype(torch::kInt32));
  auto valid = torch::empty({B, C, N}, means.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_forward", [&] {
    project_forward_impl<scalar_t>(means.data_ptr<scalar_t>(), log_scales.data_ptr<scalar_t>(),
                                   quats.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
                                   colors.data_ptr<scalar_t>(), per_camera, viewmats.data_ptr<scalar_t>(),
                                   Ks.data_ptr<scalar_t>(), B, C, N, D, width, height, scalar_t(eps2d),
                                   scalar_t(near), scalar_t(far), feats.data_ptr<scalar_t>(),
                                   radii.data_ptr<int32_t>(), valid.data_ptr<bool>());
  });
  return {feats, radii, valid};
}

// Gradients of ⟨grad_feats, feats⟩: means, log_scales, quats, opacities, colors (the
// shape of `colors`) and, when view_grad, per-(image, Gaussian) camera rows [B,C,N,3,4].
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                            torch::Tensor opacities, torch::Tensor colors, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t width, int64_t height, double eps2d,
                                            double near, double far, torch::Tensor grad_feats, bool view_grad) {
  for (auto* t : {&log_scales, &quats, &opacities, &colors, &viewmats, &Ks, &grad_feats})
    check_input(*t, means, "projection input");
  check_input(means, means, "means");
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1), D = colors.size(-1);
  TORCH_CHECK(grad_feats.numel() == B * C * N * (7 + D), "grad_feats must be [B, C, N, 7 + D]");
  auto g_means = torch::empty_like(means), g_log_scales = torch::empty_like(log_scales);
  auto g_quats = torch::empty_like(quats), g_opacities = torch::empty_like(opacities);
  auto g_colors = torch::empty_like(colors);
  auto g_view = view_grad ? torch::empty({B, C, N, 3, 4}, means.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_backward", [&] {
    project_backward_impl<scalar_t>(
        means.data_ptr<scalar_t>(), log_scales.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
        opacities.data_ptr<scalar_t>(), colors.dim() == 4, viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(),
        grad_feats.data_ptr<scalar_t>(), B, C, N, D, width, height, scalar_t(eps2d), scalar_t(near), scalar_t(far),
        g_means.data_ptr<scalar_t>(), g_log_scales.data_ptr<scalar_t>(), g_quats.data_ptr<scalar_t>(),
        g_opacities.data_ptr<scalar_t>(), g_colors.data_ptr<scalar_t>(),
        view_grad ? g_view.data_ptr<scalar_t>() : nullptr);
  });
  std::vector<torch::Tensor> out = {g_means, g_log_scales, g_quats, g_opacities, g_colors};
  if (view_grad) out.push_back(g_view);
  return out;
}

// means [B,N,3], log_scales [B,N,3], quats [B,N,4], opacities [B,N], colors [B,N,D] (only
// its size is read: the colour rows are the identity), viewmats [B,C,4,4], Ks [B,C,3,3],
// cols [5] int64 (first column of each group in p, or -1), dviews [B,C,6,4,4] or an empty
// tensor -> {jac [B,C,N,7+D,p]} or {jac, jac_pose [B,C,N,7+D,6]}.
std::vector<torch::Tensor> project_jacobian(torch::Tensor means, torch::Tensor log_scales, torch::Tensor quats,
                                            torch::Tensor opacities, torch::Tensor colors, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t width, int64_t height, double eps2d,
                                            double near, double far, torch::Tensor cols, int64_t p,
                                            torch::Tensor dviews) {
  for (auto* t : {&log_scales, &quats, &opacities, &viewmats, &Ks}) check_input(*t, means, "projection input");
  check_input(means, means, "means");
  TORCH_CHECK(colors.dim() == 3, "colors must be [B, N, D], got ", colors.sizes());
  TORCH_CHECK(cols.scalar_type() == torch::kInt64 && cols.numel() == 5 && cols.is_contiguous() &&
                  cols.device().is_cpu(), "cols must be 5 contiguous int64 column offsets");
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1), D = colors.size(-1);
  const int64_t* cp = cols.data_ptr<int64_t>();
  const int64_t widths[5] = {3, 3, 4, 1, D};
  for (int k = 0; k < 5; ++k)
    TORCH_CHECK(cp[k] == -1 || (cp[k] >= 0 && cp[k] + widths[k] <= p), "column offset ", cp[k], " of group ", k,
                " does not fit in p = ", p);
  const bool pose = dviews.numel() > 0;
  if (pose) {
    check_input(dviews, means, "dviews");
    TORCH_CHECK(dviews.numel() == B * C * 6 * 16, "dviews must be [B, C, 6, 4, 4]");
  }
  auto jac = torch::empty({B, C, N, 7 + D, p}, means.options());
  auto jac_pose = pose ? torch::empty({B, C, N, 7 + D, 6}, means.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_jacobian", [&] {
    project_jacobian_impl<scalar_t>(
        means.data_ptr<scalar_t>(), log_scales.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
        opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(),
        pose ? dviews.data_ptr<scalar_t>() : nullptr, B, C, N, D, width, height, scalar_t(eps2d), scalar_t(near),
        scalar_t(far), cp, p, jac.data_ptr<scalar_t>(), pose ? jac_pose.data_ptr<scalar_t>() : nullptr);
  });
  if (pose) return {jac, jac_pose};
  return {jac};
}
