"""A labelled corpus for masking quality: synthetic LLM answers and tool results, generated with
Faker in nine locales from the templates below (chat, e-mails, CSV, psql tables, JSON tool results,
logs, code and config files, payments, and texts in French, German and Portuguese), with hard
negatives (hashes, git SHAs, UUIDs, versions, timestamps, order numbers, placeholders, digests).

Each item is a text and its labelled values (start, end, type); secrets are labelled `SECRET`
whatever their kind. Deterministic for a seed: tune on one seed, report on another (held out).
Nothing here feeds the recognisers: douane has no name list, and must not get one from Faker.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import phonenumbers
from faker import Faker

LOCALES = {"en_US": "US", "en_GB": "GB", "de_DE": "DE", "fr_FR": "FR", "pt_BR": "BR",
           "en_IN": "IN", "es_ES": "ES", "it_IT": "IT", "nl_NL": "NL"}
TYPES = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN",
         "IP_ADDRESS", "IBAN_CODE")
B62 = string.ascii_letters + string.digits


def pem_block(label: str, body: str) -> str:
    """A PEM block around generated base64 (built here so no key-looking literal is committed)."""
    dashes = "-" * 5
    return f"{dashes}BEGIN {label}{dashes}\n{body}\n{dashes}END {label}{dashes}"


@dataclass
class Item:
    kind: str
    locale: str
    text: str
    spans: list[tuple[int, int, str]]


class Text:
    """A text built piece by piece, remembering where each labelled value is."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[tuple[int, int, str]] = []
        self.n = 0

    def t(self, s: str) -> Text:
        self.parts.append(s)
        self.n += len(s)
        return self

    def v(self, kind: str | None, value: str) -> Text:
        if kind:
            self.spans.append((self.n, self.n + len(value), kind))
        return self.t(value)

    def j(self, kind: str | None, value: str) -> Text:
        """A JSON string value, quoted and escaped; the label covers the escaped value."""
        return self.t('"').v(kind, json.dumps(value, ensure_ascii=False)[1:-1]).t('"')

    def text(self) -> str:
        return "".join(self.parts)


