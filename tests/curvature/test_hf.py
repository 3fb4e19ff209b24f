"""The Python API on Hugging Face models as users build them: GPT-2 and BERT from tiny configurations
(``transformers``, random weights, nothing downloaded), in eval mode, batches x = {"input_ids",
"attention_mask"} with padding labels -100. ``exact`` equals the dense reference in float64; every stochastic
method is unbiased within ``Z`` standard errors; the snapshot's loss is the model's own loss; the README's
example runs.

GPT-2's logits at position t predict token t + 1: the toolkit takes logits (N, T, V) and labels (N, T) aligned,
so the labels are the shifted inputs (labels[:, :-1] = input_ids[:, 1:], the last and padded positions -100).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmix_curvature.curvature import curvature_snapshot, exact_ggn_trace, ggn_trace
from gmix_curvature.curvature.reference import dense_jacobian, reference_loss

transformers = pytest.importorskip("transformers")  # a dev extra: always installed where the tests run

Z = 4.0  # a stochastic estimate may differ from the exact value by at most Z of its standard errors
N, T, V = 3, 5, 32  # sequences, positions, vocabulary
PROBES = 48


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    return transformers.BertForMaskedLM(cfg).double().eval()


def bert_tagger() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=5)  # fmt: skip
    return transformers.BertForTokenClassification(cfg).double().eval()


def gpt2_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded sequences of lengths 5, 3, 4; labels the next token, -100 at the end and on padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = (torch.arange(T) < torch.tensor([[5], [3], [4]])).long()
    labels = torch.full((N, T), -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return {"input_ids": ids * mask, "attention_mask": mask}, labels


def bert_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Masked-language-model labels: the original token at two masked positions per row, -100 elsewhere."""
    x, _ = gpt2_batch()
    ids, labels = x["input_ids"].clone(), torch.full((N, T), -100)
    for row, positions in enumerate([(0, 3), (1, 2), (0, 2)]):
        for t in positions:
            labels[row, t], ids[row, t] = ids[row, t], V - 1  # V - 1 plays [MASK]
    return {"input_ids": ids, "attention_mask": x["attention_mask"]}, labels


def tagger_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A tag in 0..4 for every token, -100 on padding."""
    x, _ = gpt2_batch()
    tags = torch.randint(0, 5, (N, T), generator=torch.Generator().manual_seed(2))
    return x, torch.where(x["attention_mask"].bool(), tags, -100)


CASES = {"gpt2": (gpt2, gpt2_batch), "bert-mlm": (bert, bert_batch), "bert-tagger": (bert_tagger, tagger_batch)}


def dense_trace(model: torch.nn.Module, x: dict[str, torch.Tensor], y: torch.Tensor) -> float:
    """Tr(Jᵀ H J) = Tr(H J Jᵀ) from the dense Jacobian and the Hessian of the mean loss in the logits
    (``torch.func`` on ``F.cross_entropy(ignore_index=-100)``): the reference without any d × d matrix."""
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no batched backward
        jac = dense_jacobian(model, x)
    out = model(**x).logits.detach()
    h = torch.func.hessian(lambda o: reference_loss(o, y))(out).reshape(out.numel(), out.numel())
    jm = jac.reshape(out.numel(), -1)
    return float((h * (jm @ jm.T)).sum())


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    build, batch = CASES[request.param]
    model = build()
    x, y = batch()
    return request.param, model, x, y, dense_trace(model, x, y)


def test_exact_equals_the_dense_reference(case):
    _, model, x, y, want = case
    r = exact_ggn_trace(model, (x, y))
    assert abs(r.value - want) / want < 1e-8
    assert r.n_samples == N and r.extra["n_predictions"] == int((y != -100).sum()) and not model.training
    if case[0] == "gpt2":  # batches of 2 (once: exact costs P·V backward passes a batch)
        assert abs(ggn_trace(model, [(x, y)], "exact", batch_size=2).value - want) / want < 1e-8


def test_the_model_computes_what_the_toolkit_measures(case):
    """With shifted labels the toolkit's loss (the mean over counted tokens) is the model's own loss."""
    name, model, x, y, _ = case
    hf_labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100) if name == "gpt2" else y
    if name == "bert-tagger":  # its loss: F.cross_entropy of the (N*T, 5) logits, not upcast
        hf_labels = y
    snap = curvature_snapshot(model, (x, y), method="exact", eigenvalue=False)
    with torch.no_grad():  # transformers computes its loss in float32 (it upcasts the logits to float)
        assert snap["loss"] == pytest.approx(float(model(**x, labels=hf_labels).loss), rel=1e-6)
    assert snap["n_predictions"] == int((y != -100).sum())


@pytest.mark.montecarlo
@pytest.mark.parametrize("method", ["fisher_is", "output_hutchinson", "hutchinson", "fisher_mc"])
def test_stochastic_methods_are_unbiased(case, method):
    _, model, x, y, want = case
    r = ggn_trace(model, (x, y), method, num_probes=PROBES, generator=torch.Generator().manual_seed(3))
    assert r.n_probes == PROBES and r.stderr > 0
    assert abs(r.value - want) <= Z * r.stderr, (r.value, want, r.stderr)


def test_the_readme_language_model_example_runs_and_prints_what_it_shows(capsys):
    """The README's example, as written: its last comment is the line it prints."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Curvature of language models", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    shown = code.strip().splitlines()[-1]
    assert shown.startswith("# ") and capsys.readouterr().out.strip() == shown[2:]
