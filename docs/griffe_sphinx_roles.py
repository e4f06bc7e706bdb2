"""Griffe extension of the docs build: Sphinx cross-reference roles in numpydoc docstrings.

The docstrings refer to objects with roles such as ``:func:`deformops.deform_conv2d``` or
``:class:`~torch.nn.Conv2d```, which mkdocstrings does not interpret. This extension turns
each role into an optional cross-reference before the docstring is parsed: a link where the
target is documented on this site, inline code otherwise (so it never fails the build). As
in Sphinx, a name without a dot refers to the docstring's own module, and a leading ``~``
shows only the last component of the target.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|obj|exc|const):`(~?)([\w.]+)`")


def rewrite_roles(text: str, module: str) -> str:
    """Replace every Sphinx role of ``text``, a docstring of ``module``, by a cross-reference."""

    def cross_reference(match: re.Match[str]) -> str:
        short, target = match.groups()
        identifier = target if "." in target else f"{module}.{target}"
        title = target.rsplit(".", 1)[-1] if short else target
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return _ROLE.sub(cross_reference, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of each object's docstring when the object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_roles(obj.docstring.value, obj.module.path)
