"""MkDocs hook: the architecture page's layers and module table, read at build time from
`pyproject.toml` (the import-linter contracts `make lint` enforces) and from each module's
docstring (parsed, never imported), so they follow every move.

A page asks for them with the lines `<!-- layers -->` and `<!-- package-layout -->`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("raysim", "algorithms")
MARKER = "<!-- package-layout -->"
LAYERS = "<!-- layers -->"


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s+[A-Z`(]|$)", paragraph)  # up to the first full stop
    return (match.group(1) if match else paragraph).rstrip(":")


def _module_path(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def layers(root: Path = ROOT) -> str:
    """The import-linter contracts of `pyproject.toml` as text: the layers top to bottom, each
    module with the first sentence of its docstring, then the forbidden imports."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return "The layers are the import-linter contracts in `pyproject.toml`."
    settings = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = settings.get("tool", {}).get("importlinter", {}).get("contracts", [])
    lines = []
    for contract in contracts:
        if contract.get("type") == "layers":
            lines += [f"{contract['name']}, top to bottom (each imports only from those below "
                      "it):", "", "| layer | what it holds |", "|---|---|"]
            for layer in contract["layers"]:
                names = [n.strip() for n in layer.split("|")]
                paths = [_module_path(n, root) for n in names]
                summaries = " ".join(first_sentence(p) for p in paths if p is not None)
                shown = ", ".join(f"`{n}`" for n in names)
                lines.append(f"| {shown} | {summaries.replace('|', '/')} |")
            lines.append("")
        elif contract.get("type") == "forbidden":
            sources = ", ".join(f"`{m}`" for m in contract["source_modules"])
            forbidden = ", ".join(f"`{m}`" for m in contract["forbidden_modules"])
            name = contract["name"]
            lines += [f"{name[:1].upper()}{name[1:]}: {sources} never import {forbidden}.", ""]
    return "\n".join(lines).strip() or "(no import contracts declared in pyproject.toml)"


def modules(root: Path = ROOT) -> list[tuple[str, str]]:
    """(path, first sentence of its docstring) for every package and module, packages first
    within their parent; `__main__` and modules without a docstring are left out."""
    rows = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py"),
                           key=lambda p: (p.parent.relative_to(root).parts,
                                          p.name != "__init__.py", p.name)):
            if "__pycache__" in path.parts or path.name == "__main__.py":
                continue
            summary = first_sentence(path)
            if not summary:
                continue
            shown = path.parent if path.name == "__init__.py" else path
            label = f"{shown.relative_to(root).as_posix()}{'/' if shown.is_dir() else ''}"
            rows.append((label, summary))
    return rows


def table(root: Path = ROOT) -> str:
    lines = ["| module | what it holds |", "|---|---|"]
    for label, summary in modules(root):
        strong = "**" if label.endswith("/") else ""
        escaped = summary.replace("|", "\\|")
        lines.append(f"| {strong}`{label}`{strong} | {escaped} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if LAYERS in markdown:
        markdown = markdown.replace(LAYERS, layers())
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, table())
    return markdown
