"""Block traces and scale-invariant sharpness: the blocks sum to the total, and rescaling the weights
feeding a BatchNorm (with its running statistics and eps) or a LayerNorm (with its eps) leaves the function
and the sharpness unchanged while dividing their block trace by the square of the scale; weights that only
reach a normalisation layer through a residual sum are not reported."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FRESH, TRAINED, materialise
from torch import nn

from gmix_curvature.curvature import ggn_trace, scale_invariant_groups, scale_invariant_sharpness
from gmix_curvature.curvature._outputs import call_model
from gmix_curvature.curvature.sharpness import NORM_LAYERS
from gmix_curvature.errors import GmixError
from gmix_curvature.models import CifarResNet18

ALPHA = 3.0
REL = 1e-8


@pytest.mark.parametrize("method", ["exact", "fisher_is", "output_hutchinson", "hutchinson"])
def test_block_traces_sum_to_the_total(method):
    model, x, y = materialise(FRESH[3])
    r = ggn_trace(model, (x, y), method, num_probes=4, generator=0)
    assert set(r.per_param) == {k for k, _ in model.named_parameters()}
    assert sum(r.per_param.values()) == pytest.approx(r.value, rel=1e-10)


def test_groups_are_found_from_the_module_graph():
    """Every convolution of the CIFAR ResNet-18 feeds a BatchNorm (stem, blocks, shortcuts); the head does not."""
    net = CifarResNet18(width=2).eval()
    groups = scale_invariant_groups(net, torch.zeros(2, 3, 32, 32))
    convs = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(groups) == sorted(convs) and len(convs) == 20
    assert "fc" not in groups


@pytest.mark.parametrize("case", [FRESH[2], TRAINED[1]], ids=lambda c: c.id)
def test_rescaling_the_weights_feeding_batchnorm(case):
    model, x, y = materialise(case)
    scaled = copy.deepcopy(model)
    conv, bn = scaled[0], scaled[1]  # Conv2d(1, 4) with bias → BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.mul_(ALPHA)
        conv.bias.mul_(ALPHA)
        bn.running_mean.mul_(ALPHA)
        bn.running_var.mul_(ALPHA**2)
    bn.eps *= ALPHA**2
    torch.testing.assert_close(scaled(x), model(x), rtol=1e-12, atol=1e-12)  # eval-mode function unchanged
    before = scale_invariant_sharpness(model, (x, y))
    after = scale_invariant_sharpness(scaled, (x, y))
    for name in ("0.weight", "0.bias"):
        assert after.per_param[name] == pytest.approx(before.per_param[name] / ALPHA**2, rel=REL)
    assert after.value == pytest.approx(before.value, rel=REL)
    assert after.extra["weight_norms2"]["0"] == pytest.approx(before.extra["weight_norms2"]["0"] * ALPHA**2, rel=REL)
    assert sorted(after.extra["groups"]) == ["0", "4"]
    assert after.quantity == "scale_invariant_sharpness" and after.stderr is None


def test_stochastic_sharpness_has_a_stderr():
    model, x, y = materialise(FRESH[2])
    exact = scale_invariant_sharpness(model, (x, y)).value
    r = scale_invariant_sharpness(model, (x, y), method="fisher_is", num_probes=16, generator=0)
    assert r.stderr > 0 and abs(r.value - exact) < 4 * r.stderr


def test_no_normalisation_layers():
    model, x, y = materialise(FRESH[0])
    with pytest.raises(GmixError, match="no parameters feeding a normalisation layer"):
        scale_invariant_sharpness(model, (x, y))


# LayerNorm-fed groups (issue 15, item 4) -----------------------------------------------------------------------


class NormedLM(nn.Module):
    """A tiny normalised transformer classifier: token embedding, one pre-norm block whose attention has
    QK-norm (queries and keys through their own LayerNorm), a final LayerNorm, mean pooling, linear head.

    Scale-invariant: ``q`` and ``k`` alone (each feeds a LayerNorm directly) and the residual stream's writers
    together (``emb``, ``o``, ``fc2``: every reader sees the stream through a LayerNorm). Not: ``v`` (through
    ``o``'s bias into a residual sum), ``fc1`` (through tanh), ``head`` (the logits), the LayerNorms' own."""

    def __init__(self, vocab: int = 7, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.q_norm, self.k_norm, self.ln2, self.ln_f = (nn.LayerNorm(d) for _ in range(5))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        a = self.ln1(h)
        q, k = self.q_norm(self.q(a)), self.k_norm(self.k(a))
        attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.o(attention @ self.v(a))
        h = h + self.fc2(torch.tanh(self.fc1(self.ln2(h))))
        return self.head(self.ln_f(h).mean(1))


class PostNormClassifier(nn.Module):
    """torch's post-norm ``nn.TransformerEncoderLayer`` on a linear patch embedding: every LayerNorm reads a
    residual sum, so no weight is scale-invariant."""

    def __init__(self, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


def _normed_lm() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = NormedLM().double().eval()
    return model, torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))


def rescaled(model: nn.Module, x: torch.Tensor, names: list[str], c: float) -> nn.Module:
    """A copy with the parameters ``names`` multiplied by c and, in every normalisation layer whose input
    comes out multiplied by c, eps by c² (BatchNorm: its running statistics too) — the function is then
    unchanged exactly when the group is scale-invariant. Which layers these are is measured, not assumed."""
    inputs: dict[str, list[torch.Tensor]] = {}

    def record(name):
        return lambda m, a: inputs.setdefault(name, []).append(a[0].detach().clone())

    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_LAYERS)]
    handles = [m.register_forward_pre_hook(record(n)) for n, m in norms]
    with torch.no_grad():
        call_model(model, x)
    for h in handles:
        h.remove()
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].mul_(c)
    calls: dict[str, int] = {}

    def adjust(name):
        def hook(m, a):
            i = calls[name] = calls.get(name, -1) + 1
            base = inputs[name][i]
            tol = 1e-12 * float(base.abs().max())
            if torch.allclose(a[0], c * base, rtol=1e-12, atol=c * tol) and not torch.allclose(a[0], base, atol=tol):
                m.eps *= c**2
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.mul_(c)
                    m.running_var.mul_(c**2)
        return hook

    handles = [m.register_forward_pre_hook(adjust(n)) for n, m in out.named_modules() if isinstance(m, NORM_LAYERS)]
    with torch.no_grad():
        call_model(out, x)  # the hooks adjust eps on the way
    for h in handles:
        h.remove()
    return out


def test_layernorm_groups_of_a_normalised_transformer():
    """QK-norm projections alone; the residual stream's writers (embedding, output projection, second MLP
    layer) jointly; never the value projection, the first MLP layer, the head or the LayerNorms."""
    model, x, _ = _normed_lm()
    groups = scale_invariant_groups(model, x)
    assert groups == {
        "q": ["q.weight", "q.bias"],
        "k": ["k.weight", "k.bias"],
        "emb+o+fc2": ["emb.weight", "o.weight", "o.bias", "fc2.weight", "fc2.bias"],
    }


@pytest.mark.parametrize("group", ["q", "k", "emb+o+fc2"])
def test_rescaling_a_layernorm_fed_group(group):
    """θ_g → c·θ_g: loss unchanged, Tr(G_gg) / c², ‖θ_g‖² · c², every block product and the sharpness unchanged."""
    model, x, y = _normed_lm()
    names = scale_invariant_groups(model, x)[group]
    scaled = rescaled(model, x, names, ALPHA)
    torch.testing.assert_close(F.cross_entropy(scaled(x), y), F.cross_entropy(model(x), y), rtol=1e-12, atol=0)
    before = scale_invariant_sharpness(model, (x, y))
    after = scale_invariant_sharpness(scaled, (x, y))
    row_before, row_after = before.extra["groups"][group], after.extra["groups"][group]
    assert row_after["trace"] == pytest.approx(row_before["trace"] / ALPHA**2, rel=REL)
    assert row_after["norm2"] == pytest.approx(row_before["norm2"] * ALPHA**2, rel=REL)
    for name, row in before.extra["groups"].items():
        assert after.extra["groups"][name]["product"] == pytest.approx(row["product"], rel=REL)
    assert after.value == pytest.approx(before.value, rel=REL)


@pytest.mark.parametrize("module", ["v", "fc1", "head", "o", "emb", "ln1"])
def test_weights_that_are_not_scale_invariant_are_not_reported(module):
    """Scaling any of them alone (with the same eps adjustment) changes the loss, and none is a group of its own."""
    model, x, y = _normed_lm()
    names = [f"{module}.{n}" for n, _ in getattr(model, module).named_parameters()]
    scaled = rescaled(model, x, names, ALPHA)
    with torch.no_grad():
        change = float((F.cross_entropy(scaled(x), y) - F.cross_entropy(model(x), y)).abs())
    assert change > 1e-6
    assert all(set(names) != set(group) for group in scale_invariant_groups(model, x).values())


def test_post_norm_transformer_block_has_no_scale_invariant_weight():
    """Each LayerNorm of a post-norm block reads x + sublayer(x): no weight is reported, and scaling the
    feed-forward output layer (the one closest to a LayerNorm) changes the function."""
    torch.manual_seed(0)
    model = PostNormClassifier().double().eval()
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert scale_invariant_groups(model, x) == {}
    scaled = rescaled(model, x, ["block.linear2.weight", "block.linear2.bias"], ALPHA)
    with torch.no_grad():
        assert float((scaled(x) - model(x)).abs().max()) > 1e-6
    with pytest.raises(GmixError, match="no parameters feeding a normalisation layer"):
        scale_invariant_sharpness(model, (x, y))


def _torchvision(name: str) -> tuple[nn.Module, torch.Tensor]:
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    swin = {"patch_size": [4, 4], "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "window_size": [2, 2],
            "num_classes": 3}
    model = {
        "vit": lambda: torchvision.models.VisionTransformer(16, 8, 2, 2, 8, 8, num_classes=3),
        "swin": lambda: SwinTransformer(**swin),
        "swin_v2": lambda: SwinTransformer(**swin, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2),
        "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], layer_scale=0.5,
                                     num_classes=3),
        "mobilenet_v3": lambda: MobileNetV3([InvertedResidualConfig(8, 3, 8, 8, True, "RE", 2, 1, 1.0),
                                             InvertedResidualConfig(8, 3, 16, 8, True, "HS", 1, 1, 1.0)],
                                            last_channel=16, num_classes=3),
    }[name]()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.double().eval(), torch.randn(4, 3, 16, 16, dtype=torch.float64)


TORCHVISION_GROUPS = {
    # ViT: the residual stream's writers (patch embedding, class token, position embedding, attention output
    # projections, second MLP layers) jointly; every block reads the stream through a LayerNorm
    "vit": [["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding",
             "encoder.layers.encoder_layer_0.self_attention.out_proj.weight",
             "encoder.layers.encoder_layer_0.self_attention.out_proj.bias",
             "encoder.layers.encoder_layer_0.mlp.3.weight", "encoder.layers.encoder_layer_0.mlp.3.bias",
             "encoder.layers.encoder_layer_1.self_attention.out_proj.weight",
             "encoder.layers.encoder_layer_1.self_attention.out_proj.bias",
             "encoder.layers.encoder_layer_1.mlp.3.weight", "encoder.layers.encoder_layer_1.mlp.3.bias"]],
    # ConvNeXt: the stem and each block's depthwise convolution (through a permute) feed a LayerNorm
    "convnext": [["features.0.0.weight", "features.0.0.bias"], ["features.1.0.block.0.weight",
                 "features.1.0.block.0.bias"], ["features.3.0.block.0.weight", "features.3.0.block.0.bias"]],
}


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2", "convnext", "mobilenet_v3"])
def test_torchvision_groups_are_scale_invariant(name):
    """Every group found in torchvision's transformers and convnets, rescaled by c (eps and BatchNorm statistics
    adjusted where the norm's input scales), leaves the output unchanged."""
    model, x = _torchvision(name)
    groups = scale_invariant_groups(model, x)
    assert groups
    if name in TORCHVISION_GROUPS:
        assert sorted(map(sorted, groups.values())) == sorted(map(sorted, TORCHVISION_GROUPS[name]))
    with torch.no_grad():
        base = model(x)
        for names in groups.values():
            torch.testing.assert_close(rescaled(model, x, names, ALPHA)(x), base, rtol=1e-10, atol=1e-12)


