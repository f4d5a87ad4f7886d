"""docs/trust.md shows the key's exclusion list exactly as the code keeps it."""

from __future__ import annotations

from hack import render_key_docs

from stepcache import keys


def test_docs_trust_md_shows_the_exclusion_list_the_code_keeps() -> None:
    text = render_key_docs.TRUST.read_text()
    assert render_key_docs.rendered(text) == text, "run `python -m hack.render_key_docs` and review the diff"


def test_every_exclusion_is_a_row_with_its_condition_and_reason() -> None:
    rows = [line for line in keys.exclusions_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(keys.EXCLUSIONS)
    for row, exclusion in zip(rows, keys.EXCLUSIONS, strict=True):
        assert row.startswith(f"| `{exclusion.path}` | {keys.CONDITIONS[exclusion.when]} | ")
        assert row.endswith(f" | {exclusion.reason} |")
