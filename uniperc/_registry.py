"""The one decorator behind every name registry (stems, downsamples, blocks, mixers, checkpoint converters)."""
from __future__ import annotations


def register_into(table: dict, kind: str, name: str):
    """Decorator storing its object in ``table[name]``; re-registering a name to another object raises
    ``ValueError`` (two extensions claiming one name is a bug, not an override)."""

    def wrap(obj):
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} name {name!r} is already registered to {getattr(table[name], '__name__', table[name])}")
        table[name] = obj
        return obj

    return wrap
