"""The serving engine on tiny random models: the same answers as ``deltatune predict`` / ``inference.score``
for every kind of run, whether a request runs alone or shares batches with other deltas; step-level
batching of generation; the bounded queue; hot load and unload; drain.

Trained deltas of a few steps barely move a random model, so each run's delta is replaced by random
values after training: different runs then answer differently, and a request routed to the wrong delta
would show."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from deltatune.data.examples import conversation_ids
from deltatune.inference import load_run, predict, score
from deltatune.models import load_model
from deltatune.serve.engine import Engine, Overloaded, Sampling, TooLong, UnknownModel, WrongKind
from deltatune.serve.generation import Sequence, TextStream
from deltatune.train.run import train
from tests.conftest import NEGATIVE, POSITIVE, qa_rows, sentiment_rows, tagged_rows, write_csv, write_jsonl
from tests.helpers import config, randomize

ONE_EPOCH = ["train.epochs=1", "train.lr=1e-3", "train.warmup_ratio=0"]
TEXTS = ["good great film", "the plot was dull and boring", "a lovely story", "bad", "the actor was fine"]
PROMPTS = ["what is 1 and 2", "what is 7", "hello", "my name is what", "what is 3 and 9 and 4"]
GREEDY = Sampling(max_tokens=12, temperature=0)

# predict's generate (the reference) passes position ids to a soft-prompt model, which peft ignores
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported")


def run(coro):
    return asyncio.run(coro)


def preference_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": f"what is {i % 10}", "chosen": " ".join(rng.sample(POSITIVE, 2)),
             "rejected": " ".join(rng.sample(NEGATIVE, 2))} for i in range(n)]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_llama, tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    cls = write_csv(root / "cls.csv", sentiment_rows(24))
    yes_no = write_csv(root / "yes_no.csv", [{"text": r["text"], "label": {"positive": "yes", "negative": "no"}[
        r["label"]]} for r in sentiment_rows(24, seed=1)])
    tagged = write_jsonl(root / "tags.jsonl", tagged_rows(24))
    qa = write_jsonl(root / "qa.jsonl", qa_rows(24))
    prefs = write_jsonl(root / "prefs.jsonl", preference_rows(24))
    plan = {"cls_a": (tiny_bert, "classification", "lora", cls), "cls_b": (tiny_bert, "classification", "lora", yes_no),
            "cls_full": (tiny_bert, "classification", "full", cls),
            "cls_prompt": (tiny_bert, "classification", "prompt", cls),
            "tags": (tiny_bert, "token_classification", "lora", tagged),
            "reward": (tiny_bert, "reward", "lora", prefs),
            "lm_a": (tiny_llama, "causal_lm", "lora", qa), "lm_b": (tiny_llama, "causal_lm", "lora", qa),
            "lm_ia3": (tiny_llama, "causal_lm", "ia3", qa), "lm_prompt": (tiny_llama, "causal_lm", "prompt", qa),
            "lm_full": (tiny_llama, "causal_lm", "full", qa), "s2s": (tiny_t5, "seq2seq", "lora", qa)}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_REGISTRY", str(root / "registry.sqlite"))
        for seed, (name, (model, task, method, data)) in enumerate(plan.items()):
            out[name] = train(config(model, task, method, data, root / name, *ONE_EPOCH)).path
            if method != "full":
                randomize(out[name], seed)
    return out


@pytest.fixture(scope="module")
def engine(runs):
    eng = Engine(dict(runs), max_batch=16, batch_wait_ms=20)
    run(eng.start())
    yield eng
    run(eng.drain())


@pytest.fixture(scope="module")
def loaded(runs):
    return {name: load_run(path) for name, path in runs.items()}


def greedy_reference(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    """What causal_lm's predict generates (its own loop: HF generate, greedy, one prompt at a time)."""
    ids = torch.tensor([prompt_ids])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=tokenizer.pad_token_id)
    return gen[0, 1 if model.config.is_encoder_decoder else ids.shape[1]:].tolist()  # a decoder starts anew


async def collect(stream) -> tuple[str, list[int], list]:
    chunks = [c async for c in stream]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks


def chat(engine, name, prompt):
    return engine.chat_prompt(name, [{"role": "user", "content": prompt}])


def assert_same_predictions(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want):
        assert g["text"] == w["text"] and g["probabilities"].keys() == w["probabilities"].keys()
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


