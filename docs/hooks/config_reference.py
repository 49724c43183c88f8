"""MkDocs hook: the configuration reference, generated from the config dataclasses at build
time so it cannot disagree with the code.

It walks the core `raysim.config.Config` recursively (`dataclasses.fields`), then the `Config`
dataclass of every registered plug-in that has one (methods, datasets, partitioners, models,
sinks, found through `raysim.registry`). Each key gets its type, its default and its comment:
the trailing `# comment` on the field's line, else the comment block just above the field.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from typing import Any

import yaml

PAGE = "reference/configuration.md"
SEARCH_SPACES = "<!-- search-spaces -->"
PLUGIN_GROUPS = "<!-- plugin-groups -->"

log = logging.getLogger("mkdocs.hooks.config_reference")

# Headings of the plug-in kinds (`raysim.registry.REGISTRIES` keys) in the reference.
HEADINGS = {"algorithm": "Methods", "dataset": "Datasets", "partition kind": "Partitioners",
            "model": "Models", "sink": "Sinks"}


@dataclasses.dataclass(frozen=True)
class Key:
    """One documented config key."""

    dotted: str
    type: str
    default: str
    comment: str


@dataclasses.dataclass(frozen=True)
class Section:
    """The keys of one dataclass, under a heading."""

    title: str
    intro: str
    keys: tuple[Key, ...]


# --------------------------------------------------------------------------- walking


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a plug-in's own keys go: beside the core keys of section `prefix`, whose key `by`
    names the plug-in of `kind`."""

    kind: str
    prefix: str
    by: str


def core_sections(slots: list[Slot] | None = None) -> list[Section]:
    """Every key of the core `Config`, one section per dataclass, parents first; the sections
    that take a plug-in's keys are appended to `slots`."""
    from raysim.config import Config

    return list(_walk(Config, None, "", slots if slots is not None else []))


def plugin_sections() -> list[tuple[str, list[Section]]]:
    """Per plug-in kind, a section for each registered plug-in with keys of its own."""
    from raysim import registry

    slots: list[Slot] = []
    core_sections(slots)
    groups = []
    for slot in slots:
        plugins = registry.REGISTRIES[slot.kind]
        sections = []
        for name in plugins.names():
            obj = plugins[name]
            config_class = getattr(obj, "Config", None)
            if not dataclasses.is_dataclass(config_class):
                continue
            keys = tuple(key for section in _walk(config_class, None, slot.prefix, [])
                         for key in section.keys)
            selector = f"{slot.prefix}.{slot.by}" if slot.prefix else slot.by
            parts = [f"`{selector}: {name}`."]
            if slot.kind == "algorithm":  # one module per method: its docstring names the paper
                parts.append(_summary(obj))
            parts.append(_docstring(config_class))
            if slot.kind == "algorithm":
                parts.append(_search_space(_space_of(obj)))
            if keys or slot.kind == "algorithm":
                sections.append(Section(f"`{name}`", " ".join(p for p in parts if p), keys))
        groups.append((HEADINGS.get(slot.kind, f"{slot.kind.capitalize()}s"), sections))
    return groups


def _plugin_kind(field: dataclasses.Field) -> str | None:
    """The plug-in kind whose `Config` instance this field holds (`raysim.config.plugin_params`
    marks it in the field's metadata), else None."""
    from raysim import registry

    for value in field.metadata.values():
        if isinstance(value, tuple) and len(value) == 2 and value[0] in registry.REGISTRIES:
            return value
    return None


def _walk(cls: type, instance: Any, prefix: str, slots: list[Slot]) -> Iterator[Section]:
    """`cls`'s own keys as one section, then each nested dataclass field's, depth first.
    Defaults come from `instance` (the parent's default for this section) where there is one,
    so a nested default that differs from the class's own (e.g. the server's CPUs) shows."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    keys, nested = [], []
    for field in dataclasses.fields(cls):
        plugin = _plugin_kind(field)
        if plugin is not None:  # the named plug-in's own keys: listed with the plug-in
            slots.append(Slot(plugin[0], prefix, plugin[1]))
            continue
        hint = hints[field.name]
        if hint is Any:
            continue
        dotted = f"{prefix}.{field.name}" if prefix else field.name
        value = getattr(instance, field.name) if instance is not None else _default(field)
        item = _sequence_item(hint)
        if dataclasses.is_dataclass(hint):
            nested.append((hint, value, dotted))
            continue
        if item is not None:  # a list of mappings, each with the keys of `item`
            nested.append((item, None, f"{dotted}[]"))
        keys.append(Key(dotted, format_type(hint), format_default(value),
                        comments.get(field.name, "")))
    title = f"`{prefix}`" if prefix else "Top level"
    yield Section(title, _docstring(cls), tuple(keys))
    for child, value, dotted in nested:
        yield from _walk(child, value, dotted, slots)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _sequence_item(hint: Any) -> type | None:
    """The dataclass of a `list[Item]` or `tuple[Item, ...]` field, else None."""
    if typing.get_origin(hint) in (list, tuple):
        item = (typing.get_args(hint) or (None,))[0]
        if dataclasses.is_dataclass(item):
            return item
    return None


# --------------------------------------------------------------------------- comments


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of `cls` and its dataclass bases: the trailing
    `# comment` on the field's line, else the comment lines directly above it."""
    found: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base is object or not dataclasses.is_dataclass(base):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(base))
        except (OSError, TypeError):  # no source (a class built at run time)
            continue
        found.update(_comments_in(source, {f.name for f in dataclasses.fields(base)}))
    return found


