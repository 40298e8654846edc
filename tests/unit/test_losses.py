import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from deltatune.losses import causal_lm_loss, classification_loss, linear_cross_entropy


def test_causal_lm_loss_matches_transformers(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    ids = torch.randint(10, 40, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    out = model(input_ids=ids, labels=labels)
    total, count = causal_lm_loss(out.logits, labels)
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, out.loss)


def test_classification_loss_is_summed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    total, count = classification_loss(logits, torch.tensor([0, 0]))
    expected = -torch.log_softmax(logits, -1)[[0, 1], [0, 0]].sum()
    assert count == 2
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("trainable", ["rows", "rows+head"])
def test_linear_cross_entropy_gives_the_plain_loss_and_gradients(chunk, trainable):
    """Gradients made in forward, chunk by chunk, equal autograd through the plain logits (fp64 reference)."""
    torch.manual_seed(0)
    rows, weight, bias = torch.randn(13, 8), torch.randn(50, 8), torch.randn(50)
    targets = torch.randint(0, 50, (13,))
    grads = {}
    for side, dtype in (("fused", torch.float32), ("plain", torch.float64)):
        x, w, b = (t.detach().to(dtype).requires_grad_(name == "rows" or trainable == "rows+head")
                   for name, t in (("rows", rows), ("weight", weight), ("bias", bias)))
        if side == "fused":
            loss = linear_cross_entropy(x, w, b, targets, chunk)
        else:
            loss = F.cross_entropy(F.linear(x, w, b), targets, reduction="sum")
        (2.5 * loss).backward()  # an upstream scale reaches every gradient
        grads[side] = [loss.detach()] + [t.grad for t in (x, w, b)]
    for fused, plain in zip(grads["fused"], grads["plain"]):
        assert (fused is None) == (plain is None)
        if plain is not None:
            torch.testing.assert_close(fused.double(), plain, rtol=1e-5, atol=1e-5)
    assert (grads["fused"][2] is None) == (trainable == "rows")


@pytest.mark.parametrize("trainable", ["rows", "rows+head"])
def test_linear_cross_entropy_under_autocast_computes_what_autocast_computes(trainable):
    """Under bf16 autocast the fused loss rounds what autocast's plain path rounds (inputs and the gradient of the
    logits to bf16, softmax in fp32): the same loss and gradients up to bf16's summation order, and fp32 masters."""
    torch.manual_seed(0)
    rows, weight, bias = torch.randn(300, 16), torch.randn(70, 16), torch.randn(70)
    targets = torch.randint(0, 70, (300,))
    grads = {}
    for side in ("fused", "plain"):
        x, w, b = (t.detach().clone().requires_grad_(name == "rows" or trainable == "rows+head")
                   for name, t in (("rows", rows), ("weight", weight), ("bias", bias)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if side == "fused":
                loss = linear_cross_entropy(x, w, b, targets, 64)
            else:
                loss = F.cross_entropy(F.linear(x, w, b).float(), targets, reduction="sum")
        loss.backward()
        grads[side] = [loss.detach()] + [t.grad for t in (x, w, b)]
    torch.testing.assert_close(grads["fused"][0], grads["plain"][0], rtol=1e-5, atol=0)  # same bf16 logits
    for fused, plain in zip(grads["fused"][1:], grads["plain"][1:]):
        assert (fused is None) == (plain is None)
        if plain is not None:
            assert fused.dtype == torch.float32
            torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)
