"""The real demo's task: short instruction prompts, written here procedurally (templates x topics).

Two disjoint sets: `demo:instructions` (the training prompts; the student is healed on the teacher's answers to
some of them) and `demo:instructions_heldout` (topics never seen in training or healing, `data.val_path`). There is
no gold answer: the headline metric is the held-out reverse KL(student || teacher) per token on the student's own
samples (scripts/heldout_kl.py), the quantity on-policy distillation minimises.
"""

from __future__ import annotations

TRAIN_NAME, HELDOUT_NAME = "instructions", "instructions_heldout"

TEMPLATES = (
    "Write one sentence about {}.",
    "Describe {} in one short sentence.",
    "Give me a short fact about {}.",
    "What is {}? Answer in one sentence.",
)

TRAIN_TOPICS = (
    "the sun", "the moon", "rain", "snow", "a cat", "a dog", "a horse", "bees", "trees", "the ocean", "rivers",
    "mountains", "bread", "coffee", "tea", "apples", "bicycles", "trains", "cars", "books", "music", "the piano",
    "football", "chess", "computers", "the internet", "friendship", "winter", "summer", "autumn", "spring", "a city",
    "a village", "a library", "a school", "a hospital", "fire", "water", "clouds", "birds", "fish", "a garden",
    "flowers", "the desert", "volcanoes", "the wind", "stars", "a forest", "honey", "cheese", "a kitchen", "a bridge",
    "a castle", "a ship", "an airplane", "the weather", "money", "a market", "a museum", "painting",
)

HELDOUT_TOPICS = (
    "the sea", "a lion", "milk", "a river boat", "the sky", "an island", "rice", "a clock", "a camera", "a farm",
    "the rain forest", "ice", "a theatre", "an elephant", "a lake", "a telephone",
)


def records(name: str) -> list[dict]:
    """The prompts of `name` (TRAIN_NAME or HELDOUT_NAME) as records {"prompt": text, "answer": ""}, in a fixed order.

    ValueError for another name."""
    topics = {TRAIN_NAME: TRAIN_TOPICS, HELDOUT_NAME: HELDOUT_TOPICS}.get(name)
    if topics is None:
        raise ValueError(f"unknown real demo prompt set {name!r} (known: {TRAIN_NAME}, {HELDOUT_NAME})")
    return [{"prompt": t.format(topic), "answer": ""} for topic in topics for t in TEMPLATES]
