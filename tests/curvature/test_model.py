"""The routing around fused kernels of ``bn_mode_context`` / ``kernel_context``: global state restored (also when
the body raises), the routed functions equal to the fused ones (values and first derivatives), and a product
that meets an operation without the derivative it needs stopped by one line naming the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases_kernels import build
from torch import nn
from torch.func import functional_call, jvp

from gmix_curvature.curvature import ggn_trace, hessian_trace, top_eigenvalues
from gmix_curvature.curvature._model import bn_mode_context, kernel_context
from gmix_curvature.errors import GmixError

SINGLE = 1e-7  # relative error of 1/6 rounded to single precision (PyTorch's float64 hardsigmoid_backward)


def _global_state() -> tuple:
    return (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch._C._len_torch_function_stack(),
    )


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath_on", "fastpath_off"])
@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_global_state_is_restored(fastpath, raises):
    model = nn.Linear(2, 2)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        before = _global_state()
        with pytest.raises(RuntimeError, match="inside") if raises else torch.no_grad():
            with bn_mode_context(model):
                assert not torch.backends.mha.get_fastpath_enabled()
                assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
                assert not torch.backends.cuda.mem_efficient_sdp_enabled()
                if raises:
                    raise RuntimeError("inside")
        assert _global_state() == before
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def test_routing_can_be_left_out():
    before = _global_state()
    with bn_mode_context(nn.Linear(2, 2), route_kernels=False):
        assert _global_state() == before
        assert type(F.hardsigmoid(torch.zeros(1, requires_grad=True)).grad_fn).__name__ == "HardsigmoidBackward0"


def test_hardsigmoid_is_routed_only_inside():
    """Inside, hardsigmoid is relu6(x + 3) / 6: the same values, the exact derivative 1/6 on (-3, 3) and 0 at and
    beyond the kinks ±3, as PyTorch's — whose float64 derivative is 1/6 rounded to single precision."""
    x = torch.linspace(-4, 4, 17, dtype=torch.float64, requires_grad=True)  # -3 and 3 (the kinks) included
    outside = F.hardsigmoid(x)
    with kernel_context():
        inside = F.hardsigmoid(x)
        module = nn.Hardsigmoid()(x)
        builtin = torch._C._nn.hardsigmoid(x)
    assert type(outside.grad_fn).__name__ == "HardsigmoidBackward0"
    assert type(inside.grad_fn).__name__ != "HardsigmoidBackward0"
    assert type(module.grad_fn) is type(inside.grad_fn) and type(builtin.grad_fn) is type(inside.grad_fn)
    assert torch.equal(inside, outside)
    (routed,), (fused,) = torch.autograd.grad(inside.sum(), x), torch.autograd.grad(outside.sum(), x)
    assert torch.equal(routed, ((x > -3) & (x < 3)).double() / 6)
    torch.testing.assert_close(fused, routed, rtol=SINGLE, atol=0)
    assert type(F.hardsigmoid(x).grad_fn).__name__ == "HardsigmoidBackward0"


@pytest.mark.parametrize("name", ["transformer_encoder", "squeeze_excitation"])
def test_routed_kernels_compute_the_same_function(name):
    """Outputs and parameter gradients inside the context equal those of the fused kernels outside."""
    model, x, y = build(name)
    params = [p for p in model.parameters()]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model(x)
        return out, list(torch.autograd.grad(F.cross_entropy(out, y), params))

    with torch.no_grad():
        fused = model(x)  # eval and no autograd: the fused fast path where there is one
    out, grads = run()
    with kernel_context():
        with torch.no_grad():
            routed = model(x)
        out_routed, grads_routed = run()
    torch.testing.assert_close(routed, fused, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_routed, out, rtol=1e-12, atol=1e-14)
    rel = SINGLE if name == "squeeze_excitation" else 1e-10  # PyTorch's hardsigmoid derivative: 1/6 in single
    for a, b in zip(grads_routed, grads):
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


