"""HandsOnVLM's released language assets: RBHP reasoning questions and narration paraphrases.

* ``ek100_questions.json`` / ``ek100_questions_val.json``: last observed frame path
  (``P01/rgb_frames/P01_11/frame_0000002889.jpg``) -> one string with 1-3 double-quoted
  questions separated by ``"  \\n"``.
* ``rephrase_ek100.json``: narration -> ``[paraphrase]``, or a string naming another key (alias).

Deviations from the release (docs/DATA.md): an entry without quotes is kept as one question
instead of being dropped, and aliases resolve to the paraphrase list instead of a nested list.
"""

from __future__ import annotations

import json
import re

from preprocessing import storage
from preprocessing.quarantine import Quarantine

QUESTION_FILES = {"train": "ek100_questions.json", "validation": "ek100_questions_val.json"}
PARAPHRASE_FILE = "rephrase_ek100.json"
_QUOTED = re.compile(r'"([^"]*)"')
_UNREADABLE = object()  # what _load_json returns for a file it quarantined (JSON's null is None)


def parse_question_string(text: str) -> list[str]:
    """The questions in one RBHP entry (quoted pieces; the whole text if it holds no quotes)."""
    quoted = [q.strip() for q in _QUOTED.findall(text)]
    questions = [q for q in quoted if q]
    if not questions and '"' not in text and text.strip():
        questions = [text.strip()]
    return questions


def _load_json(uri: str, quarantine: Quarantine, split: str | None):
    try:
        return json.loads(storage.read_bytes(uri).decode("utf-8"))
    except Exception as exc:
        quarantine.add(uri, "malformed_question", f"cannot parse JSON: {type(exc).__name__}: {exc}",
                       split=split, source=uri)
        return _UNREADABLE


def _load_json_object(uri: str, quarantine: Quarantine, split: str | None) -> dict | None:
    """The JSON object in ``uri``; None when the file is unreadable or holds another JSON value
    (either way it is quarantined as one row)."""
    raw = _load_json(uri, quarantine, split)
    if raw is _UNREADABLE:
        return None
    if not isinstance(raw, dict):
        quarantine.add(uri, "malformed_question", f"expected a JSON object, got {type(raw).__name__}",
                       split=split, source=uri)
        return None
    return raw


def load_questions(uri: str, quarantine: Quarantine, split: str | None = None) -> dict[str, list[str]]:
    """Frame path -> questions. Entries that are not strings or hold no question are quarantined."""
    raw = _load_json_object(uri, quarantine, split)
    if raw is None:
        return {}
    questions = {}
    for key, value in raw.items():
        parsed = parse_question_string(value) if isinstance(value, str) else []
        if not parsed:
            quarantine.add(key, "malformed_question", f"entry is not a usable question string: {value!r:.200}",
                           split=split, source=uri)
            continue
        questions[key] = parsed
    return questions


def load_paraphrases(uri: str, quarantine: Quarantine) -> dict[str, list[str]]:
    """Narration -> paraphrases, with alias entries resolved to their target's list."""
    raw = _load_json_object(uri, quarantine, None)
    if raw is None:
        return {}
    out = {}
    for key, value in raw.items():
        target = value
        for _ in range(len(raw)):  # follow alias chains, guarding against cycles
            if not isinstance(target, str):
                break
            target = raw.get(target)
        if isinstance(target, list) and all(isinstance(v, str) for v in target) and target:
            out[key] = [v.strip() for v in target]
        else:
            quarantine.add(key, "malformed_question", f"paraphrase entry is not a list of strings: {value!r:.200}",
                           source=uri)
    return out
