"""The answer normalisation of the VQA evaluation (VQAv2, TextVQA, VizWiz servers and scorers).

Both the prediction and each human answer go through the same steps before comparison:

1. lower-case; drop ``,`` and ``?``; split off a possessive ``'s``; whitespace to spaces;
2. punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``): a mark next to a space is
   dropped, any other becomes a space (``yes-no`` -> ``yes no``, ``(yes)`` -> ``yes``);
   a period not followed by a digit is dropped (``3.5`` stays);
3. per word: number words up to ten become digits (``two`` -> ``2``, ``none`` -> ``0``), the
   articles ``a``, ``an``, ``the`` go, and a contraction written without its apostrophe gets
   it back (``dont`` -> ``don't``).

The scorers differ from this nowhere we know of; the one quirk reproduced on purpose is that
the reference implementations remove at most 32 periods from one answer.
"""

from __future__ import annotations

import re
from itertools import combinations

NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# Contractions the scorers restore. A form with one apostrophe is matched written without it;
# a form with several is matched with any one of them left out ("couldnt've", "couldn'tve").
CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've "
    "it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't "
    "'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in CONTRACTED:
        marks = [i for i, c in enumerate(form) if c == "'"]
        drops = [tuple(marks)] if len(marks) == 1 else list(combinations(marks, 1))
        for drop in drops:
            table["".join(c for i, c in enumerate(form) if i not in drop)] = form
    table["somebody'd"] = "somebodyd"  # the reference table maps this one the other way round
    return table


CONTRACTIONS = _contractions()
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text  # tested on the input, as the scorers do
        out = out.replace(mark, "" if spaced else " ")
    return _PERIOD.sub("", out, count=32)


def _words(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """``text`` normalised as the VQA scorers normalise answers."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))