class Gen:
    def __init__(self, locale: str, rng: random.Random, seed: int) -> None:
        self.locale, self.rng = locale, rng
        self.region = LOCALES[locale]
        self.fake = Faker(locale)
        self.fake.seed_instance(seed)
        self.us = Faker("en_US")
        self.us.seed_instance(seed + 1)

    def pick(self, *options):
        return self.rng.choice(options)

    def chars(self, n: int, alphabet: str = B62) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    # --- personal data -------------------------------------------------------------------
    def person(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return self.fake.name()
        if r < 0.85:
            return f"{self.fake.first_name()} {self.fake.last_name()}"
        return self.fake.last_name() if r < 0.9 else self.fake.first_name()

    def email(self, name: str | None = None) -> str:
        if name and self.rng.random() < 0.5:
            user = ".".join(name.lower().split()[:2])
            user = "".join(c for c in user if c in string.ascii_lowercase + ".")
            if user.strip("."):
                return f"{user.strip('.')}@{self.fake.free_email_domain()}"
        return self.pick(self.fake.email, self.fake.company_email, self.fake.free_email)()

    def phone(self) -> str:
        for _ in range(40):
            raw = self.fake.phone_number()
            try:
                number = phonenumbers.parse(raw, self.region)
            except phonenumbers.NumberParseException:
                continue
            if not phonenumbers.is_valid_number(number):
                continue
            style = self.rng.random()
            if style < 0.4:
                return raw
            fmt = (phonenumbers.PhoneNumberFormat.NATIONAL if style < 0.7 else
                   phonenumbers.PhoneNumberFormat.INTERNATIONAL if style < 0.9 else
                   phonenumbers.PhoneNumberFormat.E164)
            return phonenumbers.format_number(number, fmt)
        number = phonenumbers.example_number_for_type(self.region,
                                                      phonenumbers.PhoneNumberType.MOBILE)
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)

    def card(self) -> str:
        number = self.us.credit_card_number(card_type=self.pick(
            "visa16", "mastercard", "amex", "discover", "visa16", "mastercard"))
        style = self.rng.random()
        if style < 0.5:
            return number
        sep = " " if style < 0.8 else "-"
        if len(number) == 15:
            return sep.join((number[:4], number[4:10], number[10:]))
        return sep.join(number[i:i + 4] for i in range(0, len(number), 4))

    def ssn(self) -> str:
        ssn = self.us.ssn()
        return self.pick(ssn, ssn, ssn.replace("-", ""), ssn.replace("-", " "))

    def ip(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return self.us.ipv4_public()
        if r < 0.75:
            return self.us.ipv4_private()
        if r < 0.9:
            return self.us.ipv6()
        import ipaddress

        return ipaddress.IPv6Address(self.us.ipv6()).exploded

    def iban(self) -> str:
        iban = self.fake.iban()
        if self.rng.random() < 0.4:
            return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        return iban

    def location(self) -> str:
        r = self.rng.random()
        if r < 0.5 and self.locale not in ("en_US", "en_GB", "pt_BR", "en_IN"):
            return self.fake.city()
        if r < 0.65 and self.locale == "en_US":
            return self.fake.state()
        return self.pick(self.us.country, self.fake.current_country,
                         lambda: self.pick("London", "Paris", "Berlin", "Madrid", "Rome",
                                           "Amsterdam", "Lisbon", "Chicago", "Boston",
                                           "São Paulo", "Mumbai", "Toronto", "Sydney",
                                           "Munich", "Lyon", "Milan", "Seattle", "Dublin"))()

    def timestamp(self) -> str:  # not Faker's: its dates depend on today's
        moment = datetime(2000, 1, 1) + timedelta(seconds=self.rng.randint(0, 25 * 365 * 86400),
                                                  microseconds=self.rng.randint(0, 999999))
        return moment.isoformat() + self.pick("", "Z", "+00:00")

    # --- hard negatives -------------------------------------------------------------------
    def negative(self) -> str:
        rng = self.rng
        return self.pick(
            lambda: str(self.us.uuid4()), lambda: self.us.md5(), lambda: self.us.sha1(),
            lambda: self.us.sha256(), lambda: self.us.sha1()[:7],
            lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 40)}",
            lambda: f"{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}-rc{rng.randint(1, 5)}",
            lambda: self.timestamp(), lambda: f"ORD-{rng.randint(10**7, 10**8 - 1)}",
            lambda: f"#{rng.randint(10**8, 10**9 - 1)}", lambda: str(rng.randint(1600000000, 1800000000)),
            lambda: f"sha256:{self.us.sha256()}", lambda: f"build {rng.randint(1000, 99999)}",
            lambda: self.pick("S3", "EKS", "EC2", "GKE", "C4", "Lambda", "BigQuery"),
            lambda: f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d} EUR",
            lambda: f"port {rng.choice([443, 5432, 6379, 8080, 9200])}",
            lambda: f"/var/log/app/{self.us.word()}-{rng.randint(1, 99)}.log",
            lambda: f"web-{self.us.md5()[:10]}-{self.chars(5, string.ascii_lowercase)}",
            lambda: "#" + self.us.hex_color()[1:])()

    def placeholder_secret(self) -> str:
        return self.pick("password: ********", "api_key=${API_KEY}", "token: <YOUR_TOKEN>",
                         "max_tokens: 4096", "password = os.environ[\"DB_PASSWORD\"]",
                         "secret_ref: projects/acme/secrets/db/versions/3",
                         "\"integrity\": \"sha512-" + base64.b64encode(self.rng.randbytes(64))
                         .decode() + "\"", "auth: required", "AWS_SECRET_ACCESS_KEY=<redacted>",
                         "tokenizer: bert-base-multilingual-cased", "password_min_length: 12",
                         "access_token_ttl: 3600")

    # --- secrets: (before, value, after) --------------------------------------------------
    def secret(self) -> list[tuple[str, str | None]]:
        """Pieces of text; a piece with a value kind of "SECRET" is labelled."""
        c, p = self.chars, self.pick
        akia = "AKIA" + c(16, string.ascii_uppercase + string.digits)
        aws_secret = c(40, B62 + "/+")
        password = c(self.rng.randint(8, 16), B62 + "!#%^*_-+=.?@") + self.pick("1", "A", "z", "!")
        jwt = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
                       for part in ({"alg": "HS256", "typ": "JWT"},
                                    {"sub": str(self.rng.randint(1, 10**6)),
                                     "exp": self.rng.randint(1600000000, 1800000000)})) \
            + "." + c(43, B62 + "-_")
        pem = "\n".join(c(64, B62 + "+/") for _ in range(self.rng.randint(2, 5)))
        choices: list[Callable[[], list[tuple[str, str | None]]]] = [
            lambda: [("aws_access_key_id = ", None), (akia, "S"), ("\naws_secret_access_key = ", None),
                     (aws_secret, "S")],
            lambda: [("export AWS_ACCESS_KEY_ID=", None), (akia, "S"),
                     ("\nexport AWS_SECRET_ACCESS_KEY=", None), (aws_secret, "S")],
            lambda: [('{"AccessKeyId": "', None), (akia, "S"), ('", "SecretAccessKey": "', None),
                     (aws_secret, "S"), ('"}', None)],
            lambda: [("User name,Access key ID,Secret access key\nci-bot,", None), (akia, "S"),
                     (",", None), (aws_secret, "S")],
            lambda: [(p("AWS_SECRET=", "secret: ", "aws_secret_key: ", "Secret access key: "),
                      None), (aws_secret, "S")],
            lambda: [(p("OPENAI_API_KEY=", "api key: ", "Use this key: "), None),
                     ("sk-proj-" + c(48, B62 + "_-"), "S")],
            lambda: [(p("ANTHROPIC_API_KEY=", "x-api-key: ", "key "), None),
                     ("sk-ant-api03-" + c(93, B62 + "_-"), "S")],
            lambda: [(p("GITHUB_TOKEN=", "token: ", "git clone https://x-access-token:"), None),
                     ("ghp_" + c(36), "S")],
            lambda: [(p("GITLAB_TOKEN=", "private-token: ", "--token "), None),
                     ("glpat-" + c(20, B62 + "_-"), "S")],
            lambda: [("//registry.npmjs.org/:_authToken=", None), ("npm_" + c(36), "S")],
            lambda: [(p("STRIPE_SECRET_KEY=", "stripe.api_key = '", "key: "), None),
                     (p("sk_live_", "rk_live_", "sk_test_") + c(24), "S")],
            lambda: [("SLACK_BOT_TOKEN=", None), ("xoxb-" + str(self.rng.randint(10**10, 10**11))
                                                  + "-" + c(24), "S")],
            lambda: [("webhook_url: ", None), ("https://hooks.slack.com/services/T" + c(8, string.ascii_uppercase + string.digits)
                                              + "/B" + c(8, string.ascii_uppercase + string.digits) + "/" + c(24), "S")],
            lambda: [(p("GOOGLE_API_KEY=", "?key=", "maps key "), None), ("AIza" + c(35, B62 + "_-"), "S")],
            lambda: [("HF_TOKEN=", None), ("hf_" + c(34), "S")],
            lambda: [("Authorization: Bearer ", None), (c(self.rng.randint(32, 64), B62 + "._-"), "S")],
            lambda: [("Authorization: Bearer ", None), (jwt, "S")],
            lambda: [(p("id_token: ", "session cookie: ", "the JWT is "), None), (jwt, "S")],
            lambda: [(pem_block("RSA PRIVATE KEY", pem), "S")],
            lambda: [('{"type": "service_account", "private_key_id": "', None),
                     (self.us.sha1(), "S"), ('", "private_key": "', None),
                     (json.dumps(pem_block("PRIVATE KEY", pem) + "\n")[1:-1], "S"), ('"}', None)],
            lambda: [(p("password: ", "DB_PASSWORD=", "PGPASSWORD=", '"password": "', "--password=",
                        "passwd = ", "The new password is "), None), (password, "S")],
            lambda: [(p("postgres://app:", "mysql://root:", "https://deploy:", "redis://default:"),
                      None), (password, "S"), ("@db.internal:5432/app", None)],
            lambda: [("Authorization: Basic ", None),
                     (base64.b64encode(f"admin:{password}".encode()).decode(), "S")],
            lambda: [(p("api_key: ", "X-Api-Key: ", "client_secret=", '"apiKey": "', "SECRET_KEY = '",
                        "webhook_secret: ", "DATADOG_API_KEY="), None),
                     (p(self.us.md5(), c(32), c(40, B62 + "_-"), "whsec_" + c(32)), "S")],
            lambda: [(p("Here is the credential you asked for: ", "copy this: ", ""), None),
                     (c(40, B62), "S")],
        ]
        pieces = self.rng.choice(choices)()
        return [(text, "SECRET" if kind else None) for text, kind in pieces]


