"""What the loader tells a user about attention keys beyond errors: keys the chosen mechanism ignores (a
warning each), and the feature map a mechanism switched on the command line brings with it."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from linearize.config import RunConfig


def ignored_attention_keys(cfg: RunConfig, keys: Iterable[str]) -> list[str]:
    """One warning line for each dotted `attention.*` key in `keys` that cfg's mechanism does not read,
    naming the mechanisms that do (each mechanism declares its keys: `mechanism_config_keys`)."""
    from linearize.attention import mechanism_config_keys

    reads = mechanism_config_keys()
    mechanism = cfg.attention.mechanism
    warnings = []
    for dotted in keys:
        section, _, key = dotted.partition(".")
        if section != "attention" or key in reads[mechanism]:
            continue
        users = [name for name, used in reads.items() if key in used]
        warnings.append(f"{dotted} is ignored by attention.mechanism={mechanism}; it applies to: {', '.join(users)}")
    return warnings


def switched_feature_map(current_feature_map: str, overrides: Mapping) -> tuple[dict, str]:
    """When the command line switches attention.mechanism without naming a feature map, and the new
    mechanism takes only some maps, its default map replaces the one the files chose for another
    mechanism (e.g. demo's hedgehog under `attention.mechanism=liger`). Returns (the override to merge,
    the note to print), both empty when nothing changes."""
    attention = overrides.get("attention") or {}
    if "mechanism" not in attention or "feature_map" in attention:
        return {}, ""
    from linearize.attention import MECHANISMS

    entry = MECHANISMS.get(attention["mechanism"])
    default = getattr(entry.factory, "default_feature_map", None) if entry is not None else None
    if default is None or current_feature_map == default:
        return {}, ""
    note = (f"attention.feature_map={default}, {attention['mechanism']}'s default, replaces "
            f"{current_feature_map} (set attention.feature_map to choose another)")
    return {"attention": {"feature_map": default}}, note
