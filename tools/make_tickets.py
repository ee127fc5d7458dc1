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

PRODUCTS = ["Harbor Sync", "Lumen Desk", "Cobalt Notes", "Atlas Ledger", "Pinecone Mail",
            "Vesper Chat", "Quill Forms", "Tidepool Drive", "Orbit Planner", "Ember Analytics"]
CATEGORIES = ["billing", "login", "bug", "shipping", "refund", "account", "performance",
              "feature_request"]
TONES = ["polite", "angry", "terse", "rambling"]
FIRST = ["Anna", "Ben", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kemi", "Lars", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tomas"]
LAST = ["Adler", "Brooks", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Hughes",
        "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Patel"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
PLANS = ["Starter", "Pro", "Team", "Business", "Enterprise"]
SYSTEMS = ["Windows 11", "Windows 10", "macOS 14", "macOS 13", "Ubuntu 22.04", "iOS 17",
           "Android 14", "ChromeOS"]
BROWSERS = ["Chrome 124", "Firefox 125", "Safari 17", "Edge 123"]
ACTIONS = ["exporting a report to PDF", "opening a shared folder", "pasting an image",
           "renaming a project", "uploading a CSV file", "printing an invoice",
           "switching workspaces", "dragging a card to another column", "searching for a tag",
           "importing contacts", "attaching a file over 20 MB", "undoing a deletion"]
OBJECTS = ["project settings", "notification preferences", "custom fields", "saved filters",
           "profile photo", "team permissions", "dashboard layout", "email templates"]
SCREENS = ["the dashboard", "the reports page", "the inbox", "search results",
           "the calendar view", "the admin console"]
FEATURES = ["dark mode", "export to CSV", "a Slack integration", "keyboard shortcuts",
            "bulk editing", "an offline mode", "webhooks in the API", "recurring tasks",
            "two-factor login with hardware keys", "a German translation"]
ADDONS = ["Extra Storage 1 TB", "Priority Support", "Advanced Reports", "Audit Log"]
ITEMS = ["Starter Kit", "hardware security key", "USB sync dock", "branded notebook set"]
COMPONENTS = ["sync-worker", "auth", "http", "db-pool", "scheduler", "render", "cache", "api"]


def _day(t: datetime.datetime) -> str:
  return f"{MONTHS[t.month - 1]} {t.day}"


class Ctx:
  """Everything one ticket may mention, drawn up front so its text and summary agree."""

  def __init__(self, r: random.Random, product: str):
    self.r, self.product = r, product
    self.when = datetime.datetime(2024, 1, 1) + datetime.timedelta(
        minutes=r.randrange(365 * 24 * 60))
    self.date = _day(self.when)
    self.month = MONTHS[self.when.month - 1]
    self.order = f"ORD-{r.randrange(100000, 999999)}"
    self.invoice = f"INV-2024-{r.randrange(1000, 9999)}"
    self.amount = f"{r.choice([9, 19, 29, 49, 79, 99, 149, 249])}.{r.choice(['00', '99'])}"
    self.code = f"E{r.randrange(100, 999)}"
    self.version = f"{r.randrange(2, 9)}.{r.randrange(0, 20)}.{r.randrange(0, 10)}"
    self.plan = r.choice(PLANS)
    self.system, self.browser = r.choice(SYSTEMS), r.choice(BROWSERS)
    self.name = f"{r.choice(FIRST)} {r.choice(LAST)}"  # the customer, who signs
    self.other = f"{r.choice(FIRST)} {r.choice(LAST)}"  # a colleague they mention
    self.days = r.randrange(3, 30)
    self.n = r.randrange(2, 60)


# Each problem maker returns (summary phrase, [full phrasings..., terse phrasing], facts).
# Facts are extra true sentences that medium and long tickets add around the core statement.

def billing(c: Ctx):
  k, p = c.r.randrange(4), c.product
  if k == 0:
    return (f"charged twice for the {c.month} invoice",
            [f"I was charged twice for the {c.month} invoice ({c.invoice}): two payments of "
             f"${c.amount} each went through on {c.date}.",
             f"My card statement shows two identical {p} charges of ${c.amount} on {c.date}, "
             f"but there is only one invoice for {c.month} ({c.invoice}).",
             f"{p} double charged me for {c.month}, ${c.amount} twice, invoice {c.invoice}."],
            [f"Only one of the two charges has an invoice number.",
             f"The second charge appeared about a minute after the first."])
  if k == 1:
    return (f"billed ${c.amount} instead of the {c.plan} plan price",
            [f"We are on the {c.plan} plan, but invoice {c.invoice} charged ${c.amount}, which "
             f"is not the price we signed up for.",
             f"Our {c.month} bill for {p} was ${c.amount}, yet the {c.plan} plan should cost "
             f"less; nothing changed on our side (invoice {c.invoice})."],
            [f"We did not add seats or upgrade anything in {c.month}."])
  if k == 2:
    return (f"charged after cancelling the subscription",
            [f"I cancelled my {p} subscription before the renewal date, and on {c.date} I was "
             f"still charged ${c.amount}.",
             f"Even though I cancelled {p} last month, a renewal charge of ${c.amount} arrived "
             f"on {c.date} (invoice {c.invoice})."],
            ["I still have the cancellation confirmation email."])
  return (f"card payment declined with error {c.code}",
          [f"Every time I try to pay invoice {c.invoice} for {p}, the checkout says "
           f"\"Payment declined ({c.code})\", although my bank says the card is fine.",
           f"Paying for the {c.plan} plan of {p} fails with payment error {c.code}; I tried two "
           f"different cards."],
          ["The bank confirmed that no payment attempt was blocked on their side."])


def login(c: Ctx):
  k, p = c.r.randrange(4), c.product
  if k == 0:
    return ("password reset email never arrives",
            [f"I requested a password reset for {p} several times since {c.date}, but the "
             f"email never arrives, not even in the spam folder.",
             f"The \"forgot password\" email from {p} never shows up in my inbox, so I cannot "
             f"get back into my account."],
            ["Other emails from your domain arrive normally."])
  if k == 1:
    return ("two-factor code rejected as invalid",
            [f"When I log in to {p}, the six-digit code from my authenticator app is always "
             f"rejected as \"invalid code\", even right after it refreshes.",
             f"{p} keeps saying my two-factor code is invalid; the phone clock is correct."],
            ["I re-synced the authenticator app and the codes are still refused."])
  if k == 2:
    return (f"login fails with error {c.code}",
            [f"Since {c.date} I cannot sign in to {p}: after entering my password the page "
             f"shows \"Sign-in failed ({c.code})\".",
             f"Logging in to {p} on {c.browser} ends with error {c.code} every time."],
            [f"It fails the same way in a private window and on {c.system}."])
  return ("account locked after failed login attempts",
          [f"My {p} account got locked after a few wrong password attempts on {c.date}, and "
           f"the unlock link in the email says it has expired.",
           f"{p} locked me out after failed logins and I cannot unlock it myself."],
          ["I am sure the current password is right; I reset it last week."])


def bug(c: Ctx):
  k, p, act = c.r.randrange(3), c.product, c.r.choice(ACTIONS)
  if k == 0:
    return (f"crashes when {act}",
            [f"{p} {c.version} crashes every single time I try {act}. The window just closes "
             f"without any message.",
             f"Whenever I am {act}, {p} freezes for a second and then quits on {c.system}."],
            [f"It started after updating to version {c.version}.",
             "It happens with a brand new, empty project too."])
  if k == 1:
    return (f"error {c.code} when {act}",
            [f"{p} shows \"Something went wrong ({c.code})\" when {act}, and nothing happens.",
             f"I get error {c.code} in {p} every time I try {act} on {c.browser}."],
            [f"The error appeared for the first time on {c.date}."])
  obj = c.r.choice(OBJECTS)
  return (f"changes to {obj} are not saved",
          [f"In {p}, any change I make to the {obj} is lost: it says \"Saved\" but after a "
           f"reload the old values are back.",
           f"{p} does not keep my edits to the {obj}; they revert after reloading."],
          ["Two colleagues see the same thing on their accounts."])


def shipping(c: Ctx):
  k, p, item = c.r.randrange(4), c.product, c.r.choice(ITEMS)
  if k == 0:
    return (f"order {c.order} not delivered after {c.days} days",
            [f"I ordered the {p} {item} on {c.date} (order {c.order}) and after {c.days} days "
             f"it still has not arrived.",
             f"Order {c.order} for the {p} {item} is {c.days} days old and nothing has been "
             f"delivered."],
            ["The estimated delivery date on the confirmation has long passed."])
  if k == 1:
    return (f"{item} arrived damaged, order {c.order}",
            [f"The {p} {item} from order {c.order} arrived today with a crushed box and a "
             f"cracked casing.",
             f"My {p} {item} (order {c.order}) came broken; photos attached."],
            ["The outer box was visibly dented when the courier handed it over."])
  if k == 2:
    return (f"received the wrong item for order {c.order}",
            [f"I ordered the {p} {item} (order {c.order}) but the package contained something "
             f"else entirely.",
             f"Order {c.order} for {p} arrived with the wrong item inside."],
            ["The packing slip lists the right product, the box does not."])
  return (f"tracking for order {c.order} stuck in transit",
          [f"The tracking page for my {p} {item}, order {c.order}, has said \"in transit\" "
           f"since {c.date} without any update.",
           f"Tracking for {p} order {c.order} has not moved for {c.days} days."],
          ["The courier says they have no record of the parcel yet."])


def refund(c: Ctx):
  k, p = c.r.randrange(3), c.product
  if k == 0:
    return (f"refund of ${c.amount} not received after {c.days} days",
            [f"Your team approved a refund of ${c.amount} for {p} {c.days} days ago, but the "
             f"money has not reached my account.",
             f"The ${c.amount} refund for {p} promised {c.days} days ago never arrived."],
            [f"The approval email referenced invoice {c.invoice}."])
  if k == 1:
    addon = c.r.choice(ADDONS)
    return (f"refund for accidental purchase of {addon}",
            [f"I bought the {addon} add-on for {p} by accident on {c.date} (${c.amount}); "
             f"please refund it, it has never been used.",
             f"Accidentally purchased {addon} in {p} for ${c.amount}, I want a refund."],
            ["I clicked the upgrade banner thinking it was a free trial."])
  return (f"refund for unused annual {c.plan} plan",
          [f"I renewed the annual {c.plan} plan of {p} on {c.date} by mistake and have not "
           f"used it since; I would like a refund of the ${c.amount}.",
           f"Please refund my unused yearly {p} {c.plan} plan (${c.amount})."],
          ["We moved to a different tool earlier this year."])


def account(c: Ctx):
  k, p = c.r.randrange(4), c.product
  if k == 0:
    return ("wants to change the account email address",
            [f"I need to change the email address on my {p} account because my old company "
             f"domain is being shut down.",
             f"How do I change the login email of my {p} account? The settings page greys it "
             f"out."],
            ["I still have access to the old mailbox until the end of the month."])
  if k == 1:
    return ("requests account and data deletion",
            [f"Please delete my {p} account and all data associated with it, under GDPR.",
             f"I want my {p} account closed and every bit of my data erased."],
            ["I exported everything I need already."])
  if k == 2:
    return (f"needs to add {c.n} users to the {c.plan} account",
            [f"We need to add {c.n} new people to our {p} {c.plan} account, but the admin page "
             f"only lets me invite one user at a time.",
             f"How can I add {c.n} users to our {p} team at once?"],
            [f"Our {c.plan} contract allows up to {c.n + 50} seats."])
  return ("wants workspace ownership transferred to a colleague",
          [f"I am leaving the company and need to transfer ownership of our {p} workspace to "
           f"my colleague {c.other}.",
           f"Please move ownership of our {p} workspace to {c.other}."],
          [f"{c.other} already has an admin role in the workspace."])


def performance(c: Ctx):
  k, p = c.r.randrange(4), c.product
  secs = c.r.randrange(15, 120)
  if k == 0:
    screen = c.r.choice(SCREENS)
    return (f"{screen} takes {secs} seconds to load",
            [f"In {p}, {screen} now takes about {secs} seconds to load, where it used to be "
             f"instant.",
             f"{screen.capitalize()} in {p} needs {secs} s to open."],
            [f"Our internet connection measures fine, around {c.n * 10} Mbit/s."])
  if k == 1:
    return (f"desktop app uses {c.n % 12 + 4} GB of memory",
            [f"The {p} desktop app on {c.system} grows to {c.n % 12 + 4} GB of memory after an "
             f"hour and the whole laptop slows down.",
             f"{p} eats {c.n % 12 + 4} GB RAM on {c.system}."],
            ["Closing and reopening the app helps for a short while."])
  if k == 2:
    return (f"sync takes hours for {c.n * 100} files",
            [f"Syncing a folder of {c.n * 100} small files with {p} takes several hours, and "
             f"the progress bar barely moves.",
             f"{p} needs hours to sync {c.n * 100} files."],
            ["Copying the same folder over the network takes two minutes."])
  return (f"slow since the update to version {c.version}",
          [f"Since {p} updated to version {c.version} on {c.date}, everything is sluggish: "
           f"typing lags and menus open with a delay.",
           f"{p} {c.version} is much slower than the previous version."],
          [f"Rolling back is not possible because version {c.version} was pushed "
           f"automatically."])


def feature_request(c: Ctx):
  feat, p = c.r.choice(FEATURES), c.product
  return (f"requests {feat}",
          [f"It would really help our team if {p} offered {feat}. Is that on the roadmap?",
           f"Feature request: please add {feat} to {p}; we would use it every day.",
           f"{p} needs {feat}."],
          [f"Two competitors already offer {feat}.",
           f"Our team of {c.n} would rely on it daily."])


PROBLEMS = dict(billing=billing, login=login, bug=bug, shipping=shipping, refund=refund,
                account=account, performance=performance, feature_request=feature_request)
TRIED = dict(
    billing=["checked with my bank", "looked at the billing page", "downloaded the invoices"],
    login=["cleared cookies", "tried another browser", "restarted my phone"],
    bug=["reinstalled the app", "cleared the cache", "tried on another computer"],
    shipping=["checked the tracking page", "asked my neighbours", "called the courier"],
    refund=["waited the usual 5-7 business days", "checked my bank statements"],
    account=["searched the help center", "asked our admin"],
    performance=["restarted the app", "disabled browser extensions", "tried a wired network"],
    feature_request=["looked through the settings", "searched the community forum"])
PASTES = dict(billing="table", refund="table", shipping="tracking", login="log", bug="log",
              performance="log", account="thread", feature_request="thread")


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
  lines, events = ["What happened so far:", f"- {_day(day)}: I first noticed the problem."], []
  events = r.sample(EVENTS, k=len(EVENTS))
  while events and sum(map(len, lines)) < target:
    day += datetime.timedelta(days=r.randrange(1, 4))
    lines.append(f"- {_day(day)}: {events.pop()}.")
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
