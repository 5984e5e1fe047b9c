// PyTorch binding of the fused head + decoder + argmax kernel (fused_decode_kernel.cpp).
//
// Built by torch.utils.cpp_extension (calm.fused_decode). Every tensor is checked here, before
// the kernel reads a byte of it: dtype float32, the CPU, contiguous memory, and the exact shape
// the sizes inferred from the weights imply. A model that does not fit gets a ValueError naming
// the tensor, never an out-of-bounds read.
//
// The pybind header of PyTorch (not <torch/extension.h>, which pulls in the whole C++ frontend)
// halves the first build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "fused_decode_kernel.h"

namespace {

// Bumped when the Python side must notice an incompatible build (calm.fused_decode checks it).
constexpr int kInterfaceVersion = 1;

std::string shape_of(const at::Tensor &t) {
    std::string s = "[";
    for (int64_t i = 0; i < t.dim(); i++) s += (i ? ", " : "") + std::to_string(t.size(i));
    return s + "]";
}

void check_float_cpu(const at::Tensor &t, const char *what, int64_t index = -1) {
    if (t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous()) return;
    const std::string name = index < 0 ? what : std::string(what) + " " + std::to_string(index);
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// (the message is only built on failure: these checks run on every call)
void check_shape(const at::Tensor &t, at::IntArrayRef shape, const char *what, const char *prefix = "") {
    TORCH_CHECK_VALUE(t.sizes() == shape, prefix, what, " has shape ", shape_of(t), ", the kernel expects ",
                      shape);
}

// The weights in the kernel's order (fused_decode_kernel.h) and the sizes they imply.
struct Plan {
    std::vector<const float *> ptrs;
    int64_t dims[calm_fused::NUM_DIMS];
    float eps[2];
};

Plan make_plan(const std::vector<at::Tensor> &w, int64_t head_blocks, int64_t pre_blocks, int64_t post_blocks,
               int64_t chunk_size, double ln_eps, double rms_eps) {
    using namespace calm_fused;
    TORCH_CHECK_VALUE(head_blocks >= 0 && pre_blocks >= 0 && post_blocks >= 0 && chunk_size > 0,
                      "block counts must be >= 0 and the chunk size > 0");
    const size_t expected = 8 + 10 * head_blocks + 6 + 2 + 4 * pre_blocks + 2 + 4 * post_blocks + 2;
    TORCH_CHECK_VALUE(w.size() == expected, "the kernel expects ", expected, " weight tensors for ",
                      head_blocks, " head blocks and ", pre_blocks, " + ", post_blocks,
                      " decoder blocks, got ", w.size());
    for (size_t j = 0; j < w.size(); j++) check_float_cpu(w[j], "weight", static_cast<int64_t>(j));
    // sizes from the first tensor of each kind; every tensor is then checked against them
    TORCH_CHECK_VALUE(w[0].dim() == 2 && w[4].dim() == 2, "the head's input layers must be matrices");
    const int64_t d = w[0].size(0), nd = w[4].size(1);
    const size_t fin = 8 + 10 * head_blocks, dec = fin + 6;
    TORCH_CHECK_VALUE(w[fin + 4].dim() == 2 && w[dec].dim() == 2, "the latent layers must be matrices");
    const int64_t l = w[fin + 4].size(0), da = w[dec].size(0);
    const size_t expand = dec + 2 + 4 * pre_blocks, lm_head = w.size() - 1;
    int64_t f = 0;
    if (pre_blocks + post_blocks > 0) {
        const at::Tensor &gate = w[pre_blocks > 0 ? dec + 3 : expand + 3];
        TORCH_CHECK_VALUE(gate.dim() == 2, "the decoder's gate projection must be a matrix");
        f = gate.size(0);
    }
    TORCH_CHECK_VALUE(w[lm_head].dim() == 2, "the vocabulary projection must be a matrix");
    const int64_t V_ = w[lm_head].size(0), K_ = chunk_size;

    size_t i = 0;
    auto next = [&](at::IntArrayRef shape, const char *what, const char *prefix = "") {
        check_shape(w[i++], shape, what, prefix);
    };
    next({d, d}, "hidden_embd.weight"), next({d}, "hidden_embd.bias");
    next({d}, "norm_hidden.weight"), next({d}, "norm_hidden.bias");
    next({d, nd}, "noise_embd.weight"), next({d}, "noise_embd.bias");
    next({d}, "norm_noise.weight"), next({d}, "norm_noise.bias");
    for (int64_t b = 0; b < head_blocks; b++) {
        next({d}, "head block in_ln.weight"), next({d}, "head block in_ln.bias");
        next({d, 2 * d}, "head block linears.0.weight"), next({d}, "head block linears.0.bias");
        next({d, d}, "head block linears.2.weight"), next({d}, "head block linears.2.bias");
        next({2 * d, d}, "head block linears.4.weight"), next({2 * d}, "head block linears.4.bias");
        next({d, d}, "head block down_proj.weight"), next({d}, "head block down_proj.bias");
    }
    next({d}, "final_layer.in_ln.weight"), next({d}, "final_layer.in_ln.bias");
    next({d, d}, "final_layer.linears.0.weight"), next({d}, "final_layer.linears.0.bias");
    next({l, d}, "final_layer.linears.2.weight"), next({l}, "final_layer.linears.2.bias");
    next({da, l}, "from_latent.weight"), next({da}, "from_latent.bias");
    auto block = [&](const char *where) {
        next({da}, "norm.weight", where), next({f, da}, "gate_proj.weight", where);
        next({f, da}, "up_proj.weight", where), next({da, f}, "down_proj.weight", where);
    };
    for (int64_t b = 0; b < pre_blocks; b++) block("decoder_pre block ");
    next({K_ * da, da}, "expand.weight"), next({K_ * da}, "expand.bias");
    for (int64_t b = 0; b < post_blocks; b++) block("decoder_post block ");
    next({da}, "decoder_norm.weight"), next({V_, da}, "lm_head.weight");

    Plan plan;
    for (const at::Tensor &t : w) plan.ptrs.push_back(t.data_ptr<float>());
    const int64_t dims[NUM_DIMS] = {d, nd, l, head_blocks, da, f, pre_blocks, post_blocks, K_, V_};
    std::copy(dims, dims + NUM_DIMS, plan.dims);
    plan.eps[0] = static_cast<float>(ln_eps), plan.eps[1] = static_cast<float>(rms_eps);
    return plan;
}

// Token chunks [B, m, K] (int64) for h [B, d] and noise [B, m, noise_dim]; the head's samples
// into `latents` [B, m, latent_dim] when given. Holds no state: the weights are checked on
// every call (a few microseconds against ~0.7 ms of arithmetic at the CPU preset).
at::Tensor head_decode(const std::vector<at::Tensor> &weights, int64_t head_blocks, int64_t pre_blocks,
                       int64_t post_blocks, int64_t chunk_size, double ln_eps, double rms_eps,
                       const at::Tensor &h, const at::Tensor &noise, const std::optional<at::Tensor> &latents) {
    using namespace calm_fused;
    Plan plan = make_plan(weights, head_blocks, pre_blocks, post_blocks, chunk_size, ln_eps, rms_eps);
    check_float_cpu(h, "h");
    check_float_cpu(noise, "noise");
    TORCH_CHECK_VALUE(h.dim() == 2 && noise.dim() == 3, "h must be [B, d] and noise [B, m, noise_dim], got ",
                      shape_of(h), " and ", shape_of(noise));
    const int64_t B = h.size(0), m = noise.size(1);
    check_shape(h, {B, plan.dims[D]}, "h");
    check_shape(noise, {B, m, plan.dims[NOISE]}, "noise");
    float *z = nullptr;
    if (latents.has_value()) {
        check_float_cpu(*latents, "latents");
        check_shape(*latents, {B, m, plan.dims[LATENT]}, "latents");
        z = latents->data_ptr<float>();
    }
    at::Tensor out = at::empty({B, m, plan.dims[K]}, h.options().dtype(at::kLong));
    if (B * m == 0) return out;
    int rc;
    {
        pybind11::gil_scoped_release no_gil;  // plain arithmetic on memory the tensors own
        rc = calm_fused_head_decode(plan.ptrs.data(), plan.dims, plan.eps, h.data_ptr<float>(), B,
                                    noise.data_ptr<float>(), m, out.data_ptr<int64_t>(), z);
    }
    if (rc != 0) throw std::bad_alloc();  // -> MemoryError
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "CALM's energy head + autoencoder decoder + vocabulary argmax in one call (calm.fused_decode)";
    m.attr("interface_version") = kInterfaceVersion;
    m.def("head_decode", &head_decode, "token chunks [B, m, K] for h [B, d] and noise [B, m, noise_dim]",
          pybind11::arg("weights"), pybind11::arg("head_blocks"), pybind11::arg("pre_blocks"),
          pybind11::arg("post_blocks"), pybind11::arg("chunk_size"), pybind11::arg("ln_eps"),
          pybind11::arg("rms_eps"), pybind11::arg("h"), pybind11::arg("noise"),
          pybind11::arg("latents") = pybind11::none());
}
