"""PII detection and redaction for regulated data: e-mail, phone, credit card, IBAN, IP address, name.

Numbers are validated, not just pattern-matched: cards must pass Luhn, IBANs their mod-97 check,
IPs ``ipaddress``, phones libphonenumber (international numbers from any country, national ones in
``PHONE_REGIONS``). Names are a heuristic, since no NER model is available offline: a capitalised
first name from a gazetteer (Faker's lists for ``NAME_LOCALES``) followed by more capitalised words,
anything capitalised after a title (Mr, Dr, Frau ...), or a first name after a greeting ("Dear
Anna,"). It misses names whose first name is not in the lists, lone first names elsewhere, and
lower-case or ALL-CAPS names; it flags capitalised phrases that start with a first name.
docs/pii.md has the measured precision and recall.

Overlaps are resolved by kind (checksum-validated numbers beat phones, everything beats names),
then length, then position, so an IBAN is never also a phone. Decoys, strings shaped like an IBAN,
an IPv4 address or a date that failed validation, block phones and cards inside them: the digits
of "NL68 TGPC 4025 1765 02" or "743.35.45.174" are not a phone number.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import importlib
import ipaddress
import random
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..config import PII_TYPES  # the kinds data.pii.types may name: defined once, where the config is checked
from ..errors import ConfigError

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>",
                "ip": "<IP_ADDRESS>", "name": "<NAME>"}
PHONE_REGIONS = ("US", "GB")  # whose national formats ("(206) 555-0143", "020 7946 0958") are understood
NAME_LOCALES = ("en_US", "de_DE", "fr_FR", "es_ES", "it_IT")  # the gazetteer's sources
EVAL_NAME_LOCALES = ("en_GB", "en_IE", "nl_NL", "da_DK", "sv_SE", "pl_PL")  # synthetic_set's: held out
_DECOY = ""  # the kind of a decoy span: it takes part in overlap resolution, then is dropped
_RANK = {kind: i for i, kind in enumerate(("email", "iban", "ip", _DECOY, "credit_card", "phone", "name"))}
_MAX_PASSES = 8


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    kind: str  # text[start:end] is the PII


def check_kinds(kinds) -> None:
    """Raise ConfigError naming every unknown kind (with a close match if there is one)."""
    if isinstance(kinds, str):
        raise ConfigError([f"expected a list of PII kinds, got the string {kinds!r}; write [{kinds!r}]"],
                          source="data.pii.types")
    problems = []
    for kind in kinds:
        if kind not in PII_TYPES:
            close = difflib.get_close_matches(str(kind), PII_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown PII kind {kind!r}{hint}; valid kinds: {', '.join(PII_TYPES)}")
    if problems:
        raise ConfigError(problems, source="data.pii.types")


def find_pii(text: str, kinds: Sequence[str] = PII_TYPES) -> list[Span]:
    """Sorted, non-overlapping PII spans of the given kinds."""
    check_kinds(kinds)
    candidates = [Span(start, end, kind) for kind in kinds for start, end in _DETECTORS[kind](text)]
    if candidates:
        candidates += [Span(*m.span(), _DECOY) for m in _DECOYS.finditer(text)]
    taken: list[Span] = []
    for span in sorted(candidates, key=lambda s: (_RANK[s.kind], s.start - s.end, s.start)):
        if all(span.end <= t.start or span.start >= t.end for t in taken):
            taken.append(span)
    return sorted(s for s in taken if s.kind != _DECOY)


def redact(text: str, kinds: Sequence[str] = PII_TYPES) -> tuple[str, Counter]:
    """``text`` with each PII span replaced by its placeholder, and how many of each kind.

    Idempotent: a replacement can expose a new match (in "::1(206) 555-0143" the address glued to
    the phone hides it until the address is replaced), so we redact again until nothing is found.
    Each pass replaces original characters and placeholders never match, so this ends, nearly
    always after one pass (a second finds nothing)."""
    counts: Counter = Counter()
    for _ in range(_MAX_PASSES):
        spans = find_pii(text, kinds)
        if not spans:
            break
        counts.update(s.kind for s in spans)
        parts, last = [], 0
        for s in spans:
            parts += [text[last:s.start], PLACEHOLDERS[s.kind]]
            last = s.end
        text = "".join(parts) + text[last:]
    return text, counts


# ----------------------------------------------------------------------------- detectors
# Each yields (start, end) candidates; a cheap test up front skips text that cannot hold its kind,
# since most rows have no digits or no "@". Numbers are ASCII digits (re.A): int() and ipaddress
# would accept other scripts' digits that no card or IBAN uses.

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[\w-]+\.)+[A-Za-z]{2,}(?![\w-])")
# Not after a "+" (a phone) or "INV-" (a reference): any 13 digits pass Luhn one time in ten.
_CARD = re.compile(r"(?<![\w+-])(?<!\d )\d(?:[ -]?\d){12,18}(?!\w|[ -]\d)", re.A)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", re.A)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)", re.A)
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:.]{3,45}(?![\w:])", re.A)
_DECOYS = re.compile(rf"{_IBAN.pattern}|(?<![\w.])\d+(?:\.\d+){{3}}(?!\w|\.\d)"
                     r"|(?<![\w./-])(?:\d{1,2}([./-])\d{1,2}\1\d{2,4}|\d{4}-\d\d-\d\d)(?![\w/-]|\.\d)", re.A)


_SEVEN_DIGITS = re.compile(r"\d(?:\D*\d){6}")
_THIRTEEN_DIGITS = re.compile(r"\d(?:\D*\d){12}")


def _emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" in text:
        yield from (m.span() for m in _EMAIL.finditer(text))


def _cards(text: str) -> Iterator[tuple[int, int]]:
    if _THIRTEEN_DIGITS.search(text):
        from stdnum import luhn
        yield from (m.span() for m in _CARD.finditer(text) if luhn.is_valid(re.sub(r"\D", "", m.group())))


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    from stdnum import iban
    for m in _IBAN.finditer(text):
        candidate = m.group()
        while True:  # the last group may be a following word ("... 0130 00 ABC"): drop groups until valid
            if iban.is_valid(candidate):
                yield m.start(), m.start() + len(candidate)
                break
            if " " not in candidate:
                break
            candidate = candidate.rsplit(" ", 1)[0]


def _ips(text: str) -> Iterator[tuple[int, int]]:
    checks = [(_IPV4, ipaddress.IPv4Address)] * (text.count(".") >= 3)
    checks += [(_IPV6, ipaddress.IPv6Address)] * (text.count(":") >= 2)
    for pattern, version in checks:
        for m in pattern.finditer(text):
            candidate = m.group().rstrip(".")  # a full stop ending the sentence
            if version is ipaddress.IPv6Address and candidate.count(":") < 2:
                continue
            try:
                version(candidate)
            except ValueError:
                continue
            yield m.start(), m.start() + len(candidate)


# Four in ten random 10-digit numbers are valid US phone numbers; after one of these labels a bare
# run of digits is far more likely an identifier: "Account 4305360565".
_ID_LABEL = re.compile(r"(?i)(?:\b(?:order|invoice|ref|reference|account|acct|tracking|customer|id|po|sku|serial|"
                       r"ticket|case|no|nr)\b\W{0,4}|#)$")


def _phones(text: str) -> Iterator[tuple[int, int]]:
    if _SEVEN_DIGITS.search(text):
        from phonenumbers import PhoneNumberMatcher
        # Decoys lose to phones anyway; blanking them (same length, so same offsets) first spares
        # libphonenumber parsing every date and IBAN group, which is most of its time.
        text = _DECOYS.sub(lambda m: " " * len(m.group()), text)
        for region in PHONE_REGIONS:  # duplicates and overlaps are settled by find_pii
            for m in PhoneNumberMatcher(text, region):
                if not (m.raw_string.isdigit() and _ID_LABEL.search(text, max(0, m.start - 16), m.start)):
                    yield m.start, m.end


# Names. Words are matched by shape and then looked up in Python sets: faster and far more readable
# than a regex alternation of 3,500 first names.
_TITLES = frozenset("Mr Mrs Ms Miss Mx Dr Prof Sir Dame Lady Lord Herr Frau Mme Mlle Madame Monsieur Sr Sra "
                    "Signor Signora".split())
_PARTICLES = "van|von|de|der|den|du|da|di|del|della|la|le|ten|ter|zu|dos|das"
# A first name before these words is part of a place or an organisation: "Victoria Station",
# "Santa Maria Maddalena", "Herrmann Börner KG".
_PLACE_WORDS = frozenset("Street St Road Rd Avenue Ave Lane Square Station Park Hospital University College School "
                         "Bank Group Company Corp Hotel Airport Bridge Center Centre Church Strasse Straße "
                         "Platz Island Valley Mountain River Lake County City Inc Ltd LLC LLP PLC GmbH AG KG SE SA "
                         "SAS SARL SpA NV BV AB ApS Oy Co".split())
_PLACE_PREFIXES = frozenset("San Santa Santo São Saint Sainte St Port Lake Mount Fort New North South East West".split())
_MONTHS = tuple("January February March April May June July August September October November December".split())
_WEEKDAYS = tuple("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())
_NOT_NAMES = frozenset(_MONTHS + _WEEKDAYS)
_GREETING = re.compile(r"(?:Dear|Hi|Hello|Hey|Thanks|Thank you|Cheers|Bye|Love),?\s+$")
_UPPER = "".join(c for c in map(chr, range(0x250)) if c.isupper())  # Latin, with accents
# Two letters or more (not the "S" of "S.A."), with an optional "O'" or "D'" and inner hyphens.
_WORD = re.compile(rf"(?:[{_UPPER}]['’])?[{_UPPER}][^\W\d_]+(?:['’][{_UPPER}][^\W\d_]+|-[^\W\d_]+)*")
_ORG_AFTER = re.compile(r"[ \t]+(?:[A-Z]\.[A-Za-z]|&[ \t]+Co\b)")  # "Paul Bertrand S.A.", "... & Co. KG"
_TITLE = rf"(?:{'|'.join(sorted(_TITLES))})\.?[ \t]+"
# A word with the name particles before it ("van Dijk") is one token of a name.
_TOKEN = re.compile(rf"(?:(?:{_PARTICLES})[ \t]+)*{_WORD.pattern}")
# A run of capitalised words, allowing a title's full stop ("Dr. Jan van Dijk").
_RUN = re.compile(rf"(?<![\w'’])(?:{_TITLE})*{_TOKEN.pattern}(?:[ \t]+(?:{_TITLE})*{_TOKEN.pattern})*")


@functools.cache
def gazetteer() -> frozenset[str]:
    """First names from Faker's person providers for NAME_LOCALES (built once, on first use)."""
    names: set[str] = set()
    for locale in NAME_LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for attr in ("first_names", "first_names_male", "first_names_female"):
            names.update(getattr(provider, attr, ()))
    return frozenset(n for n in names if len(n) > 1 and n[0].isupper()) - _NOT_NAMES


