"""HTML built from nodes, escaped by construction.

Text and attribute values are always escaped when rendered; the only way to put markup in a
page is `Markup`, which this module's builders produce and nothing else should. Attribute names
are fixed by the code (never data), and URLs in `href` are built by `url()` from a fixed path
and encoded query values, so a trace's content can never become a tag, an attribute or a
`javascript:` link.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlencode

import orjson


class Markup(str):
    """Text that is already HTML (built by `el`); rendered as is."""

    __slots__ = ()


Child = "Markup | str | int | float | None | Iterable[Markup | str | None]"

_VOID = frozenset({"br", "hr", "img", "input", "link", "meta"})


def escape(value: object) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _children(children: Iterable[object]) -> str:
    out: list[str] = []
    for child in children:
        if child is None or child is False:
            continue
        if isinstance(child, str | int | float):
            out.append(escape(child))
        else:
            out.append(_children(child))  # type: ignore[arg-type]
    return "".join(out)


def el(tag: str, attrs: Mapping[str, object] | None = None, *children: object) -> Markup:
    """`<tag attrs>children</tag>`; attribute values and text children are escaped.

    An attribute whose value is None or False is left out; True renders the bare name.
    """
    parts = [tag]
    for name, value in (attrs or {}).items():
        if value is None or value is False:
            continue
        name = name.rstrip("_").replace("_", "-")  # class_ -> class, data_x -> data-x
        parts.append(name if value is True else f'{name}="{escape(value)}"')
    opening = "<" + " ".join(parts) + ">"
    if tag in _VOID:
        return Markup(opening)
    return Markup(f"{opening}{_children(children)}</{tag}>")


def url(path: str, query: Mapping[str, object] | None = None) -> str:
    """A same-site URL: `path` (segments percent-encoded) plus the non-empty query values."""
    encoded = quote(path, safe="/")
    values = {k: str(v) for k, v in (query or {}).items() if v not in (None, "")}
    return encoded + ("?" + urlencode(values) if values else "")


def json_script(element_id: str, data: object) -> Markup:
    """Data for the page's script, as JSON in a non-executed script element.

    `<`, `>` and `&` are escaped as JSON unicode escapes, so no text inside can close the
    element or open a comment; the browser never runs it (type application/json).
    """
    text = orjson.dumps(data).decode()
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(f'<script type="application/json" id="{escape(element_id)}">{text}</script>')
