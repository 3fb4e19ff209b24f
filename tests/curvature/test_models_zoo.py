"""Every method on torchvision's classification models (issue 15, item 5): ViT, Swin, ConvNeXt, MobileNet v2
and v3, EfficientNet and ResNet at tiny widths and depths, 16×16 images (8×8 for ResNet, whose widths are
fixed), float64, in eval mode.

The reference is the model's Jacobian J (n × C × d, ``torch.func.jacrev``, first derivatives only):
Tr(G) = (1/n) Σ_i Tr(H_i J_i J_iᵀ), the empirical Fisher (1/n) Σ_i r_iᵀ J_i J_iᵀ r_i with r_i = p_i - e_{y_i},
the GGN-vector product Jᵀ H J v / n and the top eigenvalue of G from the nC × nC matrix H^{1/2} J Jᵀ H^{1/2} / n.
Hessian-vector products are checked against central differences of gradients (first derivatives through the
fused kernels): the products run on the kernels routed around by
``bn_mode_context`` (theory/KERNELS.md) and must agree with the function the fused kernels compute. Zero
initialisations that make J degenerate (ViT's head, ConvNeXt's layer scale of 1e-6) are replaced.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import Case, materialise
from torch import nn
from torch.func import functional_call, grad, jvp
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.swin_transformer import SwinTransformer

from gmix_curvature.curvature import (
    empirical_fisher_trace,
    ggn_trace,
    ggn_vector_product,
    hessian_trace,
    hessian_vector_product,
    top_eigenvalues,
)
from gmix_curvature.curvature._model import bn_mode_context
from gmix_curvature.curvature.deflated import deflated_ggn_trace
from gmix_curvature.curvature.reference import dense_ggn, dense_hessian, dense_jacobian
from gmix_curvature.transformer import TransformerSeq2Seq

Z = 4.0  # standard errors allowed between a stochastic estimate and the exact value
REL = 1e-8  # exact methods against the Jacobian reference (float64)
PROBES = 16
HESSIAN_PROBES = 8
FD_STEP = 1e-7  # central differences of gradients for the Hessian-vector products
FD_REL = 1e-5
CLASSES = 4


def _vit(g: torch.Generator) -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                                 mlp_dim=8, num_classes=CLASSES)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision's head starts at zero: J would be the head's
    nn.init.normal_(model.heads.head.bias, std=0.5)
    return model


def _swin(g: torch.Generator) -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
                           num_classes=CLASSES)


def _convnext(g: torch.Generator) -> nn.Module:
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], layer_scale=0.5, num_classes=CLASSES)


def _mobilenet_v2(g: torch.Generator) -> nn.Module:
    return torchvision.models.MobileNetV2(num_classes=CLASSES, width_mult=0.25,
                                          inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 1, 2]])


def _mobilenet_v3(g: torch.Generator) -> nn.Module:
    """Squeeze-excitation (hardsigmoid) and hardswish blocks, as mobilenet_v3_small's."""
    setting = [InvertedResidualConfig(8, 3, 8, 8, True, "RE", 2, 1, 1.0),
               InvertedResidualConfig(8, 3, 16, 8, True, "HS", 1, 1, 1.0)]
    return MobileNetV3(setting, last_channel=16, num_classes=CLASSES)


def _efficientnet(g: torch.Generator) -> nn.Module:
    return EfficientNet([MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1)], dropout=0.2,
                        last_channel=16, num_classes=CLASSES)


def _resnet(g: torch.Generator) -> nn.Module:
    """torchvision's ResNet with one basic block per stage (resnet18 has two; its widths, 64 to 512, are fixed);
    the last three stages frozen so that the parameter-space methods and Lanczos hold 0.08 M trainable
    parameters, not 4.9 M."""
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)
    for p in [*model.layer2.parameters(), *model.layer3.parameters(), *model.layer4.parameters()]:
        p.requires_grad_(False)
    return model


ZOO = [
    Case("vit", _vit, (3, 16, 16), CLASSES, 8),
    Case("swin", _swin, (3, 16, 16), CLASSES, 8),
    Case("convnext", _convnext, (3, 16, 16), CLASSES, 8),
    Case("mobilenet_v2", _mobilenet_v2, (3, 16, 16), CLASSES, 8),
    Case("mobilenet_v3", _mobilenet_v3, (3, 16, 16), CLASSES, 8),
    Case("efficientnet", _efficientnet, (3, 16, 16), CLASSES, 8),
    Case("resnet", _resnet, (3, 8, 8), CLASSES, 8),
]
PIECEWISE_LINEAR = {"mobilenet_v2", "resnet"}  # ReLU/ReLU6, max-pooling, eval BatchNorm: Tr(H) = Tr(G)
ids = [c.name for c in ZOO]


