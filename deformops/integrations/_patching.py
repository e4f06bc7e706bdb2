"""Attribute replacements that are applied together and undone exactly."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MISSING", "Patch"]

#: Stands for "no attribute": as a replacement it deletes, as an original it is deleted again.
MISSING = object()


class Patch:
    """A set of ``(owner, name, replacement)`` attribute changes.

    ``apply`` records each owner's own value (from ``vars(owner)``, so an inherited or
    absent attribute is restored as inherited or absent) and is idempotent; ``undo`` puts
    every original back, in reverse order.

    Examples
    --------
    >>> import types
    >>> owner = types.SimpleNamespace(f=len)
    >>> patch = Patch()
    >>> patch.apply([(owner, "f", abs), (owner, "g", MISSING)])
    >>> patch.apply([(owner, "f", min)])  # already applied: no change
    >>> owner.f is abs, patch.active
    (True, True)
    >>> patch.undo()
    >>> owner.f is len, patch.active
    (True, False)
    """

    def __init__(self) -> None:
        self._originals: list[tuple[object, str, object]] = []
        self.active = False
        """Whether the replacements are in place."""

    def apply(self, replacements: Iterable[tuple[object, str, object]]) -> None:
        """Replace each ``owner.name`` by its replacement, unless already applied."""
        if self.active:
            return
        for owner, name, replacement in list(replacements):
            self._originals.append((owner, name, vars(owner).get(name, MISSING)))
            _assign(owner, name, replacement)
        self.active = True

    def undo(self) -> None:
        """Restore every original; nothing happens when not applied."""
        while self._originals:
            owner, name, original = self._originals.pop()
            _assign(owner, name, original)
        self.active = False


def _assign(owner: object, name: str, value: object) -> None:
    if value is not MISSING:
        setattr(owner, name, value)
    elif name in vars(owner):
        delattr(owner, name)
