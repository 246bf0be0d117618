"""Token scores into entities, as ``transformers.pipeline("token-classification")`` makes them.

A port of the pipeline's post-processing (transformers 4.57), strategy by strategy, so that a
job gives the framework's entities row for row:

- ``none``: one entity per token (special tokens left out), its argmax label and probability.
- ``simple``: tokens grouped while the tag stays the same and no ``B-`` starts a new one (an
  ``I-`` after ``O`` or after another type starts a group); the score is the mean of the
  tokens' probabilities; the word is the tokens decoded together.
- ``first``, ``average``, ``max``: tokens first merged into words (a word's label from its
  first token, from the mean of its tokens' scores, or from its most confident token), then
  grouped as ``simple`` groups tokens.

Subwords are found as the pipeline finds them: with a tokenizer whose model has a
continuing-subword prefix (WordPiece's ``##``), a token whose text is longer than its span of
the input; otherwise (byte-level BPE) a token that neither starts the text nor follows a
space. Entities whose group is in ``ignore_labels`` are dropped. Long texts run as windows;
their entities are merged as the pipeline merges them (of overlapping ones, the longest, then
the most confident, is kept).

One departure: where the pipeline decodes a byte-level word twice (the first word of a text
with a non-ASCII letter comes out as U+FFFD), the word is its text, as it should be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

STRATEGIES = ("none", "simple", "first", "average", "max")


@dataclass
class Entity:
    label: str
    score: float
    word: str
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        return {"entity_group": self.label, "score": self.score, "word": self.word,
                "start": self.start, "end": self.end}


@dataclass
class Token:
    """A token of a window that is not a special token: its text, span and scores."""

    word: str
    scores: np.ndarray  # probabilities over the labels
    start: int
    end: int
    is_subword: bool


class EntityReader:
    """Entities from a window's token probabilities, for one tokenizer and label set."""

    def __init__(self, tokenizer: Tokenizer, labels: list[str], strategy: str,
                 ignore_labels: list[str]) -> None:
        self.tokenizer = tokenizer
        self.labels = labels
        self.strategy = strategy
        self.ignore = set(ignore_labels)
        model = tokenizer.model
        self.word_aware = bool(getattr(model, "continuing_subword_prefix", None))
        unk = getattr(model, "unk_token", None)
        self.unk_id = tokenizer.token_to_id(unk) if unk else None
        self.decoder = tokenizer.decoder
        self.byte_level = type(self.decoder).__name__ == "ByteLevel"

    def decode(self, tokens: list[str]) -> str:
        """``convert_tokens_to_string``: the tokenizer's decoder, or the tokens joined."""
        return self.decoder.decode(tokens) if self.decoder is not None else " ".join(tokens)

    def tokens(self, text: str, ids: list[int], offsets: list[tuple[int, int]],
               special: list[int], probabilities: np.ndarray) -> list[Token]:
        """The pipeline's ``gather_pre_entities``."""
        out = []
        for i, token_id in enumerate(ids):
            if special[i]:
                continue
            start, end = offsets[i]
            word = self.tokenizer.id_to_token(token_id) or ""
            piece = text[start:end]
            if self.word_aware:
                is_subword = len(word) != len(piece)
            else:
                is_subword = start > 0 and " " not in text[start - 1:start + 1]
            if self.unk_id is not None and token_id == self.unk_id:
                word, is_subword = piece, False
            out.append(Token(word, probabilities[i], start, end, is_subword))
        return out

    def entities(self, text: str, tokens: list[Token]) -> list[Entity]:
        """A window's entities, those in ``ignore_labels`` dropped."""
        if self.strategy in ("none", "simple"):
            singles = []
            for t in tokens:
                best = int(t.scores.argmax())
                singles.append(Entity(self.labels[best], float(t.scores[best]), t.word,
                                      t.start, t.end))
            if self.strategy == "none":
                return [e for e in singles if e.label not in self.ignore]
            groups = self._group(text, singles, decoded=False)
        else:
            groups = self._group(text, self._words(tokens), decoded=True)
        return [e for e in groups if e.label not in self.ignore]

    def _words(self, tokens: list[Token]) -> list[Entity]:
        words: list[Entity] = []
        group: list[Token] = []
        for token in tokens:
            if group and not token.is_subword:
                words.append(self._word(group))
                group = []
            group.append(token)
        if group:
            words.append(self._word(group))
        return words

    def _word(self, tokens: list[Token]) -> Entity:
        if self.strategy == "first":
            scores = tokens[0].scores
        elif self.strategy == "max":
            scores = max(tokens, key=lambda t: t.scores.max()).scores
        else:  # average
            scores = np.nanmean(np.stack([t.scores for t in tokens]), axis=0)
        best = int(scores.argmax())
        return Entity(self.labels[best], float(scores[best]),
                      self.decode([t.word for t in tokens]), tokens[0].start, tokens[-1].end)

    def _group(self, text: str, entities: list[Entity], decoded: bool) -> list[Entity]:
        groups: list[Entity] = []
        members: list[Entity] = []
        for entity in entities:
            if members:
                bi, tag = _tag(entity.label)
                _, last_tag = _tag(members[-1].label)
                if not (tag == last_tag and bi != "B"):
                    groups.append(self._merge(text, members, decoded))
                    members = []
            members.append(entity)
        if members:
            groups.append(self._merge(text, members, decoded))
        return groups

    def _merge(self, text: str, members: list[Entity], decoded: bool) -> Entity:
        words = [m.word for m in members]
        # Decoded byte-level words are text already: decoding them again is the pipeline's
        # U+FFFD for a first word with a non-ASCII letter.
        word = "".join(words) if decoded and self.byte_level else self.decode(words)
        start, end = members[0].start, members[-1].end
        if "\ufffd" in word and "\ufffd" not in text[start:end]:
            word = text[start:end]  # a token that holds part of a character, decoded alone
        score = float(np.mean(np.nanmean([m.score for m in members])))
        return Entity(members[0].label.split("-", 1)[-1], score, word, start, end)


def _tag(label: str) -> tuple[str, str]:
    """``B``/``I`` and the type; a label without a prefix continues (``I``)."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def merge_windows(entities: list[Entity]) -> list[Entity]:
    """Entities of a text's overlapping windows: of those that overlap, the longest, then the
    most confident (the pipeline's ``aggregate_overlapping_entities``)."""
    if not entities:
        return entities
    ordered = sorted(entities, key=lambda e: e.start)
    kept: list[Entity] = []
    previous = ordered[0]
    for entity in ordered:
        if previous.start <= entity.start < previous.end:
            length, previous_length = entity.end - entity.start, previous.end - previous.start
            if length > previous_length or (length == previous_length
                                             and entity.score > previous.score):
                previous = entity
        else:
            kept.append(previous)
            previous = entity
    kept.append(previous)
    return kept

