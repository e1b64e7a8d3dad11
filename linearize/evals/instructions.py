"""The fixed prompts of the behaviour evaluation: everyday instructions, and the documents put before
them to test whether a student still follows the instruction after a long context.

EVAL_INSTRUCTIONS are written for this evaluation and kept out of every training source (the teacher
data source must never sample them), so no recipe can be tuned to them. "Unrelated" documents are
text of a registered corpus (`linearize.data.load_corpus`); "related" documents hide a short generated
fact passage about a fictional place in that text, and the instruction asks about those facts."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

# Grouped by kind; EVAL_INSTRUCTIONS interleaves the groups so that any prefix of it is varied.
INSTRUCTION_GROUPS: dict[str, tuple[str, ...]] = {
    "explain": (
        "Explain why the sky looks blue during the day.",
        "Explain in simple words how a refrigerator keeps food cold.",
        "Explain what a budget is and why people make one.",
        "Explain the difference between weather and climate.",
        "Explain how a bicycle stays upright while it is moving.",
        "Explain why bread goes stale.",
        "Explain what happens when you boil water at a high altitude.",
        "Explain how vaccines help the body fight disease.",
        "Explain why leaves change colour in autumn.",
        "Explain what an interest rate is to a teenager.",
    ),
    "list": (
        "List five things to pack for a weekend camping trip.",
        "List three healthy snacks that are easy to take to work.",
        "List four ways to save electricity at home.",
        "List the planets of the solar system in order from the sun.",
        "List five common kitchen herbs and one dish for each.",
        "List three questions to ask at the end of a job interview.",
        "List four indoor activities for a rainy afternoon with children.",
        "List five words that rhyme with 'light'.",
        "List three signs that a houseplant needs more water.",
        "List the steps to change a flat tyre on a car.",
    ),
    "rewrite": (
        "Rewrite this sentence to sound more polite: 'Send me the report now.'",
        "Rewrite this sentence in the past tense: 'She walks to the market and buys apples.'",
        "Make this sentence shorter: 'Due to the fact that it was raining, we made the decision to stay inside.'",
        "Rewrite 'The meeting got moved to Thursday' in a formal tone.",
        "Turn this into a question: 'The train leaves at seven.'",
        "Rewrite so a child can understand it: 'Photosynthesis converts light energy into chemical energy.'",
        "Fix the grammar in this sentence: 'Me and him goes to the shop yesterday.'",
        "Rewrite 'I can't come to the party' as a friendly text message.",
    ),
    "short": (
        "What is 15% of 80?",
        "If a train travels 120 kilometres in 2 hours, what is its average speed?",
        "What is 7 times 8 plus 6?",
        "A shirt costs 40 dollars and is on sale for 25% off. What is the sale price?",
        "How many minutes are there in three and a half hours?",
        "What is the sum of the numbers from 1 to 10?",
        "If I have 3 apples and buy 2 bags of 6 apples each, how many apples do I have?",
        "Convert 5 kilometres to metres.",
        "What is the area of a rectangle that is 6 metres long and 4 metres wide?",
        "Is 91 a prime number? Explain briefly.",
    ),
    "advice": (
        "Give me three tips for sleeping better.",
        "How can I stay focused while studying at home?",
        "What should I do if I feel nervous before giving a presentation?",
        "Suggest a simple routine for drinking more water during the day.",
        "How do I start learning to play the guitar?",
        "Give me advice on keeping a small vegetable garden on a balcony.",
        "How can I make my morning routine less stressful?",
        "What are good ways to remember people's names?",
        "Give me tips for writing a clear email to a colleague.",
        "How should I prepare for a long flight?",
    ),
    "definitions": (
        "What does the word 'ephemeral' mean?",
        "Define 'photosynthesis' in one sentence.",
        "What is a haiku?",
        "What is the meaning of the idiom 'break the ice'?",
        "What is a metaphor? Give an example.",
        "What is inflation?",
        "Define the word 'democracy'.",
        "What is a noun?",
    ),
    "writing": (
        "Write a two-line poem about the sea.",
        "Write a short thank-you note to a neighbour who watered my plants.",
        "Suggest three names for a small coffee shop.",
        "Write a one-sentence description of a cat for a children's book.",
        "Give me a simple recipe for scrambled eggs.",
        "Write a short invitation to a birthday picnic in the park.",
        "Summarise the story of Little Red Riding Hood in two sentences.",
        "Translate 'Good morning, how are you?' into French.",
        "Name three famous painters and one painting by each.",
        "What are the primary colours?",
    ),
}
EVAL_INSTRUCTIONS: tuple[str, ...] = tuple(
    group[i] for i in range(max(map(len, INSTRUCTION_GROUPS.values())))
    for group in INSTRUCTION_GROUPS.values() if i < len(group)
)

# The related documents' facts: about a fictional place, so the teacher cannot know them beforehand.
PLACE_KINDS = ("library", "bakery", "museum", "boatyard", "observatory", "tea house", "clinic", "bookshop")
PLACE_NAMES = ("Alder Point", "Brindlewick", "Corran Bay", "Dunmere", "Eastholm", "Fennick", "Greywater",
               "Hollin Cross", "Ivel Green", "Juniper Row", "Kestrel Hill", "Larchmont")
PEOPLE = ("Ruth Okafor", "Tomas Lindqvist", "Amara Chen", "Felix Moreau", "Ingrid Salo", "Pavel Novak",
          "Leila Haddad", "Oscar Whitfield", "Nadia Rossi", "Samuel Achebe")
FEATURES = ("a rooftop garden", "a red spiral staircase", "a clock that runs backwards", "a copper weathervane",
            "an old wooden boat in the hall", "a wall of blue tiles")
FACT_PASSAGE = ("The {kind} of {place} was founded in {year}. It is run by {person}, who opens it at {hour} "
                "o'clock every morning. Visitors remember it for {feature}. ")
RELATED_QUESTION = ("According to the text above, who runs the {kind} of {place}, when was it founded, and what "
                    "do visitors remember it for?")


@dataclass(frozen=True)
class RelatedCase:
    """A generated fact passage and an instruction that asks about it (`answer`: the facts, for reading)."""

    facts: str
    instruction: str
    answer: str


def related_case(index: int, seed: int = 0) -> RelatedCase:
    """The `index`-th related case: the same facts for the same (index, seed)."""
    rng = random.Random(f"related-{seed}-{index}")
    fields = dict(kind=rng.choice(PLACE_KINDS), place=rng.choice(PLACE_NAMES), year=rng.randrange(1820, 1990),
                  person=rng.choice(PEOPLE), hour=rng.randrange(6, 11), feature=rng.choice(FEATURES))
    answer = f"{fields['person']}; {fields['year']}; {fields['feature']}"
    return RelatedCase(FACT_PASSAGE.format(**fields), RELATED_QUESTION.format(**fields), answer)


def pick_instructions(n: int | None = None, instructions: Sequence[str] = EVAL_INSTRUCTIONS) -> list[str]:
    """The first `n` instructions (None: all). The order is fixed so that a smaller n is a prefix."""
    if n is not None and not 1 <= n <= len(instructions):
        raise ValueError(f"instruction count must be in [1, {len(instructions)}], got {n}")
    return list(instructions[:n])
