"""Red team, stop 31: the `+971 4 123 4567` masking leaves in a Dubai contact line
(tests/test_masking_stream.py's texts) is not a detection gap. libphonenumber holds no Emirati
number starting `4 1` (`is_valid_number` is false: an unassigned range), and stock Presidio's
phone recogniser, which asks for valid numbers, leaves it too; the numbers of the UAE's assigned
ranges are masked in every international form. A number written the national way (`04 345
6789`) is read only in the regions `masking.phone_regions` names (the UAE is not a default)."""

from __future__ import annotations

import dataclasses

import phonenumbers
import pytest
from presidio_analyzer.predefined_recognizers import PhoneRecognizer

from douane.masking.engine import Analyzer
from tests.test_masking import SETTINGS

MASKED = ["+971 4 345 6789", "+971-4-345-6789", "00971 4 345 6789", "+971 50 123 4567",
          "+971501234567", "+971 2 234 5678", "(+971) 4 345 6789"]


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(SETTINGS)


def _phones(analyzer: Analyzer, text: str) -> list[str]:
    return [text[s.start:s.end] for s in analyzer.analyze(text) if s.entity == "PHONE_NUMBER"]


@pytest.mark.parametrize("number", MASKED)
def test_emirati_numbers_are_found_in_every_international_form(analyzer, number):
    text = f"Contact: Fatima Al-Sayed, fatima@example.ae, {number}; backup: Jonas Berg."
    assert any(number.strip("()+") in found or found in number for found in
               _phones(analyzer, text)), _phones(analyzer, text)


def test_the_number_left_is_no_number_for_libphonenumber_or_stock_presidio(analyzer):
    text = "Contact: Fatima Al-Sayed, fatima@example.ae, +971 4 123 4567; backup: Jonas Berg."
    assert not phonenumbers.is_valid_number(phonenumbers.parse("+971 4 123 4567"))
    assert PhoneRecognizer().analyze(text, ["PHONE_NUMBER"], None) == []
    assert _phones(analyzer, text) == []


def test_a_national_number_is_read_in_the_regions_configured():
    text = "Call Fatima on 04 345 6789 after lunch."
    assert _phones(Analyzer(SETTINGS), text) == []
    with_ae = Analyzer(dataclasses.replace(SETTINGS, phone_regions=(*SETTINGS.phone_regions, "AE")))
    assert _phones(with_ae, text) == ["04 345 6789"]