# --- templates: each writes one item ----------------------------------------------------------
def chat(g: Gen, b: Text) -> None:
    name = g.person()
    b.t(g.pick("Sure! ", "Of course. ", "Here is what I found: ", "")).t(
        g.pick("The account belongs to ", "I spoke with ", "The ticket was opened by ",
               "Please contact ")).v("PERSON", name)
    b.t(g.pick(", who lives in ", " from ", " (based in ")).v("LOCATION", g.location()).t(
        g.pick(". ", "). ", ". "))
    b.t(g.pick("You can reach them at ", "Their email is ", "Write to ")).v("EMAIL_ADDRESS",
                                                                          g.email(name))
    b.t(g.pick(" or call ", " or by phone on ", ", phone ")).v("PHONE_NUMBER", g.phone()).t(". ")
    b.t(g.pick("The last order, ", "Reference ", "See ")).v(None, g.negative()).t(
        g.pick(", shipped on ", ", updated ")).v(None, g.negative()).t(".")


def greeting(g: Gen, b: Text) -> None:
    first = g.fake.first_name()
    b.t(g.pick("Hi ", "Hello ", "Dear ")).v("PERSON", first).t(",\n\n")
    b.t("Thanks for your message about order ").v(None, g.negative()).t(". ")
    b.t(g.pick("My colleague ", "Our agent ")).v("PERSON", g.person()).t(
        " will call you back on ").v("PHONE_NUMBER", g.phone()).t(" tomorrow.\n\nBest regards,\n")
    name = g.person()
    b.v("PERSON", name).t("\n").v("EMAIL_ADDRESS", g.email(name)).t("\n")