def _names(text: str) -> Iterator[tuple[int, int]]:
    if text == text.lower():  # no capitals, no names (cheaper than the regex on lower-case rows)
        return
    for run in _RUN.finditer(text):
        words = [(run.start() + m.start(), run.start() + m.end(), m.group()) for m in _TOKEN.finditer(run.group())]
        span = _name_in(words, text)
        if span:
            yield span


def _name_in(words: list[tuple[int, int, str]], text: str) -> tuple[int, int] | None:
    """The name in one run of capitalised words, if it has one: from the first title or known first
    name on. A lone first name counts only after a greeting."""
    for i, (start, _, word) in enumerate(words):
        if i and words[i - 1][2] in _PLACE_PREFIXES:
            return None
        if word in _TITLES:  # everything capitalised after the title(s): "Dr Novak", "Mrs Lucy Ross"
            name = [w for w in words[i + 1:] if w[2] not in _TITLES][:3]
        elif word in gazetteer() or word.split("-")[0] in gazetteer():  # "Anna Maria Schmidt", "Anna-Lena Vogt"
            greeted = _GREETING.search(text, max(0, start - 12), start)
            name = words[i:i + 4] if i + 1 < len(words) or greeted else []
        else:
            continue
        if name and name[-1][2] not in _PLACE_WORDS and not _ORG_AFTER.match(text, name[-1][1]):
            return name[0][0], name[-1][1]
        return None
    return None