MISSING = [
    # (case, estimator, the message's layer and operation)
    ("grid_sample", lambda m, d: ggn_trace(m, d, "hutchinson", num_probes=2, generator=0),
     r"layer '1' \(Warp\): aten::grid_sampler_2d has no forward-mode derivative"),
    ("grid_sample", lambda m, d: top_eigenvalues(m, d, k=1),
     r"layer '1' \(Warp\): aten::grid_sampler_2d has no forward-mode derivative"),
    ("raw_hardsigmoid", lambda m, d: hessian_trace(m, d, num_probes=2, generator=0),
     r"layer '1' \(RawGate\): aten::hardsigmoid_backward has no second derivative"),
    ("raw_hardsigmoid", lambda m, d: top_eigenvalues(m, d, k=1, matrix="hessian"),
     r"layer '1' \(RawGate\): aten::hardsigmoid_backward has no second derivative"),
]


@pytest.mark.parametrize("case,estimator,message", MISSING,
                         ids=["grid_sample-hutchinson", "grid_sample-lanczos", "raw_hardsigmoid-hessian",
                              "raw_hardsigmoid-hessian_lanczos"])
def test_missing_derivative_is_one_line_naming_the_layer(case, estimator, message):
    model, x, y = build(case)
    with pytest.raises(GmixError, match=message) as err:
        estimator(model, (x, y))
    assert "\n" not in str(err.value) and "per-sample norms" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_once_differentiable_error_names_the_layer():
    """PyTorch raises this (from a DelayedError node) when a second backward reaches such a Function's backward;
    the translation is tested on PyTorch's own message, raised inside the context after a forward pass."""
    model, x, _ = build("once_differentiable")
    with pytest.raises(GmixError, match=r"layer '1' \(OnceSquare\): its autograd.Function _OnceSquare is marked "
                                        "@once_differentiable, so it has no second derivative") as err:
        with bn_mode_context(model):
            model(x)
            raise RuntimeError("trying to differentiate twice a function that was marked with @once_differentiable")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["grid_sample", "raw_hardsigmoid", "once_differentiable"])
def test_first_order_methods_still_run_where_a_product_cannot(case):
    """What the message suggests works: exact and fisher_is need first derivatives only."""
    model, x, y = build(case)
    exact = ggn_trace(model, (x, y), "exact").value
    r = ggn_trace(model, (x, y), "fisher_is", num_probes=8, generator=0)
    assert exact > 0 and abs(r.value - exact) < 4 * r.stderr


def _jvp(model: nn.Module, x: torch.Tensor) -> None:
    params = {k: p.detach() for k, p in model.named_parameters()}
    jvp(lambda p: functional_call(model, p, (x,)), (params,), ({k: torch.ones_like(p) for k, p in params.items()},))


def _double_backward(model: nn.Module, x: torch.Tensor) -> None:
    params = list(model.parameters())
    grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
    torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])


@pytest.mark.parametrize("product,message", [
    (_jvp, r"layer 'encoder.layers.0' \(TransformerEncoderLayer\): aten::_transformer_encoder_layer_fwd has no "
           "forward-mode derivative"),
    (_double_backward, r"layer 'encoder.layers.0.self_attn' \(MultiheadAttention\): "
                       "aten::_scaled_dot_product_flash_attention_for_cpu_backward has no second derivative"),
], ids=["forward_mode", "second_derivative"])
def test_fused_kernels_fail_without_the_routing_and_are_named(product, message):
    """The products the estimators form, on the fused kernels (route_kernels=False): PyTorch's errors, turned into
    one line naming the layer; with the routing the same products run (below and in test_hessian/test_eigen)."""
    model, x, _ = build("transformer_encoder")
    with pytest.raises(GmixError, match=message):
        with bn_mode_context(model, route_kernels=False):
            model(x)
            product(model, x)
    with bn_mode_context(model):
        product(model, x)
