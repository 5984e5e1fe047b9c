/* The fused head + decoder + argmax kernel's entry point (fused_decode_kernel.cpp), called by
 * the PyTorch wrapper (fused_decode_ext.cpp) after it has checked every tensor. */
#pragma once
#include <stdint.h>

namespace calm_fused {

/* Sizes, in this order (all int64):
 *   D       the head's width (= the backbone's: h is [B, D])
 *   NOISE   the head's noise size            LATENT  the latent size
 *   HEAD_BLOCKS                              AE_D    the autoencoder's width
 *   AE_FFN  the decoder's SwiGLU width       PRE_BLOCKS, POST_BLOCKS  decoder blocks
 *   K       tokens per chunk                 V       vocabulary size */
enum { D, NOISE, LATENT, HEAD_BLOCKS, AE_D, AE_FFN, PRE_BLOCKS, POST_BLOCKS, K, V, NUM_DIMS };

}  // namespace calm_fused

/* Weights, in the order `calm.fused_decode` lists them (all contiguous float32):
 *   head:    hidden_embd.{w,b}, norm_hidden.{w,b}, noise_embd.{w,b}, norm_noise.{w,b},
 *            per block: in_ln.{w,b}, linears.0.{w,b}, linears.2.{w,b}, linears.4.{w,b}, down_proj.{w,b},
 *            final_layer: in_ln.{w,b}, linears.0.{w,b}, linears.2.{w,b}
 *   decoder: from_latent.{w,b}, per pre block: norm.w, gate.w, up.w, down.w, expand.{w,b},
 *            per post block: norm.w, gate.w, up.w, down.w, decoder_norm.w, lm_head.w [V, AE_D]
 * eps: head LayerNorm eps, autoencoder RMSNorm eps.
 *
 * h [B, D], noise [B, m, NOISE] -> out [B, m, K] token ids, and the head's latents in
 * latents [B, m, LATENT] unless it is NULL. The caller guarantees every shape (nothing is
 * checked here). Returns 0, or -1 when out of memory. */
int calm_fused_head_decode(const float *const *p, const int64_t *dims, const float *eps, const float *h,
                           int64_t B, const float *noise, int64_t m, int64_t *out, float *latents);
