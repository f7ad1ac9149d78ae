"""Text sources: the built-in corpus (Python's own documentation) and a user's files.

The built-in corpus needs no download: it joins the reference manual's topics shipped in
`pydoc_data` with the docstrings of the standard library, read with `ast` from the running
interpreter's stdlib folder. Building it takes seconds, so the result is cached on disk.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from plait.errors import DataError

log = logging.getLogger(__name__)

SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "dist-packages"}


def default_cache_dir() -> Path:
    """`$PLAIT_CACHE`, else `$XDG_CACHE_HOME/plait`, else `~/.cache/plait`."""
    if os.environ.get("PLAIT_CACHE"):
        return Path(os.environ["PLAIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "plait"


def stdlib_docstrings(stdlib_dir: str | Path) -> list[str]:
    """Module, class and function docstrings of every .py file under `stdlib_dir`, sorted by path."""
    root = Path(stdlib_dir)
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc.strip())
    return texts


def pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[k].strip() for k in sorted(topics)]


def build_builtin_corpus(stdlib_dir: str | Path | None = None) -> str:
    """The reference manual's topics followed by the stdlib's docstrings, one blank line apart."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    parts = pydoc_topics() + stdlib_docstrings(stdlib_dir)
    return "\n\n".join(parts) + "\n"


def builtin_corpus(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached built-in corpus, building it first if needed (atomic, race-safe)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(f"{sys.version}|{stdlib}".encode()).hexdigest()[:12]
    path = cache / f"pydocs-{sys.version_info.major}.{sys.version_info.minor}-{key}.txt"
    if path.is_file() and path.stat().st_size > 0:
        return path
    log.info("building the built-in corpus from %s (once; cached at %s)", stdlib, path)
    text = build_builtin_corpus(stdlib)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".corpus-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # concurrent builders each write whole files; the last rename wins
    return path


def text_files(path: str | Path) -> list[Path]:
    """The file itself, or every `.txt` file under a folder (sorted, so the order is fixed)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path {str(p)!r} does not exist; give a text file or a folder of .txt files")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*.txt") if f.is_file())
    if not files:
        raise DataError(f"data.path {str(p)!r} is a folder with no .txt files; add some or point at a file")
    return files


def load_text(path: str | Path | None, cache_dir: str | Path | None = None) -> str:
    """Text of the user's file/folder, or of the built-in corpus when `path` is empty."""
    if not path:
        return builtin_corpus(cache_dir).read_text(encoding="utf-8")
    chunks = []
    for f in text_files(path):
        try:
            chunks.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"data.path file {str(f)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = "\n\n".join(chunks)
    if not text.strip():
        raise DataError(f"data.path {str(path)!r} holds no text (all files are empty)")
    return text
