// DN self-attention on the CPU without a W x W mask, as two problems over exactly the visible blocks:
//   every query x the matching keys, run by ATen's CPU flash-attention kernel (final for matching queries, one
//   segment of a DN query's softmax);
//   each DN group x its own keys, a small dense problem (group_size keys per query) computed here directly on
//   the strided rows, so no group has to be copied into a batch layout.
// A DN query's two segments share one softmax: their outputs merge exactly through their log-sum-exp.
// The backward runs the flash backward of the matching problem with the merged output and log-sum-exp, which is
// exactly the joint softmax's gradient restricted to that segment (P = exp(s - lse), D = rowsum(dO * O)), and
// computes the own-group segment's share here.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "cpu_loops.h"
#include "dn_structure_common.h"

namespace dnops {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t pad_size, int64_t group_size) {
  TORCH_CHECK(q.dim() == 4, "dn_self_attention: q must be (B, H, W, Dh), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "dn_self_attention: q, k, v must share one shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "dn_self_attention: q, k, v must share one dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "dn_self_attention: q must be floating, got ", q.scalar_type());
  TORCH_CHECK(pad_size <= q.size(2), "dn_self_attention: pad_size (", pad_size, ") exceeds W=", q.size(2));
  check_dn_structure(pad_size, group_size, q.size(2) - pad_size);
}

// The matching queries' rows [pad, W) along the sequence.
at::Tensor matching_part(const at::Tensor& t, int64_t pad_size) {
  return t.narrow(2, pad_size, t.size(2) - pad_size);
}

at::Tensor lse_like(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::toOpMathType(q.scalar_type())));
}

// Gradients in the (B, W, H, Dh) memory layout ATen's flash backward produces, so no copy is needed to reuse
// its results (the fake kernel in dnops/ops/dn_self_attention.py declares the same strides).
at::Tensor grad_like(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

// A (B, H, W, Dh) tensor with any strides; kUnit: the caller checked that Dh is contiguous, and the channel loops
// vectorize.
template <typename T, bool kUnit>
struct Rows {
  T* data;
  int64_t sb, sh, sw, sd_;
  Rows() : data(nullptr), sb(0), sh(0), sw(0), sd_(0) {}
  explicit Rows(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sw(t.stride(2)), sd_(t.stride(3)) {}
  T* row(int64_t b, int64_t h, int64_t w) const { return data + b * sb + h * sh + w * sw; }
  int64_t sd() const { return kUnit ? 1 : sd_; }
};

// dot / axpy over a row of Dh channels: the shared vectorized loops when the rows are contiguous (kUnit), else
// strided loops.
template <typename acc_t, bool kUnit, typename T, typename U>
DNOPS_ALWAYS_INLINE acc_t row_dot(const T* x, int64_t sx, const U* y, int64_t sy, int64_t n) {
  if constexpr (kUnit) {
    return dot<acc_t>(x, y, n);
  } else {
    acc_t s = 0;
    for (int64_t d = 0; d < n; ++d) s += static_cast<acc_t>(x[d * sx]) * static_cast<acc_t>(y[d * sy]);
    return s;
  }
}

template <bool kUnit, typename acc_t, typename T>
DNOPS_ALWAYS_INLINE void row_axpy(acc_t* y, acc_t alpha, const T* x, int64_t sx, int64_t n) {
  if constexpr (kUnit) {
    axpy(y, alpha, x, n);
  } else {
    for (int64_t d = 0; d < n; ++d) y[d] += alpha * static_cast<acc_t>(x[d * sx]);
  }
}

// Calls f(std::true_type) when every tensor's last dimension is contiguous, else f(std::false_type).
template <typename F>
void dispatch_unit_stride(std::initializer_list<const at::Tensor*> tensors, F&& f) {
  const bool unit = std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) { return t->stride(3) == 1; });
  if (unit) return f(std::true_type{});
  f(std::false_type{});
}

// The tensors of the own-group problem as strided rows: q, k, v, out, and for the backward grad_out, dq, dk, dv;
// lse as (B, H, W) contiguous.
template <typename scalar_t, bool kUnit>
struct OwnGroups {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t, kUnit> q, k, v;
  Rows<scalar_t, kUnit> out;
  acc_t* lse;
  int64_t heads, width, dh, groups, group_size;
  acc_t scale;
  bool merge = false;
  Rows<const scalar_t, kUnit> go{};
  Rows<scalar_t, kUnit> dq{}, dk{}, dv{};
};