# ----------------------------------------------------------------------------- what is served

def test_served_names_share_bases(engine, tiny_bert, tiny_llama, tiny_t5):
    served = {s.name: s for s in engine.served()}
    bert, llama = f"base:{tiny_bert.name}", f"base:{tiny_llama.name}"
    assert set(served) == {bert, llama, f"base:{tiny_t5.name}", "cls_a", "cls_b", "cls_full", "cls_prompt", "tags",
                           "reward", "lm_a", "lm_b", "lm_ia3", "lm_prompt", "lm_full", "s2s"}
    assert served[bert].kind == "embed" and served[llama].kind == "generate" and served[llama].method is None
    assert served["cls_b"].labels == ["no", "yes"] and served["cls_b"].kind == "classify"
    assert (served["tags"].kind, served["reward"].kind, served["lm_a"].kind) == ("tag", "score", "generate")
    assert served["lm_a"].base == llama and served["cls_full"].base == bert and served["lm_a"].method == "lora"
    # One LoRA model holds both classification deltas (same head size); lm_a and lm_b share another.
    members = engine._members
    assert members["cls_a"].group is members["cls_b"].group is members[bert].group
    assert members["lm_a"].group is members["lm_b"].group is members[llama].group
    assert members["lm_ia3"].group is not members["lm_a"].group  # peft holds one adapter type per model
    assert members["cls_full"].group.peft_type is None and members["lm_full"].group.peft_type is None
    assert members["cls_prompt"].group is not members["cls_a"].group


def test_unknown_model_wrong_kind_and_too_long(engine):
    with pytest.raises(UnknownModel) as err:
        engine.get("nope")
    assert "cls_a" in err.value.available and err.value.name == "nope"
    with pytest.raises(UnknownModel):
        run(engine.classify("nope", ["x"]))
    with pytest.raises(WrongKind, match="cannot classify"):
        run(engine.classify("lm_a", ["x"]))
    with pytest.raises(WrongKind, match="cannot embed"):
        run(engine.embed("lm_a", ["x"]))
    with pytest.raises(WrongKind, match="cannot generate"):
        engine.generate("cls_a", [1, 2], GREEDY)
    with pytest.raises(WrongKind, match="cannot score"):
        run(engine.score("cls_a", ["p"], ["r"]))
    with pytest.raises(TooLong, match="at most 2048"):
        engine.text_prompt("lm_a", " ".join(["good"] * 2100))
    assert engine.count_tokens("lm_a", "good great film") == 3


# ----------------------------------------------------------------------------- parity with predict / score

def test_classification_matches_predict(engine, loaded):
    async def both():
        return await asyncio.gather(engine.classify("cls_a", TEXTS), engine.classify("cls_b", TEXTS[:3]),
                                    engine.classify("cls_full", TEXTS), engine.classify("cls_prompt", TEXTS))
    a, b, full, prompt = run(both())
    assert_same_predictions(prompt, predict(loaded["cls_prompt"], TEXTS))
    assert_same_predictions(a, predict(loaded["cls_a"], TEXTS))
    assert_same_predictions(b, predict(loaded["cls_b"], TEXTS[:3]))
    assert set(b[0]["probabilities"]) == {"no", "yes"}
    assert_same_predictions(full, predict(loaded["cls_full"], TEXTS))
    assert a != full


def test_token_classification_matches_predict(engine, loaded):
    got = run(engine.classify("tags", TEXTS))
    assert got == predict(loaded["tags"], TEXTS)


def test_reward_scores_match_inference_score(engine, loaded):
    prompts, responses = ["what is 1", "what is 2", "what is 3"], ["good great", "bad awful", "fine"]
    got = run(engine.score("reward", prompts, responses))
    assert got == pytest.approx(score(loaded["reward"], prompts, responses), abs=1e-5)


def test_base_embeddings_pool_the_encoder(engine, loaded, tiny_bert):
    from transformers import AutoModel

    name = f"base:{tiny_bert.name}"
    got = torch.tensor(run(engine.embed(name, TEXTS)))
    bert = AutoModel.from_pretrained(tiny_bert).eval()
    enc = loaded["cls_a"].tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(got, (hidden * mask).sum(1) / mask.sum(1), rtol=0, atol=1e-5)
    tuned = torch.tensor(run(engine.embed("cls_a", TEXTS)))  # an encoder run embeds with its delta
    assert tuned.shape == got.shape and not torch.allclose(tuned, got)