class Reference:
    """Exact quantities from the Jacobian (first derivatives only)."""

    def __init__(self, case: Case) -> None:
        self.model, self.x, self.y = materialise(case)
        jac = dense_jacobian(self.model, self.x).detach()  # (n, C, d)
        n, c, d = jac.shape
        with torch.no_grad():
            p = torch.softmax(self.model(self.x), 1)
        h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (n, C, C)
        gram = jac @ jac.transpose(1, 2)  # J_i J_iᵀ
        r = p - F.one_hot(self.y, c).to(p)
        self.ggn_trace = float(torch.einsum("ncd,ndc->", h, gram) / n)
        self.empirical_fisher = float(torch.einsum("nc,ncd,nd->", r, gram, r) / n)
        vals, vecs = torch.linalg.eigh(h)
        root = torch.block_diag(*(v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T for w, v in zip(vals, vecs)))
        flat = jac.reshape(n * c, d)
        self.top_eigenvalue = float(torch.linalg.eigvalsh(root @ flat @ flat.T @ root / n)[-1])
        self.jac, self.h, self.n = flat, torch.block_diag(*h), n

    def ggn_vector_product(self, v: torch.Tensor) -> torch.Tensor:
        """Σ_i J_iᵀ H_i J_i v (a sum over samples, as ``ggn_vector_product``)."""
        return self.jac.T @ (self.h @ (self.jac @ v))


@functools.cache
def reference(name: str) -> Reference:
    return Reference(next(c for c in ZOO if c.name == name))


def _flat(model: nn.Module, v: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v[k].reshape(-1) for k, p in model.named_parameters() if p.requires_grad])


def _direction(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters() if p.requires_grad}


# exact methods ---------------------------------------------------------------------------------------------------

EXACT = {
    "exact": lambda m, d: ggn_trace(m, d, "exact"),
    "exact_func": lambda m, d: ggn_trace(m, d, "exact", backend="func"),
    "auto": lambda m, d: ggn_trace(m, d, "auto"),
}


@pytest.mark.parametrize("method", list(EXACT))
@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_exact_ggn_trace(case, method):
    ref = reference(case.name)
    r = EXACT[method](ref.model, (ref.x, ref.y))
    assert r.method == "exact" and r.value == pytest.approx(ref.ggn_trace, rel=REL)


@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_empirical_fisher_trace(case):
    ref = reference(case.name)
    assert empirical_fisher_trace(ref.model, (ref.x, ref.y)).value == pytest.approx(ref.empirical_fisher, rel=REL)


# stochastic methods ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fisher_is", "fisher_mc", "output_hutchinson", "hutchinson", "fisher_is_deflated"])
@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_stochastic_ggn_trace_within_standard_errors(case, method):
    ref = reference(case.name)
    if method == "fisher_is_deflated":  # a rank-2 sketch (forward-mode products) plus fisher_is on the rest
        r = deflated_ggn_trace(ref.model, (ref.x, ref.y), rank=2, num_probes=PROBES, generator=1)
    else:
        r = ggn_trace(ref.model, (ref.x, ref.y), method, num_probes=PROBES, generator=1)
    assert r.method == method and r.n_probes == PROBES and r.stderr > 0
    assert abs(r.value - ref.ggn_trace) < Z * r.stderr


# products through the routed kernels -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_ggn_vector_product(case):
    """Forward mode (torch.func.jvp) through every layer, against Jᵀ H J v."""
    ref = reference(case.name)
    v = _direction(ref.model)
    with bn_mode_context(ref.model):
        got = ggn_vector_product(ref.model, ref.x, v, y=ref.y)
    want = ref.ggn_vector_product(_flat(ref.model, v))
    torch.testing.assert_close(_flat(ref.model, got), want, rtol=REL, atol=REL * float(want.abs().max()))


def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"),
                                                                  params)])


def _hvp_forward_over_reverse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: dict) -> torch.Tensor:
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y, reduction="sum")

    return _flat(model, jvp(grad(loss), (params,), (v,))[1])