def email_header(g: Gen, b: Text) -> None:
    sender, to = g.person(), g.person()
    b.t("From: ").v("PERSON", sender).t(" <").v("EMAIL_ADDRESS", g.email(sender)).t(">\nTo: ")
    b.v("PERSON", to).t(" <").v("EMAIL_ADDRESS", g.email(to)).t(">\nSubject: ")
    b.t(g.pick("Invoice ", "Re: build ", "Meeting notes ")).v(None, g.negative()).t("\n\n")
    b.t("Author: ").v("PERSON", g.person()).t("\nOffice: ").v("LOCATION", g.location()).t("\n")


def csv(g: Gen, b: Text) -> None:
    cols = g.rng.sample(["name", "email", "phone", "city", "ssn", "ip", "card", "order_id"],
                        g.rng.randint(3, 5))
    if "name" not in cols:
        cols[0] = "name"
    b.t(",".join(cols) + "\n")
    for _ in range(g.rng.randint(2, 6)):
        for k, col in enumerate(cols):
            if k:
                b.t(",")
            name = g.person()
            value = {"name": ("PERSON", name), "email": ("EMAIL_ADDRESS", g.email(name)),
                     "phone": ("PHONE_NUMBER", g.phone()), "city": ("LOCATION", g.location()),
                     "ssn": ("US_SSN", g.ssn()), "ip": ("IP_ADDRESS", g.ip()),
                     "card": ("CREDIT_CARD", g.card().replace(" ", "").replace("-", "")),
                     "order_id": (None, g.negative())}[col]
            quoted = "," in value[1]
            b.t('"' if quoted else "").v(*value).t('"' if quoted else "")
        b.t("\n")


def psql(g: Gen, b: Text) -> None:
    b.t(" id | display_name          | email                        | last_ip\n")
    b.t("----+-----------------------+------------------------------+----------------\n")
    for i in range(g.rng.randint(2, 5)):
        name = g.person()
        b.t(f" {i + 1:2d} | ").v("PERSON", name).t(" | ").v("EMAIL_ADDRESS", g.email(name))
        b.t(" | ").v("IP_ADDRESS", g.ip()).t("\n")
    b.t(f"({g.rng.randint(2, 5)} rows)\n")