@pytest.mark.parametrize("name", ["lm_a", "lm_b", "lm_ia3", "lm_prompt", "lm_full", "s2s"])
def test_greedy_generation_matches_predict(engine, loaded, name):
    ref = loaded[name]
    for prompt in PROMPTS[:3]:
        ids = chat(engine, name, prompt)
        text, tokens, chunks = run(collect(engine.generate(name, ids, GREEDY)))
        assert tokens == greedy_reference(ref.model, ref.tokenizer, ids, GREEDY.max_tokens)
        (want,) = predict(ref, [prompt], max_new_tokens=GREEDY.max_tokens)
        assert text.strip() == want["response"] and len(tokens) == want["new_tokens"]
        assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])


def test_base_generation_is_the_untouched_model(engine, tiny_llama, loaded):
    base = load_model(tiny_llama, "causal").eval()
    tok = loaded["lm_a"].tokenizer
    name = f"base:{tiny_llama.name}"
    ids = chat(engine, name, PROMPTS[0])
    assert ids == conversation_ids(tok, [{"role": "user", "content": PROMPTS[0]}], True)
    _, tokens, _ = run(collect(engine.generate(name, ids, GREEDY)))
    assert tokens == greedy_reference(base, tok, ids, GREEDY.max_tokens)


# ----------------------------------------------------------------------------- batching