_DETECTORS = {"email": _emails, "phone": _phones, "credit_card": _cards, "iban": _ibans, "ip": _ips,
              "name": _names}


# ----------------------------------------------------------------------------- synthetic evaluation set
# Slots named after a PII kind are planted PII; "first" and "titled" are names too (the title itself is
# not PII). Every other slot is a hard negative: digits, dots or capitals that are not PII.
_TEMPLATES = (
    "Please contact {name} at {email} about {order}.",
    "Call {phone} before {weekday} to confirm the delivery to {city}.",
    "Card {credit_card} was charged {price} on {date}.",
    "Refund {price} to IBAN {iban} by {date}, ref {order}.",
    "Login from {ip} at {time} was blocked after {count} attempts.",
    "Dear {first},\nyour appointment on {date} at {time} is confirmed.",
    "Meeting with {titled} at {company} in {city} on {weekday}.",
    "{name} moved to {city} in {month} and now works for {company}.",
    "Patient {name}, phone {phone}, was admitted on {date}.",
    "Transfer of {price} from {iban} failed; call {phone}.",
    "Customer {email} paid {price} with {credit_card}.",
    "Hosts {ip} and {ip} run version {version}.",
    "Thanks {first}! I'll send the {month} report to {email}.",
    "{titled} asked us to call back on {phone} or write to {email}.",
    # hard negatives only
    "Order {order} for {price} ships on {weekday}, {date}.",
    "Card {bad_card} was declined: the number failed its check.",
    "Account {bad_iban} could not be verified.",
    "Upgrade to version {version} before {month}.",
    "{company} opened an office in {city} on {weekday}.",
    "Invoice {order}: {count} items at {price} each, due {date}.",
    "The {weekday} meeting on {date} at {time} moves to {city}.",
    "Address {bad_ip} is not a valid host.",
    "Account {account} was closed on {date}; tracking number {tracking}.",
)
_PII_SLOTS = {"first": "name", "titled": "name", **{k: k for k in PII_TYPES}}
_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL")
_CITY_LOCALES = tuple(loc for loc in _LOCALES if loc != "it_IT")  # its city list's order follows the hash seed


