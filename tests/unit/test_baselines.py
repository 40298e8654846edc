"""The forgetting meter and the in-context baselines, checked against a token-by-token computation."""

import math

import pytest
import torch

from deltatune.eval.evaluate import evaluate
from deltatune.eval.forgetting import detokenize, forgetting, text_examples
from deltatune.eval.icl import TEMPLATE, demonstrations, icl_baseline, label_scores
from deltatune.models import load_model, load_tokenizer


def _next_token_logprob(model, ids: list[int], token: int) -> float:
    """log p(token | ids) from one unpadded forward pass over the prefix alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return float(logits.log_softmax(-1)[token])


@pytest.fixture(scope="module")
def llama(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama, "causal", None, tok.pad_token_id)
    return model.eval(), tok


def test_label_scores_equal_token_by_token_log_likelihoods(llama):
    model, tok = llama
    prompts = ["Text: good film\nLabel:", "Text: the plot was very dull and the actor was weak\nLabel:"]
    labels = ["good", "bad very"]  # a two-token label too
    scores = label_scores(model, tok, prompts, labels, batch_size=3)  # batches mix prompts, with padding
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
            total = 0.0
            for token in tok(" " + label, add_special_tokens=False)["input_ids"]:
                total += _next_token_logprob(model, ids, token)
                ids = ids + [token]
            assert scores[i, j].item() == pytest.approx(total, abs=1e-4)


def test_icl_prediction_is_the_best_scoring_label(llama):
    model, tok = llama
    train = [{"text": f"good film {i}", "label": "good"} for i in range(3)] + \
            [{"text": f"bad film {i}", "label": "bad"} for i in range(3)]
    eval_rows = [{"text": "great story", "label": "good"}, {"text": "awful plot", "label": "bad"},
                 {"text": "fine actor", "label": "good"}]
    for shots in (0, 2):
        result = icl_baseline(model, tok, train, eval_rows, "text", "label", ["bad", "good"], shots, seed=0)
        prefix = demonstrations(train, "text", "label", shots, 0)
        scores = label_scores(model, tok, [prefix + TEMPLATE.format(text=r["text"]) for r in eval_rows],
                              ["bad", "good"])
        expected = [["bad", "good"][k] for k in scores.argmax(-1).tolist()]
        correct = sum(e == r["label"] for e, r in zip(expected, eval_rows))
        assert result["accuracy"] == pytest.approx(correct / 3) and result["shots"] == shots


def test_demonstrations_are_balanced_and_seeded():
    rows = [{"t": f"x{i}", "y": "a"} for i in range(10)] + [{"t": f"z{i}", "y": "b"} for i in range(2)]
    text = demonstrations(rows, "t", "y", 4, seed=1)
    assert text.count(" a\n\n") == 2 and text.count(" b\n\n") == 2
    assert demonstrations(rows, "t", "y", 4, seed=1) == text and demonstrations(rows, "t", "y", 0, 1) == ""


def test_general_text_perplexity_equals_token_by_token(llama):
    model, tok = llama
    texts = ["the movie was good", "a very dull plot and a weak actor"]
    examples = text_examples(texts, tok, max_length=64)
    metrics = evaluate(model, examples, "causal_lm", batch_size=2, pad_id=tok.pad_token_id)
    nll, count = 0.0, 0
    for example in examples:
        ids = example["input_ids"]
        for t in range(1, len(ids)):
            nll -= _next_token_logprob(model, ids[:t], ids[t])
            count += 1
    assert metrics["tokens"] == count
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    summary = forgetting({"loss": 1.0, "perplexity": math.e}, {"loss": 1.5, "perplexity": math.exp(1.5)})
    assert summary["ratio"] == pytest.approx(math.exp(0.5)) and summary["loss_change"] == pytest.approx(0.5)


def test_detokenize():
    assert detokenize(["I", "do", "n't", "know", ",", "she", "said", "(", "twice", ")", "."]) == \
        "I don't know, she said (twice)."


def test_runs_report_forgetting_and_prompting(tiny_llama, qa_jsonl, cls_csv, tmp_path):
    import json

    from deltatune.train.run import train
    from tests.helpers import config

    run = train(config(tiny_llama, "causal_lm", "lora", qa_jsonl, tmp_path / "lm", "eval.forgetting_rows=20",
                       "train.max_steps=2"))
    metrics = json.loads((run.path / "metrics.json").read_text())
    f = metrics["forgetting"]
    assert f["rows"] == 20 and f["ratio"] == pytest.approx(f["perplexity_after"] / f["perplexity_before"])
    assert metrics["baseline"]["general_text"]["perplexity"] == pytest.approx(f["perplexity_before"])
    run = train(config(tiny_llama, "classification", "lora", cls_csv, tmp_path / "cls", "eval.icl_shots=[0, 2]",
                       "eval.icl_limit=5", "train.max_steps=1"))
    prompting = json.loads((run.path / "metrics.json").read_text())["prompting"]
    assert prompting["rows"] == 5 and [r["shots"] for r in prompting["results"]] == [0, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["confusion_matrix"]) == 2 for r in prompting["results"])