@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_hessian_vector_product(case):
    """Reverse over reverse through the routed kernels, against (∇L(θ + εv) - ∇L(θ - εv)) / 2ε computed with the
    model's own (fused) kernels, which only need first derivatives; on the piecewise-linear networks (no fused
    kernel, but kinks a difference step may cross) against forward over reverse (torch.func.jvp of grad)."""
    ref = reference(case.name)
    model, v = ref.model, _direction(ref.model)
    with bn_mode_context(model):
        got = _flat(model, hessian_vector_product(model, ref.x, ref.y, v))
    if case.name in PIECEWISE_LINEAR:
        want = _hvp_forward_over_reverse(model, ref.x, ref.y, v)
        torch.testing.assert_close(got, want, rtol=REL, atol=REL * float(want.abs().max()))
        return
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = []
    for sign in (1, -1):
        with torch.no_grad():
            for k, p in params.items():
                p.add_(sign * FD_STEP * v[k])
        grads.append(_loss_gradient(model, ref.x, ref.y))
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(sign * FD_STEP * v[k])
    want = (grads[0] - grads[1]) / (2 * FD_STEP)
    torch.testing.assert_close(got, want, rtol=FD_REL, atol=FD_REL * float(want.abs().max()))


@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_hessian_trace(case):
    """Finite with a standard error everywhere; where the network is piecewise linear, Tr(H) = Tr(G)."""
    ref = reference(case.name)
    r = hessian_trace(ref.model, (ref.x, ref.y), num_probes=HESSIAN_PROBES, generator=2)
    assert r.n_probes == HESSIAN_PROBES and torch.isfinite(torch.tensor([r.value, r.stderr])).all() and r.stderr > 0
    if case.name in PIECEWISE_LINEAR:
        assert abs(r.value - ref.ggn_trace) < Z * r.stderr


@pytest.mark.parametrize("case", ZOO, ids=ids)
def test_top_ggn_eigenvalue(case):
    ref = reference(case.name)
    r = top_eigenvalues(ref.model, (ref.x, ref.y), k=1, tol=1e-10)
    assert r.value == pytest.approx(ref.top_eigenvalue, rel=1e-7)


# the Fig. 3 Transformer (sequence outputs, padding, tied weights, fused encoder/decoder layers) -------------------


@functools.cache
def _fig3() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The toy-size Fig. 3 Transformer in eval mode, a padded batch, and the dense G and Hessian (``reference.py``'s
    dense references, the mean over counted tokens)."""
    torch.manual_seed(0)
    model = TransformerSeq2Seq(7, max_len=4, d_model=4, nhead=2, num_layers=1, dim_feedforward=8).double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(1, 7, (4, 2, 4), generator=g), torch.randint(1, 7, (4, 4), generator=g)
    x[0, :, 3], y[0, 3] = 0, -100  # one padded position
    return model, x, y, dense_ggn(model, x, y), dense_hessian(model, x, y)


SEQUENCE_METHODS = {
    "exact": lambda m, d: ggn_trace(m, d, "exact"),
    "auto": lambda m, d: ggn_trace(m, d, "auto"),
    **{k: functools.partial(lambda k, m, d: ggn_trace(m, d, k, num_probes=PROBES, generator=3), k)
       for k in ("fisher_is", "output_hutchinson", "hutchinson")},
    "hessian_trace": lambda m, d: hessian_trace(m, d, num_probes=PROBES, generator=4),
    "top_eigenvalue": lambda m, d: top_eigenvalues(m, d, k=1, tol=1e-10),
    "top_hessian_eigenvalue": lambda m, d: top_eigenvalues(m, d, k=1, matrix="hessian", tol=1e-10),
}


@pytest.mark.parametrize("method", list(SEQUENCE_METHODS))
def test_fig3_transformer(method):
    """Every method on the Fig. 3 Transformer (nn.Transformer's fused layers in eval mode) against the dense G and
    Hessian: exact values to 1e-8 (eigenvalues 1e-7), stochastic ones within Z standard errors."""
    model, x, y, ggn, hess = _fig3()
    r = SEQUENCE_METHODS[method](model, (x, y))
    if method == "top_eigenvalue":
        assert r.value == pytest.approx(float(torch.linalg.eigvalsh(ggn)[-1]), rel=1e-7)
    elif method == "top_hessian_eigenvalue":
        assert r.value == pytest.approx(float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-7)
    elif r.stderr is None:
        assert r.value == pytest.approx(float(ggn.trace()), rel=REL)
    else:
        want = float((hess if method == "hessian_trace" else ggn).trace())
        assert abs(r.value - want) < Z * r.stderr