def _gpt2(tied: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2, tie_word_embeddings=tied,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def test_hugging_face_gpt2_residual_stream():
    """GPT-2 (pre-norm; its Conv1D layers are addmm calls): with untied embeddings the residual stream's
    writers form one group, verified by rescaling; tied to the output layer, the embedding scales the logits,
    so nothing is invariant."""
    x = {"input_ids": torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))}
    model = _gpt2(tied=False)
    groups = scale_invariant_groups(model, x)
    assert list(groups.values()) == [["transformer.wte.weight", "transformer.wpe.weight"] + [
        f"transformer.h.{i}.{part}.c_proj.{p}" for i in range(2) for part in ("attn", "mlp") for p in ("weight", "bias")
    ]]
    with torch.no_grad():
        scaled = rescaled(model, x, next(iter(groups.values())), ALPHA)
        torch.testing.assert_close(scaled(**x).logits, model(**x).logits, rtol=1e-10, atol=1e-12)
    tied = _gpt2(tied=True)
    assert scale_invariant_groups(tied, x) == {}
    with pytest.raises(GmixError, match="no scale-invariant groups"):
        scale_invariant_sharpness(tied, (x, torch.zeros(3, 5, dtype=torch.int64)))


def test_sharpness_of_a_padded_hugging_face_lm():
    """Through ``output_fn`` and ``ignore_index``: the sharpness is Σ ‖θ_g‖² Tr(G_gg) of ggn_trace's blocks on the
    counted tokens only, and rescaling the group leaves it unchanged."""
    x = {"input_ids": torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))}
    y = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    y[0, 3:] = y[2, 4] = -100
    model = _gpt2(tied=False)
    kw = {"ignore_index": -100, "output_fn": lambda o: o.logits}
    r = scale_invariant_sharpness(model, (x, y), **kw)
    assert r.extra["n_predictions"] == 12
    (names,) = scale_invariant_groups(model, x).values()
    blocks = ggn_trace(model, (x, y), "exact", **kw).per_param
    norm2 = sum(float(model.get_parameter(p).detach().square().sum()) for p in names)
    assert r.value == pytest.approx(norm2 * sum(blocks[p] for p in names), rel=REL)
    scaled = rescaled(model, x, names, ALPHA)
    assert scale_invariant_sharpness(scaled, (x, y), **kw).value == pytest.approx(r.value, rel=REL)


class NormedRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def test_sharpness_with_mean_squared_error():
    """loss="mse": the LayerNorm-fed layer is the group; its sharpness is unchanged by rescaling."""
    torch.manual_seed(0)
    model = NormedRegressor().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    groups = scale_invariant_groups(model, x)
    assert groups == {"fc1": ["fc1.weight", "fc1.bias"]}
    r = scale_invariant_sharpness(model, (x, y), loss="mse")
    assert r.extra["loss"] == "mse"
    blocks = ggn_trace(model, (x, y), "exact", loss="mse").per_param
    norm2 = sum(float(p.detach().square().sum()) for p in model.fc1.parameters())
    assert r.value == pytest.approx(norm2 * (blocks["fc1.weight"] + blocks["fc1.bias"]), rel=REL)
    scaled = rescaled(model, x, groups["fc1"], ALPHA)
    assert scale_invariant_sharpness(scaled, (x, y), loss="mse").value == pytest.approx(r.value, rel=REL)