def _grouped(number: str, sep: str) -> str:
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4))


def _valid_phone(number: str, region: str) -> bool:
    import phonenumbers
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(number, region))
    except phonenumbers.NumberParseException:
        return False


def _phone(rng, fake) -> str:
    """A Faker number in the locale's own formats, international unless in PHONE_REGIONS. Faker also
    makes up unassigned area codes; real numbers are assigned, so we plant only valid ones."""
    locale = rng.choice(_LOCALES)
    while True:
        number = fake(locale).phone_number()
        if (number.startswith(("+", "00")) or locale[-2:] in PHONE_REGIONS) and _valid_phone(number, locale[-2:]):
            return number


def _card(rng, fake, valid=True) -> str:
    number = fake("en_US").credit_card_number(rng.choice(("visa16", "visa13", "visa19", "mastercard", "amex",
                                                          "discover", "diners", "jcb16")))
    if not valid:  # any other last digit breaks the Luhn check
        number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    return _grouped(number, rng.choice(("", " ", "-"))) if len(number) != 15 else number  # Amex: 4-6-5, kept whole


def _iban(rng, fake, valid=True) -> str:
    number = fake(rng.choice(_LOCALES[1:])).iban()
    if not valid:  # only one pair of check digits is right
        number = number[:2] + f"{(int(number[2:4]) + rng.randint(1, 90)) % 100:02d}" + number[4:]
    return _grouped(number, rng.choice(("", " ")))


