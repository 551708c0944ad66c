// dn_attn_mask has no tensor input, so the dispatcher cannot pick a backend from its arguments: like aten's
// factory functions it gets a BackendSelect kernel that turns the `device` argument into a dispatch key.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/TensorOptions.h>
#include <torch/library.h>

namespace dnops {
namespace {

at::Tensor dn_attn_mask_backend_select(int64_t pad_size, int64_t group_size, int64_t num_queries,
                                       std::optional<at::Device> device) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dnops::dn_attn_mask", "")
                       .typed<at::Tensor(int64_t, int64_t, int64_t, std::optional<at::Device>)>();
  const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, std::nullopt, device));
  return op.redispatch(keys, pad_size, group_size, num_queries, device);
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, BackendSelect, m) {
  m.impl("dn_attn_mask", &dn_attn_mask_backend_select);
}

}  // namespace dnops
