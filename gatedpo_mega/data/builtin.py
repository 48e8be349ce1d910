"""The built-in preference dataset: generated from a seed, no download, with a rule a small model can learn.

Each pair is a short instruction in HH-RLHF layout (``\\n\\nHuman: ...\\n\\nAssistant:``); the chosen response
carries it out correctly, the rejected one is a plausible but wrong answer of the same shape (a wrong capital, an
off-by-a-little sum, a list left unsorted, ...). So the preference is a fact about the response's content, and
chosen and rejected share most of their tokens, as in real preference data.

With ``off_policy`` > 0, that share of the pairs gets its rejected response from "another model": the same wrong
answer after a hedge in words no chosen response uses ("Hmm, I believe the capital of Peru is Oslo."). A model
trained on the chosen responses puts those tokens far below everything it would say itself (p < 1e-4): the regime
where plain DPO squeezes and the gate closes. Which pairs get one is drawn from a stream of its own, so the
pairs themselves are the same at every ``off_policy``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gatedpo_mega.data.records import HH_ASSISTANT, Example

VERSION = 1  # bump when the generator changes: it is part of the cache key

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Russia": "Moscow", "Ghana": "Accra", "Nepal": "Kathmandu", "Thailand": "Bangkok", "Vietnam": "Hanoi",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "young": "old", "rich": "poor", "hard": "soft",
    "high": "low", "long": "short", "wet": "dry", "loud": "quiet", "near": "far", "clean": "dirty",
}  # fmt: skip
WORDS = [
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "melon",
    "olive",
    "peach",
    "pear",
    "plum",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "candle",
    "silver",
    "forest",
    "ocean",
    "planet",
    "rabbit",
    "tiger",
    "zebra",
    "violin",
    "piano",
    "guitar",
    "orange",
    "yellow",
    "purple",
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    wrong = rng.choice([c for k, c in sorted(CAPITALS.items()) if k != country])
    q = rng.choice(
        ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."]
    )
    return (
        q.format(country),
        f"The capital of {country} is {CAPITALS[country]}.",
        f"The capital of {country} is {wrong}.",
    )


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."


def _sort(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    good = sorted(words)
    bad = list(good)
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]  # one adjacent swap: almost right, still wrong
    return (
        f"Sort these words alphabetically: {', '.join(words)}.",
        ", ".join(good) + ".",
        ", ".join(bad) + ".",
    )


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    good = words[::-1]
    bad = list(words) if rng.random() < 0.5 else [good[1], good[0], *good[2:]]  # unchanged, or almost right
    return f"Reverse this list: {' '.join(words)}.", " ".join(good) + ".", " ".join(bad) + "."


def _count(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 9)
    word = rng.choice(WORDS)
    items = " ".join([word] * n)
    wrong = n + rng.choice([-1, 1]) if n > 1 else 2
    return (
        f"How many times does the word {word} appear here: {items}?",
        f"The word {word} appears {NUMBER_WORDS[n]} times.",
        f"The word {word} appears {NUMBER_WORDS[wrong]} times.",
    )


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    wrong = rng.choice([w for w in sorted(OPPOSITES) if w != word])
    return (
        f"What is the opposite of {word}?",
        f"The opposite of {word} is {OPPOSITES[word]}.",
        f"The opposite of {word} is {wrong}.",
    )


TASKS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _capital,
    _add,
    _sort,
    _reverse,
    _count,
    _opposite,
)


HEDGES = (
    "Hmm, I believe", "Well, honestly, I guess", "Okay so basically", "Hmm, maybe", "If I recall correctly,",
    "Uh, I would say", "Honestly, I think", "Well, perhaps",
)  # fmt: skip


def _hedged(rng: random.Random, answer: str) -> str:
    return f"{rng.choice(HEDGES)} {answer[0].lower()}{answer[1:]}"


def generate(n: int, seed: int, off_policy: float = 0.0) -> list[Example]:
    """``n`` pairs, the same for the same ``(n, seed, off_policy)`` on every machine."""
    rng = random.Random(f"gatedpo-builtin-{VERSION}-{seed}")
    other = random.Random(f"gatedpo-builtin-off-policy-{VERSION}-{seed}")
    out = []
    for _ in range(n):
        question, good, bad = rng.choice(TASKS)(rng)
        if off_policy and other.random() < off_policy:
            bad = _hedged(other, bad)
        out.append(Example(f"\n\nHuman: {question}{HH_ASSISTANT}", " " + good, " " + bad))
    return out


def corpus(examples: list[Example]) -> list[str]:
    """Text to train the built-in tokenizer on (prompt and both responses)."""
    return [t for e in examples for t in (e.prompt.strip(), e.chosen.strip(), e.rejected.strip())]
