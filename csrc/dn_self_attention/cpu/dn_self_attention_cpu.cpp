// DN self-attention on the CPU as two unmasked attention problems over exactly the visible blocks, each run by
// ATen's CPU flash-attention kernel:
//   every query x the matching keys (final for matching queries, one segment of a DN query's softmax);
//   DN group g x DN group g (batched over groups).
// A DN query's two segments share one softmax: their outputs merge exactly through their log-sum-exp.
// The backward runs the flash backward of each problem with the merged output and log-sum-exp, which is exactly
// the joint softmax's gradient restricted to that segment (P = exp(s - lse), D = rowsum(dO * O)).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "dn_attn_mask/dn_attn_mask_common.h"

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

struct Segments {
  at::Tensor dn, match;  // [0, pad) and [pad, W) along the sequence
};

Segments split_seq(const at::Tensor& t, int64_t pad_size) {
  return {t.narrow(2, 0, pad_size), t.narrow(2, pad_size, t.size(2) - pad_size)};
}

// (B, H, pad, ...) -> (B * H, groups, group_size, ...): each group as one "head" of an unmasked problem.
at::Tensor by_group(const at::Tensor& t, int64_t group_size) {
  std::vector<int64_t> shape{t.size(0) * t.size(1), t.size(2) / group_size, group_size};
  for (int64_t d = 3; d < t.dim(); ++d) shape.push_back(t.size(d));
  return t.reshape(shape);
}

at::Tensor lse_like(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::toOpMathType(q.scalar_type())));
}

// Gradients in the (B, W, H, Dh) memory layout ATen's flash backward produces, so no copy is needed to reuse
// its results (the fake kernel in dnops/ops/dn_self_attention.py declares the same strides).
at::Tensor grad_like(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

// out[b, h, r] / lse[b, h, r] hold the DN rows' cross segment (queries x matching keys); merges in place with the
// own-group segment: lse = logaddexp(l1, l2), out = o1 * exp(l1 - lse) + o2 * exp(l2 - lse).
template <typename scalar_t>
void merge_segments(at::Tensor& out, at::Tensor& lse, const at::Tensor& own_out, const at::Tensor& own_lse,
                    int64_t pad_size) {
  using acc_t = at::opmath_type<scalar_t>;
  auto o = out.accessor<scalar_t, 4>();
  auto l = lse.accessor<acc_t, 3>();
  const auto o1 = own_out.accessor<scalar_t, 4>();
  const auto l1 = own_lse.accessor<acc_t, 3>();
  const int64_t heads = out.size(1), dh = out.size(3);
  at::parallel_for(0, out.size(0) * heads * pad_size, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i % pad_size, h = (i / pad_size) % heads, b = i / (pad_size * heads);
      const acc_t own = l1[b][h][r], cross = l[b][h][r];
      const acc_t top = std::max(own, cross);
      const acc_t w_own = std::exp(own - top), w_cross = std::exp(cross - top);
      const acc_t total = w_own + w_cross;
      for (int64_t d = 0; d < dh; ++d) {
        o[b][h][r][d] = static_cast<scalar_t>(
            (static_cast<acc_t>(o1[b][h][r][d]) * w_own + static_cast<acc_t>(o[b][h][r][d]) * w_cross) / total);
      }
      l[b][h][r] = top + std::log(total);
    }
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
  const Segments qs = split_seq(q, pad_size), ks = split_seq(k, pad_size), vs = split_seq(v, pad_size);
  at::Tensor out, lse;
  if (matching > 0) {
    auto [o, l] =
        at::_scaled_dot_product_flash_attention_for_cpu(q, ks.match, vs.match, 0.0, false, std::nullopt, scale);
    out = o;
    lse = l.contiguous();
    if (pad_size == 0) return {out, lse};
  }
  auto [own_o, own_l] =
      at::_scaled_dot_product_flash_attention_for_cpu(by_group(qs.dn, group_size), by_group(ks.dn, group_size),
                                                      by_group(vs.dn, group_size), 0.0, false, std::nullopt, scale);
  const at::Tensor own_out = own_o.reshape({q.size(0), q.size(1), pad_size, q.size(3)});
  const at::Tensor own_lse = own_l.reshape({q.size(0), q.size(1), pad_size});
  if (matching == 0) return {at::empty_like(q).copy_(own_out), own_lse.contiguous()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dn_self_attention_merge",
                                  [&] { merge_segments<scalar_t>(out, lse, own_out, own_lse, pad_size); });
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
  const Segments qs = split_seq(q, pad_size), ks = split_seq(k, pad_size), vs = split_seq(v, pad_size);
  at::Tensor dq, dk_match, dv_match;
  if (matching > 0) {
    std::tie(dq, dk_match, dv_match) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        go, q, ks.match, vs.match, out, lse, 0.0, false, std::nullopt, scale);
    if (pad_size == 0) return {dq, dk_match, dv_match};
  } else {
    dq = grad_like(q);
  }
  const Segments gs = split_seq(go, pad_size), os = split_seq(out, pad_size), ls = split_seq(lse, pad_size);
  at::Tensor a, b, c;
  std::tie(a, b, c) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      by_group(gs.dn, group_size), by_group(qs.dn, group_size), by_group(ks.dn, group_size),
      by_group(vs.dn, group_size), by_group(os.dn, group_size), by_group(ls.dn, group_size), 0.0, false, std::nullopt,
      scale);
  const Segments dqs = split_seq(dq, pad_size);
  const auto dn_shape = dqs.dn.sizes();
  if (matching > 0) {
    dqs.dn.add_(a.reshape(dn_shape));
  } else {
    dqs.dn.copy_(a.reshape(dn_shape));
  }
  // Assemble dk, then dv, releasing each segment as soon as it is copied: peak memory stays below one full
  // gradient plus the flash backward's own.
  auto assemble = [&](const at::Tensor& like, at::Tensor& match_part, at::Tensor& dn_part) {
    at::Tensor full = grad_like(like);
    const Segments parts = split_seq(full, pad_size);
    if (matching > 0) parts.match.copy_(match_part);
    match_part.reset();
    parts.dn.copy_(dn_part.reshape(dn_shape));
    dn_part.reset();
    return full;
  };
  at::Tensor dk = assemble(k, dk_match, b);
  at::Tensor dv = assemble(v, dv_match, c);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("dn_self_attention", &dn_self_attention_cpu);
  m.impl("_dn_self_attention_backward", &dn_self_attention_backward_cpu);
}

}  // namespace dnops