def json_tool(g: Gen, b: Text) -> None:
    name = g.person()
    b.t('{"id": ').j(None, g.negative()).t(', "display_name": ').j("PERSON", name)
    b.t(', "email": ').j("EMAIL_ADDRESS", g.email(name))
    if g.rng.random() < 0.6:
        b.t(', "phone": ').j("PHONE_NUMBER", g.phone())
    if g.rng.random() < 0.5:
        b.t(', "address": {"city": ').j("LOCATION", g.location()).t(', "country": ').j(
            "LOCATION", g.us.country()).t("}")
    if g.rng.random() < 0.4:
        b.t(', "ssn": ').j("US_SSN", g.ssn())
    if g.rng.random() < 0.4:
        b.t(', "client_ip": ').j("IP_ADDRESS", g.ip())
    b.t(', "updated_at": ').j(None, g.timestamp()).t(', "etag": ').j(None, g.us.md5()).t("}")


def log(g: Gen, b: Text) -> None:
    for _ in range(g.rng.randint(2, 5)):
        b.t(g.timestamp() + g.pick(" INFO ", " WARN ", " DEBUG "))
        r = g.rng.random()
        if r < 0.3:
            b.t("login ok user=").v("EMAIL_ADDRESS", g.email()).t(" src=").v("IP_ADDRESS", g.ip())
        elif r < 0.5:
            b.t("request_id=").v(None, str(g.us.uuid4())).t(" client=").v("IP_ADDRESS", g.ip())
            b.t(" status=200 bytes=" + str(g.rng.randint(100, 99999)))
        elif r < 0.65:
            b.t("deploy ").v(None, g.negative()).t(" commit=").v(None, g.us.sha1()).t(" ok")
        elif r < 0.8:
            b.t("sms sent to ").v("PHONE_NUMBER", g.phone()).t(" for ").v("PERSON", g.person())
        else:
            b.t("payment by ").v("PERSON", g.person()).t(" card=").v("CREDIT_CARD", g.card())
        b.t("\n")


def payment(g: Gen, b: Text) -> None:
    holder = g.person()
    b.t(g.pick("Please wire the refund to ", "Bank details: IBAN ", "Transfer to ")).v(
        "IBAN_CODE", g.iban()).t(" (account holder: ").v("PERSON", holder).t("). ")
    b.t("The card on file is ").v("CREDIT_CARD", g.card()).t(", total ").v(None, g.negative())
    b.t(". Invoice ").v(None, g.negative()).t(".")


def ssn_record(g: Gen, b: Text) -> None:
    name = g.person()
    b.t("Employee: ").v("PERSON", name).t("\n")
    b.t(g.pick("SSN: ", "Social Security Number: ", "ssn=", "SSN ")).v("US_SSN", g.ssn()).t("\n")
    b.t("Employee ID: ").v(None, str(g.rng.randint(10**5, 10**6))).t("\nPhone: ").v(
        "PHONE_NUMBER", g.phone()).t("\n")


def code(g: Gen, b: Text) -> None:
    b.t(g.pick("Here is the config:\n```\n", "```yaml\n", "# settings.py\n", "```bash\n"))
    for _ in range(g.rng.randint(1, 2)):
        for text, kind in g.secret():
            b.v(kind, text)
        b.t("\n")
    b.t(g.pick("region = eu-west-1\n", "debug = false\n", "")).t(g.placeholder_secret()).t("\n")
    b.t("version: ").v(None, g.negative()).t("\n").t(g.pick("```", ""))


def secret_prose(g: Gen, b: Text) -> None:
    b.t(g.pick("I found this in the repository: ", "The tool returned: ", "From the .env file: "))
    for text, kind in g.secret():
        b.v(kind, text)
    b.t(g.pick(". Rotate it now.", " (commit ", ". ")).v(None, g.us.sha1()).t(".")


def negatives_only(g: Gen, b: Text) -> None:
    b.t(g.pick("Deployment finished. ", "Build report: ", "Release notes: "))
    for _ in range(g.rng.randint(3, 6)):
        b.t(g.pick("artifact ", "checksum ", "image ", "tag ", "id ", "at ", "ref ")).v(
            None, g.negative()).t(g.pick(", ", "; ", ". "))
    b.t(g.placeholder_secret()).t(". Nothing else to report.")


