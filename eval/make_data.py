"""Write the local eval data in eval/data/ deterministically (python eval/make_data.py).

The outputs are committed; this script is how they were made and how to change them. Running it
again must reproduce them byte for byte (tests/unit/test_evaluation.py checks that).

- forge_mc.jsonl: multiple-choice questions (capitals, antonyms, number words, sequences,
  everyday facts) that a small instruct model answers better than chance (4 choices: 25%).
  The first 151 items are the original smoke set; the rule-generated families after them (see
  `more_items`) grow it to the size a 0.95 gate needs (README "Accuracy gates").
- forge_prose.jsonl is not made here: it is human-written prose extracted from a pinned Debian
  package by eval/extract_prose.py (different in source from every calibration set).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHOICES_PER_QUESTION = 4
SEED = 20261101

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Mexico", "Mexico City"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Turkey", "Ankara"),
    ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"),
]

ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("up", "down"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("old", "young"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("sweet", "sour"),
    ("day", "night"),
    ("win", "lose"),
    ("buy", "sell"),
    ("push", "pull"),
    ("inside", "outside"),
    ("first", "last"),
    ("true", "false"),
    ("friend", "enemy"),
    ("north", "south"),
    ("east", "west"),
    ("begin", "end"),
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
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

# (prompt, answer, three wrong answers), written by hand.
FACTS = [
    ("The sun rises in the", "east", ["west", "north", "south"]),
    ("A week has", "seven days", ["five days", "ten days", "three days"]),
    ("Water freezes at zero degrees", "Celsius", ["Kelvin", "Fahrenheit", "Rankine"]),
    ("The color of a clear daytime sky is", "blue", ["green", "purple", "orange"]),
    ("A baby dog is called a", "puppy", ["kitten", "calf", "foal"]),
    ("A baby cat is called a", "kitten", ["puppy", "lamb", "cub"]),
    ("Cows say", "moo", ["woof", "meow", "quack"]),
    ("Ducks say", "quack", ["moo", "oink", "woof"]),
    ("The largest ocean on Earth is the", "Pacific Ocean", ["Arctic Ocean", "Indian Ocean", "Southern Ocean"]),
    ("Bees make", "honey", ["milk", "silk", "wool"]),
    ("A triangle has", "three sides", ["four sides", "five sides", "six sides"]),
    ("A square has", "four sides", ["three sides", "six sides", "eight sides"]),
    ("Ice is frozen", "water", ["sand", "wood", "glass"]),
    ("The planet we live on is called", "Earth", ["Mars", "Venus", "Jupiter"]),
    ("We see with our", "eyes", ["ears", "elbows", "knees"]),
    ("We hear with our", "ears", ["eyes", "toes", "elbows"]),
    ("Bread is baked in an", "oven", ["igloo", "ocean", "envelope"]),
    ("A year has", "twelve months", ["ten months", "six months", "twenty months"]),
    ("An hour has", "sixty minutes", ["ten minutes", "thirty minutes", "hundred minutes"]),
    ("Fish live in", "water", ["trees", "deserts", "clouds"]),
    ("Birds fly with their", "wings", ["fins", "wheels", "roots"]),
    ("Grass is usually", "green", ["blue", "red", "black"]),
    ("Snow is", "white", ["green", "red", "purple"]),
    ("The moon shines at", "night", ["noon", "breakfast", "lunch"]),
    ("People write with a", "pen", ["spoon", "shoe", "pillow"]),
    ("A doctor works in a", "hospital", ["bakery", "stadium", "forest"]),
    ("Plants need sunlight and", "water", ["plastic", "metal", "smoke"]),
    ("The opposite of the floor is the", "ceiling", ["window", "carpet", "doorbell"]),
]


def _choices(rng: random.Random, answer: str, pool: list[str]) -> tuple[list[str], int]:
    wrong = rng.sample(sorted({p for p in pool if p != answer}), CHOICES_PER_QUESTION - 1)
    options = [answer, *wrong]
    rng.shuffle(options)
    return options, options.index(answer)


def multiple_choice(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    items: list[tuple[str, str, str, list[str]]] = []
    capitals = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        items.append(("capital", f"The capital of {country} is", capital, capitals))
    opposites = [b for _, b in ANTONYMS] + [a for a, _ in ANTONYMS]
    for word, opposite in ANTONYMS:
        items.append(("antonym", f"The opposite of {word} is", opposite, opposites))
    for _ in range(40):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5 or a < b:
            prompt, value = f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} equals", a + b
        else:
            prompt, value = f"{NUMBER_WORDS[a].capitalize()} minus {NUMBER_WORDS[b]} equals", a - b
        near = [NUMBER_WORDS[v] for v in range(max(0, value - 3), min(20, value + 3) + 1)]
        items.append(("arithmetic", prompt, NUMBER_WORDS[value], near))
    for i in range(len(DAYS)):
        prompt = f"{DAYS[i]}, {DAYS[(i + 1) % 7]},"
        items.append(("sequence", prompt, DAYS[(i + 2) % 7], DAYS))
    for i in range(len(MONTHS)):
        prompt = f"{MONTHS[i]}, {MONTHS[(i + 1) % 12]},"
        items.append(("sequence", prompt, MONTHS[(i + 2) % 12], MONTHS))
    for n in range(1, 5):
        prompt = f"{', '.join(w.capitalize() if k == 0 else w for k, w in enumerate(NUMBER_WORDS[n : n + 3]))},"
        items.append(("sequence", prompt, NUMBER_WORDS[n + 3], NUMBER_WORDS[1:12]))
    rows = []
    for category, prompt, answer, pool in items:
        options, gold = _choices(rng, answer, pool)
        rows.append({"category": category, "query": prompt, "choices": options, "gold": gold})
    for prompt, answer, wrong in FACTS:
        options = [answer, *wrong]
        rng.shuffle(options)
        rows.append({"category": "fact", "query": prompt, "choices": options, "gold": options.index(answer)})
    seen = {row["query"] for row in rows}
    rows += [row for row in _interleave(more_items(rng)) if row["query"] not in seen and not seen.add(row["query"])]
    return [{"id": i, **row} for i, row in enumerate(rows)]



# ---------------------------------------------------------------------------------- more items
# The 151 items above decide a 0.95 gate inside their own noise (README "Accuracy gates"). The
# families below are generated from rules and small hand-written lists, so every item has one
# correct answer a small model can know, three distractors of the same kind, and the whole set
# is reproducible from SEED. Families are interleaved (`_interleave`) so any prefix is balanced.

MORE_CAPITALS = [
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"),
    ("Iceland", "Reykjavik"), ("Scotland", "Edinburgh"), ("England", "London"), ("Wales", "Cardiff"),
    ("Brazil", "Brasilia"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Cuba", "Havana"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Israel", "Jerusalem"), ("Saudi Arabia", "Riyadh"),
    ("Pakistan", "Islamabad"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"), ("Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("New Zealand", "Wellington"), ("the United States", "Washington"),
    ("the United Kingdom", "London"),
]

MORE_ANTONYMS = [
    ("tall", "short"), ("heavy", "light"), ("long", "short"), ("wide", "narrow"), ("deep", "shallow"),
    ("near", "far"), ("cheap", "expensive"), ("easy", "difficult"), ("good", "bad"), ("right", "wrong"),
    ("alive", "dead"), ("awake", "asleep"), ("come", "go"), ("give", "take"), ("laugh", "cry"),
    ("love", "hate"), ("remember", "forget"), ("arrive", "leave"), ("question", "answer"), ("boy", "girl"),
    ("man", "woman"), ("king", "queen"), ("brother", "sister"), ("father", "mother"), ("summer", "winter"),
    ("black", "white"), ("left", "right"), ("before", "after"), ("above", "below"), ("always", "never"),
    ("many", "few"), ("more", "less"), ("morning", "evening"), ("noisy", "silent"), ("smooth", "rough"),
    ("sharp", "blunt"), ("tight", "loose"), ("safe", "dangerous"), ("polite", "rude"), ("brave", "afraid"),
]

# (singular, plural), regular and irregular; the distractors are other nouns' plurals.
NOUNS = [
    ("cat", "cats"), ("dog", "dogs"), ("tree", "trees"), ("cup", "cups"), ("book", "books"), ("car", "cars"),
    ("house", "houses"), ("bird", "birds"), ("apple", "apples"), ("chair", "chairs"), ("river", "rivers"),
    ("flower", "flowers"), ("horse", "horses"), ("shoe", "shoes"), ("boat", "boats"), ("bell", "bells"),
    ("box", "boxes"), ("bus", "buses"), ("glass", "glasses"), ("dish", "dishes"), ("church", "churches"),
    ("city", "cities"), ("baby", "babies"), ("lady", "ladies"), ("story", "stories"), ("party", "parties"),
    ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("child", "children"), ("mouse", "mice"),
    ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"), ("man", "men"), ("woman", "women"),
    ("person", "people"), ("sheep", "sheep"), ("fish", "fish"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("key", "keys"), ("toy", "toys"), ("day", "days"), ("egg", "eggs"), ("hat", "hats"),
    ("pen", "pens"), ("door", "doors"), ("window", "windows"), ("road", "roads"), ("star", "stars"),
]

# (base, past tense); the distractors are other verbs' past tenses.
VERBS = [
    ("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("cook", "cooked"), ("open", "opened"),
    ("clean", "cleaned"), ("paint", "painted"), ("call", "called"), ("watch", "watched"), ("help", "helped"),
    ("go", "went"), ("see", "saw"), ("eat", "ate"), ("drink", "drank"), ("run", "ran"), ("swim", "swam"),
    ("sing", "sang"), ("write", "wrote"), ("read", "read"), ("speak", "spoke"), ("take", "took"),
    ("give", "gave"), ("make", "made"), ("buy", "bought"), ("bring", "brought"), ("think", "thought"),
    ("teach", "taught"), ("catch", "caught"), ("fly", "flew"), ("grow", "grew"), ("know", "knew"),
    ("throw", "threw"), ("sleep", "slept"), ("keep", "kept"), ("sit", "sat"), ("stand", "stood"),
    ("win", "won"), ("lose", "lost"), ("find", "found"), ("tell", "told"), ("sell", "sold"), ("come", "came"),
]

# (animal, its young, its sound)
ANIMALS = [
    ("dog", "puppy", "barks"), ("cat", "kitten", "meows"), ("cow", "calf", "moos"), ("horse", "foal", "neighs"),
    ("sheep", "lamb", "bleats"), ("pig", "piglet", "oinks"), ("duck", "duckling", "quacks"),
    ("lion", "cub", "roars"), ("frog", "tadpole", "croaks"), ("owl", "owlet", "hoots"), ("goat", "kid", "bleats"),
    ("hen", "chick", "clucks"), ("bee", "larva", "buzzes"), ("snake", "snakelet", "hisses"),
]

COLOURS = [
    ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("fresh grass", "green"), ("coal", "black"),
    ("milk", "white"), ("a clear sky", "blue"), ("an orange", "orange"), ("chocolate", "brown"),
    ("a lemon", "yellow"), ("snow", "white"), ("a strawberry", "red"), ("a lime", "green"), ("charcoal", "black"),
    ("a carrot", "orange"), ("a violet", "purple"), ("a plum", "purple"), ("soil", "brown"), ("the sea", "blue"),
]
COLOUR_NAMES = ["yellow", "red", "green", "black", "white", "blue", "orange", "brown", "purple", "pink", "grey"]

LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    """English words for 0..99 ("forty-two")."""
    if n < 20:
        return NUMBER_WORDS[n] if n <= 20 else ""
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + NUMBER_WORDS[ones])


def _distinct_numbers(rng: random.Random, answer: int, low: int, high: int) -> list[int]:
    pool = [v for v in range(max(low, answer - 6), min(high, answer + 6) + 1) if v != answer]
    return rng.sample(pool, CHOICES_PER_QUESTION - 1)


def _numeric(rng: random.Random, category: str, prompt: str, answer: int, low: int = 0, high: int = 999) -> dict:
    options = [str(v) for v in [answer, *_distinct_numbers(rng, answer, low, high)]]
    rng.shuffle(options)
    return {"category": category, "query": prompt, "choices": options, "gold": options.index(str(answer))}


def _pick(rng: random.Random, category: str, prompt: str, answer: str, pool: list[str]) -> dict:
    options, gold = _choices(rng, answer, pool)
    return {"category": category, "query": prompt, "choices": options, "gold": gold}


def more_items(rng: random.Random) -> list[list[dict]]:
    """One list per family, each in a deterministic order."""
    families: dict[str, list[dict]] = {}
    capitals = sorted({c for _, c in CAPITALS + MORE_CAPITALS})
    families["capital"] = [_pick(rng, "capital", f"The capital of {country} is", city, capitals)
                           for country, city in MORE_CAPITALS]
    # Both directions of every pair, except words with two opposites (short: tall and long), which
    # would have two right answers; distractors are never an opposite of the prompt word.
    opposite_of: dict[str, set[str]] = {}
    for a, b in ANTONYMS + MORE_ANTONYMS:
        opposite_of.setdefault(a, set()).add(b)
        opposite_of.setdefault(b, set()).add(a)
    asked = {a for a, _ in ANTONYMS}
    opposites = sorted(opposite_of)
    families["antonym"] = [
        _pick(rng, "antonym", f"The opposite of {word} is", next(iter(opposite_of[word])),
              [w for w in opposites if w != word and w not in opposite_of[word]] + [next(iter(opposite_of[word]))])
        for word in [a for a, _ in MORE_ANTONYMS] + [b for _, b in ANTONYMS + MORE_ANTONYMS]
        if len(opposite_of[word]) == 1 and word not in asked and not asked.add(word)
    ]
    plurals = sorted({p for _, p in NOUNS})
    families["plural"] = [_pick(rng, "plural", f"One {s}, two", p, plurals) for s, p in NOUNS] + \
                         [_pick(rng, "plural", f"I saw one {s} and then three more", p, plurals) for s, p in NOUNS]
    pasts = sorted({p for _, p in VERBS})
    families["past"] = [_pick(rng, "past", f"Today I {v}. Yesterday I", p, pasts) for v, p in VERBS] + \
                       [_pick(rng, "past", f"Every day we {v}, and last week we", p, pasts) for v, p in VERBS]
    young, sounds = sorted({y for _, y, _ in ANIMALS}), sorted({s for _, _, s in ANIMALS})
    families["animal"] = [_pick(rng, "animal", f"A baby {a} is called a", y, young) for a, y, _ in ANIMALS] + \
                         [_pick(rng, "animal", f"The {a}", s, sounds) for a, _, s in ANIMALS]
    families["colour"] = [_pick(rng, "colour", f"The colour of {thing} is", c, COLOUR_NAMES) for thing, c in COLOURS]
    letters: list[dict] = []
    for i in range(len(LETTERS) - 3):
        letters.append(_pick(rng, "letter", f"{', '.join(LETTERS[i:i + 3])},", LETTERS[i + 3], LETTERS))
        letters.append(_pick(rng, "letter", f"The letter after {LETTERS[i + 2]} is", LETTERS[i + 3], LETTERS))
        letters.append(_pick(rng, "letter", f"The letter before {LETTERS[i + 3]} is", LETTERS[i + 2], LETTERS))
    families["letter"] = letters
    calendar: list[dict] = []
    for names, unit in ((DAYS, "day"), (MONTHS, "month")):
        k = len(names)
        for i in range(k):
            calendar.append(_pick(rng, "calendar", f"The {unit} after {names[i]} is", names[(i + 1) % k], names))
            calendar.append(_pick(rng, "calendar", f"The {unit} before {names[i]} is", names[(i - 1) % k], names))
            calendar.append(_pick(rng, "calendar", f"{names[(i + 2) % k]}, {names[(i + 1) % k]},", names[i], names))
    families["calendar"] = calendar
    words = [number_word(n) for n in range(100)]
    families["number_word"] = [_pick(rng, "number_word", f"The number {n} written in words is", words[n], words)
                               for n in range(100)] + \
                              [_numeric(rng, "number_word", f"{words[n].capitalize()} written in digits is", n, 0, 99)
                               for n in range(100)]
    counting: list[dict] = []
    for step in (1, 2, 3, 5, 10):
        for start in range(0, 40 if step < 10 else 100, 1 if step < 10 else 10):
            seq = [start + step * j for j in range(4)]
            counting.append(_numeric(rng, "counting", f"{seq[0]}, {seq[1]}, {seq[2]},", seq[3]))
    for start in range(20, 50):
        seq = [start - 2 * j for j in range(4)]
        counting.append(_numeric(rng, "counting", f"{seq[0]}, {seq[1]}, {seq[2]},", seq[3]))
    families["counting"] = counting
    sums: list[dict] = []
    for a in range(1, 21):
        for b in range(1, 21):
            if (a * 7 + b * 3) % 4 == 0:  # a fixed quarter of the 20 x 20 grid, spread over both operands
                sums.append(_numeric(rng, "digits_arithmetic", f"{a} + {b} =", a + b))
            if a > b and (a * 5 + b) % 4 == 1:
                sums.append(_numeric(rng, "digits_arithmetic", f"{a} - {b} =", a - b))
    for a in range(2, 11):
        for b in range(2, 11):
            sums.append(_numeric(rng, "times_table", f"{a} times {b} is", a * b, 1))
    families["arithmetic"] = sums
    compare: list[dict] = []
    for k in range(120):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        while a == b:
            b = rng.randint(1, 99)
        bigger = k % 2 == 0
        answer = max(a, b) if bigger else min(a, b)
        others = [v for v in rng.sample(range(1, 100), 4) if v not in (a, b)][:1]
        options = [str(a), str(b), str(others[0]), str(answer + 100 if bigger else answer + 50)]
        options = list(dict.fromkeys(options))
        while len(options) < CHOICES_PER_QUESTION:
            options.append(str(rng.randint(100, 200)))
        rng.shuffle(options)
        word = "larger" if bigger else "smaller"
        compare.append({"category": "compare", "query": f"Of the numbers {a} and {b}, the {word} one is",
                        "choices": options, "gold": options.index(str(answer))})
    families["compare"] = compare
    return list(families.values())


def _interleave(families: list[list[dict]]) -> list[dict]:
    """Round-robin over the families in proportion to their size, so any prefix keeps the mix."""
    total = sum(len(f) for f in families)
    keyed = [((j + 0.5) / len(f), k, row) for k, f in enumerate(families) for j, row in enumerate(f)]
    return [row for _, _, row in sorted(keyed, key=lambda t: (t[0], t[1]))][:total]


def write(out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"forge_mc": out_dir / "forge_mc.jsonl"}
    datasets = {"forge_mc": multiple_choice()}
    for name, rows in datasets.items():
        text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n" for row in rows)
        paths[name].write_text(text, encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = parser.parse_args(argv)
    for name, path in write(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