// Every DN query x its own group's keys for items (b, h, group) [begin, end). With `merge`, out / lse already
// hold the DN rows' matching segment and the two merge in place: lse = logaddexp(l1, l2),
// out = o1 * exp(l1 - lse) + o2 * exp(l2 - lse); without (no matching queries) the own segment is written.
template <typename scalar_t, bool kUnit>
DNOPS_ALWAYS_INLINE void own_forward_items(const OwnGroups<scalar_t, kUnit>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t gs = a.group_size, dh = a.dh;
  std::vector<acc_t> p(gs), o(dh);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t g = item % a.groups, h = item / a.groups % a.heads, b = item / (a.groups * a.heads);
    const int64_t first = g * gs;
    for (int64_t r = first; r < first + gs; ++r) {
      const scalar_t* qrow = a.q.row(b, h, r);
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < gs; ++j) {
        p[j] = a.scale * row_dot<acc_t, kUnit>(qrow, a.q.sd(), a.k.row(b, h, first + j), a.k.sd(), dh);
        mx = std::max(mx, p[j]);
      }
      acc_t sum = 0;
      for (int64_t j = 0; j < gs; ++j) sum += (p[j] = std::exp(p[j] - mx));
      std::fill(o.begin(), o.end(), acc_t(0));
      for (int64_t j = 0; j < gs; ++j) row_axpy<kUnit>(o.data(), p[j], a.v.row(b, h, first + j), a.v.sd(), dh);
      const acc_t own = mx + std::log(sum);
      acc_t& l = a.lse[(b * a.heads + h) * a.width + r];
      scalar_t* out_row = a.out.row(b, h, r);
      const int64_t so = a.out.sd();
      if (!a.merge) {
        for (int64_t d = 0; d < dh; ++d) out_row[d * so] = static_cast<scalar_t>(o[d] / sum);
        l = own;
        continue;
      }
      const acc_t top = std::max(own, l);
      const acc_t e_own = std::exp(own - top), w_cross = std::exp(l - top), total = e_own + w_cross;
      const acc_t w_own = e_own / sum;  // o holds the own segment's unnormalized sum
      for (int64_t d = 0; d < dh; ++d) {
        out_row[d * so] = static_cast<scalar_t>((o[d] * w_own + static_cast<acc_t>(out_row[d * so]) * w_cross) / total);
      }
      l = top + std::log(total);
    }
  }
}

// The own-group segment's share of the gradients for items (b, h, group) [begin, end), from the merged out and
// lse: P = exp(scale * q.k - lse), dS = P * (dO.v - dO.O). Adds to dq's DN rows and writes dk's and dv's (no other
// query sees those keys). Items own disjoint rows, so the result does not depend on scheduling.
template <typename scalar_t, bool kUnit>
DNOPS_ALWAYS_INLINE void own_backward_items(const OwnGroups<scalar_t, kUnit>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t gs = a.group_size, dh = a.dh;
  std::vector<acc_t> dk_acc(gs * dh), dv_acc(gs * dh), dq_acc(dh);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t g = item % a.groups, h = item / a.groups % a.heads, b = item / (a.groups * a.heads);
    const int64_t first = g * gs;
    std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
    std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
    for (int64_t r = first; r < first + gs; ++r) {
      const scalar_t *qrow = a.q.row(b, h, r), *grow = a.go.row(b, h, r);
      const acc_t delta = row_dot<acc_t, kUnit>(grow, a.go.sd(), a.out.row(b, h, r), a.out.sd(), dh);
      const acc_t l = a.lse[(b * a.heads + h) * a.width + r];
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      for (int64_t j = 0; j < gs; ++j) {
        const scalar_t *krow = a.k.row(b, h, first + j), *vrow = a.v.row(b, h, first + j);
        const acc_t prob = std::exp(a.scale * row_dot<acc_t, kUnit>(qrow, a.q.sd(), krow, a.k.sd(), dh) - l);
        const acc_t ds = prob * (row_dot<acc_t, kUnit>(grow, a.go.sd(), vrow, a.v.sd(), dh) - delta) * a.scale;
        row_axpy<kUnit>(dq_acc.data(), ds, krow, a.k.sd(), dh);
        row_axpy<kUnit>(dk_acc.data() + j * dh, ds, qrow, a.q.sd(), dh);
        row_axpy<kUnit>(dv_acc.data() + j * dh, prob, grow, a.go.sd(), dh);
      }
      scalar_t* dq_row = a.dq.row(b, h, r);
      const int64_t sq = a.dq.sd();
      for (int64_t d = 0; d < dh; ++d)
        dq_row[d * sq] = static_cast<scalar_t>(static_cast<acc_t>(dq_row[d * sq]) + dq_acc[d]);
    }
    for (int64_t j = 0; j < gs; ++j) {
      scalar_t *dk_row = a.dk.row(b, h, first + j), *dv_row = a.dv.row(b, h, first + j);
      for (int64_t d = 0; d < dh; ++d) {
        dk_row[d * a.dk.sd()] = static_cast<scalar_t>(dk_acc[j * dh + d]);
        dv_row[d * a.dv.sd()] = static_cast<scalar_t>(dv_acc[j * dh + d]);
      }
    }
  }
}

// The forward (backward = false) or backward items, compiled for AVX2+FMA and for the baseline ISA.
template <typename scalar_t, bool kUnit>
DNOPS_TARGET_AVX2 void own_items_avx2(const OwnGroups<scalar_t, kUnit>& a, bool backward, int64_t begin, int64_t end) {
  backward ? own_backward_items(a, begin, end) : own_forward_items(a, begin, end);
}

