"""The `generated` calibration set's writer (english-v1): English prose and dialogues from word lists
(calibration/<wordlist>.yaml) and a seed, offline and deterministic: document i of corpus seed s is
the same on every machine (its RNG is seeded from sha256("english-v1:s:i")).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.yamlio import load_yaml_file

# A document is plain text (str) or a chat (list of {role, content}); pipeline/calibration/sets.py uses the same type.
Document = str | list[dict[str, str]]


# --------------------------------------------------------------------------------------------
# Generator english-v1


_VOWEL_SOUND_EXCEPTIONS = ("uni", "use", "usu", "eu", "one")
_SILENT_H = ("hour", "honest", "honour")


def _article(phrase: str) -> str:
    lower = phrase.lower()
    vowel = lower[0] in "aeiou" and not lower.startswith(_VOWEL_SOUND_EXCEPTIONS)
    return ("an " if vowel or lower.startswith(_SILENT_H) else "a ") + phrase


def _doubles_final(base: str) -> bool:
    # Short CVC verbs double their last consonant: stir -> stirred, spot -> spotting.
    v = "aeiou"
    return len(base) <= 4 and len(base) >= 3 and base[-1] not in v + "wxy" and base[-2] in v and base[-3] not in v


@dataclass(frozen=True)
class _Verb:
    base: str
    past: str

    @classmethod
    def parse(cls, text: str) -> _Verb:
        base, _, past = text.partition("/")
        if past:
            return cls(base, past)
        if base.endswith("e"):
            return cls(base, base + "d")
        if base.endswith("y") and base[-2] not in "aeiou":
            return cls(base, base[:-1] + "ied")
        return cls(base, base + base[-1] + "ed" if _doubles_final(base) else base + "ed")

    @property
    def third(self) -> str:
        b = self.base
        if b.endswith(("s", "sh", "ch", "x", "z", "o")):
            return b + "es"
        if b.endswith("y") and b[-2] not in "aeiou":
            return b[:-1] + "ies"
        return b + "s"

    @property
    def ing(self) -> str:
        b = self.base
        if b.endswith("ie"):
            return b[:-2] + "ying"
        if b.endswith("e") and not b.endswith(("ee", "ye")):
            return b[:-1] + "ing"
        if self.past == b + b[-1] + "ed" or _doubles_final(b):
            return b + b[-1] + "ing"
        return b + "ing"


def _plural(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("s", "sh", "ch", "x", "z")):
        last += "es"
    elif last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


class _Words:
    """Word lists for one document plus the rng that draws from them."""

    def __init__(self, lists: dict[str, Any], rng: random.Random):
        self.lists = lists
        self.rng = rng
        self.topic_name = rng.choice(sorted(lists["topics"]))
        self.topic = lists["topics"][self.topic_name]
        self.verbs = [_Verb.parse(v) for v in self.topic["verbs"]]

    def pick(self, key: str) -> str:
        source = self.topic[key] if key in self.topic else self.lists[key]
        return self.rng.choice(source)

    def verb(self) -> _Verb:
        return self.rng.choice(self.verbs)

    def two(self, key: str) -> tuple[str, str]:
        first, second = self.rng.sample(self.topic[key], 2)
        return first, second

    def number(self) -> str:
        style = self.rng.random()
        if style < 0.45:
            return str(self.rng.randint(2, 99))
        if style < 0.7:
            return f"{self.rng.randint(1, 60) / 2:g}"
        if style < 0.9:
            return f"{self.rng.randint(100, 99_999):,}"
        return str(self.rng.randint(1650, 2024))

    def slots(self) -> dict[str, str]:
        thing, thing2 = self.two("things")
        role, role2 = self.two("people")
        name, name2 = self.rng.sample(self.lists["names"], 2)
        verb, verb2 = self.verb(), self.verb()
        a, b = self.rng.randint(2, 60), self.rng.randint(2, 60)
        return {
            "thing": thing,
            "thing2": thing2,
            "things": _plural(thing),
            "things2": _plural(thing2),
            "a_thing": _article(thing),
            "role": role,
            "role2": role2,
            "a_role": _article(role),
            "roles": _plural(role),
            "name": name,
            "name2": name2,
            "adj": self.pick("adjectives"),
            "adj2": self.pick("adjectives"),
            "gadj": self.pick("general_adjectives"),
            "place": self.pick("places"),
            "time": self.pick("times"),
            "adv": self.pick("adverbs"),
            "conn": self.pick("connectives"),
            "num": self.number(),
            "measure": self.pick("measures"),
            "duration": self.pick("durations"),
            "pct": str(self.rng.randint(2, 98)),
            "v": verb.base,
            "v_past": verb.past,
            "v_3": verb.third,
            "v_ing": verb.ing,
            "v2": verb2.base,
            "v2_past": verb2.past,
            "v2_3": verb2.third,
            "title": self.topic["title"],
            "a": str(a),
            "b": str(b),
            "sum": str(a + b),
            "small": str(self.rng.randint(2, 12)),
        }


_SENTENCES = (
    "{name}, {a_role} from {place}, {v_past} {a_thing} {time}.",
    "{conn}, the {thing} proved far more {adj} than anyone had expected.",
    "Most {roles} agree that {a_thing} is easier to {v} when the {thing2} is {adj}.",
    "When {name} first {v_past} the {thing}, they {adv} wrote down {a} notes about it.",
    "The {thing} near {place} measures about {num} {measure}, which is {gadj} for its kind.",
    "{name} {v_3} the {thing} {adv} and then {v2_3} the {thing2}.",
    "There are at least {small} ways to {v} {a_thing}, but only a few of them are {gadj}.",
    '"I never expected the {thing} to be so {adj}," said {name}, who has worked as {a_role} for {small} years.',
    "In {place}, {roles} often {v} {things} {time}.",
    "Why would anyone {v} {a_thing}? Because it is {gadj}, and because the {thing2} depends on it.",
    "{conn}, {name} and {name2} decided to {v} the {thing} together.",
    "About {pct} percent of the {things} in {place} are {adj}.",
    "If you want to {v} {a_thing}, start with the {thing2} and work {adv}.",
    "It took {name} {small} weeks to {v} the {adj} {thing}.",
    "{name}'s {thing} is {gadj}, although the {thing2} next to it looks rather {adj}.",
    "{name} counted {a} {things} on Monday and {b} more on Friday, {sum} in total.",
    "Nobody in {place} remembers {a_thing} as {adj} as the one {name} {v_past} {time}.",
    "{v_ing} {things} is {gadj} work, and {a_role} needs both patience and a good {thing2}.",
    "{conn}, the {role2} {v2_past} the {thing2} while {name} watched.",
    "A {gadj} {thing} can last {small} years if you {v} it {adv}.",
)

_QUESTIONS = (
    "Can you tell me how to {v} {a_thing}?",
    "What is the difference between {a_thing} and {a_thing2}?",
    "I am {a_role} in {place}. Do you have any advice on {v_ing} {things}?",
    "Why is the {thing} usually so {adj}?",
    "Write a short note about {title}.",
    "How long does it take to {v} {a_thing}?",
    "My {thing} looks {adj}. Should I be worried?",
)

_FOLLOW_UPS = (
    "Thanks. And what about the {thing2}?",
    "Could you say that more briefly?",
    "Is that true in {place} as well?",
    "What would {a_role} do differently?",
)

_STEPS = (
    "{V} the {thing} {adv}.",
    "Check that the {thing2} is {adj}.",
    "Ask {a_role} if you are unsure.",
    "Wait about {small} {duration} before you {v} it again.",
    "Write down what you see, including the {thing2}.",
)


def _fill(template: str, slots: dict[str, str]) -> str:
    text = template.format(**slots, a_thing2=_article(slots["thing2"]), V=slots["v"].capitalize())
    return text[0].upper() + text[1:]


def _prose(words: _Words) -> str:
    rng = words.rng
    parts = []
    if rng.random() < 0.5:
        parts.append(f"{words.topic['title'].capitalize()}")
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.15:
            steps = rng.sample(_STEPS, rng.randint(3, len(_STEPS)))
            lines = [f"Steps for {words.topic['title']}:"]
            lines += [f"{i}. {_fill(s, words.slots())}" for i, s in enumerate(steps, 1)]
            parts.append("\n".join(lines))
        else:
            count = rng.randint(2, 6)
            parts.append(" ".join(_fill(t, words.slots()) for t in rng.sample(_SENTENCES, count)))
    return "\n\n".join(parts)


def _answer(words: _Words, short: bool) -> str:
    rng = words.rng
    opener = rng.choice(("Sure. ", "Good question. ", "", "In short: ", "Here is what I know. "))
    count = 1 if short else rng.randint(2, 5)
    return opener + " ".join(_fill(t, words.slots()) for t in rng.sample(_SENTENCES, count))


def _dialogue(words: _Words) -> list[dict[str, str]]:
    rng = words.rng
    messages = [{"role": "user", "content": _fill(rng.choice(_QUESTIONS), words.slots())}]
    messages.append({"role": "assistant", "content": _answer(words, short=False)})
    for _ in range(rng.randint(0, 2)):
        follow = rng.choice(_FOLLOW_UPS)
        messages.append({"role": "user", "content": _fill(follow, words.slots())})
        messages.append({"role": "assistant", "content": _answer(words, short="briefly" in follow)})
    return messages


def generate_document(lists: dict[str, Any], corpus_seed: int, index: int, dialogue_fraction: float) -> Document:
    """Document `index` of a generated corpus; depends only on its arguments (not on order)."""
    # Seed from a digest, not hash(): str hashing is salted per process.
    digest = hashlib.sha256(f"english-v1:{corpus_seed}:{index}".encode()).digest()
    words = _Words(lists, random.Random(int.from_bytes(digest[:8], "big")))
    return _dialogue(words) if words.rng.random() < dialogue_fraction else _prose(words)


def load_wordlist(path: Path) -> dict[str, Any]:
    """The word lists of calibration/<wordlist>.yaml, checked complete (RecipeError names what is missing)."""
    data = load_yaml_file(path)
    required = (
        "names",
        "places",
        "times",
        "adverbs",
        "connectives",
        "general_adjectives",
        "measures",
        "durations",
        "topics",
    )
    missing = [k for k in required if not data.get(k)]
    bad_topics = [
        t
        for t, v in (data.get("topics") or {}).items()
        if not all(len(v.get(k) or []) >= 2 for k in ("things", "people", "verbs", "adjectives")) or not v.get("title")
    ]
    if missing or bad_topics:
        raise RecipeError(
            str(path),
            f"missing lists {missing}, incomplete topics {bad_topics}.",
            "Every topic needs a title and >= 2 things, people, verbs, adjectives.",
        )
    return data
