"""The facts of a synthetic support ticket: vocabularies, the per-ticket context (`Ctx`)
and one problem maker per category, which returns the summary phrase, the ways a customer
words it, and extra true facts. `make_tickets.py` wraps these in tone, noise and pastes.

Every draw goes through the `random.Random` the caller passes (inside `Ctx`), in a fixed
order, so the tickets stay byte-identical for a seed.
"""

from __future__ import annotations

import datetime
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


def month_day(t: datetime.datetime) -> str:
  return f"{MONTHS[t.month - 1]} {t.day}"


class Ctx:
  """Everything one ticket may mention, drawn up front so its text and summary agree."""

  def __init__(self, r: random.Random, product: str):
    self.r, self.product = r, product
    self.when = datetime.datetime(2024, 1, 1) + datetime.timedelta(
        minutes=r.randrange(365 * 24 * 60))
    self.date = month_day(self.when)
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
            ["Only one of the two charges has an invoice number.",
             "The second charge appeared about a minute after the first."])
  if k == 1:
    return (f"billed ${c.amount} instead of the {c.plan} plan price",
            [f"We are on the {c.plan} plan, but invoice {c.invoice} charged ${c.amount}, which "
             f"is not the price we signed up for.",
             f"Our {c.month} bill for {p} was ${c.amount}, yet the {c.plan} plan should cost "
             f"less; nothing changed on our side (invoice {c.invoice})."],
            [f"We did not add seats or upgrade anything in {c.month}."])
  if k == 2:
    return ("charged after cancelling the subscription",
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
