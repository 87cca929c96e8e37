"""Tokenize rendered conversations so that control tokens appear only where the template put them.

A Hugging Face fast tokenizer turns every occurrence of an added token's text (``</s>``,
``<|im_end|>``, ``<|eot_id|>`` ...) into that token, wherever it comes from. In training data
such text is ordinary text: a question quoting ``</s>`` must not end the turn. transformers'
``split_special_tokens`` can only switch the matching off for the whole string, so here the
template's own control tokens are swapped for private sentinel tokens of a clone of the backend
tokenizer (same ``lstrip``/``rstrip``/``normalized`` flags, so the text around them is cut and
normalized exactly as before), every real control token is made splittable, and the sentinels
are mapped back to the real ids. On text whose data holds no control-token text and that needs
no split, :meth:`ExactTokenizer.encode` is one plain call of the backend: the ids are exactly
``tokenizer(text)``.

The same sentinels cut the text at chosen points (e.g. where a generation prompt ends), so that
a token never merges text on both sides: the piece before the cut is tokenized as if the string
ended there, which is what inference sees.
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

# First code point of the sentinels: Unicode's supplementary private use area B, which no
# published vocabulary gives a meaning to. Data holding one is refused (see ``check_text``).
_SENTINEL_BASE = 0x100000
_MASK = chr(_SENTINEL_BASE - 1)  # stands in for data control-token text while rendering
_RESERVED = re.compile(f"[{_MASK}-\U0010ffff]")  # code points the sentinels and probes use


_SHARED: weakref.WeakKeyDictionary[Any, dict[tuple, ExactTokenizer]] = weakref.WeakKeyDictionary()


def exact_tokenizer(tokenizer: Any, keep: Iterable[str] = ()) -> ExactTokenizer:
    """The :class:`ExactTokenizer` of ``tokenizer``, shared by every encoder of it (building the
    sentinel clone of a large vocabulary takes seconds); rebuilt when tokens were added."""
    key = (len(tokenizer), tuple(sorted(set(keep))))
    try:
        per_tokenizer = _SHARED.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no sharing
        return ExactTokenizer(tokenizer, keep)
    if key not in per_tokenizer:
        per_tokenizer[key] = ExactTokenizer(tokenizer, keep)
    return per_tokenizer[key]


class ExactTokenizer:
    """Control-token-aware tokenization with cut points, for one fast tokenizer.

    Args:
        tokenizer: a fast Hugging Face tokenizer (with ``backend_tokenizer``).
        keep: added tokens that stay control tokens wherever they appear (the image token and
            the tokens of answer tags: their counts are checked against the sample elsewhere).
    """

    def __init__(self, tokenizer: Any, keep: Iterable[str] = ()) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; exact label masks need "
                "character offsets (load it with use_fast=True)"
            )
        self.tokenizer = tokenizer
        self.backend = backend
        keep = set(keep)
        added = backend.get_added_tokens_decoder()
        # content -> id of every added token that data text could spell by accident.
        self.control: dict[str, int] = {
            tok.content: int(i)
            for i, tok in added.items()
            if tok.content and tok.content not in keep
        }
        names = sorted(self.control, key=len, reverse=True)  # leftmost-longest, as the tokenizer
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self._clone: Any = None
        self._sentinel_of: dict[str, str] = {}
        self._sentinel_ids: dict[int, int] = {}  # clone id -> real id (-1: a cut point)
        self._cut = ""

    # ---- finding control-token text ------------------------------------------------------

    def find_control(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` of every control-token text in ``text``, as the tokenizer matches."""
        if self._pattern is None:
            return []
        return [m.span() for m in self._pattern.finditer(text)]

    def has_control(self, text: str) -> bool:
        """Whether ``text`` holds any control-token text."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def control_names(self, text: str) -> list[str]:
        """The control-token texts that occur in ``text`` (for messages)."""
        return sorted({text[a:b] for a, b in self.find_control(text)})

    @staticmethod
    def check_text(text: str) -> str | None:
        """A problem with ``text`` that makes exact tokenization impossible, else ``None``."""
        if _RESERVED.search(text):
            return "the text holds characters of Unicode's private use area B (U+FFFFF and up)"
        return None

    def mask(self, text: str) -> str:
        """``text`` with every control-token text replaced by a same-length private run.

        Rendering a conversation once as is and once with masked data shows which control
        tokens came from the template: they are the ones both renderings share.
        """
        spans = self.find_control(text)
        if not spans:
            return text
        out, pos = [], 0
        for a, b in spans:
            out.append(text[pos:a])
            out.append(_MASK * (b - a))
            pos = b
        out.append(text[pos:])
        return "".join(out)

    # ---- tokenizing ----------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        escape: Sequence[tuple[int, int]] = (),
        cuts: Sequence[int] = (),
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of ``text``.

        Args:
            text: the rendered text.
            add_special_tokens: let the tokenizer add its BOS/EOS (its post-processor).
            escape: ``(start, end)`` ranges of control-token text to tokenize as ordinary text.
            cuts: positions no token may span (the text is tokenized as separate pieces there).

        Without ``escape`` and ``cuts`` this is exactly ``tokenizer(text)``.
        """
        if not escape and not cuts:
            enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
            return enc.ids, enc.offsets
        clone = self._build_clone()
        escaped = {start for start, _ in escape}
        cut_set = sorted({c for c in cuts if 0 < c < len(text)})
        pieces: list[str] = []
        starts: list[int] = []  # original start of each clone-text character
        ends: list[int] = []  # original end of each clone-text character
        pos = 0
        controls = [span for span in self.find_control(text) if span[0] not in escaped]
        events = sorted([(a, b, "control") for a, b in controls] + [(c, c, "cut") for c in cut_set])
        for a, b, kind in events:
            if a < pos:  # a cut inside a control token: the token is kept whole
                continue
            for k in range(pos, a):
                pieces.append(text[k])
                starts.append(k)
                ends.append(k + 1)
            if kind == "control":
                pieces.append(self._sentinel_of[text[a:b]])
            else:
                pieces.append(self._cut)
            starts.append(a)
            ends.append(b)
            pos = b
        for k in range(pos, len(text)):
            pieces.append(text[k])
            starts.append(k)
            ends.append(k + 1)
        enc = clone.encode("".join(pieces), add_special_tokens=add_special_tokens)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        size = len(starts)
        for token_id, (s, e) in zip(enc.ids, enc.offsets, strict=True):
            real = self._sentinel_ids.get(token_id, token_id)
            if real == -1:
                continue
            if e > s:
                offsets.append((starts[s], ends[e - 1]))
            else:
                at = starts[s] if s < size else len(text)
                offsets.append((at, at))
            ids.append(real)
        return ids, offsets

    def encode_whole(
        self,
        text: str,
        points: Sequence[int],
        *,
        add_special_tokens: bool = True,
        escape: Sequence[tuple[int, int]] = (),
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode`, cut at those of ``points`` that a token would span (the ends of
        generation prompts and STOPs), so no token spans any of them."""
        ids, offsets = self.encode(text, add_special_tokens=add_special_tokens, escape=escape)
        cuts = crossed(offsets, points)
        if cuts:
            ids, offsets = self.encode(
                text, add_special_tokens=add_special_tokens, escape=escape, cuts=cuts
            )
        return ids, offsets

    def _build_clone(self) -> Any:
        """The backend with every control token splittable and one sentinel per control token."""
        if self._clone is not None:
            return self._clone
        from tokenizers import AddedToken, Tokenizer

        spec = json.loads(self.backend.to_str())
        for token in spec.get("added_tokens", []):
            # encode_special_tokens splits special tokens like ordinary text: every control
            # token becomes splittable, the kept ones (image token, answer tags) stay matched.
            token["special"] = token["content"] in self.control
        clone = Tokenizer.from_str(json.dumps(spec))
        added = self.backend.get_added_tokens_decoder()
        sentinels = []
        for k, (content, real_id) in enumerate(self.control.items()):
            tok = added[real_id]
            char = chr(_SENTINEL_BASE + k)
            self._sentinel_of[content] = char
            sentinels.append(
                AddedToken(
                    char,
                    single_word=tok.single_word,
                    lstrip=tok.lstrip,
                    rstrip=tok.rstrip,
                    normalized=tok.normalized,
                    special=False,
                )
            )
        self._cut = chr(_SENTINEL_BASE + len(self.control))
        sentinels.append(AddedToken(self._cut, normalized=False, special=False))
        clone.add_tokens(sentinels)
        clone.encode_special_tokens = True
        for content, real_id in self.control.items():
            self._sentinel_ids[clone.token_to_id(self._sentinel_of[content])] = real_id
        self._sentinel_ids[clone.token_to_id(self._cut)] = -1
        self._clone = clone
        return clone


def crossed(offsets: Sequence[tuple[int, int]], points: Sequence[int]) -> list[int]:
    """The ``points`` that some token spans (starts before and ends after)."""
    out = []
    for p in points:
        k = bisect.bisect_left(offsets, p, key=lambda o: o[0]) - 1
        while k >= 0 and offsets[k][0] == offsets[k][1]:  # zero-width tokens span nothing
            k -= 1
        if k >= 0 and offsets[k][0] < p < offsets[k][1]:
            out.append(p)
    return out


def single_token_id(tokenizer: Any, token: str, needed_by: str) -> int:
    """The id of ``token``, which must be one token of ``tokenizer`` (``needed_by`` says why)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"tokenizer has no special token {token!r}, needed by {needed_by}; add it with "
            f"tokenizer.add_special_tokens(...) (and resize the model's embeddings)"
        )
    return int(token_id)
