"""Model names: the seed's canonical names and their aliases."""

from __future__ import annotations

RESNET50 = "resnet-50"
MOBILENET = "mobilenet"

_ALIASES = {
    RESNET50: RESNET50,
    "resnet50": RESNET50,
    MOBILENET: MOBILENET,
    "mobilenet_v2": MOBILENET,
    "mobilenetv2": MOBILENET,
}


def list_models() -> list[str]:
    """Canonical model names (the seed's ``_model_name_*`` values)."""
    return [RESNET50, MOBILENET]


def canonical_name(name: str) -> str:
    """Map a name or alias (case-insensitive) to its canonical form.

    Raises:
        ValueError: unknown name; the message lists the valid names and aliases.
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown model name {name!r}; valid names: {', '.join(list_models())} "
            f"(aliases: {', '.join(sorted(set(_ALIASES) - set(list_models())))})"
        )
    return _ALIASES[key]
