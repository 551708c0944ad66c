// DN self-attention on the CPU as two unmasked attention problems over exactly the visible blocks, each run by
// ATen's CPU flash-attention kernel:
//   every query x the matching keys (final for matching queries, one segment of a DN query's softmax);
//   DN group g x DN group g (batched over groups).
// A DN query's two segments share one softmax: their outputs merge exactly through their log-sum-exp.
// The backward runs the flash backward of each problem with the merged output and log-sum-exp, which is exactly
// the joint softmax's gradient restricted to that segment (P = exp(s - lse), D = rowsum(dO * O)).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

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
  const auto dtype = at::toOpMathType(q.scalar_type());
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor> dn_self_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, int64_t pad_size, int64_t group_size,
                                                         double scale) {
  check_qkv(q_in, k_in, v_in, pad_size, group_size);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t matching = q.size(2) - pad_size;
  if (q.numel() == 0) return {at::empty_like(q), lse_like(q)};
  const Segments qs = split_seq(q, pad_size), ks = split_seq(k, pad_size), vs = split_seq(v, pad_size);
  at::Tensor out, lse;
  if (matching > 0) {
    auto [o, l] =
        at::_scaled_dot_product_flash_attention_for_cpu(q, ks.match, vs.match, 0.0, false, std::nullopt, scale);
    out = o.contiguous();
    lse = l.contiguous();
    if (pad_size == 0) return {out, lse};
  } else {
    out = at::empty_like(q);
    lse = lse_like(q);
  }
  auto [own_o, own_l] =
      at::_scaled_dot_product_flash_attention_for_cpu(by_group(qs.dn, group_size), by_group(ks.dn, group_size),
                                                      by_group(vs.dn, group_size), 0.0, false, std::nullopt, scale);
  const Segments os = split_seq(out, pad_size), ls = split_seq(lse, pad_size);
  const at::Tensor own_out = own_o.reshape(os.dn.sizes());
  const at::Tensor own_lse = own_l.reshape(ls.dn.sizes());
  if (matching == 0) {
    os.dn.copy_(own_out);
    ls.dn.copy_(own_lse);
    return {out, lse};
  }
  const at::Tensor cross_lse = ls.dn.clone();
  const at::Tensor merged = at::logaddexp(own_lse, cross_lse);
  const auto acc = lse.scalar_type();
  os.dn.copy_(own_out.to(acc) * (own_lse - merged).exp().unsqueeze(-1) +
              os.dn.to(acc) * (cross_lse - merged).exp().unsqueeze(-1));
  ls.dn.copy_(merged);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dn_self_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t pad_size, int64_t group_size, double scale) {
  check_qkv(q_in, k_in, v_in, pad_size, group_size);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "dn_self_attention backward: grad_out and out must be (B, H, W, Dh)");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_out_in.contiguous().to(q.scalar_type()), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const int64_t matching = q.size(2) - pad_size;
  if (q.numel() == 0) return {at::empty_like(q), at::empty_like(k), at::empty_like(v)};
  const Segments qs = split_seq(q, pad_size), ks = split_seq(k, pad_size), vs = split_seq(v, pad_size);
  at::Tensor dq = matching > 0 ? at::Tensor() : at::empty_like(q);
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  const Segments dks = split_seq(dk, pad_size), dvs = split_seq(dv, pad_size);
  if (matching > 0) {
    auto [a, b, c] = at::_scaled_dot_product_flash_attention_for_cpu_backward(go, q, ks.match, vs.match, out, lse, 0.0,
                                                                              false, std::nullopt, scale);
    dq = a.contiguous();
    dks.match.copy_(b);
    dvs.match.copy_(c);
    if (pad_size == 0) return {dq, dk, dv};
  }
  const Segments gs = split_seq(go, pad_size), os = split_seq(out, pad_size), ls = split_seq(lse, pad_size);
  const Segments dqs = split_seq(dq, pad_size);
  auto [a, b, c] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      by_group(gs.dn, group_size), by_group(qs.dn, group_size), by_group(ks.dn, group_size),
      by_group(vs.dn, group_size), by_group(os.dn, group_size), by_group(ls.dn, group_size), 0.0, false, std::nullopt,
      scale);
  if (matching > 0) {
    dqs.dn.add_(a.reshape(dqs.dn.sizes()));
  } else {
    dqs.dn.copy_(a.reshape(dqs.dn.sizes()));
  }
  dks.dn.copy_(b.reshape(dks.dn.sizes()));
  dvs.dn.copy_(c.reshape(dvs.dn.sizes()));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("dn_self_attention", &dn_self_attention_cpu);
  m.impl("_dn_self_attention_backward", &dn_self_attention_backward_cpu);
}

}  // namespace dnops
