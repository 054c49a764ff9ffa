"""The report's markdown as one self-contained HTML page: rendered by markdown-it-py (CommonMark with tables),
figures embedded as base64 PNG data URIs (no external resources), the synthetic-data banner styled."""

from __future__ import annotations

import base64
import html

from markdown_it import MarkdownIt

SYNTHETIC_BANNER = "SYNTHETIC DATA — these numbers are not CIFAR-10"
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 3px; }
.banner { background: #c62828; color: white; font-size: 1.5em; font-weight: bold; padding: 0.6em 1em;
          border: 4px solid #7f0000; text-align: center; margin: 1em 0; }
"""


def to_html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """The markdown as one HTML page; ![name](file.png) becomes the PNG `images[file.png]` inlined."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        src, alt = token.attrGet("src") or "", html.escape(token.content or "")
        data = images.get(src)
        if data is None:
            return f"[figure {html.escape(src)} not rendered]"
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    md.add_render_rule("image", image)
    body = md.render(markdown)
    body = body.replace(f"<blockquote>\n<p><strong>{SYNTHETIC_BANNER}</strong></p>\n</blockquote>",
                        f'<div class="banner">{SYNTHETIC_BANNER}</div>')  # fmt: skip
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
