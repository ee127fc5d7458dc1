"""Writes synthetic customer-support tickets, each with a one-line reference summary.

    python tools/make_tickets.py --count 240 --seed 0 --out data/tickets.jsonl

Why synthetic: the Harbor job needs a corpus with known answers, both to train a small
summariser and to load the pipeline with realistic, very uneven prompt lengths. So the
structure is meant to be learnable: every ticket has a `category` (8), a `product` (10) and
one concrete problem drawn from per-category templates, and its reference summary is exactly

    "<category> | <product> | <problem phrase>"   e.g. "billing | Harbor Sync | charged twice
                                                         for the March invoice"

where every fact in the phrase (codes, amounts, order numbers, months) appears in the text. The
noise around it is what a summariser has to learn to ignore: tone (polite, angry, terse,
rambling), greetings and signatures, environment details, steps already tried, and in the
tails pasted logs, billing tables, tracking histories and quoted e-mail threads.

Lengths follow the batch job's hard case rather than an average: about 70% short (a couple
of lines), 25% medium (up to ~2,600 characters) and 5% long (4,000-9,000 characters, well over
1,000 tokens), so a batch mixes prompts that differ in length by 50x.

Output is byte-identical for the same arguments: all randomness comes from one stdlib
`random.Random(seed)` stream (whose seeded sequence Python keeps stable), consumed ticket by
ticket, so the first N tickets of a larger `--count` are the same N tickets. Lines are
`{"id": "T00001", "text", "category", "product", "summary", "tone"}` in ASCII JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import random

from ticket_problems import (
  CATEGORIES,
  COMPONENTS,
  FIRST,
  MONTHS,
  PASTES,
  PROBLEMS,
  PRODUCTS,
  TONES,
  TRIED,
  Ctx,
  month_day,
)


def context_sentences(c: Ctx, tone: str) -> list[str]:
  """True but irrelevant context, each fact drawn once: the noise a summary must leave out.

  Drawn once per ticket and shuffled, so a long ticket never contradicts itself (one
  employee count, one account ID) and never repeats a sentence.
  """
  r = c.r
  org = r.choice(["law firm", "school", "bakery chain", "clinic", "design studio", "NGO"])
  pool = [
      f"We have used {c.product} since {r.randrange(2016, 2024)} across {r.randrange(2, 9)} "
      f"teams and it has mostly been reliable.",
      f"For context, I manage IT for a {org} with about {r.randrange(5, 400)} employees.",
      f"Our setup is {c.system}, {c.browser} and {c.product} version {c.version}.",
      f"My colleague {r.choice(FIRST)} mentioned something similar a while ago, but it went "
      f"away on its own then.",
      f"We are on the {c.plan} plan, account ID ACC-{r.randrange(10000, 99999)}.",
      f"I already chatted with support on {c.month} {r.randrange(1, 29)} and was told it would "
      f"be escalated (reference CS-{r.randrange(100000, 999999)}), but nothing happened.",
      "We switched to a new VPN provider a few weeks ago, not sure if that matters.",
      f"This is the {r.choice(['second', 'third', 'fourth'])} time I am writing about this.",
      f"Most of our staff work {r.choice(['remotely', 'from two offices', 'in shifts'])}.",
      f"The account owner is {c.other}, in case you need to verify anything.",
  ]
  if tone == "rambling":
    pool += [
        "Sorry, I am writing this from my phone on the train, so excuse any typos.",
        f"Honestly I almost went back to spreadsheets last {r.choice(MONTHS)}, but anyway.",
        "My manager keeps asking me about it, which is why I am writing again.",
        "Anyway, I am getting off track, sorry about that.",
        f"We are in the middle of {r.choice(['a move', 'our audit', 'the holiday rush'])}, "
        f"so the timing could not be worse.",
        "My nephew, who knows computers, had a look and could not figure it out either.",
    ]
  if tone == "angry":
    pool += ["I pay for this service and expect it to work.",
             "Frankly, the support experience so far has been terrible.",
             f"I have been a customer for {r.randrange(2, 9)} years and never had this much "
             f"trouble.",
             "Nobody on your side seems to read these messages."]
  r.shuffle(pool)
  return pool


EVENTS = ["I restarted everything and it seemed fine for a day",
          "the problem came back", "I wrote to support through the contact form",
          "support asked for screenshots", "I sent the screenshots",
          "a colleague ran into the same thing", "I got an automatic reply and nothing else",
          "I tried again from home, same result", "I asked in the community forum",
          "someone on the forum suggested waiting for the next release",
          "I called the phone line and was on hold for 40 minutes", "I gave up for the weekend",
          "our manager escalated it internally", "I checked the status page, all green"]


def timeline(c: Ctx, target: int) -> str:
  """A dated history ("what happened so far"), up to about target chars, in date order."""
  r, day = c.r, c.when - datetime.timedelta(days=40)
  lines, events = ["What happened so far:", f"- {month_day(day)}: I first noticed the problem."], []
  events = r.sample(EVENTS, k=len(EVENTS))
  while events and sum(map(len, lines)) < target:
    day += datetime.timedelta(days=r.randrange(1, 4))
    lines.append(f"- {month_day(day)}: {events.pop()}.")
  return "\n".join(lines)


HUBS = ["Rotterdam", "Leipzig", "Lyon", "Memphis", "Louisville", "Warsaw", "Milan"]
SCANS = ["arrived at facility", "departed facility", "processed", "in transit", "scanned"]
SUPPORT_SAYS = ["Thanks for reaching out, we are looking into it.",
                "Could you send us a screenshot and your browser version?",
                "We have forwarded this to the product team.",
                "Apologies for the delay, the team is very busy this week.",
                "Can you confirm the email address on the account?"]
CUSTOMER_SAYS = ["Any update on this? It is still not resolved.",
                 "I sent the screenshot yesterday, please check.",
                 "Yes, that is the right address.", "Is anyone actually working on this?",
                 "Please let me know if you need anything else from me."]


def paste_line(c: Ctx, kind: str, t: datetime.datetime) -> str:
  """One line of a pasted block: a log record, invoice row, tracking scan or quoted reply."""
  r = c.r
  if kind == "log":
    msg = r.choice([f"request {r.randrange(10**6, 10**7)} completed in {r.randrange(2, 900)} ms",
                    f"cache hit ratio {r.randrange(50, 99)}%",
                    f"uploaded chunk {r.randrange(1, 5000)}/5000 ({r.randrange(1, 512)} KB)",
                    f"heartbeat ok, queue depth {r.randrange(0, 40)}",
                    f"retrying connection (attempt {r.randrange(1, 5)})"])
    level = r.choice(["INFO", "INFO", "DEBUG", "WARN"])
    return f"{t.isoformat()}Z {level:<5} [{r.choice(COMPONENTS)}-{r.randrange(1, 8)}] {msg}"
  if kind == "table":
    number, seats = r.randrange(1000, 9999), r.randrange(1, 40)  # draw order = output
    price = r.choice(["9.00", "19.00", "49.00", "99.00"])
    return f"{t.date()}  INV-{t.year}-{number}  {c.plan} plan, {seats} seats  ${price:>6}  paid"
  if kind == "tracking":
    return f"{t.strftime('%Y-%m-%d %H:%M')}  {r.choice(HUBS)} hub  {r.choice(SCANS)}"
  support = r.random() < 0.5
  return (f"> [{t.strftime('%Y-%m-%d %H:%M')}] {'Support' if support else c.name}: "
          + r.choice(SUPPORT_SAYS if support else CUSTOMER_SAYS))


def paste(c: Ctx, kind: str, code: str, target: int) -> str:
  """A pasted block (log, billing table, tracking history, quoted thread) of ~target chars.

  Timestamps move the way the real thing does: seconds apart in a log, hours apart on a
  tracking page, a day or so between replies, and back in time month by month on invoices.
  """
  head = {"log": "Here is the log from around the time it happened:",
          "table": "Here is our billing history from the account page (newest first):",
          "tracking": "This is the full tracking history:",
          "thread": "Our previous conversation, for reference:"}[kind]
  step = {"log": (1, 60), "tracking": (600, 14400), "thread": (3600, 172800),
          "table": (-31 * 86400, -28 * 86400)}[kind]  # seconds between lines
  lead = {"log": 1200, "tracking": 4 * 86400, "thread": 40 * 86400, "table": 0}[kind]
  t = c.when - datetime.timedelta(seconds=lead)  # so the paste ends around the incident
  lines, total = [], len(head)
  while total < target:
    t += datetime.timedelta(seconds=c.r.randrange(*step))
    lines.append(paste_line(c, kind, t))
    total += len(lines[-1]) + 1
  if kind == "log":  # the error the customer is writing about, near the end of the paste
    at = len(lines) - c.r.randrange(0, min(5, len(lines)))
    t = datetime.datetime.fromisoformat(lines[at - 1][:19])  # same second as the line before
    lines[at:at] = [f"{t.isoformat()}Z ERROR [{c.r.choice(COMPONENTS)}-1] {code}: operation "
                    f"failed", f"    at {c.product.replace(' ', '')}.run "
                    f"(core.js:{c.r.randrange(10, 999)})"]
  return head + "\n" + "\n".join(lines)


GREETINGS = {"polite": ["Hello,", "Hi team,", "Good morning,", "Dear support,"],
             "angry": ["", "Hello.", "To whom it may concern,"],
             "terse": [""], "rambling": ["Hi there!", "Hello again,", "Hi,"]}
CLOSINGS = {"polite": ["Could you please look into this? Thank you in advance.",
                       "Thanks for your help.", "Any help is appreciated."],
            "angry": ["Fix this NOW.", "I expect an answer today.",
                      "If this is not fixed this week, we are leaving."],
            "terse": ["", "pls fix.", "thx"],
            "rambling": ["Anyway, thanks for reading all of this, I know it is a lot!",
                         "Sorry for the long message, and thanks in advance."]}


def size(parts: list[str]) -> int:
  return sum(len(p) + 2 for p in parts)


def ticket(r: random.Random, index: int) -> dict:
  """One ticket: category, product and problem first, then the tone's wrapping around them."""
  category, product, tone = r.choice(CATEGORIES), r.choice(PRODUCTS), r.choice(TONES)
  c = Ctx(r, product)
  phrase, phrasings, facts = PROBLEMS[category](c)
  # Terse customers write short tickets; the others are 60/33/7 short/medium/long, which
  # with a quarter of tickets terse gives about 70/25/5 overall.
  u = 0.0 if tone == "terse" else r.random()
  length = "short" if u < 0.60 else "medium" if u < 0.933 else "long"
  target = {"short": 0, "medium": r.randrange(400, 2600), "long": r.randrange(4000, 9000)}[length]

  context = context_sentences(c, tone)
  core = phrasings[-1] if tone == "terse" else r.choice(phrasings[:-1] or phrasings)
  if tone == "angry":
    core = r.choice(["", "This is ridiculous. ", "Again?! "]) + core
  body = [core]
  if tone == "rambling" or (tone != "terse" and r.random() < 0.3):
    body.append(context.pop())
  if length != "short":
    body += facts
    tried = r.sample(TRIED[category], k=min(2, len(TRIED[category])))
    body.append(f"I already {' and '.join(tried)}, without any luck.")
  parts = [g for g in [r.choice(GREETINGS[tone])] if g] + [" ".join(body)]
  fill = target * (0.45 if length == "long" else 1)  # long: the paste supplies the rest
  while length != "short" and context and size(parts) < fill:
    parts.append(" ".join(context.pop() for _ in range(min(r.randrange(1, 4), len(context)))))
  if length != "short" and size(parts) < fill:
    parts.append(timeline(c, int(fill - size(parts))))
  if length != "short" and size(parts) < target - 200:
    parts.append(paste(c, PASTES[category], c.code, target - size(parts)))
  parts += [x for x in [r.choice(CLOSINGS[tone])] if x]
  if tone != "terse" and r.random() < 0.7:
    parts.append(r.choice(["Best regards,", "Thanks,", "Cheers,", "Regards,", "--"]) + "\n"
                 + c.name)
  return {"id": f"T{index:05d}", "text": "\n\n".join(parts), "category": category,
          "product": product, "summary": f"{category} | {product} | {phrase}", "tone": tone}


def histogram(lengths: list[int]) -> str:
  """Character-length buckets, so a run shows the short/medium/long mix at a glance."""
  edges = [0, 300, 600, 1000, 2000, 4000, 10**9]
  rows = []
  for lo, hi in zip(edges, edges[1:]):
    n = sum(lo <= x < hi for x in lengths)
    label = f">= {lo}" if hi == 10**9 else f"{lo}-{hi - 1}"
    rows.append(f"  {label:>10} chars: {n:4d} {'#' * -(-n * 60 // max(len(lengths), 1))}")
  return "\n".join(rows)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--count", type=int, default=240)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("data/tickets.jsonl"))
  args = ap.parse_args()
  r = random.Random(args.seed)
  tickets = [ticket(r, i + 1) for i in range(args.count)]
  args.out.parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w", encoding="ascii", newline="\n") as f:
    for t in tickets:
      f.write(json.dumps(t) + "\n")
  lengths = sorted(len(t["text"]) for t in tickets)
  print(f"wrote {len(tickets)} tickets to {args.out} ({args.out.stat().st_size:,} bytes)")
  print(f"text length: min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]} chars (~{lengths[-1] // 4} tokens)")
  print(histogram(lengths))


if __name__ == "__main__":
  main()
