"""ClientTokens survive a crashed pass and never repeat for a new decision."""

import json
import stat
from datetime import datetime, timedelta, timezone

from disposabledisco.tokens import TokenBook

NOW = datetime(2026, 11, 21, 12, 59, 59, tzinfo=timezone.utc)


def test_same_decision_gets_the_same_token_across_processes(tmp_path):
    first = TokenBook(tmp_path).token_for("k" * 40, NOW)
    again = TokenBook(tmp_path).token_for("k" * 40, NOW + timedelta(seconds=2))  # next hour
    assert first == again and len(first) <= 64
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600


def test_other_decisions_and_old_ones_get_fresh_tokens(tmp_path):
    book = TokenBook(tmp_path)
    one = book.token_for("a" * 40, NOW)
    assert book.token_for("b" * 40, NOW) != one
    assert book.token_for("a" * 40, NOW + timedelta(hours=2)) != one
    assert set(json.loads((tmp_path / "tokens.json").read_text())) == {"a" * 40}  # b expired


def test_a_damaged_book_is_started_afresh(tmp_path):
    (tmp_path / "tokens.json").write_text("{not json")
    assert TokenBook(tmp_path).token_for("c" * 40, NOW).startswith("dd-cccc")
