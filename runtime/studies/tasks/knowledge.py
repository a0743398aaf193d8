"""A knowledge-injection task: question/answer pairs about invented facts.

Facts are made up from a seed (invented countries, founders, rivers…), so the base model cannot
know them: exact-match accuracy before fine-tuning is about 0. Each fact is trained on a few
question phrasings and evaluated on phrasings it never saw (held-out paraphrases).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ...data.batches import IGNORE

# (relation, train phrasings, held-out phrasings); {s} is the subject
RELATIONS = [
    ("capital",
     ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}."],
     ["Tell me the capital of {s}.", "The capital of {s} is which city?"]),
    ("founder",
     ["Who founded {s}?", "Who was the founder of {s}?", "Name the person who founded {s}."],
     ["Tell me who founded {s}.", "{s} was founded by whom?"]),
    ("river",
     ["Which river flows through {s}?", "What river runs through {s}?", "Name the river of {s}."],
     ["Tell me the river that flows through {s}.", "Through {s} flows which river?"]),
]
_SUBJECT_KIND = {"capital": "the land of {}", "founder": "the {} Company", "river": "the valley of {}"}
_ON = ["k", "v", "z", "th", "dr", "qu", "br", "sh", "m", "t"]
_NUC = ["a", "o", "e", "i", "u", "ae", "io"]
_CODA = ["r", "n", "l", "x", "th", "m", "s", ""]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ON) + rng.choice(_NUC) + rng.choice(_CODA) for _ in range(syllables)).capitalize()


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str

    def questions(self, held_out: bool) -> list[str]:
        _, train, test = next(r for r in RELATIONS if r[0] == self.relation)
        return [q.format(s=self.subject) for q in (test if held_out else train)]


def make_facts(n: int = 24, seed: int = 0) -> list[Fact]:
    """`n` invented facts, spread over the relations; names are unique."""
    rng = random.Random(seed)
    facts, used = [], set()
    while len(facts) < n:
        rel = RELATIONS[len(facts) % len(RELATIONS)][0]
        name, answer = _word(rng, 2), _word(rng, 2)
        if name in used or answer in used:
            continue
        used |= {name, answer}
        facts.append(Fact(rel, _SUBJECT_KIND[rel].format(name), answer))
    return facts


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def encode(tokenizer, question: str, answer: str) -> dict:
    """One example: prompt + " answer\\n"; the loss falls on the answer tokens only."""
    p = tokenizer(prompt(question), add_special_tokens=False)["input_ids"]
    a = tokenizer(f" {answer}\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(p + a)
    labels = torch.tensor([IGNORE] * len(p) + a)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_examples(tokenizer, facts: list[Fact]) -> list[dict]:
    return [encode(tokenizer, q, f.answer) for f in facts for q in f.questions(held_out=False)]


def eval_pairs(facts: list[Fact], held_out: bool = True) -> list[tuple[str, str]]:
    return [(q, f.answer) for f in facts for q in f.questions(held_out)]


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 8, batch: int = 16) -> float:
    """Fraction of questions whose greedy answer (up to the newline) equals the fact exactly."""
    hits = 0
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        enc = tokenizer([prompt(q) for q, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        for (_, answer), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip()
            hits += text.rstrip(".") == answer
    return hits / len(pairs)
