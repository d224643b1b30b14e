"""Names, places and SSNs known by where they stand, not by what they look like: the value of a
`"display_name"` or `city` key, a CSV or psql column headed `name` or `ssn`, the name after
`Hi`/`Dear` or under a sign-off, after `Author:` or `From:` in a header. NER misses many of
them (a lone first name, a foreign name, a place it calls a person); the field says what they are.

No name lists: a value counts when its field says so and it has the shape (capitalised words, no
digits or `@`; for SSNs, nine valid digits).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

PERSON_FIELDS = {"name", "full_name", "fullname", "display_name", "displayname", "first_name",
                 "firstname", "last_name", "lastname", "given_name", "family_name", "surname",
                 "customer", "customer_name", "author", "owner", "holder", "account_holder",
                 "employee", "employee_name", "contact", "contact_name", "assignee", "reporter",
                 "patient", "recipient", "sender", "from", "to", "cc", "signed_by", "nom",
                 "prénom", "nome", "nombre"}
LOCATION_FIELDS = {"city", "town", "country", "location", "office",  # not state, region: "RUNNING"
                   "birthplace", "place_of_birth", "ville", "pays", "stadt", "land", "cidade",
                   "ciudad", "país"}
SSN_FIELDS = {"ssn", "social_security_number", "social_security_no", "us_ssn"}
ENTITIES = ("PERSON", "LOCATION", "US_SSN")
FIELDS = {**{f: "PERSON" for f in PERSON_FIELDS}, **{f: "LOCATION" for f in LOCATION_FIELDS},
          **{f: "US_SSN" for f in SSN_FIELDS}}

_UPPER = "A-ZÀ-ÖØ-Þ"
_LOWER = "a-zß-öø-ÿ"
# capitalised, not all capitals (`"to": "EUR"`): Marie, O'Connor, McDonald, Hugues-la-Forêt, J.
_WORD = (rf"(?:[dl{_UPPER}]['’])?[{_UPPER}](?:[{_LOWER}]+(?:[{_UPPER}][{_LOWER}]+)?"
         rf"(?:['’.-][^\W\d_]+)*\.?|\.)")
_PARTICLE = r"(?:de|da|do|dos|das|del|della|di|du|van|von|der|den|le|la|y|e|and|of|the|sur|am|im)"
NAME = rf"{_WORD}(?:[ ](?:{_WORD}|{_PARTICLE}(?=[ ](?:[dl]['’])?[{_UPPER}]))){{0,5}}"
SSN = re.compile(r"(?!000|666|9)\d{3}([- ]?)(?!00)\d{2}\1(?!0000)\d{4}")
_KEY = "(?i:" + "|".join(re.escape(f).replace("_", "[ _-]?")
                        for f in sorted(FIELDS, key=len, reverse=True)) + ")"
# "key": "value"
JSON_FIELD = re.compile(rf'"(?P<key>{_KEY})"\s*:\s*"(?P<v>[^"\\]{{1,80}})"')
# key: value, key=value (a line, a log's pairs), up to the end of the line, `<`, `(`, `,`, `|`
PAIR = re.compile(rf"(?<![\w-])(?P<key>{_KEY})(?![\w-])[ \t]*[:=][ \t]*(?P<v>{NAME}|[\d -]{{9,11}})"
                  r"(?=[ \t]*(?:$|[<(),;|\n]))", re.M)
GREETING = re.compile(rf"(?:^|\n)[ \t]*(?:Hi|Hello|Hey|Dear|Bonjour|Hallo|Hola|Olá|Ciao|Salut|"
                      rf"Moin|Hej)[ \t]+(?P<v>{NAME})[ \t]*[,!:\n]")
SIGN_OFF = re.compile(rf"(?i:regards|best|thanks|thank you|cheers|sincerely|cordialement|grüße|"
                      rf"gruß|atenciosamente|saludos|cordiali saluti),?[ \t]*\n[ \t]*(?P<v>{NAME})"
                      r"[ \t]*(?=\n|$)")
TABLE_SEPARATORS = (",", "|", "\t", ";")
RULE_LINE = re.compile(r"^[\s|:+=-]*$")


def field_type(key: str) -> str | None:
    return FIELDS.get(re.sub(r"[\s-]+", "_", key.strip().lower()))


def _shaped(entity: str, value: str) -> bool:
    if entity == "US_SSN":
        return SSN.fullmatch(value) is not None
    return re.fullmatch(NAME, value) is not None


def _cells(line: str, sep: str) -> list[tuple[int, int]]:
    """The cells of a delimited line as (start, end), trimmed, quotes ("a, b") respected."""
    cells, start, quoted = [], 0, False
    for i, c in enumerate(line + sep):
        if c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            s, e = start, i
            while s < e and line[s] in ' "\t':
                s += 1
            while e > s and line[e - 1] in ' "\t\r':
                e -= 1
            cells.append((s, e))
            start = i + 1
    if sep == "|" and line.strip().startswith("|"):  # markdown: outer pipes
        cells = cells[1:-1] if len(cells) > 2 else cells
    return cells


class Tables:
    """Delimited tables read a line at a time: a header naming fields (CSV, psql, markdown), its
    rule lines, then rows with as many cells. Whole texts and streams share this state, so a
    stream knows the header of the table it is in the middle of (streaming.py)."""

    def __init__(self) -> None:
        self.header = ""  # the header line and its rule lines, while a table is open
        self.sep = ""
        self.columns: list[str | None] = []
        self.rows = 0  # rows read since the header (rule lines are skipped only before one)

    def line(self, line: str) -> list[tuple[int, int, str]]:
        """The field values among the cells of the next line, as (start, end, entity) in it."""
        if self.header:
            if not self.rows and RULE_LINE.match(line) and line.strip():
                self.header += "\n" + line  # psql's ----+---- and markdown's |---|
                return []
            cells = _cells(line, self.sep)
            if len(cells) == len(self.columns):
                self.rows += 1
                return [(s, e, entity) for (s, e), entity in zip(cells, self.columns, strict=True)
                        if entity and _shaped(entity, line[s:e])]
            self.header = ""  # the table ended: this line may start another
        for sep in TABLE_SEPARATORS:
            if line.count(sep) < 1:
                continue
            cells = _cells(line, sep)
            columns = [field_type(line[s:e]) for s, e in cells]
            if any(columns) and all(re.fullmatch(r"[\w .-]{1,30}", line[s:e]) for s, e in cells):
                self.header, self.sep, self.columns, self.rows = line, sep, columns, 0
                break
        return []


def _tables(text: str) -> Iterator[tuple[int, int, str]]:
    tables, base = Tables(), 0
    for line in text.split("\n"):
        for start, end, entity in tables.line(line):
            yield base + start, base + end, entity
        base += len(line) + 1


def find(text: str, entities: set[str]) -> Iterator[tuple[int, int, str]]:
    """(start, end, entity) of each field value of the wanted entities."""
    for pattern in (JSON_FIELD, PAIR):
        for m in pattern.finditer(text):
            entity = field_type(m.group("key"))
            if entity in entities and _shaped(entity, m.group("v").strip()):
                start = m.start("v")
                yield start, start + len(m.group("v").strip()), entity
    lines = "\n" in text  # a sign-off's name and a table's rows follow a line break
    if "PERSON" in entities:
        for pattern in (GREETING, SIGN_OFF) if lines else (GREETING,):
            for m in pattern.finditer(text):
                yield m.start("v"), m.end("v"), "PERSON"
    for start, end, entity in _tables(text) if lines else ():
        if entity in entities:
            yield start, end, entity