def foreign(g: Gen, b: Text) -> None:
    name = g.person()
    lang = g.pick("fr", "de", "pt")
    opening = {"fr": ("Bonjour, le client ", " habite à ", ". Son e-mail est ", " et son numéro ",
                      "."),
               "de": ("Hallo, der Kunde ", " wohnt in ", ". Seine E-Mail ist ", ", Telefon ",
                      "."),
               "pt": ("Olá, o cliente ", " mora em ", ". O e-mail é ", " e o telefone ", ".")}[lang]
    b.t(opening[0]).v("PERSON", name).t(opening[1]).v("LOCATION", g.location()).t(opening[2])
    b.v("EMAIL_ADDRESS", g.email(name)).t(opening[3]).v("PHONE_NUMBER", g.phone()).t(opening[4])


def lowercase_chat(g: Gen, b: Text) -> None:
    name = g.fake.first_name().lower()
    b.t(g.pick("ok so ", "fyi ", "btw ")).v("PERSON", name).t(
        g.pick(" said the server at ", " is on ")).v("IP_ADDRESS", g.ip()).t(" is down, ping ")
    b.v("EMAIL_ADDRESS", g.email()).t(" or text ").v("PHONE_NUMBER", g.phone()).t(" lol")


def narrative(g: Gen, b: Text) -> None:
    b.t(g.pick("Yesterday ", "Last week ", "On Monday ")).v("PERSON", g.person()).t(" met ")
    b.v("PERSON", g.person()).t(" in ").v("LOCATION", g.location()).t(
        g.pick(" to review the contract. ", " for the quarterly review. "))
    b.t(g.pick("Thanks to ", "Kudos to ")).v("PERSON", g.fake.first_name()).t(
        " for the fix in ").v(None, g.negative()).t(". ")
    name = g.person()
    b.v("PERSON", name).t(" will send the signed copy to ").v("EMAIL_ADDRESS", g.email(name))
    b.t(g.pick(" by Friday.", " before the release of ")).t(g.negative()).t(".")


def markdown_table(g: Gen, b: Text) -> None:
    b.t("| Customer | Assigned to | Phone | Opened |\n|---|---|---|---|\n")
    for _ in range(g.rng.randint(2, 4)):
        b.t("| ").v("PERSON", g.person()).t(" | ").v("PERSON", g.person()).t(" | ")
        b.v("PHONE_NUMBER", g.phone()).t(" | ").v(None, g.timestamp()).t(" |\n")


def cloud_json(g: Gen, b: Text) -> None:
    b.t('[{"name": ').j(None, g.pick("Nightly Build", "Backup Policy", "Main Branch",
                                     "Default Pool", "Primary Cluster", "Marketing"))
    b.t(', "state": ').j(None, g.pick("RUNNING", "Active", "Pending", "Stopped"))
    b.t(', "region": ').j(None, g.pick("eu-west-1", "us-east-2", "europe-west4"))
    b.t(', "owner": ').j(None, g.pick("team-platform", "svc-ci", "root"))
    b.t(', "id": ').j(None, str(g.us.uuid4())).t(', "from": "EUR", "to": "USD"}, {"name": ')
    b.j("PERSON", g.person()).t(', "role": "admin", "created": ').j(None, g.timestamp()).t("}]")


TEMPLATES: dict[str, tuple[Callable[[Gen, Text], None], int]] = {  # name -> (template, weight)
    "chat": (chat, 14), "greeting": (greeting, 8), "email": (email_header, 7), "csv": (csv, 8),
    "psql": (psql, 5), "json": (json_tool, 12), "log": (log, 9), "payment": (payment, 7),
    "ssn": (ssn_record, 5), "code": (code, 9), "secret": (secret_prose, 6),
    "negatives": (negatives_only, 6), "foreign": (foreign, 6), "lowercase": (lowercase_chat, 3),
    "narrative": (narrative, 6), "markdown": (markdown_table, 4), "cloud": (cloud_json, 4),
}


def corpus(n: int, seed: int = 2) -> list[Item]:
    rng = random.Random(seed)
    names = list(TEMPLATES)
    weights = [TEMPLATES[k][1] for k in names]
    gens = {loc: Gen(loc, random.Random(f"{seed}-{loc}"), seed) for loc in LOCALES}
    items = []
    for _ in range(n):
        kind = rng.choices(names, weights)[0]
        locale = rng.choice(list(LOCALES))
        b = Text()
        TEMPLATES[kind][0](gens[locale], b)
        items.append(Item(kind, locale, b.text(), b.spans))
    return items


