"""The plugin author guide documents every hook with its exact signature."""

from __future__ import annotations

import inspect
from pathlib import Path

from studyvault import hookspecs

DOCS = Path(__file__).parent.parent / "docs"


def hook_signatures() -> dict[str, str]:
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("studyvault_"):
            sig = str(inspect.signature(fn)).replace("'", "")
            out[name] = f"def {name}{sig}"
    return out


def test_every_hook_is_documented_with_its_exact_signature():
    text = (DOCS / "plugins.md").read_text()
    signatures = hook_signatures()
    assert len(signatures) >= 8
    for signature in signatures.values():
        assert signature in text, f"docs/plugins.md lacks `{signature}`"


def test_the_docs_name_no_hook_that_does_not_exist():
    import re

    text = (DOCS / "plugins.md").read_text()
    named = set(re.findall(r"def (studyvault_\w+)", text))
    assert named == set(hook_signatures())
