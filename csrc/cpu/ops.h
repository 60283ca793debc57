// The cpu backend's operators: declarations shared by the kernels and the bindings.
//
// Each function mirrors the function of the same name in cprec_kernels/reference.py
// (same arguments in the same order, same outputs). Two conventions differ, because
// an operator schema has no "list of optional tensors": an absent projection or an
// absent gradient is an EMPTY tensor (numel() == 0), which cprec_kernels/cpu.py maps
// to and from None. Supported dtypes: float32 and float64 (cpu.py upcasts the rest).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace cprec::cpu {

using TensorVec = std::vector<at::Tensor>;

// ---- block-wise factorized embedding (embedding.cpp) --------------------------------
at::Tensor blockwise_embedding_forward(const at::Tensor& ids, at::TensorList weights, at::TensorList projections,
                                       at::IntArrayRef cutoffs, std::optional<int64_t> padding_idx);

std::tuple<TensorVec, TensorVec> blockwise_embedding_backward(const at::Tensor& grad_out, const at::Tensor& ids,
                                                              at::TensorList weights, at::TensorList projections,
                                                              at::IntArrayRef cutoffs,
                                                              std::optional<int64_t> padding_idx);

// ---- tail-cluster adaptive softmax (adaptive_softmax.cpp) ---------------------------
// Gradients: (grad_hidden, grad_head_weight, grad_head_bias or empty,
//             [grad_tail_projection], [grad_tail_weight]).
using AdaptiveGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, TensorVec, TensorVec>;

// The loss with its softmax statistics: (loss, head_lse [N], tail_lse [N]); head_lse:
// log-sum-exp of each row's head logits; tail_lse: of the row's target tail cluster's
// logits (0 where the target is in the head or ignored). The backward takes them
// instead of recomputing them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_softmax_loss_stats_forward(
    const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& head_weight,
    const std::optional<at::Tensor>& head_bias, at::TensorList tail_projections, at::TensorList tail_weights,
    at::IntArrayRef cutoffs, int64_t ignore_index, const std::string& reduction);

AdaptiveGrads adaptive_softmax_loss_stats_backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                   const at::Tensor& target, const at::Tensor& head_weight,
                                                   const std::optional<at::Tensor>& head_bias,
                                                   at::TensorList tail_projections, at::TensorList tail_weights,
                                                   at::IntArrayRef cutoffs, int64_t ignore_index,
                                                   const std::string& reduction, const at::Tensor& head_lse,
                                                   const at::Tensor& tail_lse);

// The scalar loss (mean or sum) and its gradients for grad_loss = 1, formed in one pass:
// (loss, grad_hidden, grad_head_weight, grad_head_bias or empty, [grad_tail_projection],
// [grad_tail_weight]). Autograd scales them by the incoming gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, TensorVec, TensorVec> adaptive_softmax_loss_with_grads(
    const at::Tensor& hidden, const at::Tensor& target, const at::Tensor& head_weight,
    const std::optional<at::Tensor>& head_bias, at::TensorList tail_projections, at::TensorList tail_weights,
    at::IntArrayRef cutoffs, int64_t ignore_index, const std::string& reduction);

at::Tensor adaptive_log_prob_forward(const at::Tensor& hidden, const at::Tensor& head_weight,
                                     const std::optional<at::Tensor>& head_bias, at::TensorList tail_projections,
                                     at::TensorList tail_weights, at::IntArrayRef cutoffs);

AdaptiveGrads adaptive_log_prob_backward(const at::Tensor& grad, const at::Tensor& hidden,
                                         const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias,
                                         at::TensorList tail_projections, at::TensorList tail_weights,
                                         at::IntArrayRef cutoffs);

std::tuple<at::Tensor, at::Tensor> adaptive_topk_forward(const at::Tensor& hidden, const at::Tensor& head_weight,
                                                         const std::optional<at::Tensor>& head_bias,
                                                         at::TensorList tail_projections,
                                                         at::TensorList tail_weights, at::IntArrayRef cutoffs,
                                                         int64_t k, const std::optional<at::Tensor>& exclude);

// ---- causal dilated convolution (conv.cpp) ------------------------------------------
at::Tensor causal_conv1d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t dilation);

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      int64_t dilation);

// -> (out, mean, rstd, z): z [B, T, C_out] is the conv output before LayerNorm, kept so
// the backward need not recompute it (one activation a layer of memory, as eager keeps).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_ln_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
    const std::optional<at::Tensor>& residual, int64_t dilation, double eps);

// z: the forward's z, or absent (None / empty) to recompute it from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_ln_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& z, int64_t dilation, double eps);

}  // namespace cprec::cpu
