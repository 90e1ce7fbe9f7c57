"""The shell detector measured on two corpora (issue 16): every payload refused, every
line of ordinary text passed. The figures are printed (`pytest -s`) and asserted."""

from __future__ import annotations

from pathlib import Path

from apishield.config import Injection
from apishield.steps.injection import Detector

CORPUS = Path(__file__).parent / "data" / "injection"


def lines(name: str) -> list[str]:
    text = (CORPUS / name).read_text(encoding="utf-8")
    out: list[str] = []
    for line in text.split("\n"):
        if line.startswith("#") or not line.strip():
            continue
        out.append(line)
    return out


def test_every_shell_payload_is_refused() -> None:
    detector = Detector(Injection())
    payloads = lines("shell_payloads.txt")
    missed = [p for p in payloads if detector.check(p) is None]
    print(f"shell payloads: {len(payloads) - len(missed)}/{len(payloads)} refused")
    assert len(payloads) >= 80
    assert missed == []


def test_ordinary_text_passes() -> None:
    detector = Detector(Injection())
    texts = lines("ordinary_text.txt")
    refused = [(t, detector.check(t)) for t in texts if detector.check(t) is not None]
    print(f"ordinary text: {len(texts) - len(refused)}/{len(texts)} passed")
    assert len(texts) >= 80
    assert refused == []


def test_the_three_that_went_through_before() -> None:
    detector = Detector(Injection(sql=False, xss=False))
    for payload in (";e''cho hi", ";/bin/echo hi", ";printf hi"):
        assert detector.check(payload) == "shell-injection", payload