def test_mixed_deltas_in_concurrent_requests_answer_as_alone(engine, tiny_llama, tiny_bert):
    gen_names = ["lm_a", "lm_b", f"base:{tiny_llama.name}", "lm_ia3", "lm_prompt", "lm_full", "s2s"]
    jobs = [(n, p) for p in PROMPTS[:3] for n in gen_names]

    async def alone():
        out = {}
        for n, p in jobs:
            out[n, p] = await collect(engine.generate(n, chat(engine, n, p), GREEDY))
        cls = {n: await engine.classify(n, TEXTS) for n in ("cls_a", "cls_b", "cls_full", "tags")}
        return out, cls, await engine.embed(f"base:{tiny_bert.name}", TEXTS)

    async def together():
        gens = [collect(engine.generate(n, chat(engine, n, p), GREEDY)) for n, p in jobs]
        texts = [engine.classify(n, [t]) for t in TEXTS for n in ("cls_a", "cls_b", "cls_full", "tags")]
        embeds = [engine.embed(f"base:{tiny_bert.name}", [t]) for t in TEXTS]
        return await asyncio.gather(asyncio.gather(*gens), asyncio.gather(*texts), asyncio.gather(*embeds))

    want, want_cls, want_embed = run(alone())
    before = engine.stats()["batch_sizes"]
    gens, texts, embeds = run(together())
    after = engine.stats()["batch_sizes"]
    for (n, p), (text, tokens, _) in zip(jobs, gens):
        assert tokens == want[n, p][1] and text == want[n, p][0], (n, p)
    for i, got in enumerate(texts):
        n = ("cls_a", "cls_b", "cls_full", "tags")[i % 4]
        want_one = want_cls[n][i // 4]
        if n == "tags":
            assert got == [want_one]
        else:
            assert_same_predictions(got, [want_one])
    assert torch.allclose(torch.tensor([e[0] for e in embeds]), torch.tensor(want_embed), atol=1e-5)
    grown = {size for size, count in after["generate"].items() if count > before["generate"].get(size, 0)}
    assert max(grown) >= 9  # lm_a, lm_b and the base: one LoRA batch (IA3 and the prompt: their own)
    prefilled = {size for size, count in after["prefill"].items() if count > before["prefill"].get(size, 0)}
    assert max(prefilled) >= 2  # new prompts prefilled together (left-padded) and still answered as alone
    shared = {size for size, count in after["classify"].items() if count > before["classify"].get(size, 0)}
    assert max(shared) >= 2


def test_a_request_joining_a_running_batch_decodes_as_alone(engine, monkeypatch):
    long = Sampling(max_tokens=60, temperature=0)
    ids_a, ids_b = chat(engine, "lm_a", PROMPTS[4]), chat(engine, "lm_b", PROMPTS[1])
    alone_a = run(collect(engine.generate("lm_a", ids_a, long)))[1]
    alone_b = run(collect(engine.generate("lm_b", ids_b, GREEDY)))[1]
    assert len(alone_a) == 60  # the random delta does not end early

    # The worker holds still once a has 5 tokens, until b is queued: b joins a running batch for sure.
    queued, decode = threading.Event(), engine.scheduler._decode

    def held():
        if not queued.is_set() and any(len(s.generated) >= 5 for b in engine.scheduler.running for s in b.rows):
            queued.wait(10)
        decode()

    monkeypatch.setattr(engine.scheduler, "_decode", held)

    async def joined():
        stream = await engine.generate("lm_a", ids_a, long)
        first = [await stream.__anext__() for _ in range(5)]
        b = await engine.generate("lm_b", ids_b, GREEDY)
        queued.set()
        b, rest = await asyncio.gather(collect(b), collect(stream))
        return [t for c in first for t in c.token_ids] + rest[1], b[1], rest[2]

    before = engine.stats()["batch_sizes"]["generate"].get(2, 0)
    a, b, rest = run(joined())
    assert a == alone_a and b == alone_b
    assert rest[-1].finish_reason == "length"
    assert engine.stats()["batch_sizes"]["generate"].get(2, 0) >= before + len(alone_b) - 1  # b decoded beside a


def test_stop_strings_max_tokens_and_streamed_text(engine, loaded):
    ids = chat(engine, "lm_a", PROMPTS[0])
    text, tokens, chunks = run(collect(engine.generate("lm_a", ids, Sampling(max_tokens=20, temperature=0))))
    tok = loaded["lm_a"].tokenizer
    assert text == tok.decode(tokens, skip_special_tokens=True) and len(tokens) == 20
    assert chunks[-1].finish_reason == "length"
    words = text.split()
    stop = " " + words[3]
    cut, _, stop_chunks = run(collect(engine.generate("lm_a", ids, Sampling(max_tokens=20, temperature=0,
                                                                          stop=[stop, "never there"]))))
    assert cut == text[:text.index(stop)] and stop_chunks[-1].finish_reason == "stop"
    three, tokens3, _ = run(collect(engine.generate("lm_a", ids, Sampling(max_tokens=3, temperature=0))))
    assert tokens3 == tokens[:3] and three == tok.decode(tokens[:3], skip_special_tokens=True)


def test_sampling_is_repeatable_with_a_seed(engine):
    ids = chat(engine, "lm_a", PROMPTS[2])
    hot = Sampling(max_tokens=15, temperature=1.5, seed=7)
    a = run(collect(engine.generate("lm_a", ids, hot)))[1]
    assert a == run(collect(engine.generate("lm_a", ids, hot)))[1]
    others = [run(collect(engine.generate("lm_a", ids, Sampling(max_tokens=15, temperature=1.5, seed=s))))[1]
              for s in (1, 2, 3)]
    assert any(o != a for o in others)
    nucleus = Sampling(max_tokens=15, temperature=1.0, top_p=1e-6, seed=3)  # only the top token is left
    assert run(collect(engine.generate("lm_a", ids, nucleus)))[1] == \
        run(collect(engine.generate("lm_a", ids, Sampling(max_tokens=15, temperature=0))))[1]


def test_text_is_released_when_it_decodes_cleanly_and_cannot_start_a_stop_string():
    class Bytes:
        def decode(self, ids, **_):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), ["lo!"])
    out = [stream.push(b)[0] for b in "héllo wor".encode()]
    assert out[1:3] == ["", "é"]  # é is two bytes: nothing until the second
    assert out[3:7] == ["", "l", "", "lo "]  # "l", then "lo", could start "lo!": held until they cannot
    assert "".join(out) + stream.flush() == "héllo wor"
    stop = TextStream(Bytes(), ["lo!"])
    assert [stop.push(b) for b in b"yello!"][-1] == ("", True) and stop.text == "yello!"
    assert "".join([TextStream(Bytes(), []).push(b)[0] for b in b"ab"]) == "ab"


# ----------------------------------------------------------------------------- queue, hot load, drain

