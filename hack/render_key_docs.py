"""Write `keys.EXCLUSIONS` into docs/trust.md, between its `exclusions` markers: `python -m hack.render_key_docs`.

tests/unit/test_key_docs.py fails while the two differ.
"""

from __future__ import annotations

import pathlib
import re

from stepcache import keys

TRUST = pathlib.Path(__file__).resolve().parent.parent / "docs" / "trust.md"
BLOCK = re.compile(r"(<!-- exclusions:begin -->\n).*?(<!-- exclusions:end -->)", re.S)


def rendered(text: str) -> str:
    """`text` with the table between the markers replaced by the code's."""
    if not BLOCK.search(text):
        raise ValueError("docs/trust.md has no exclusions markers")
    return BLOCK.sub(lambda m: m.group(1) + keys.exclusions_markdown() + m.group(2), text)


def main() -> None:
    TRUST.write_text(rendered(TRUST.read_text()))


if __name__ == "__main__":
    main()