template <typename scalar_t, bool kUnit>
void own_items_base(const OwnGroups<scalar_t, kUnit>& a, bool backward, int64_t begin, int64_t end) {
  backward ? own_backward_items(a, begin, end) : own_forward_items(a, begin, end);
}

template <typename scalar_t, bool kUnit>
OwnGroups<scalar_t, kUnit> own_groups(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& lse, int64_t pad_size,
                                      int64_t group_size, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return {Rows<const scalar_t, kUnit>(q),
          Rows<const scalar_t, kUnit>(k),
          Rows<const scalar_t, kUnit>(v),
          Rows<scalar_t, kUnit>(out),
          static_cast<acc_t*>(lse.data_ptr()),
          q.size(1),
          q.size(2),
          q.size(3),
          pad_size / group_size,
          group_size,
          static_cast<acc_t>(scale)};
}

// Runs the own-group forward (backward = false) or backward over all (b, h, group) items.
template <typename scalar_t, bool kUnit>
void run_own_groups(const OwnGroups<scalar_t, kUnit>& a, int64_t batch, bool backward) {
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, batch * a.heads * a.groups, 1, [&](int64_t begin, int64_t end) {
    avx2 ? own_items_avx2(a, backward, begin, end) : own_items_base(a, backward, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> dn_self_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, int64_t pad_size, int64_t group_size,
                                                         double scale) {
  check_qkv(q_in, k_in, v_in, pad_size, group_size);
  // The flash kernel reads any (B, H, W, Dh) strides, e.g. the head-transposed views of a projection, and its
  // output takes q's strides: no copies.
  const at::Tensor &q = q_in, &k = k_in, &v = v_in;
  const int64_t matching = q.size(2) - pad_size;
  if (q.numel() == 0) return {at::empty_like(q), lse_like(q)};
  const at::Tensor k_match = matching_part(k, pad_size), v_match = matching_part(v, pad_size);
  at::Tensor out, lse;
  if (matching > 0) {
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(q, k_match, v_match, 0.0, false, std::nullopt, scale);
    out = o;
    lse = l.contiguous();
    if (pad_size == 0) return {out, lse};
  } else {
    out = at::empty_like(q);
    lse = lse_like(q);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dn_self_attention_own_groups", [&] {
    dispatch_unit_stride({&q, &k, &v, &out}, [&](auto unit) {
      auto a = own_groups<scalar_t, decltype(unit)::value>(q, k, v, out, lse, pad_size, group_size, scale);
      a.merge = matching > 0;
      run_own_groups(a, q.size(0), false);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dn_self_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t pad_size, int64_t group_size, double scale) {
  check_qkv(q_in, k_in, v_in, pad_size, group_size);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "dn_self_attention backward: grad_out and out must be (B, H, W, Dh)");
  const at::Tensor &q = q_in, &k = k_in, &v = v_in, &out = out_in;
  const at::Tensor go = grad_out_in.to(q.scalar_type());
  const at::Tensor lse = lse_in.contiguous();
  const int64_t matching = q.size(2) - pad_size;
  if (q.numel() == 0) return {grad_like(q), grad_like(k), grad_like(v)};
  const at::Tensor k_match = matching_part(k, pad_size), v_match = matching_part(v, pad_size);
  at::Tensor dq, dk, dv;
  if (matching > 0) {
    at::Tensor dk_match, dv_match;
    std::tie(dq, dk_match, dv_match) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        go, q, k_match, v_match, out, lse, 0.0, false, std::nullopt, scale);
    if (pad_size == 0) return {dq, dk_match, dv_match};
    // The full dk and dv are allocated only now, each right before its matching part is released: peak memory
    // stays that of the flash backward.
    dk = grad_like(k);
    matching_part(dk, pad_size).copy_(dk_match);
    dk_match.reset();
    dv = grad_like(v);
    matching_part(dv, pad_size).copy_(dv_match);
  } else {
    dq = grad_like(q).zero_();
    dk = grad_like(k);
    dv = grad_like(v);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "dn_self_attention_own_groups_backward", [&] {
        dispatch_unit_stride({&go, &q, &k, &v, &out, &dq, &dk, &dv}, [&](auto unit) {
          constexpr bool kUnit = decltype(unit)::value;
          auto a = own_groups<scalar_t, kUnit>(q, k, v, out, lse, pad_size, group_size, scale);
          a.go = Rows<const scalar_t, kUnit>(go);
          a.dq = Rows<scalar_t, kUnit>(dq);
          a.dk = Rows<scalar_t, kUnit>(dk);
          a.dv = Rows<scalar_t, kUnit>(dv);
          run_own_groups(a, q.size(0), true);
        });
      });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("dn_self_attention", &dn_self_attention_cpu);
  m.impl("_dn_self_attention_backward", &dn_self_attention_backward_cpu);
}

}  // namespace dnops