def test_a_full_queue_refuses_with_overloaded(runs):
    eng = Engine({"cls": runs["cls_a"]}, queue_size=2, batch_wait_ms=0)

    async def go():
        await eng.start()
        release = threading.Event()
        blocked = eng.scheduler.call(release.wait)  # the worker is busy: requests wait in the queue
        waiting = [asyncio.ensure_future(eng.classify("cls", [t])) for t in TEXTS[:2]]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="queue holds 2"):
            await eng.classify("cls", ["one more"])
        assert eng.stats()["queue_depth"] == 2
        release.set()
        await asyncio.wrap_future(blocked)
        done = await asyncio.gather(*waiting)
        await eng.drain()
        return done

    done = run(go())
    assert [d[0]["text"] for d in done] == TEXTS[:2]


def test_hot_load_and_unload_while_others_run(engine, runs, loaded):
    long = Sampling(max_tokens=40, temperature=0)
    ids_a, ids_b = chat(engine, "lm_a", PROMPTS[3]), chat(engine, "lm_b", PROMPTS[0])
    alone_a = run(collect(engine.generate("lm_a", ids_a, long)))[1]
    alone_b = run(collect(engine.generate("lm_b", ids_b, long)))[1]

    async def go():
        running = asyncio.ensure_future(collect(engine.generate("lm_a", ids_a, long)))
        served = await engine.load("b_again", runs["lm_b"])  # attached to the running LoRA model
        full = await engine.load("full_again", runs["cls_full"])  # its own model, loaded beside
        assert served.kind == "generate" and served.run == str(runs["lm_b"]) and full.kind == "classify"
        again = asyncio.ensure_future(collect(engine.generate("b_again", ids_b, long)))
        await asyncio.sleep(0.05)
        await engine.unload("b_again")  # waits for its own request
        assert again.done()
        labels = await engine.classify("full_again", TEXTS)
        await engine.unload("full_again")
        return await running, await again, labels

    a, b, labels = run(go())
    assert a[1] == alone_a and b[1] == alone_b and len(b[1]) == 40
    assert_same_predictions(labels, predict(loaded["cls_full"], TEXTS))
    with pytest.raises(UnknownModel):
        engine.get("b_again")
    assert "b_again" not in [s.name for s in engine.served()]
    adapters = engine._members["lm_a"].group.model.peft_config
    assert len(adapters) == 2  # b_again's adapter was deleted; lm_a and lm_b remain
    assert run(collect(engine.generate("lm_b", ids_b, long)))[1] == alone_b


def test_drain_finishes_running_work_then_refuses(runs):
    eng = Engine({"lm": runs["lm_full"]}, max_batch=2)  # a run of its own; its base loads plainly, as "base"

    async def go():
        await eng.start()
        assert [s.name for s in eng.served()] == ["base", "lm"]
        assert eng._members["base"].group.peft_type is None and eng._members["base"].group.key[0] == "base"
        streams = [await eng.generate("lm", chat(eng, "lm", p), Sampling(max_tokens=30, temperature=0))
                   for p in PROMPTS[:3]]
        results = asyncio.gather(*(collect(s) for s in streams))
        await eng.drain()
        with pytest.raises(Overloaded, match="shutting down"):
            await eng.generate("lm", [1, 2], GREEDY)
        return await results

    for text, tokens, chunks in run(go()):
        assert chunks[-1].finish_reason in ("stop", "length") and tokens
    assert max(eng.stats()["batch_sizes"]["generate"]) == 2  # the third waited for a free row


def test_closing_a_stream_ends_its_generation(engine):
    async def go():
        stream = await engine.generate("lm_a", chat(engine, "lm_a", PROMPTS[4]), Sampling(max_tokens=60,
                                                                                        temperature=0))
        await stream.__anext__()
        await stream.aclose()
        await asyncio.to_thread(engine.scheduler.wait, lambda: engine._members["lm_a"].inflight == 0)
        return [c async for c in stream]

    assert run(go()) == [] and engine.stats()["running_sequences"] == 0


def test_sampling_at_extreme_temperature_and_top_p_is_a_token_not_an_error():
    from deltatune.serve.generation import choose

    logits = torch.tensor([1.0, 3.0, 2.0, -50.0])
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((5e-324, 1.0), (1e-30, 0.5), (2.0, 0.0), (2.0, 1e-9)):
        assert choose(logits, Sampling(temperature=temperature, top_p=top_p), g) == 1  # the argmax, no nan
    seen = {choose(logits, Sampling(temperature=2.0, top_p=1.0), g) for _ in range(200)}
    assert seen >= {0, 1, 2}


