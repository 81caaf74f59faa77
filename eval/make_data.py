"""Write the local eval data in eval/data/ deterministically (python eval/make_data.py).

The outputs are committed; this script is how they were made and how to change them. Running it
again must reproduce them byte for byte (tests/unit/test_evaluation.py checks that).

- forge_mc.jsonl: multiple-choice questions (capitals, antonyms, number words, sequences,
  everyday facts) that a small instruct model answers better than chance (4 choices: 25%).
- forge_prose.jsonl: short paragraphs of plain English written for this project, scored with
  loglikelihood_rolling. They are deliberately distinct from any calibration text: the
  calibration sets live under calibration/ and are generated elsewhere; evaluating on text the
  quantizer calibrated on would flatter the quantized model.
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
    return [{"id": i, **row} for i, row in enumerate(rows)]


# Written for this project's evaluation only; not calibration text (see module docstring).
PROSE = [
    "The kitchen garden behind the old school was planted every spring by the same three neighbours. One of them grew beans along the fence, another kept a row of lettuce in the shade of the shed, and the third insisted on tomatoes even in the years when the summer was too short for them to ripen.",
    "Repairing a bicycle chain takes more patience than strength. You turn the pedals slowly, look for the stiff link that jumps over the teeth, and work it loose with your thumbs before adding a drop of oil. Most riders only notice the chain when it starts to complain.",
    "At low tide the rock pools along the northern beach fill with small surprises. Crabs hide under loose stones, anemones fold themselves shut when a shadow passes over them, and children crouch for an hour at a time waiting for something to move.",
    "The town library opened its doors at nine, but a small line had usually formed by a quarter to. Students came for the quiet tables by the window, retired teachers came for the newspapers, and a few people simply came to be somewhere warm in the morning.",
    "In the middle of winter the birds change their habits. They gather near houses where someone has hung a feeder, they fluff their feathers against the cold, and they spend the short afternoons searching hedges for the last of the berries.",
    "Baking bread at home teaches you to wait. The dough needs time to rise, then more time after it has been shaped, and the loaf must cool before it can be cut cleanly. People who rush any of these steps learn quickly why the recipe asked for patience.",
    "The lighthouse keeper wrote the weather in a thick notebook every evening. Wind direction, the height of the waves, the colour of the sky at sunset: nothing was too small to record. Years later, those pages were more useful to scientists than anyone had expected.",
    "A good map is honest about what it leaves out. It shows the roads you need and the rivers you must cross, but it does not pretend to know every path through the woods. Hikers who forget this tend to discover it the hard way.",
    "The market opened before sunrise on Saturdays. Farmers unloaded crates of apples and potatoes from their vans, the baker set out warm rolls, and by seven the square was full of people comparing prices and greeting friends they had not seen all week.",
    "Learning to swim as an adult is mostly about trust. The water will hold you up if you let it, but the body does not believe this at first. Instructors spend the early lessons persuading students to relax their shoulders and breathe out slowly.",
    "The old clock in the hallway ran five minutes fast for as long as anyone could remember. Nobody ever corrected it, because the whole family had learned to subtract the difference without thinking, and a correct clock would only have made them late.",
    "When the river flooded in the spring, the farmers moved their animals to the higher fields and waited. The water usually stayed for a week, left a layer of dark mud behind, and the following summer the crops on the low ground grew better than anywhere else.",
    "A carpenter once said that the most important tool in the workshop is the pencil. Measure twice, mark clearly, and cut once. A saw can only follow the line it is given, and a poor line means a poor joint no matter how sharp the blade.",
    "The mountain village had one road in and the same road out. In winter the snow sometimes closed it for days, and the people who lived there kept their cellars full of flour, dried beans and firewood so that they never had to worry about it.",
    "Tea tastes different depending on the water. Hard water from limestone hills makes a darker cup with a slight film on top, while soft water from granite country gives a lighter, brighter taste. Some people travel with their own kettle for this reason.",
    "The choir met every Thursday in the church hall. Rehearsals began with stretching and humming, moved on to the difficult passages, and always ended with a song everyone already knew, so that people went home singing rather than worrying.",
    "A new puppy changes the shape of a household. Shoes move to higher shelves, doors are closed more carefully, and someone always has to be awake early enough to take it outside. Within a month nobody can remember how the house worked before.",
    "The train from the coast was slow but beautiful. It followed the river through narrow valleys, stopped at stations with flower boxes on every window, and climbed so gently into the hills that passengers hardly noticed how high they had come.",
    "Bees spend the whole summer preparing for winter. They collect nectar from every flower within reach, turn it into honey, and seal it in wax cells. When the cold arrives, they cluster together and live on what they stored in the warm months.",
    "The fishing boats left the harbour before dawn and came back in the early afternoon. Their return was announced by gulls, which followed the boats in loud clouds and waited on the harbour wall for whatever the crews threw away while cleaning the catch.",
    "Painting a room is mostly preparation. Furniture must be moved, holes filled, edges taped and floors covered. The painting itself can be finished in an afternoon, but the work before it often takes a whole weekend.",
    "The school held a science fair every March. Some projects were simple, like growing beans under different colours of light, and some were ambitious, like a model volcano that erupted a little too enthusiastically onto the judges' table.",
    "Walking in fog makes familiar places strange. Trees appear suddenly out of the grey, sounds seem to come from nowhere, and a path you have walked a hundred times can feel like a road in another country.",
    "The old bridge was built of stone without any mortar. Each block had been cut to lean on its neighbours, and the whole arch held together by its own weight. Engineers who came to inspect it were surprised to find it in better shape than the new road beside it.",
    "A notebook kept in the kitchen drawer slowly becomes a family history. It holds shopping lists, phone numbers, recipes copied from friends, and the heights of children pencilled next to dates. Few people throw such notebooks away.",
    "On the first warm day of the year the park fills up within an hour. People bring blankets and books, dogs chase each other across the grass, and the ice cream van parks by the gate as if it had been waiting all winter for that exact morning.",
    "Sailing depends on reading the wind. A sailor watches the flags on the harbour, the ripples on the water and the shape of the clouds, and adjusts the sails long before a gust arrives. Those who wait to feel the wind are always a little late.",
    "The village post office also sold stamps, string, birthday cards and fresh eggs. The woman who ran it knew everyone by name and usually knew what their letters were about before they had finished telling her.",
    "Growing potatoes is easier than most people think. You plant a piece of potato with a few eyes, cover it with soil as the shoots appear, and wait. In late summer you dig, and the ground gives back many times what you put into it.",
    "The museum's oldest exhibit was a wooden boat found in a peat bog. It had been preserved for thousands of years because the wet ground kept out the air. Visitors walked around it slowly, trying to imagine the people who had carved it.",
    "A thunderstorm in summer often arrives quickly. The air grows heavy, the light turns yellow, and then the first drops fall, large and far apart. Within minutes the streets are running with water, and within an hour the sky is clear again.",
    "The orchestra tuned before every concert to a single note from the oboe. One instrument at a time joined in until the whole hall hummed with the same pitch. Only then did the conductor walk onto the stage and the audience fall silent.",
    "Learning a new language is easier when you are curious about small things. Reading the labels in a shop, listening to conversations on the bus and asking how to say the names of foods all add up to more than hours spent with a grammar book.",
    "The farmer kept a row of beehives at the edge of the orchard. The apple trees needed the bees to carry pollen between their flowers, and the bees needed the blossom. Neither could have done well without the other.",
    "In the workshop every tool had a painted outline on the wall behind it. When something went missing, the empty shape showed immediately what it was, and the apprentices learned to put things back before they were asked.",
    "A long train journey at night has its own rhythm. The carriage rocks gently, the lights of small towns pass by the window, and conversations drop to whispers. By morning strangers who shared a compartment are sometimes old friends.",
    "The river ferry carried cars, bicycles, sheep and schoolchildren across the water every half hour. It had no timetable on paper because everyone already knew it by heart, and the captain waited for anyone he could see running down the hill.",
    "Keeping a small aquarium requires routine. The water must be tested, the filter cleaned, and the fish fed a little but not too much. Most problems come from doing too much rather than too little, and a calm tank usually means a careful owner.",
    "The hill above the town was covered in heather that turned purple at the end of summer. Walkers came from the city to see it, and the local cafe made more money in those three weeks than in the rest of the year together.",
    "An old recipe book is full of notes in the margins. Someone has crossed out the amount of sugar and written a smaller number, someone else has added a pinch of salt, and one page is stained so badly that it must have been the family favourite.",
    "Street lamps in the old quarter were once lit by hand. A man walked the lanes each evening with a long pole, opening the gas valves one by one, and came back at dawn to close them. Children followed him as if he were part of a parade.",
    "The football club had no stadium, only a field with a wooden stand on one side. On match days the whole neighbourhood came to watch, and the loudest supporters were usually the grandmothers who had been coming for fifty years.",
]


def write(out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"forge_mc": out_dir / "forge_mc.jsonl", "forge_prose": out_dir / "forge_prose.jsonl"}
    datasets = {
        "forge_mc": multiple_choice(),
        "forge_prose": [{"id": i, "text": text} for i, text in enumerate(PROSE)],
    }
    for name, rows in datasets.items():
        text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
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
