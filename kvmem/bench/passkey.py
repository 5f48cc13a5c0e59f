"""Passkey retrieval on a natural-text haystack: the prompt builder, the scorer and the statistics.

The haystack is the licence texts Debian ships under ``/usr/share/common-licenses`` (copying them
is allowed; each is pinned by sha256 so results are reproducible), concatenated and cut to the
requested number of tokens. A needle sentence holding a random 5-digit key is put at a given depth
(fraction of the haystack), and the prompt ends with a question whose answer starts the
completion. A trial is right when the greedy completion contains the key.

``benchmarks/passkey.py`` runs the trials (resumable, one JSON per trial); ``examples/passkey.py``
is the short interactive version. Both use this module.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

LICENCE_DIR = "/usr/share/common-licenses"
# Concatenated in this order; each file's sha256 is recorded with the results (and checked when
# a results folder pins them).
HAYSTACK_FILES = ("GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-2.0", "GPL-2", "Apache-2.0", "MPL-1.1", "LGPL-2",
                  "GFDL-1.2", "GPL-1", "CC0-1.0", "Artistic")

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
MULTI_NEEDLE = "\n\nThe pass key for the {name} door is {key}. Remember it.\n\n"
MULTI_QUESTION = "\n\nWhat is the pass key for the {name} door? The pass key for the {name} door is"
DOOR_NAMES = ("red", "green", "blue")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def haystack_text(pinned: Optional[dict] = None) -> Tuple[str, dict]:
    """The concatenated licence texts and ``{file: sha256}``; raises if a pinned hash differs."""
    parts, hashes = [], {}
    for name in HAYSTACK_FILES:
        path = os.path.join(LICENCE_DIR, name)
        if not os.path.isfile(path):
            continue
        digest = sha256_file(path)
        if pinned and name in pinned and pinned[name] != digest:
            raise RuntimeError(f"passkey haystack: {path} has sha256 {digest}, pinned {pinned[name]}; "
                               "the results would not be comparable")
        hashes[name] = digest
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    if not parts:
        raise RuntimeError(f"passkey haystack: no licence texts under {LICENCE_DIR}")
    return "\n\n".join(parts), hashes


@dataclass
class Trial:
    input_ids: List[int]
    key: str
    depth: float
    needle_span: Tuple[int, int]  # token positions [start, end) of the needle in input_ids
    question: str


def build_trial(tokenizer, haystack_ids: Sequence[int], length: int, seed: int, depth: Optional[float] = None,
                *, multi: bool = False) -> Trial:
    """A prompt of about ``length`` tokens with the key at ``depth`` (fraction; from the seed if None).

    ``multi``: three doors with three different keys at three depths, the question asks for one.
    """
    rng = random.Random(seed)
    if depth is None:
        depth = rng.random()
    intro = tokenizer.encode(INTRO, add_special_tokens=False)
    if multi:
        names = list(DOOR_NAMES)
        keys = [str(rng.randint(10000, 99999)) for _ in names]
        target = rng.randrange(len(names))
        needles = [tokenizer.encode(MULTI_NEEDLE.format(name=n, key=k), add_special_tokens=False)
                   for n, k in zip(names, keys)]
        question = tokenizer.encode(MULTI_QUESTION.format(name=names[target]), add_special_tokens=False)
        depths = sorted({depth, rng.random(), rng.random()})
        while len(depths) < 3:
            depths.append(rng.random())
        depths = sorted(depths)[:3]
        order = list(range(3))
        rng.shuffle(order)
        key = keys[target]
    else:
        key = str(rng.randint(10000, 99999))
        needles = [tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)]
        question = tokenizer.encode(QUESTION, add_special_tokens=False)
        depths, order, target = [depth], [0], 0
    fill = length - len(intro) - len(question) - sum(len(n) for n in needles)
    if fill <= 0:
        raise ValueError(f"length={length} is too short for the passkey prompt")
    start = rng.randrange(0, max(1, len(haystack_ids) - fill)) if len(haystack_ids) > fill else 0
    hay = list(haystack_ids[start:start + fill])
    while len(hay) < fill:  # wrap around: the texts are long enough for 32k only once
        hay += list(haystack_ids[:fill - len(hay)])
    ids = list(intro)
    span = (0, 0)
    prev = 0
    for rank, d in enumerate(depths):
        cut = int(round(d * fill))
        ids += hay[prev:cut]
        prev = cut
        needle = needles[order[rank]]
        if order[rank] == target:
            span = (len(ids), len(ids) + len(needle))
        ids += needle
    ids += hay[prev:]
    ids += question
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and tokenizer.encode("a")[:1] == [bos]:
        ids = [bos] + ids
        span = (span[0] + 1, span[1] + 1)
    return Trial(ids, key, depth, span, tokenizer.decode(question))


DOC_PROMPT = ("You have been given a long document. There is an important piece of information hidden inside "
              "a lot of irrelevant text in it: a pass key, a number of five digits, said twice in one short "
              "passage of the document. The rest of the document is licence texts and does not matter. Read "
              "the document back from your memory, find the passage with the pass key and answer with the "
              "pass key only.")


@dataclass
class DocumentTrial:
    document: List[int]  # the haystack with the needle (no question): what goes into a bank
    input_ids: List[int]  # the prompt: DOC_PROMPT + the question, without the document
    key: str
    depth: float
    needle_span: Tuple[int, int]  # token positions [start, end) of the needle in ``document``


def build_document_trial(tokenizer, haystack_ids: Sequence[int], length: int, seed: int,
                         depth: Optional[float] = None) -> DocumentTrial:
    """A document of about ``length`` tokens with the key at ``depth`` (``build_trial``'s haystack and
    needle) and a short prompt that asks for the key without containing the document."""
    t = build_trial(tokenizer, haystack_ids, length, seed, depth)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    document = t.input_ids[:len(t.input_ids) - len(question)]
    prompt = tokenizer.encode(DOC_PROMPT, add_special_tokens=False) + question
    return DocumentTrial(document, prompt, t.key, t.depth, t.needle_span)


def is_correct(completion: str, key: str) -> bool:
    return key in completion.replace(",", "").replace(" ", "")


def wilson(successes: int, n: int, z: float = 1.959964) -> Tuple[float, float]:
    """Wilson score 95 % interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
