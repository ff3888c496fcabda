"""The report's HTML: one self-contained file (figures embedded as PNG data URIs, no script, no
network), readable offline and attachable to a message."""
from __future__ import annotations

import base64
import html

STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1300px;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%}.note{color:#666}code{background:#f3f3f3;padding:0 .2em}"""


def image_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table(head: list[str] | None, rows: list[list]) -> str:
    cells = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{cells}{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def render(title: str, summary: list[tuple[str, str]], sections: list[tuple[str, str]]) -> str:
    """`summary`: (name, value) rows at the top; `sections`: (heading, HTML body)."""
    parts = [f"<h1>{html.escape(title)}</h1>", table(None, [list(r) for r in summary])]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
