"""The files a sweep or comparison directory holds, read back by `raysim tune --resume` and
`raysim compare --resume/--report`. One that is damaged (cut short by a crash or a full disk,
edited by hand) is a one-line ConfigError naming the file and what to do, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from raysim.config import ConfigError, check_expanded_size

# Records are small (a path, a comparison's definition, one row per trial): anything larger
# is not one of them, and is refused before it is read into memory.
MAX_RECORD_BYTES = 64 * 2**20


def _text(path: Path, fix: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_RECORD_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes, more than a record of raysim's "
                              f"({MAX_RECORD_BYTES // 2**20} MiB at most); {fix}")
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it: {error.strerror}; {fix}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: damaged (not UTF-8 text); {fix}") from None


def _check_fields(path: Path, data: Any, fields: dict[str, Any], fix: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: damaged (expected a mapping, found "
                          f"{type(data).__name__}); {fix}")
    for key, kind in fields.items():
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{path}: damaged ({key!r} is "
                              f"{'missing' if key not in data else repr(value)[:60]}); {fix}")
    return data


def read_json(path: Path, fields: dict[str, Any], fix: str) -> dict:
    """The JSON object in `path`, with each of `fields` (name → type) present and of its
    type; `fix` says what to do when it is not (ends the error line)."""
    try:
        data = json.loads(_text(path, fix))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: damaged (not JSON: {error.msg}, line {error.lineno} column "
                          f"{error.colno}); "
                          f"{fix}") from None
    except RecursionError:
        raise ConfigError(f"{path}: damaged (nested too deeply); {fix}") from None
    return _check_fields(path, data, fields, fix)


def read_yaml_record(path: Path, fields: dict[str, Any], fix: str) -> dict:
    """`read_json` for a YAML file a run wrote (its `config.yaml`)."""
    try:
        data = yaml.safe_load(_text(path, fix))
    except yaml.YAMLError as error:
        problem = " ".join(str(getattr(error, "problem", None) or "syntax error").split())
        raise ConfigError(f"{path}: damaged (not YAML: {problem}); {fix}") from None
    except RecursionError:
        raise ConfigError(f"{path}: damaged (nested too deeply); {fix}") from None
    check_expanded_size(data, str(path))
    return _check_fields(path, data, fields, fix)


def read_table(path: Path, columns: tuple[str, ...], fix: str) -> Any:
    """The CSV table in `path` (a pandas DataFrame) with every one of `columns`."""
    import pandas as pd

    _text(path, fix)  # the size bound and readable text, before pandas parses it
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: damaged (not a CSV table: {first}); {fix}") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ConfigError(f"{path}: damaged (no column {', '.join(missing)}); {fix}")
    return table