# Locales the corpus above never draws from: a check set built apart from it (`broad`)
BROAD_LOCALES = ("pl_PL", "tr_TR", "vi_VN", "zh_CN", "ru_RU", "sv_SE", "cs_CZ", "hu_HU", "el_GR",
                 "fi_FI", "ko_KR", "ja_JP", "ar_AA", "he_IL", "uk_UA", "ro_RO", "da_DK", "no_NO",
                 "id_ID", "th_TH", "fa_IR", "en_NZ", "en_IE", "es_MX", "pt_PT", "fr_CA", "de_AT",
                 "it_IT", "nl_BE", "hi_IN")


def _broad_item(f: Faker, us: Faker, shape: int, rng: random.Random) -> Text:
    b = Text()
    name, first, city = f.name(), f.first_name(), f.city()
    if shape == 0:  # lower-case chat
        (b.t("btw ").v("PERSON", name.lower()).t(" said the deploy to ")
         .v("LOCATION", city.lower()).t(" failed again, ping ").v("PERSON", first.lower())
         .t(" tomorrow"))
    elif shape == 1:  # sentence-initial
        (b.v("PERSON", name).t(" joined the team in ").v("LOCATION", city).t(" last spring. ")
         .v("PERSON", first).t(" will onboard them."))
    elif shape == 2:  # after a title
        (b.t(rng.choice(["Dr. ", "Prof. ", "Mr. ", "Ms. ", "Mrs. "])).v("PERSON", name)
         .t(" can be reached at ").v("EMAIL_ADDRESS", f.email()).t(" or ")
         .v("PHONE_NUMBER", us.phone_number()).t("."))
    elif shape == 3:  # a list
        (b.t("Attendees:\n- ").v("PERSON", name).t("\n- ").v("PERSON", f.name()).t("\n- ")
         .v("PERSON", f.name()).t("\nVenue: ").v("LOCATION", city))
    elif shape == 4:
        b.t('{"owner": ').j("PERSON", name).t(', "city": ').j("LOCATION", city)
        b.t(f', "id": "{f.uuid4()}"}}')
    elif shape == 5:  # all capitals
        (b.t("SHIP TO: ").v("PERSON", name.upper()).t(", ").v("LOCATION", city.upper())
         .t(f" — ORDER #{rng.randrange(10**6, 10**7)}"))
    elif shape == 6:
        (b.t("Thanks for asking! ").v("PERSON", first).t(" moved from ").v("LOCATION", city)
         .t(" to ").v("LOCATION", us.city()).t(" in 2019 and now works remotely."))
    else:  # a markdown table
        (b.t("| name | email |\n|---|---|\n| ").v("PERSON", name).t(" | ")
         .v("EMAIL_ADDRESS", f.email()).t(" |\n| ").v("PERSON", f.name()).t(" | ")
         .v("EMAIL_ADDRESS", f.email()).t(" |"))
    return b


def broad(n: int, seed: int = 77) -> list[Item]:
    """A check set apart from `corpus` (not used to tune anything): names and cities from 30
    other locales (Arabic, Chinese, Cyrillic, Greek, Hebrew, Thai, Vietnamese scripts among them)
    in eight shapes: lower-case chat, sentence-initial, after a title, a list, JSON, all
    capitals, a plain sentence, a markdown table; with e-mails and US phone numbers."""
    rng = random.Random(seed)
    items = []
    for k in range(n):
        locale = rng.choice(BROAD_LOCALES)
        f, us = Faker(locale), Faker("en_US")
        f.seed_instance(seed * 1000 + k)
        us.seed_instance(seed * 1000 + k + 7)
        b = _broad_item(f, us, rng.randrange(8), rng)
        items.append(Item("broad", locale, b.text(), b.spans))
    return items


# What `random_texts` draws words from: no labels, only variety (scripts, invisible and other
# spaces, look-alike digits, punctuation runs) for A/Bs of the engine (scripts/eval-masking
# --against), where only sameness counts
FILLER_TEXT = ("the of and to in is it you that he was for on are with as I his they be at one have "
          "this from or had by word but what some we can out other were all there when up use "
          "your how said an each she which do their time if will way about many then them would "
          "like so these her long make see him two has look more day could go come did number "
          "no most people my over know water than call first who may down side been now find")
