"""An offline intent-classification task with held-out intents as out-of-distribution (OOD) data.

Utterances are generated from templates and slot values (15 intents, hundreds of phrasings each,
deterministic by seed), in the manner of CLINC150's in-scope/out-of-scope split: a classifier is
trained on the in-distribution intents and tested on their held-out utterances, and the utterances
of the held-out intents — which it never saw and has no class for — are what an OOD detector must
flag. Nothing is downloaded.

    data = make_intents(seed=0)                       # 12 in-distribution intents, 3 OOD intents
    train = encode(tokenizer, data.train)             # [{"input_ids": [...], "label": k}, ...]
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

# intent -> (templates, slot values); {x} is the slot
INTENTS: dict[str, tuple[list[str], list[str]]] = {
    "check_balance": (["what is the balance of my {x}", "how much money is in my {x}", "show me my {x} balance",
                       "tell me what i have left in my {x}", "check the balance on my {x}",
                       "how much do i have in my {x}", "what's left in my {x} right now"],
                      ["checking account", "savings account", "account", "joint account", "bank account",
                       "business account", "credit union account", "main account"]),
    "transfer_money": (["send {x} to my brother", "transfer {x} to savings", "move {x} into my checking account",
                        "wire {x} to my landlord", "i need to transfer {x} to my friend",
                        "please send {x} to my mom's account", "make a transfer of {x} to john"],
                       ["fifty dollars", "$200", "100 euros", "a thousand dollars", "twenty bucks", "$35",
                        "five hundred pounds", "the rent money"]),
    "lost_card": (["i lost my {x}", "my {x} was stolen", "i can't find my {x} anywhere",
                   "please block my {x}, it's missing", "someone took my {x}", "freeze my {x}, i lost it",
                   "report my {x} as lost"],
                  ["credit card", "debit card", "visa card", "bank card", "mastercard", "card", "atm card"]),
    "book_flight": (["book a flight to {x}", "i need a plane ticket to {x}", "find me flights to {x} next week",
                     "get me on a flight to {x}", "reserve a seat on a plane to {x}",
                     "are there any cheap flights to {x}", "i want to fly to {x} on friday"],
                    ["paris", "new york", "tokyo", "chicago", "london", "madrid", "sydney", "boston", "denver"]),
    "cancel_reservation": (["cancel my {x}", "i want to cancel the {x} i made", "please drop my {x}",
                            "i no longer need my {x}", "call off my {x} for tonight", "get rid of my {x}",
                            "can you cancel the {x} for me"],
                           ["reservation", "hotel booking", "table for two", "dinner reservation",
                            "booking at the inn", "room reservation", "car rental"]),
    "set_alarm": (["set an alarm for {x}", "wake me up at {x}", "i need an alarm at {x}",
                   "please set my alarm to {x}", "alarm for {x} please", "make sure i'm up by {x}",
                   "create an alarm at {x}"],
                  ["6 am", "seven thirty", "noon", "5:45 in the morning", "8 o'clock", "half past six",
                   "9 pm", "quarter to seven"]),
    "play_music": (["play some {x}", "put on {x} music", "i want to listen to {x}", "start playing {x}",
                    "can you play {x} for me", "queue up some {x}", "turn on {x} songs"],
                   ["jazz", "rock", "taylor swift", "classical", "the beatles", "hip hop", "lo-fi beats",
                    "country", "piano music"]),
    "order_food": (["order a {x} for delivery", "i want to get {x} delivered", "get me a {x} from the usual place",
                    "can you order {x} for dinner", "i'm hungry, order a {x}", "place an order for {x}",
                    "have a {x} sent to my house"],
                   ["pizza", "burger", "pad thai", "sushi platter", "burrito", "chicken curry",
                    "large pepperoni pizza", "veggie wrap"]),
    "reset_password": (["reset my {x} password", "i forgot my {x} password", "i can't log into my {x}",
                        "help me change the password for my {x}", "my {x} login isn't working",
                        "i'm locked out of my {x}", "send me a password reset link for my {x}"],
                       ["email", "bank", "online banking", "work account", "app", "profile", "portal"]),
    "track_package": (["where is my {x}", "track my {x}", "has my {x} shipped yet", "when will my {x} arrive",
                       "what's the status of my {x}", "is my {x} out for delivery", "give me tracking for my {x}"],
                      ["package", "order", "parcel", "delivery", "amazon order", "shipment", "new phone"]),
    "calendar_event": (["add {x} to my calendar", "schedule {x} for tomorrow", "put {x} on my calendar",
                        "create a calendar event for {x}", "remind me about {x} on monday",
                        "block time for {x} next week", "i have {x} on thursday, save it"],
                       ["a dentist appointment", "the team meeting", "lunch with sarah", "a doctor's visit",
                        "the project review", "a haircut", "yoga class", "the parent teacher conference"]),
    "pay_bill": (["pay my {x} bill", "i need to pay the {x} bill", "settle my {x} bill today",
                  "make a payment on my {x}", "pay off the {x} invoice", "is my {x} bill paid",
                  "schedule a payment for my {x} bill"],
                 ["electric", "water", "phone", "internet", "gas", "cable", "credit card", "insurance"]),
    # held out by default: in-scope-looking requests the classifier has no class for
    "weather": (["what's the weather like in {x}", "will it rain in {x} today", "how hot is it in {x}",
                 "give me the forecast for {x}", "is it going to snow in {x}", "do i need an umbrella in {x}",
                 "what's the temperature in {x} right now"],
                ["paris", "new york", "tokyo", "chicago", "london", "seattle", "miami", "berlin"]),
    "translate": (["how do you say {x} in spanish", "translate {x} into french", "what is {x} in german",
                   "say {x} in japanese", "how would i say {x} in italian", "give me the chinese for {x}",
                   "what's the portuguese word for {x}"],
                  ["thank you", "good morning", "where is the bathroom", "i love you", "how much does it cost",
                   "see you later", "cheese", "happy birthday"]),
    "tell_joke": (["tell me a joke about {x}", "do you know any {x} jokes", "make me laugh with a {x} joke",
                   "i want to hear a funny {x} joke", "say something funny about {x}", "got a good {x} joke",
                   "cheer me up with a joke about {x}"],
                  ["cats", "programmers", "doctors", "the ocean", "dogs", "math", "pirates", "coffee"]),
}
OOD_INTENTS = ("weather", "translate", "tell_joke")
_OPENERS = ["", "", "", "hey, ", "please ", "could you ", "um ", "ok so ", "quick question: "]
_CLOSERS = ["", "", "", " please", " thanks", "?", " now", " asap"]


@dataclass(frozen=True)
class IntentData:
    intents: list[str]  # in-distribution intents; label = index
    ood_intents: list[str]
    train: list[tuple[str, int]]  # (utterance, label)
    test: list[tuple[str, int]]  # held-out utterances of the in-distribution intents
    ood: list[str]  # utterances of the held-out intents


def _utterances(intent: str, rng: random.Random) -> list[str]:
    """Every distinct template x slot phrasing of `intent`, each with a random opener and closer."""
    templates, values = INTENTS[intent]
    out = [rng.choice(_OPENERS) + t.format(x=v) + rng.choice(_CLOSERS) for t, v in itertools.product(templates, values)]
    rng.shuffle(out)
    return out


def make_intents(seed: int = 0, train_per_intent: int = 32, test_per_intent: int = 16, ood_per_intent: int = 32,
                 ood_intents: tuple[str, ...] = OOD_INTENTS) -> IntentData:
    """The task: a per-intent train/test split of the in-distribution intents, and OOD utterances."""
    unknown = [i for i in ood_intents if i not in INTENTS]
    if unknown:
        raise ValueError(f"unknown `ood_intents` {unknown}; known intents: {sorted(INTENTS)}")
    rng = random.Random(seed)
    ind = [i for i in INTENTS if i not in ood_intents]
    if len(ind) < 2:
        raise ValueError("`ood_intents` leaves fewer than 2 in-distribution intents")
    train, test, ood = [], [], []
    for label, intent in enumerate(ind):
        utts = _utterances(intent, rng)
        if len(utts) < train_per_intent + test_per_intent:
            raise ValueError(f"intent {intent!r} has {len(utts)} phrasings, fewer than "
                             f"`train_per_intent` + `test_per_intent` = {train_per_intent + test_per_intent}")
        train += [(u, label) for u in utts[:train_per_intent]]
        test += [(u, label) for u in utts[train_per_intent:train_per_intent + test_per_intent]]
    for intent in ood_intents:
        ood += _utterances(intent, rng)[:ood_per_intent]
    rng.shuffle(train)
    return IntentData(ind, list(ood_intents), train, test, ood)


def encode(tokenizer, utterances: list[tuple[str, int]] | list[str], max_length: int = 32) -> list[dict]:
    """Token rows `{"input_ids", "label"}`; bare utterances (OOD ones) get `input_ids` only."""
    texts = [u if isinstance(u, str) else u[0] for u in utterances]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": row} if isinstance(u, str) else {"input_ids": row, "label": u[1]}
            for row, u in zip(ids, utterances)]
