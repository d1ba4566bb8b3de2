"""The Story tasks of the Sparse Frontier: a generated travel narrative and three questions.

Official: ``sparse_frontier/tasks/story/{narrative,templates,retrieval,multihop,filtering}.py``
and ``configs/task/story_*.yaml`` (github.com/PiotrNawrot/sparse-frontier); our own code.

The narrative: chapters in which the protagonist (Arion) comes to a location, gives a
reason for coming, witnesses an event, meets a character, talks (3 sentences), buys one new
unique item ("<adjective> <material> <type>") from the character, sells an older item
with probability 1/2, says farewell, concludes, plus one neutral sentence. Every
(location, character) pair and every item occurs once. Chapters are added while they fit.

  story_retrieval  ``num_queries`` (16) questions "In Chapter N, which specific location /
                   character / item ...?" about distinct random chapters (with 3 queries:
                   one of each kind); answers one per line, "i. answer".
  story_multihop   "What was the last item that the protagonist acquired before acquiring
                   X?" for a random chapter but the first; the answer is the item bought in
                   the chapter before.
  story_filtering  the purchase is removed from ``chapters_in_question`` (3) random
                   chapters; "Identify all chapters where the protagonist did not buy any
                   item"; answer "3, 7, 12".

Scores (the official ``evaluate``): retrieval, the fraction of queries answered exactly
(normalised: lower case, single spaces, no leading article; a numbered line per answer;
without answer tags the whole output is read); multihop, exact match of the normalised
answer section; filtering, the IoU of the predicted and gold chapter sets ("Chapter N"
mentions if any, else every number in the answer section).

Deviations: the sentence templates are our own wording with the official slots and
structure (fewer variants); the official generator stops at the first chapter that does
not fit, we then top the chapters up with neutral sentences so that short prompts still
reach 90% of the length; an output without an answer section scores 0 (officially, story
multihop and filtering leave such samples out of the mean).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

from sparsity_jax.evals.frontier import base

PROTAGONIST = "Arion"
# templates.py: the word lists that define the narrative's entities.
CHARACTERS = (
    "Marcus", "Selene", "Cassius", "Daria", "Niko", "Iris", "Leon", "Marina", "Octavia",
    "Petros", "Lyra", "Thanos", "Eliana", "Hector", "Rhea", "Adrian", "Sophia", "Dorian",
    "Cleo", "Phaedra", "Lysander", "Callisto", "Evander", "Hermia", "Althea", "Brynn",
    "Cyrus", "Damon", "Eirene", "Felix", "Gaia", "Hylas", "Ianthe", "Jonas", "Kallias",
    "Leda", "Myrto", "Neon", "Orestes", "Phile", "Qarion", "Roxana", "Stavros", "Timon",
    "Urania", "Vitalis", "Xanthe", "Yanis", "Zarek")
LOCATIONS = (
    "Alexandria", "Byzantium", "Rhodes", "Carthage", "Athens", "Rome", "Sparta", "Babylon",
    "Memphis", "Thebes", "Troy", "Delphi", "Ephesus", "Pergamon", "Syracuse", "Corinth",
    "Knossos", "Miletus", "Argos", "Olympia", "Phaselis", "Halicarnassus", "Gortyn",
    "Mycenae", "Antioch", "Palmyra", "Damascus", "Persepolis", "Susa", "Ecbatana",
    "Nineveh", "Ur", "Tyre", "Sidon", "Jerusalem", "Petra", "Cyrene", "Leptis Magna",
    "Volubilis", "Caesarea", "Nicaea", "Thessalonica", "Philippi", "Ravenna", "Massilia",
    "Londinium", "Lutetia", "Tarraco", "Emerita Augusta", "Tingis", "Hippo Regius",
    "Ctesiphon", "Pataliputra", "Taxila", "Merv", "Samarkand", "Bukhara",
    "Thonis-Heracleion", "Berenice", "Adulis", "Axum", "Meroe", "Napata",
    "Berenice Troglodytica")
EVENTS = (
    "a grand festival", "a violent storm", "a secret treaty", "an unexpected betrayal",
    "a tense negotiation", "a mysterious disappearance", "a lavish wedding feast",
    "an outbreak of conflict", "a solemn religious ceremony", "a dangerous ambush",
    "a sudden market crash", "a surprising alliance", "a forbidden ritual",
    "an urgent council meeting", "a whispered rumor spreading", "an opulent banquet",
    "a chaotic uprising", "a quiet funeral procession", "a midnight duel", "a rare eclipse")
ADJECTIVES = ("ancient", "ornate", "engraved", "weathered", "gilded", "polished", "exquisite",
              "intricate", "delicate", "sturdy", "mystic", "legendary", "pristine", "refined",
              "timeworn", "ceremonial", "lavish", "forgotten")
MATERIALS = ("bronze", "silver", "gold", "ivory", "jade", "emerald", "crystal", "obsidian",
             "ruby", "sapphire", "marble", "amber", "copper", "lapis", "porcelain")
ITEM_TYPES = ("amulet", "figurine", "sword", "shield", "goblet", "necklace", "ring",
              "statuette", "pendant", "candelabra", "anklet", "comb", "seal", "chalice", "horn",
              "key", "bracelet", "mask", "lamp", "idol", "vase")

# Our own sentences, one tuple per part of a chapter, with the official slots.
INTRO = (
    "{p} reached {location} as the last light faded from the rooftops.",
    "Early in the morning, {p} walked through the gates of {location}.",
    "{p} arrived in {location} after many days on the road.",
    "The road brought {p} at last to {location}, busy with carts and voices.",
    "Under a grey sky, {p} entered {location} for the first time.",
    "{p} sailed into the harbour of {location} on a calm tide.",
    "Dust still on the cloak, {p} stepped into the streets of {location}.")
REASON = (
    "{p} had come in search of old knowledge that few still remembered.",
    "Word of rare goods had drawn {p} to {location}.",
    "{p} hoped that someone in {location} could answer an old question.",
    "A letter from a distant friend had sent {p} on this journey.",
    "{p} wanted to rest, but also to learn what {location} could teach.",
    "Curiosity more than need had led {p} this far.")
EVENT = (
    "Soon after, {event} drew every eye in the city.",
    "That same day, {event} changed the mood of the streets.",
    "Before long, {event} was all anyone could talk about.",
    "By nightfall, {event} had unsettled the whole of {location}.",
    "{p} had barely settled in when {event} began.",
    "News of {event} spread quickly from square to square.")
MEET = (
    "In the market, {p} met {character}, a trader with a sharp eye.",
    "{character} greeted {p} near the fountain and offered to talk.",
    "At a crowded inn, {p} shared a table with {character}.",
    "{p} was introduced to {character}, who knew the city well.",
    "{character} called out to {p} from the doorway of a small shop.",
    "Near the temple steps, {p} fell into conversation with {character}.")
TALK = (
    "They talked about the roads and the dangers along them.",
    "The conversation turned to old rivalries among the merchant families.",
    "They spoke of the harvest and of prices in the markets of {location}.",
    "Stories of distant kingdoms filled the next hour.",
    "They wondered aloud who truly held power in {location}.",
    "Both agreed that trust was hard to earn and easy to lose.",
    "They compared the customs of the coast with those of the hills.",
    "For a while they discussed the weather and the coming season.",
    "Rumours of a hidden library were repeated in low voices.",
    "They shared memories of long journeys and strange encounters.",
    "The talk moved to the ships that had recently reached {location}.",
    "They debated whether the old laws still served the people.")
BUY = (
    "After some bargaining, {p} bought {item} from {character}.",
    "For a handful of coins, {p} acquired {item} from {character}.",
    "{p} paid {character} and took {item} in exchange.",
    "{p} purchased {item} from {character}, pleased with the deal.",
    "In the end, {p} obtained {item} from {character}.")
SELL = (
    "{p} sold {item} to {character}.",
    "{p} traded {item} away to {character} for silver.",
    "Before leaving, {p} sold {item} to {character} at a good price.",
    "{character} paid {p} well for {item}.")
FAREWELL = (
    "{p} said goodbye to {character} and moved on.",
    "With a nod, {p} took leave of {character}.",
    "{p} thanked {character} and they parted ways.",
    "{character} wished {p} a safe journey.",
    "{p} left {character} with a promise to return one day.")
CONCLUSION = (
    "{p} left {location} with more questions than before.",
    "The next morning, {p} was already on the road again.",
    "As the city fell behind, {p} thought about all that had happened.",
    "{p} departed {location} carrying new ideas and old doubts.",
    "Soon {location} was only a memory for {p}.",
    "With the journey far from over, {p} set out once more.")
# Neutral sentences (no entity): each chapter's extra sentence and the top-up filler.
NEUTRAL = (
    "Somewhere a bell rang, slow and distant.",
    "The wind carried the smell of salt and smoke.",
    "Lamps were lit one by one along the streets.",
    "A dog barked twice and then fell silent.",
    "Clouds gathered over the hills to the north.",
    "Children ran laughing between the stalls.",
    "The old walls had seen many such days.",
    "Far away, thunder rolled across the plain.",
    "A cool breeze moved through the narrow lanes.",
    "Birds circled above the rooftops at sunset.",
    "The night was clear and full of stars.",
    "Rain had left the stones wet and shining.")
CONVERSATION_SENTENCES = 3  # narrative.py: conversation_extensions.

# templates.py / retrieval.py / multihop.py / filtering.py: the task's own prompt texts.
TASK_INTRO = (
    "You are given a narrative composed of multiple chapters. Throughout these chapters, "
    "the protagonist travels between different locations, meets various characters, and "
    "engages in trading activities. All items mentioned in the narrative are unique, and "
    "their ownership can change through trades. Your task is to carefully read the "
    "narrative and answer the questions based on the provided information.")
RETRIEVAL_QUESTIONS = {
    "location": "{i}. In Chapter {c}, which specific location did the protagonist visit?",
    "character": "{i}. In Chapter {c}, which character did the protagonist interact with?",
    "item": "{i}. In Chapter {c}, which specific item was acquired by the protagonist?"}
RETRIEVAL_FORMAT = "1. ANSWER_ONE\n2. ANSWER_TWO\netc."
RETRIEVAL_EXTRA = ("- For answers, use one line per answer with the number prefix\n"
                   "- Do not include articles like 'the' or 'a' in answers\n"
                   "- Answers should be specific names/items/locations mentioned in the text")
MULTIHOP_QUESTION = ("What was the last item that the protagonist acquired before acquiring "
                     "{item}?")
MULTIHOP_EXTRA = ("- Provide only the item name in the answer section.\n"
                  "- Do not include articles like 'the' or 'a' in your answer.\n"
                  "- The item name must be exactly as mentioned in the text.")
FILTERING_QUESTION = ("Identify all chapters where the protagonist did not buy any item.\n"
                      "Note: There are exactly {k} chapters without any purchases.")
FILTERING_FORMAT = "chapter_id_1, chapter_id_2, ..."
FILTERING_EXTRA = "- In the answer section, provide only the chapter IDs separated by commas."


@dataclasses.dataclass
class Chapter:
  """One chapter: its entities and its sentences as (part, text), in order."""

  id: int
  location: str
  character: str
  event: str
  bought: list
  sold: list
  sentences: list

  def text(self) -> str:
    return f"Chapter {self.id}:\n" + " ".join(t for _, t in self.sentences)

  def sentence(self, part: str) -> str:
    return next(t for p, t in self.sentences if p == part)

  def copy(self) -> "Chapter":
    return dataclasses.replace(self, bought=list(self.bought), sold=list(self.sold),
                               sentences=list(self.sentences))


def narrative(rng, protagonist: str = PROTAGONIST):
  """Endless chapters 1, 2, ... (narrative.py's Chapter.generate_chapter)."""
  pairs, items, inventory = set(), set(), []
  for cid in itertools.count(1):
    for _ in range(100):
      pair = (rng.choice(LOCATIONS), rng.choice(CHARACTERS))
      if pair not in pairs:
        break
    else:
      raise ValueError("the story ran out of unique (location, character) pairs")
    pairs.add(pair)
    location, character = pair
    event = rng.choice(EVENTS)
    slots = dict(p=protagonist, location=location, character=character, event=event)

    def say(part, templates, **extra):
      return (part, rng.choice(templates).format(**slots, **extra))

    sentences = [say("intro", INTRO), say("reason", REASON), say("event", EVENT),
                 say("meet", MEET)]
    sentences += [("talk", t.format(**slots))
                  for t in rng.sample(TALK, CONVERSATION_SENTENCES)]
    for _ in range(1000):
      item = f"{rng.choice(ADJECTIVES)} {rng.choice(MATERIALS)} {rng.choice(ITEM_TYPES)}"
      if item not in items:
        break
    else:
      raise ValueError("the story ran out of unique items")
    items.add(item)
    older = list(inventory)
    inventory.append(item)
    sentences.append(say("buy", BUY, item=item))
    sold = []
    if older and rng.random() < 0.5:
      sold = [rng.choice(older)]
      inventory.remove(sold[0])
      sentences.append(say("sell", SELL, item=sold[0]))
    sentences += [say("farewell", FAREWELL), say("conclusion", CONCLUSION),
                  ("extra", rng.choice(NEUTRAL))]
    yield Chapter(cid, location, character, event, [item], sold, sentences)


def _pieces(writer, ch: Chapter) -> list:
  head = ("" if ch.id == 1 else "\n\n") + f"Chapter {ch.id}:\n"
  return [writer.encode(head)] + writer.join([t for _, t in ch.sentences], " ")


def _cost(writer, ch: Chapter) -> int:
  return sum(len(p) for p in _pieces(writer, ch))


@dataclasses.dataclass
class Posed:
  """A question about chapters: the (possibly edited) chapters, question, gold, meta, and
  the evidence as (chapter index, sentence part, or None for the whole chapter)."""

  chapters: list
  question: str
  gold: object
  meta: dict
  evidence: list


def _top_up(writer, chapters: list, slack: int, rng) -> None:
  """Appends neutral sentences to the chapters, round robin, while they fit in slack."""
  stalled, i = 0, 0
  while stalled < len(chapters):
    ch = chapters[i % len(chapters)]
    i += 1
    have = {t for _, t in ch.sentences}
    fits = [s for s in NEUTRAL if s not in have and writer.size(" " + s) <= slack]
    if not fits:
      stalled += 1
      continue
    s = rng.choice(fits)
    ch.sentences.append(("extra", s))
    slack -= writer.size(" " + s)
    stalled = 0


def _build(task, pose, min_chapters, multi, answer_format, extra):
  """A story task builder: as many chapters as fit with the question, then top-up."""

  def build(writer, length, key, opts) -> base.Draft:
    def around(question):
      return writer.around(intro=TASK_INTRO, question=question, multi=multi,
                           answer_format=answer_format, extra=extra)

    fixed = sum(len(x) for x in around(""))  # A lower bound: the question only adds.
    need = min_chapters(opts)
    chapters, used = [], fixed
    for ch in narrative(base.rng_for(key, "narrative"), opts["protagonist_name"]):
      cost = _cost(writer, ch)
      if len(chapters) >= need and used + cost > length:
        break
      chapters.append(ch)
      used += cost
    for n in range(len(chapters), need - 1, -1):
      posed = pose(chapters[:n], base.rng_for(key, f"pose{n}"), opts)
      pre, post = around(posed.question)
      total = len(pre) + len(post) + sum(_cost(writer, c) for c in posed.chapters)
      if total <= length:
        break
    else:
      raise base.too_short(task, length, total)  # total with the fewest chapters.
    chapters = [c.copy() for c in posed.chapters]
    _top_up(writer, chapters, length - total, base.rng_for(key, "fill"))
    evidence = [chapters[i].text() if part is None else chapters[i].sentence(part)
                for i, part in posed.evidence]
    meta = {"num_chapters": len(chapters), **posed.meta, "evidence": evidence}
    pieces = [np.concatenate(_pieces(writer, c)) for c in chapters]
    return base.Draft(pre, pieces, post, posed.gold, meta, [i for i, _ in posed.evidence])

  return build


# ---- story_retrieval -------------------------------------------------------------------


def _pose_retrieval(chapters, rng, opts) -> Posed:
  k = opts["num_queries"]
  chosen = rng.sample(chapters, k)
  if k == 3:  # retrieval.py: one question of each kind when there are three.
    kinds = ["location", "character", "item"]
    rng.shuffle(kinds)
  else:
    kinds = [rng.choice(("location", "character", "item")) for _ in chosen]
  lines, gold = [], []
  for i, (ch, kind) in enumerate(zip(chosen, kinds), start=1):
    lines.append(RETRIEVAL_QUESTIONS[kind].format(i=i, c=ch.id))
    gold.append({"location": ch.location, "character": ch.character,
                 "item": ch.bought[0] if ch.bought else "None"}[kind])
  meta = {"num_queries": k, "chapters": [c.id for c in chosen], "query_kinds": kinds}
  return Posed(chapters, "\n".join(lines), gold, meta, [(c.id - 1, None) for c in chosen])


def _score_retrieval(sample, section, output) -> float:
  pred = base.numbered_lines(output if section is None else section)
  hits = [base.normalize(pred.get(i, "")) == base.normalize(g)
          for i, g in enumerate(sample.gold, start=1)]
  return sum(hits) / len(hits)


base.register(base.TaskSpec(
    "story_retrieval", {"num_queries": 16, "protagonist_name": PROTAGONIST},
    _build("story_retrieval", _pose_retrieval, lambda o: o["num_queries"], True,
           RETRIEVAL_FORMAT, RETRIEVAL_EXTRA),
    lambda s: "\n".join(f"{i}. {g}" for i, g in enumerate(s.gold, start=1)),
    _score_retrieval, "sparse_frontier/tasks/story/retrieval.py"))


# ---- story_multihop --------------------------------------------------------------------


def _pose_multihop(chapters, rng, opts) -> Posed:
  buying = [c for c in chapters if c.bought]
  target = rng.choice(buying[1:])
  before = [c for c in buying if c.id < target.id][-1]
  meta = {"target_item": target.bought[0], "target_chapter": target.id,
          "answer_chapter": before.id}
  return Posed(chapters, MULTIHOP_QUESTION.format(item=target.bought[0]), before.bought[0],
               meta, [(before.id - 1, "buy"), (target.id - 1, "buy")])


def _score_multihop(sample, section, output) -> float:
  if section is None:
    return 0.0
  return float(base.normalize(section) == base.normalize(sample.gold))


base.register(base.TaskSpec(
    "story_multihop", {"protagonist_name": PROTAGONIST},
    _build("story_multihop", _pose_multihop, lambda o: 2, False, "ITEM_NAME",
           MULTIHOP_EXTRA),
    lambda s: s.gold, _score_multihop, "sparse_frontier/tasks/story/multihop.py"))


# ---- story_filtering -------------------------------------------------------------------


def _pose_filtering(chapters, rng, opts) -> Posed:
  k = opts["chapters_in_question"]
  ids = sorted(rng.sample(range(1, len(chapters) + 1), k))
  edited = []
  for ch in chapters:
    if ch.id in ids:  # filtering.py: the purchase goes, the rest (a sale too) stays.
      ch = ch.copy()
      ch.bought = []
      ch.sentences = [(p, t) for p, t in ch.sentences if p != "buy"]
    edited.append(ch)
  return Posed(edited, FILTERING_QUESTION.format(k=k), [str(i) for i in ids],
               {"chapters": ids}, [(i - 1, None) for i in ids])


def chapter_ids(text: str) -> set:
  """filtering.py's answer parsing: "Chapter N" mentions if any, else the numbers left
  after dropping every character but digits, commas and spaces."""
  named = re.findall(r"Chapter\s+(\d+)", text, re.IGNORECASE)
  if named:
    return {int(n) for n in named}
  return {int(p) for p in re.split(r"[,\s]+", re.sub(r"[^0-9,\s]", "", text)) if p}


def _score_filtering(sample, section, output) -> float:
  if section is None:
    return 0.0
  return base.iou(chapter_ids(section), {int(g) for g in sample.gold})


base.register(base.TaskSpec(
    "story_filtering", {"chapters_in_question": 3, "protagonist_name": PROTAGONIST},
    _build("story_filtering", _pose_filtering, lambda o: o["chapters_in_question"], False,
           FILTERING_FORMAT, FILTERING_EXTRA),
    lambda s: ", ".join(s.gold), _score_filtering, "sparse_frontier/tasks/story/filtering.py"))