def test_a_shared_prompt_beginning_is_computed_once_per_delta_and_answers_as_alone(engine, loaded, tiny_llama):
    """Prompts that start alike (an application's instructions) reuse that beginning's keys and values,
    per delta, alone or prefilled together, and answer token for token as without it."""
    tok = loaded["lm_a"].tokenizer
    instructions = "answer the question in a few words and be kind " * 3
    prompts = [tok(instructions + q)["input_ids"] for q in ("what is 1", "what is 3 and 9", "hello there")]
    names = ["lm_a", "lm_b", f"base:{tiny_llama.name}", "lm_full"]
    base = load_model(tiny_llama, "causal").eval()
    want = {(n, i): greedy_reference(loaded[n].model if n in loaded else base, tok, p, GREEDY.max_tokens)
            for n in names for i, p in enumerate(prompts)}
    before = engine.stats()["prompt_tokens_reused"]

    async def alone():
        return {(n, i): (await collect(engine.generate(n, p, GREEDY)))[1] for n in names for i, p in enumerate(prompts)}

    async def together():
        keys = [(n, i) for n in names for i in range(len(prompts))]
        got = await asyncio.gather(*(collect(engine.generate(n, prompts[i], GREEDY)) for n, i in keys))
        return {k: g[1] for k, g in zip(keys, got)}

    assert run(alone()) == want
    reused = engine.stats()["prompt_tokens_reused"] - before
    assert reused >= 16 * (len(prompts) - 1) * len(names)  # learned from the first prompt, reused by the others
    assert run(together()) == want
    assert engine.stats()["prompt_tokens_reused"] - before > reused


def test_prefill_after_a_cached_prefix_computes_the_whole_prompts_keys_and_values(loaded):
    """The cache a prefix-reusing prefill leaves equals the one prefilling whole prompts leaves, at every
    position each row holds (the padding between prefix and rest masked and skipped)."""
    from deltatune.serve.generation import PrefixCache, prefill_together

    model, tok = loaded["lm_a"].model, loaded["lm_a"].tokenizer
    prompts = [tok("be brief and kind " * 4 + q)["input_ids"] for q in ("what is 1", "what is 3 and 9 and 4")]
    prefixes = PrefixCache(min_length=8)
    for p in prompts:
        prefixes.learn(p)
    prefix = prefixes.shared(prompts)
    assert prefix is not None and 8 <= len(prefix) < min(map(len, prompts))

    def sequences():
        return [Sequence(_Req(), tok, set(), None) for _ in prompts]

    whole, whole_mask, whole_chunks = prefill_together(model, sequences(), prompts, torch.device("cpu"))
    cached = prefixes.cached(model, "default", prefix, torch.device("cpu"))
    reused, mask, chunks = prefill_together(model, sequences(), prompts, torch.device("cpu"),
                                            (len(prefix), [cached, cached]))
    assert [c.token_ids for c in chunks] == [c.token_ids for c in whole_chunks]
    for row in range(len(prompts)):
        for a, b in zip(whole.layers, reused.layers):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                torch.testing.assert_close(x[row][:, whole_mask[row].bool()], y[row][:, mask[row].bool()],
                                           rtol=0, atol=1e-5)


class _Req:
    sampling = GREEDY


def test_one_shot_rows_are_batched_by_length_at_the_least_padded_cost():
    from deltatune.serve.batching import length_batches

    lengths = [5, 60, 6, 58, 7, 61, 5, 59]
    batches = length_batches(lengths, max_batch=8, forward_cost=36)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[5, 5, 6, 7], [58, 59, 60, 61]]
    assert length_batches(lengths, max_batch=8, forward_cost=10_000) == [sorted(range(8), key=lambda i: lengths[i])]
    assert all(len(b) <= 3 for b in length_batches(lengths, max_batch=3))
    assert length_batches([], 4) == []


def test_dora_runs_are_served_on_a_model_of_their_own(tmp_path):
    """peft refuses mixed batches of DoRA adapters: such a run never joins a shared base."""
    import json as _json
    from types import SimpleNamespace

    from deltatune.methods import registry
    from deltatune.rundir import RunDir
    from deltatune.serve.loading import group_key

    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "use_dora": True}))
    parts = SimpleNamespace(method=registry.get("lora"), run=RunDir(tmp_path))
    assert group_key(parts) is None
