// Declarations of the CPU bn_act kernels in namespace fastres::cpu::FASTRES_CPU_DECLS_NS.
// Included by bn_act_kernel.h once per instruction set (hence no include guard).
namespace fastres::cpu::FASTRES_CPU_DECLS_NS {

// Per-channel batch mean and biased variance of x (robust: chunked two-pass, Chan-merged in
// double). mean is the double-precision mean rounded to opmath; when mean_low is not null it
// receives what that rounding left out (mean + mean_low is the mean to about twice opmath's
// precision), for bn_act_apply.
template <typename T>
void bn_batch_stats(const T* x, const BnActLayout& layout, opmath<T>* mean, opmath<T>* var,
                    opmath<T>* mean_low);

// Folds invstd and the affine parameters into out = (x - mean) * scale + shift (scale = weight *
// invstd, shift = bias). Centring first keeps the result as accurate as the input when |mean| is
// large against the spread. weight and bias may be null (affine=False).
template <typename T>
void bn_scale_shift(const opmath<T>* mean, const opmath<T>* var, const opmath<T>* weight,
                    const opmath<T>* bias, double eps, int64_t channels, opmath<T>* scale,
                    opmath<T>* shift);

// out = activation((x - mean[c] - mean_low[c]) * scale[c] + shift[c] + residual), or with
// residual_after_activation activation((x - mean[c] - mean_low[c]) * scale[c] + shift[c]) +
// residual; residual may be null. mean_low (zeros for given statistics) is bn_batch_stats's:
// centring on the two-part mean keeps a channel whose spread is small against its mean from
// inheriting the rounding of the mean, amplified by 1 / std. relu_mask, when not null
// (relu_mask_bytes(numel) bytes, ReLU with the residual before it), receives a bit per element:
// out > 0.
template <typename T>
void bn_act_apply(const T* x, const T* residual, const opmath<T>* mean, const opmath<T>* mean_low,
                  const opmath<T>* scale, const opmath<T>* shift, const BnActLayout& layout,
                  Activation activation, bool residual_after_activation, T* out,
                  uint8_t* relu_mask);

// Per-channel sums of the masked gradient gm = grad_out * mask (mask null: all ones):
//   sum_g[c] = sum gm,   sum_gx[c] = sum gm * (x - mean[c]).
template <typename T>
void bn_act_backward_reduce(const T* grad_out, const T* x, const uint8_t* relu_mask,
                            const opmath<T>* mean, const BnActLayout& layout, opmath<T>* sum_g,
                            opmath<T>* sum_gx);

// Per-channel coefficients of grad_x = k_grad * gm + k_x * (x - mean) + k_const, from the sums
// above.
// Training differentiates through the batch statistics; eval treats them as constants.
template <typename T>
void bn_backward_coefficients(const opmath<T>* mean, const opmath<T>* var, const opmath<T>* weight,
                              const opmath<T>* sum_g, const opmath<T>* sum_gx, double eps,
                              int64_t reduce_size, int64_t channels, bool training,
                              opmath<T>* k_grad, opmath<T>* k_x, opmath<T>* k_const,
                              opmath<T>* grad_weight);

// grad_x = k_grad[c] * gm + k_x[c] * (x - mean[c]) + k_const[c]; grad_residual = gm (skipped
// when null).
template <typename T>
void bn_act_backward_apply(const T* grad_out, const T* x, const uint8_t* relu_mask,
                           const opmath<T>* mean, const opmath<T>* k_grad, const opmath<T>* k_x,
                           const opmath<T>* k_const, const BnActLayout& layout, T* grad_x,
                           T* grad_residual);

}  // namespace fastres::cpu::FASTRES_CPU_DECLS_NS
