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