def _fill(slot: str, rng: random.Random, fake) -> tuple[str, str | None]:
    """A value for one template slot, and the part of it that is PII (None for hard negatives)."""
    if slot in ("name", "titled", "first"):
        eval_person = fake(rng.choice(EVAL_NAME_LOCALES))
        first, last = eval_person.first_name(), eval_person.last_name()
        name = {"first": first, "name": f"{first} {last}", "titled": rng.choice((last, f"{first} {last}"))}[slot]
        title = rng.choice(("Mr", "Mrs", "Ms", "Dr", "Prof", "Dr.", "Mrs.")) + " " if slot == "titled" else ""
        return title + name, name
    fakes = {
        "email": lambda: fake(rng.choice(_LOCALES)).email(), "phone": lambda: _phone(rng, fake),
        "credit_card": lambda: _card(rng, fake), "iban": lambda: _iban(rng, fake),
        "ip": lambda: rng.choice((fake("en_US").ipv4(), fake("en_US").ipv6(),
                                  str(ipaddress.IPv6Address(rng.getrandbits(16) << 112 | rng.getrandbits(16))))),
        "bad_card": lambda: _card(rng, fake, valid=False), "bad_iban": lambda: _iban(rng, fake, valid=False),
        "bad_ip": lambda: f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "date": lambda: (datetime.date(1970, 1, 1) + datetime.timedelta(days=rng.randrange(22000))).strftime(rng.choice(
            ("%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%B %d, %Y", "%d %B %Y"))),
        "price": lambda: rng.choice(("${:,.2f}", "€{:.2f}", "£{:,.2f}", "{:.2f} EUR")).format(rng.uniform(1, 99999)),
        "order": lambda: rng.choice(("#{}", "INV-2024-{}", "PO {}", "order no. {}")).format(rng.randint(10**4, 10**9)),
        "version": lambda: rng.choice(("{}.{}.{}", "10.0.{}.{}")).format(*(rng.randint(0, 30000) for _ in "abc")),
        "time": lambda: f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}", "count": lambda: str(rng.randint(2, 500)),
        "account": lambda: str(rng.randint(10**9, 10**10 - 1)), "tracking": lambda: str(rng.randint(10**11, 10**12 - 1)),
        "weekday": lambda: rng.choice(_WEEKDAYS), "month": lambda: rng.choice(_MONTHS),
        "city": lambda: fake(rng.choice(_CITY_LOCALES)).city(), "company": lambda: fake(rng.choice(_LOCALES)).company(),
    }
    value = fakes[slot]()
    return value, value if slot in _PII_SLOTS else None


def synthetic_set(n: int, seed: int) -> list[dict]:
    """``n`` sentences from the templates above with Faker values, each ``{"text", "spans"}``, spans as
    ``(start, end, kind)``. Names come from EVAL_NAME_LOCALES, not the gazetteer's NAME_LOCALES, so
    the name score is not measured on the very lists the detector looks up (the lists still overlap)."""
    from faker import Faker

    rng, fakers = random.Random(seed), {}

    def fake(locale: str):
        if locale not in fakers:
            fakers[locale] = Faker(locale)
            fakers[locale].seed_instance(f"{seed}-{locale}")
        return fakers[locale]

    items = []
    for _ in range(n):
        text, spans = "", []
        for literal, slot, _, _ in string.Formatter().parse(rng.choice(_TEMPLATES)):
            text += literal
            if slot:
                value, pii = _fill(slot, rng, fake)
                if pii:
                    start = len(text) + value.index(pii)
                    spans.append((start, start + len(pii), _PII_SLOTS[slot]))
                text += value
        items.append({"text": text, "spans": spans})
    return items


def score(items: list[dict], kinds: Sequence[str] = PII_TYPES, lenient: bool = False) -> dict[str, dict]:
    """Precision, recall, F1 and counts per kind of find_pii against the items' gold spans. A match is
    the exact (start, end, kind); with ``lenient``, any overlap of the same kind, each span used once."""
    counts = {kind: Counter() for kind in kinds}
    for item in items:
        found = find_pii(item["text"], kinds)
        for kind in kinds:
            gold = [Span(*s) for s in item["spans"] if s[2] == kind]
            pred = [s for s in found if s.kind == kind]
            if lenient:
                tp = 0
                for p in pred:
                    hit = next((g for g in gold if g.start < p.end and p.start < g.end), None)
                    if hit:
                        gold.remove(hit)
                        tp += 1
                gold_n = len(gold) + tp
            else:
                tp, gold_n = len(set(pred) & set(gold)), len(gold)
            counts[kind].update(tp=tp, fp=len(pred) - tp, fn=gold_n - tp)
    result = {}
    for kind, c in counts.items():
        p = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 1.0
        r = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 1.0
        result[kind] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                        "tp": c["tp"], "fp": c["fp"], "fn": c["fn"], "support": c["tp"] + c["fn"]}
    return result
