"""Copy bench/results/NAME.md into the README between <!-- bench:NAME --> markers.

    python bench/update_readme.py convert
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def update(name: str) -> None:
    readme = ROOT / "README.md"
    table = (ROOT / "bench" / "results" / f"{name}.md").read_text().strip()
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- bench:{name} --> section")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        update(arg)
