"""The built-in learned-reward task: short reviews from a small grammar, and a hidden **gold** reward.

In the spirit of lm-human-preferences' sentiment task, in miniature: the project generates a corpus of
reviews ("the food was very good . i liked the staff ."), a tiny causal LM learns it, prompts are the
first words of a review, and the policy writes the rest. The gold reward (``gold_reward``) is what is
"true": positive sentiment with diminishing returns, minus penalties for repeated sentences, too many
sentences and ill-formed text. A proxy reward model trained on a few thousand noisy preference pairs
of the initial policy's samples (``preference_pairs``) can only approximate it, so exploits exist:
the proxy keeps rewarding more positive words where the gold has saturated or turned to penalties.

Everything here is plain Python (no torch): the words, the grammar, the corpus and the gold score.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

POSITIVE = ("good", "great", "lovely", "excellent", "fun", "perfect", "nice", "wonderful")
NEGATIVE = ("bad", "awful", "boring", "dull", "poor", "terrible", "bland", "rude")
NEUTRAL = ("long", "short", "big", "small", "new", "old", "quiet", "busy")
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
NOUNS = ("film", "food", "hotel", "book", "service", "room", "staff", "plot", "music", "price")
INTENSIFIERS = ("very", "really", "quite", "so")
LIKED, DISLIKED, SEEN = ("loved", "liked", "enjoyed"), ("hated", "disliked"), ("tried", "saw", "visited")
VERBS = LIKED + DISLIKED + SEEN
FUNCTION_WORDS = ("the", "was", "and", "i", "it", "a", ".")

# Every word the grammar can produce: the tiny actor's vocabulary.
VOCABULARY = tuple(dict.fromkeys(FUNCTION_WORDS + ADJECTIVES + NOUNS + INTENSIFIERS + VERBS))

POLARITY = {**{w: 1.0 for w in POSITIVE + LIKED}, **{w: -1.0 for w in NEGATIVE + DISLIKED}}

# A sentence is one of these templates, each slot a word class (literals stand for themselves).
TEMPLATES = (
    ("the", "N", "was", "A", "."),
    ("the", "N", "was", "I", "A", "."),
    ("the", "N", "was", "A", "and", "A", "."),
    ("i", "V", "the", "N", "."),
    ("it", "was", "a", "A", "N", "."),
)
CLASSES = {"N": NOUNS, "A": ADJECTIVES, "I": INTENSIFIERS, "V": VERBS}

# Generated reviews the tiny actor learns from; reviews whose distinct first sentences are the prompts.
CORPUS_REVIEWS = 20_000
PROMPT_REVIEWS = 3_000
# Longest response the proxy's preference pairs are sampled with, in words: three sentences of the
# longest template, and EOS.
MAX_RESPONSE_WORDS = 22


@dataclass(frozen=True)
class GoldSettings:
    """The gold reward's constants. Sentiment saturates (``scale * tanh(S / saturation)``); each
    penalty is per occurrence."""

    scale: float = 2.0
    saturation: float = 3.0
    intensifier: float = 1.5  # an intensified adjective counts this much
    ill_formed: float = 1.0  # per sentence that fits no template, the unfinished tail included
    repeated: float = 0.75  # per sentence identical to an earlier one
    max_sentences: int = 4
    extra_sentence: float = 0.5  # per sentence beyond max_sentences


GOLD = GoldSettings()


def sentences_of(text: str) -> tuple[list[list[str]], list[str]]:
    """(finished sentences, each a word list ending with ".", the unfinished tail's words)."""
    sentences, current = [], []
    for word in text.split():
        current.append(word)
        if word == ".":
            sentences.append(current)
            current = []
    return sentences, current


def well_formed(sentence: list[str]) -> bool:
    """Whether ``sentence`` (its words, "." included) fits one of the grammar's templates."""
    for template in TEMPLATES:
        if len(template) == len(sentence) and all(
            word in CLASSES[slot] if slot in CLASSES else word == slot
            for slot, word in zip(template, sentence, strict=True)
        ):
            return True
    return False


def sentiment(sentences: list[list[str]], settings: GoldSettings = GOLD) -> float:
    """Sum of word polarities over well-formed sentences, an intensified adjective counting
    ``settings.intensifier``; the k-th use of the same word counts 2^-(k-1) (diminishing returns)."""
    uses: Counter[str] = Counter()
    total = 0.0
    for sentence in sentences:
        if not well_formed(sentence):
            continue
        for i, word in enumerate(sentence):
            if word in POLARITY:
                weight = settings.intensifier if i > 0 and sentence[i - 1] in INTENSIFIERS else 1.0
                total += POLARITY[word] * weight * 0.5 ** uses[word]
                uses[word] += 1
    return total


def gold_score(text: str, settings: GoldSettings = GOLD) -> float:
    """The gold reward of a whole review (prompt and response): saturating sentiment minus penalties."""
    sentences, tail = sentences_of(text)
    score = settings.scale * math.tanh(sentiment(sentences, settings) / settings.saturation)
    score -= settings.ill_formed * (sum(not well_formed(s) for s in sentences) + bool(tail))
    seen = Counter(" ".join(s) for s in sentences)
    score -= settings.repeated * sum(count - 1 for count in seen.values())
    score -= settings.extra_sentence * max(0, len(sentences) - settings.max_sentences)
    return score


def join(prompt: str, response: str) -> str:
    """The review a prompt and its response make (words separated by spaces)."""
    return f"{prompt.strip()} {response.strip()}".strip()


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The reward interface ``(prompts, responses) -> scores`` of ``gold_score`` on the whole review."""
    return [gold_score(join(p, r)) for p, r in zip(prompts, responses, strict=True)]


def well_formed_rate(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for a review whose sentences all fit the grammar and end with ".", else 0.0: the tiny actor's
    warm-up target on this task."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        sentences, tail = sentences_of(join(prompt, response))
        scores.append(float(bool(sentences) and not tail and all(well_formed(s) for s in sentences)))
    return scores


def sample_sentence(rng: random.Random, mood: float) -> list[str]:
    """One sentence of a review whose ``mood`` (-1, 0 or 1) tilts its adjectives and verbs."""

    def pick(positive: tuple[str, ...], negative: tuple[str, ...], neutral: tuple[str, ...]) -> str:
        p_pos, p_neg = {1.0: (0.75, 0.1), -1.0: (0.1, 0.75)}.get(mood, (0.35, 0.35))
        u = rng.random()
        return rng.choice(positive if u < p_pos else negative if u < p_pos + p_neg else neutral)

    words = []
    for slot in rng.choice(TEMPLATES):
        if slot == "A":
            words.append(pick(POSITIVE, NEGATIVE, NEUTRAL))
        elif slot == "V":
            words.append(pick(LIKED, DISLIKED, SEEN))
        elif slot in CLASSES:
            words.append(rng.choice(CLASSES[slot]))
        else:
            words.append(slot)
    return words


def make_corpus(*, num_reviews: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, continuation) of ``num_reviews`` generated reviews of 2-4 sentences, a third each
    positive, negative and mixed in mood: the prompt is the first sentence, the continuation the rest.
    The tiny actor's pretraining data."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(num_reviews):
        mood = rng.choice((-1.0, 0.0, 1.0))
        num_sentences = rng.choices((2, 3, 4), weights=(0.35, 0.4, 0.25))[0]
        sentences = [" ".join(sample_sentence(rng, mood)) for _ in range(num_sentences)]
        corpus.append((sentences[0], " ".join(sentences[1:])))
    return corpus


def split_prompts(*, num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: the distinct first sentences of ``PROMPT_REVIEWS`` generated reviews
    (another draw than the corpus), in the order first seen, ``num_eval`` of them held out."""
    reviews = make_corpus(num_reviews=PROMPT_REVIEWS, seed=seed + 1)
    prompts = list(dict.fromkeys(prompt for prompt, _ in reviews))
    return prompts[num_eval:], prompts[:num_eval]


def prefers_first(first: float, second: float, *, noise: float, rng: random.Random) -> bool:
    """A noisy preference between two responses with gold scores ``first`` and ``second``: the first is
    preferred with probability sigmoid((first - second) / noise) (Bradley-Terry); ``noise`` 0 always
    prefers the better one (a tie is a coin flip)."""
    if noise == 0 or first == second:
        return first > second if first != second else rng.random() < 0.5
    margin = (first - second) / noise
    probability = 1.0 / (1.0 + math.exp(-margin)) if margin > -700 else 0.0
    return rng.random() < probability
