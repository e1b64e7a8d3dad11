"""Reading run-config files: yaml mappings and their one level of `includes`, each paired with the path it
came from (for error messages). Merging them onto the schema is `stages/config_loader.py`'s work."""
from __future__ import annotations

from pathlib import Path

import yaml

from linearize import UserError
from linearize.errors import one_line

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
INCLUDES_KEY = "includes"


def error(source: str, key: str, problem: str) -> UserError:
    """The one form of every config error: where the value was set, the dotted key, the problem."""
    return UserError(f"{source}: {key}: {problem}")


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: invalid yaml{where}: {one_line(getattr(exc, 'problem', exc))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def _find_include(name: str, including: Path) -> Path:
    """An include path is relative to the including file, else to the repository's configs/."""
    for base in (including.parent, CONFIGS_DIR):
        candidate = base / name
        if candidate.is_file():
            return candidate
    raise UserError(f"{including}: {INCLUDES_KEY}: file not found: {name} (looked in {including.parent} and {CONFIGS_DIR})")


def config_sources(path: Path) -> list[tuple[str, dict]]:
    """(source name, mapping) pairs in merge order: the includes of `path`, then `path` itself."""
    data = read_yaml(path)
    includes = data.pop(INCLUDES_KEY, None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise error(str(path), INCLUDES_KEY, "must be a list of yaml paths")
    sources = []
    for name in includes:
        included = _find_include(name, path)
        fragment = read_yaml(included)
        if INCLUDES_KEY in fragment:
            raise error(str(included), INCLUDES_KEY, f"only one level of includes is allowed (included from {path})")
        sources.append((str(included), fragment))
    sources.append((str(path), data))
    return sources
