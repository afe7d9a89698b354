"""Imports sit at the top of modules: one inside a function or method must say why on its line
(or in a comment line right above it): an optional dependency (which package, which extra),
an import cycle or layer rule it avoids, or a measured import cost."""
import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "harmonizer_fast"

#: Tool pragmas: a comment made of these alone gives no reason.
_PRAGMAS = re.compile(r"noqa(?::\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?|type:\s*ignore(?:\[[^\]]*\])?|pragma:\s*no\s*cover",
                      re.IGNORECASE)


def _comments_by_line(source: str) -> Dict[int, str]:
    """Line number -> the text of the comment on that line (tokenized: a '#' inside a string is no comment)."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def _gives_a_reason(comment: str) -> bool:
    """Whether a comment says something beyond tool pragmas (at least one word of three letters)."""
    return bool(re.search(r"[A-Za-z]{3,}", _PRAGMAS.sub(" ", comment)))


def unexplained_function_imports(source: str) -> List[Tuple[int, str]]:
    """(line, statement) of every import inside a function or method without a reason comment."""
    tree = ast.parse(source)
    lines = source.splitlines()
    comments = _comments_by_line(source)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                line = child.lineno
                above = lines[line - 2].strip() if line >= 2 else ""
                reasons = [comments.get(line, "")]
                if above.startswith("#"):
                    reasons.append(comments.get(line - 1, ""))
                if not any(_gives_a_reason(text) for text in reasons):
                    found.append((line, lines[line - 1].strip()))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def test_every_function_level_import_of_the_package_says_why():
    offenders = {
        f"{path.relative_to(PACKAGE.parent)}:{line}": statement
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, statement in unexplained_function_imports(path.read_text())
    }
    assert not offenders, (
        "imports inside functions without a reason comment (move them to the top of the module, or say which "
        f"optional dependency / cycle / measured import cost keeps them there): {offenders}"
    )


PLANTED = '''
import os
try:
    import simplejpeg
except ImportError:
    simplejpeg = None


def bare():
    import json
    return json


def pragma_only():
    import json  # noqa: F401


def hash_in_a_string():
    import json; s = "# lazy: not a comment"


async def coroutine():
    from pathlib import Path


class Holder:
    import math  # a class body is not a function: allowed

    def method(self):
        def inner():
            import re
        return inner


def explained():
    import xarray  # optional: the `xarray` extra
    # lazy: matplotlib costs 0.4 s at start-up, measured
    import matplotlib
    from timm import (  # lazy: timm costs 1.1 s, measured
        create_model,
    )
'''


def test_the_check_catches_planted_imports_and_accepts_explained_ones():
    flagged = unexplained_function_imports(PLANTED)
    assert [statement.split(";")[0] for _, statement in flagged] == [
        "import json", "import json  # noqa: F401", "import json", "from pathlib import Path", "import re",
    ]


@pytest.mark.parametrize("comment, reason", [
    ("noqa: F401", False), ("noqa", False), ("type: ignore[attr-defined]", False), ("pragma: no cover", False),
    ("noqa: F401  (optional: the xarray extra)", True), ("lazy: timm costs 1.1 s, measured", True),
])
def test_pragmas_alone_give_no_reason(comment, reason):
    assert _gives_a_reason(comment) is reason
