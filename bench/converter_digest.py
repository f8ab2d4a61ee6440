"""What decides a conversion, as a digest: benches reuse a cached conversion while it is unchanged."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def converter_digest() -> str:
    """The converter's code, without its comments and docstrings (an edited comment should not
    cost a reconversion of every operating point)."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "converter").glob("*.py"), REPO / "src" / "carvq" / "format.py", REPO / "src" / "carvq" / "reference.py"]):
        digest.update(_code_only(path.read_text(encoding="utf-8")).encode())
    return digest.hexdigest()[:16]


def _code_only(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)
