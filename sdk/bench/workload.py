"""Seeded synthetic workloads of English-like text, shared by every benchmark."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three city river garden morning light "
    "story music water house school market engine language model memory paper window question answer travel"
).split()


@dataclass
class WorkItem:
    prompt_token_ids: list[int]
    max_tokens: int


def english_like_text(rng: random.Random, num_words: int) -> str:
    words = []
    while len(words) < num_words:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        sentence[0] = sentence[0].capitalize()
        words.extend(sentence)
        words[-1] += rng.choice([".", ".", ".", "?", "!"])
    return " ".join(words)


def make_workload(
    tokenizer,
    num_requests: int,
    seed: int = 0,
    prompt_len: tuple[int, int] = (32, 512),
    output_len: tuple[int, int] = (32, 256),
) -> list[WorkItem]:
    """num_requests prompts of uniform length in prompt_len tokens, outputs uniform in output_len."""
    rng = random.Random(seed)
    items = []
    for _ in range(num_requests):
        n = rng.randint(*prompt_len)
        ids: list[int] = []
        while len(ids) < n:
            ids += tokenizer.encode(english_like_text(rng, n), add_special_tokens=False)
        items.append(WorkItem(ids[:n], rng.randint(*output_len)))
    return items


def make_copy_workload(
    tokenizer, num_requests: int, seed: int = 0, passage_len: tuple[int, int] = (96, 256)
) -> list[WorkItem]:
    """Copy-heavy chat requests (quote a given passage), the case n-gram speculation targets.

    Each prompt is the chat template around "Repeat the following passage exactly" and a passage
    of uniform length in passage_len tokens; max_tokens is the passage's length.
    """
    rng = random.Random(seed)
    items = []
    for _ in range(num_requests):
        n = rng.randint(*passage_len)
        passage = tokenizer.decode(tokenizer.encode(english_like_text(rng, n), add_special_tokens=False)[:n])
        messages = [{"role": "user", "content": f"Repeat the following passage exactly.\n\n{passage}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        items.append(WorkItem(list(ids), n))
    return items


def save_jsonl(items: list[WorkItem], path: str) -> None:
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps({"prompt_token_ids": it.prompt_token_ids, "max_tokens": it.max_tokens}) + "\n")


def load_jsonl(path: str) -> list[WorkItem]:
    with open(path) as f:
        return [WorkItem(**json.loads(line)) for line in f if line.strip()]