def _comments_in(source: str, names: set[str]) -> dict[str, str]:
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    body_indent = None
    above: list[str] = []
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.type == tokenize.INDENT and body_indent is None:
            body_indent = token.end[1]
        if token.type == tokenize.COMMENT and token.line[: token.start[1]].strip() == "":
            above.append(token.string.lstrip("#").strip())
        elif (token.type == tokenize.NAME and token.start[1] == body_indent
              and token.string in names and i + 1 < len(tokens)
              and tokens[i + 1].string == ":"):
            trailing, j = "", i
            while j < len(tokens) and tokens[j].type != tokenize.NEWLINE:
                if tokens[j].type == tokenize.COMMENT and not trailing:
                    trailing = tokens[j].string.lstrip("#").strip()
                j += 1
            out.setdefault(token.string, trailing or " ".join(above))
            above = []
            i = j
        elif token.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
                                tokenize.DEDENT):
            above = []
        i += 1
    return out


def _docstring(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses write when there is none
        return ""
    return " ".join(inspect.cleandoc(doc).split())


def _summary(obj: Any) -> str:
    """The first paragraph of the plug-in's module docstring (a method's paper)."""
    module = inspect.getmodule(obj)
    doc = inspect.cleandoc(getattr(module, "__doc__", None) or "")
    return " ".join(doc.split("\n\n")[0].split())


def _space_of(method: type) -> dict[str, dict[str, list]]:
    """What `raysim compare` tunes for `method` (its declared `search_space`)."""
    from raysim.algorithm import search_space_of

    return search_space_of(method)


def _domains(space: dict[str, dict[str, list]]) -> list[str]:
    return [f"`{key}` {kind} {values}" for key, domain in space.items()
            for kind, values in domain.items()]


def _search_space(space: dict[str, dict[str, list]] | None) -> str:
    if not space:
        return ""
    return " Tuned by `raysim compare`: " + ", ".join(_domains(space)) + "."


def search_space_table() -> str:
    """Each registered method's declared search space (what `raysim compare` tunes)."""
    from raysim import registry

    lines = ["| method | searched |", "|---|---|"]
    for name in registry.algorithm_names():
        space = _space_of(registry.algorithm_class(name))
        lines.append(f"| `{name}` | {', '.join(_domains(space)) or '—'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- formatting


def format_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(option) for option in typing.get_args(hint))
    if origin is tuple and typing.get_args(hint)[-1:] == (Ellipsis,):  # written as a YAML list
        return f"list[{format_type(typing.get_args(hint)[0])}]"
    if origin is not None:
        inner = ", ".join(format_type(arg) for arg in typing.get_args(hint))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def format_default(value: Any) -> str:
    """The default as it would be written in YAML."""
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(section: Section) -> list[str]:
    if not section.keys:
        return ["No keys of its own."]
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key in section.keys:
        lines.append(f"| `{key.dotted}` | `{_cell(key.type)}` | `{_cell(key.default)}` | "
                     f"{_cell(key.comment)} |")
    return lines


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses when this site is built: every key, its type,",
        "its default and the comment it has in the code. How to write a config, overrides and",
        "errors: [Configuration](../configuration.md).",
        "",
        "## Core keys",
        "",
        "A section whose key names a plug-in (`algorithm.name`, `data.dataset`,",
        "`data.partition.kind`, `model.name`, each of `logging.sinks`) also takes that plug-in's",
        "own keys, beside its core ones; they are listed below the core keys.",
    ]
    for section in core_sections():
        lines += ["", f"### {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        lines += _table(section)
    for heading, sections in plugin_sections():
        if not sections:  # no plug-in of this kind has keys of its own
            continue
        lines += ["", f"## {heading}"]
        for section in sections:
            lines += ["", f"### {section.title}", ""]
            if section.intro:
                lines += [section.intro, ""]
            lines += _table(section)
    return "\n".join(lines) + "\n"


def plugin_group_table() -> str:
    """Each entry-point group: what it registers, what each plug-in must have (the registry's
    contract), and the names registered in this environment."""
    from raysim import registry

    lines = ["| group | registers | each must have | registered here |", "|---|---|---|---|"]
    for kind, plugins in registry.REGISTRIES.items():
        contract = ", ".join(f"`{attribute}`" for attribute in plugins.contract)
        names = ", ".join(f"`{name}`" for name in plugins.names())
        lines.append(f"| `{plugins.group}` | {kind} | {contract} | {names} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- MkDocs events


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    log.debug("generated %s", PAGE)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SEARCH_SPACES in markdown:
        markdown = markdown.replace(SEARCH_SPACES, search_space_table())
    if PLUGIN_GROUPS in markdown:
        markdown = markdown.replace(PLUGIN_GROUPS, plugin_group_table())
    return markdown