FILLER = FILLER_TEXT.split()
NAMES = ("John", "Smith", "Maria", "Garcia", "O'Connor", "Al-Sayed", "Jean-Luc", "Müller", "Zoë",
         "Łukasz", "Ærø", "Dupont", "São Paulo", "New York", "Paris", "Berlin", "Tokyo", "Ngozi",
         "McDonald", "van der Berg", "D'Angelo", "José", "Straße", "İstanbul", "Ðorđe")
UNICODE = ("東京", "北京市", "Москва", "Ελλάδα", "שלום", "مرحبا", "नमस्ते", "😀", "👍🏽", "café",
           "naïve", "ﬁ", "Ⅻ", "①②", "٣٤٥", "１２３", "\u200b", "\u00a0", "\u2028", "—", "–", "…",
           "«", "»", "“quoted”", "‘x’", "€", "£", "¥", "ß", "ǅ", "\t", "\r\n", "  ")
SUFFIXES = ("com", "org", "io", "co.uk", "de", "fr", "com.br", "in")


def _random_number(r: random.Random) -> str:
    k = r.random()
    if k < 0.2:
        return str(r.randint(0, 10 ** r.randint(1, 12)))
    if k < 0.35:
        return f"{r.randint(0, 999)}-{r.randint(0, 999):03d}-{r.randint(0, 9999):04d}"
    if k < 0.45:
        return f"{r.randint(1, 9999):,}.{r.randint(0, 99):02d}"
    if k < 0.55:
        return ".".join(str(r.randint(0, 255)) for _ in range(4))
    if k < 0.62:
        return "fe80::" + ":".join(f"{r.randint(0, 65535):x}" for _ in range(r.randint(1, 4)))
    if k < 0.7:
        return f"{r.randint(1900, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    if k < 0.78:
        return (f"+{r.choice([1, 33, 44, 49, 55, 91, 971, 683])} {r.randint(10, 999)} "
                f"{r.randint(100, 9999999)}")
    if k < 0.85:
        return " ".join(f"{r.randint(0, 9999):04d}" for _ in range(4))
    if k < 0.9:
        return f"{r.randint(100, 999)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}"
    if k < 0.95:
        return f"v{r.randint(0, 20)}.{r.randint(0, 99)}.{r.randint(0, 999)}"
    return "".join(r.choice(string.hexdigits) for _ in range(r.randint(6, 40)))


def _random_word(r: random.Random) -> str:
    k = r.random()
    if k < 0.45:
        w = r.choice(FILLER)
        return w.capitalize() if r.random() < 0.15 else w.upper() if r.random() < 0.03 else w
    if k < 0.58:
        return r.choice(NAMES)
    if k < 0.68:
        return r.choice(UNICODE)
    if k < 0.8:
        return _random_number(r)
    if k < 0.84:
        host = ".".join(r.choice(["api", "www", "docs", "example", "x-1", "a"])
                        for _ in range(r.randint(1, 3)))
        path = "/".join(r.choice(["v1", "users", "123", "a_b", "%20", "index.html", "q"])
                        for _ in range(r.randint(0, 4)))
        query = r.choice(["", "?a=1&b=2", "?q=John+Smith", "#frag", "?id=4111111111111111"])
        return f"{r.choice(['http', 'https', 'ftp'])}://{host}.{r.choice(SUFFIXES)}/{path}{query}"
    if k < 0.88:
        return (r.choice(["john", "maria.garcia", "a_b", "x+tag", "J.Doe", "üser"]) + "@"
                + r.choice(["example", "mail", "corp-1", "b"]) + "." + r.choice(SUFFIXES))
    if k < 0.95:
        return r.choice(".,;:!?()[]{}<>\"'`~@#$%^&*-_=+|\\/") * r.randint(1, 3)
    return "".join(r.choice(string.ascii_letters + string.digits + "-_.'")
                   for _ in range(r.randint(1, 14)))


def random_texts(n: int, seed: int = 11) -> list[str]:
    """Texts of 1-60 random words of every kind above (prose, names, other scripts, numbers,
    URLs, e-mails, punctuation runs, ids) and separators (spaces, tabs, newlines)."""
    r = random.Random(seed)
    return ["".join(_random_word(r) + r.choice([" ", " ", " ", "", "\n", ", ", ". ", "  ", "\t",
                                                  "\n\n", "-"])
                    for _ in range(r.randint(1, 60))) for _ in range(n)]
