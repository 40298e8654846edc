"""PII detection and redaction: exact spans per kind, validated numbers, overlaps, idempotence, errors,
a property test on arbitrary text, and a regression floor on the seeded synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.data.pii import PII_TYPES, PLACEHOLDERS, check_kinds, find_pii, redact, score, synthetic_set
from deltatune.errors import ConfigError


def found(text: str, kinds=PII_TYPES) -> list[tuple[str, str]]:
    return [(text[s.start:s.end], s.kind) for s in find_pii(text, kinds)]


@pytest.mark.parametrize("text, pii, kind", [
    ("Write to jane.doe+news@example.co.uk today.", "jane.doe+news@example.co.uk", "email"),
    ("Call (206) 555-0143 after lunch.", "(206) 555-0143", "phone"),
    ("Ring 020 7946 0958 in London.", "020 7946 0958", "phone"),
    ("Tel: +49 30 1234567, ask for sales.", "+49 30 1234567", "phone"),
    ("Card 4111 1111 1111 1111 expires soon.", "4111 1111 1111 1111", "credit_card"),
    ("Paid with 4111-1111-1111-1111.", "4111-1111-1111-1111", "credit_card"),
    ("Amex 378282246310005 on file.", "378282246310005", "credit_card"),
    ("IBAN DE89 3704 0044 0532 0130 00 please.", "DE89 3704 0044 0532 0130 00", "iban"),
    ("Pay GB82WEST12345698765432.", "GB82WEST12345698765432", "iban"),
    ("Blocked 192.168.0.1 at noon.", "192.168.0.1", "ip"),
    ("Host 2001:db8::8a2e:370:7334 is up.", "2001:db8::8a2e:370:7334", "ip"),
    ("Yesterday Anna Schmidt called.", "Anna Schmidt", "name"),
    ("Ask Jan van Dijk first.", "Jan van Dijk", "name"),
    ("Meeting with Dr. Novak on Friday.", "Novak", "name"),
    ("Dear Lucy,\nthanks for the report.", "Lucy", "name"),
])
def test_each_kind_is_found_with_its_exact_span(text, pii, kind):
    assert found(text) == [(pii, kind)]


@pytest.mark.parametrize("text", [
    "Card 4111 1111 1111 1112 was declined.",          # fails Luhn
    "IBAN DE88 3704 0044 0532 0130 00 is wrong.",      # wrong check digits
    "Host 999.1.1.1 does not exist.",                   # octet > 255
    "Due 15/03/2024 or 2024-03-15, total $1,299.99.",   # dates and prices
    "Upgrade to 10.0.19041.1 by 12:30:45.",             # version, time
    "Order #48213957 and Account 4305360565 closed.",   # identifiers, one shaped like a US phone
    "We met at Victoria Station on Monday in April.",   # capitalised words that are not names
    "Smith, Jones and Brown opened an office in Berlin.",
])
def test_hard_negatives_are_not_flagged(text):
    assert found(text) == []


def test_numbers_inside_an_iban_or_card_are_not_also_phones():
    text = "GB82 WEST 1234 5698 7654 32 and 4111 1111 1111 1111"
    assert [kind for _, kind in found(text)] == ["iban", "credit_card"]
    # a checksum-invalid IBAN is no IBAN, and its digit groups are no phone either
    assert found("Account NL68 TGPC 4025 1765 02 could not be verified.") == []


def test_kinds_limits_what_is_found():
    text = "Anna Schmidt, anna@example.com, 192.168.0.1"
    assert found(text, ["email"]) == [("anna@example.com", "email")]
    assert found(text, []) == []


FIXTURE = ("Dear Lucy Jones, mail lucy@example.org or call +44 20 7946 0958. "
           "Card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, from 10.0.0.7.")


def test_redact_output_and_counts_are_exact():
    text, counts = redact(FIXTURE)
    assert text == ("Dear <NAME>, mail <EMAIL> or call <PHONE>. "
                    "Card <CREDIT_CARD>, IBAN <IBAN>, from <IP_ADDRESS>.")
    assert counts == Counter({kind: 1 for kind in PII_TYPES})


def test_redact_is_idempotent():
    once, _ = redact(FIXTURE)
    assert redact(once) == (once, Counter())
    assert all(placeholder in once for placeholder in PLACEHOLDERS.values())


def test_check_kinds_names_the_unknown_and_lists_the_valid():
    check_kinds(PII_TYPES)
    with pytest.raises(ConfigError) as err:
        check_kinds(["email", "phon", "ssn"])
    message = str(err.value)
    assert "'phon'" in message and "did you mean 'phone'" in message and "'ssn'" in message
    assert "valid kinds: email, phone, credit_card, iban, ip, name" in message
    assert "2 problem(s)" in message and "data.pii.types" in message
    with pytest.raises(ConfigError, match="got the string 'email'"):
        check_kinds("email")
    with pytest.raises(ConfigError):
        redact("text", ["mail"])


# Fragments that look like PII, glued together by arbitrary text, reach the detectors' edge cases far
# more often than uniformly random characters do.
FRAGMENTS = st.sampled_from([
    "4111 1111 1111 1111", "4111-1111", "DE89 3704 0044 0532 0130 00", "GB82WEST", "192.168.0.1", "::1", "fe80::",
    "+44 20 7946 0958", "(206) 555-0143", "a@b.co", "@", ".", ":", "-", " ", "\n", "Anna", "Schmidt", "Dr.", "Dear ",
    "van", "O'", "<NAME>", "<EMAIL>", "<PHONE>", "1", "12", "2024-03-15", "#", "+",
])
TEXTS = st.one_of(st.text(), st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=12).map("".join))


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_redact_never_raises_and_leaves_nothing_to_find(text):
    spans = find_pii(text)
    assert spans == sorted(spans)
    assert all(0 <= s.start < s.end <= len(text) for s in spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    out, counts = redact(text)
    assert find_pii(out) == []
    assert sum(counts.values()) >= len(spans)


def test_synthetic_set_is_seeded_and_its_gold_spans_are_sane():
    items = synthetic_set(50, seed=3)
    assert items == synthetic_set(50, seed=3) and items != synthetic_set(50, seed=4)
    # the same in another process with another hash seed (set order must not leak into the data)
    code = "import json; from deltatune.data.pii import synthetic_set; print(json.dumps(synthetic_set(50, 3)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(other.stdout) == json.loads(json.dumps(items))
    for item in items:
        spans = sorted(item["spans"])
        assert all(kind in PII_TYPES and item["text"][a:b].strip() == item["text"][a:b] for a, b, kind in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_synthetic_scores_stay_above_the_floor():
    result = score(synthetic_set(300, seed=0))
    for kind in ("email", "phone", "credit_card", "iban", "ip"):
        assert result[kind]["support"] > 10
        assert result[kind]["precision"] >= 0.95 and result[kind]["recall"] >= 0.95, (kind, result[kind])
    # Names are a gazetteer heuristic evaluated on held-out locales (docs/pii.md): a lower floor.
    assert result["name"]["precision"] >= 0.9 and result["name"]["recall"] >= 0.55, result["name"]


def test_lenient_scoring_counts_overlaps():
    items = [{"text": "Meeting with Dr Anna Kowalska-Nowak today", "spans": [(16, 20, "name")]}]
    assert score(items, ["name"])["name"]["tp"] == 0
    assert score(items, ["name"], lenient=True)["name"] == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0, "support": 1}
