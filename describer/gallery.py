"""A self-contained HTML page showing a batch's results, one card per image.

Sources, descriptions and error messages are untrusted (user URLs and model output), so every
value is escaped, only http(s) sources become links, and a Content-Security-Policy forbids
scripts and every request: thumbnails are data: URIs and the CSS is inline. Records may come
from older JSONL, so a missing or oddly typed field is shown as unknown, never an exception.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlsplit

from .records import ERROR, OK, total_usage

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# A batch may use one prompt per source; past this many the summary says how many more.
MAX_LISTED_PROMPTS = 3


@dataclass(frozen=True)
class GalleryEntry:
    """One image of the gallery: its result record and, when one was made, a small JPEG."""

    record: Mapping[str, Any]  # the JSON shape of describer.records.Record.to_json()
    thumbnail: bytes | None  # a small JPEG (<= ~200 px side), None when none was made


def render_gallery(
    entries: Sequence[GalleryEntry],
    *,
    title: str,
    elapsed_s: float | None = None,
    generated_at: datetime | None = None,
) -> bytes:
    """UTF-8 HTML, one card per entry in the given order, plus a summary."""
    records = [_as_mapping(entry.record) for entry in entries]
    when = generated_at or datetime.now(UTC)
    cards = "\n".join(
        _card(number, record, entry.thumbnail)
        for number, (record, entry) in enumerate(zip(records, entries, strict=True), start=1)
    )
    page = _PAGE.format(
        csp=escape(CONTENT_SECURITY_POLICY),
        title=escape(title),
        css=_CSS,
        summary=_summary(records, elapsed_s=elapsed_s, generated_at=when),
        cards=cards or '<p class="empty">No images in this batch.</p>',
    )
    return page.encode("utf-8")


def render_index(status: Mapping[str, Any], shard_pages: Sequence[str]) -> bytes:
    """A sharded batch's page: its status in figures, and a link to each shard's gallery.

    ``shard_pages`` are paths relative to this page. A batch of a hundred
    thousand images would make one page of some 700 MB; one gallery per shard
    keeps each page small enough to open.
    """
    usage = _as_mapping(status.get("usage"))
    stats = [
        ("images", "images", _int(status.get("total")) or 0),
        ("ok", "ok", _int(status.get("ok")) or 0),
        ("errors", "errors", _int(status.get("errors")) or 0),
        ("prompt_tokens", "prompt tokens", _int(usage.get("prompt_tokens")) or 0),
        ("output_tokens", "output tokens", _int(usage.get("output_tokens")) or 0),
        ("shards", "shards", len(shard_pages)),
    ]
    stat_html = "".join(
        f'<div class="stat stat-{key}" data-stat="{key}"><dt>{label}</dt><dd>{value:,}</dd></div>'
        for key, label, value in stats
    )
    facts = [
        f"<dt>{label}</dt><dd>{escape(str(status.get(key)))}</dd>"
        for key, label in (
            ("source", "source"),
            ("model", "model"),
            ("prompt", "prompt"),
            ("elapsed_s", "seconds"),
            ("images_per_s", "images/s"),
        )
        if status.get(key) is not None
    ]
    finished = _as_mapping(status.get("finished_shards"))
    links = []
    for index, name in enumerate(shard_pages):
        # Names come from manifests anyone with upload rights may name: "./" and
        # percent-encoding keep even "javascript:x" a path relative to this page.
        page = "./" + quote(name, safe="/")
        tally = _as_mapping(finished.get(str(index)))
        counts = (
            f"{_int(tally.get('ok')) or 0:,} ok, {_int(tally.get('error')) or 0:,} errors"
            if tally
            else "pending"
        )
        links.append(
            f'<li class="shard"><a href="{escape(page, quote=True)}">shard {index + 1}</a> '
            f"<span>{counts}</span></li>"
        )
    page_html = _PAGE.format(
        csp=escape(CONTENT_SECURITY_POLICY),
        title=escape(f"Batch {status.get('batch', '')}"),
        css=_CSS,
        summary=f'<dl class="stats">{stat_html}</dl>\n<dl class="facts">{"".join(facts)}</dl>',
        cards=f'<ol class="shards">{"".join(links)}</ol>',
    )
    return page_html.encode("utf-8")


def _summary(
    records: Sequence[Mapping[str, Any]], *, elapsed_s: float | None, generated_at: datetime
) -> str:
    ok = sum(1 for record in records if _is_ok(record))
    tokens = total_usage({"usage": _usage(record)} for record in records)
    stats = [
        ("images", "images", f"{len(records):,}"),
        ("ok", "ok", f"{ok:,}"),
        ("errors", "errors", f"{len(records) - ok:,}"),
        ("prompt_tokens", "prompt tokens", f"{tokens['prompt_tokens']:,}"),
        ("output_tokens", "output tokens", f"{tokens['output_tokens']:,}"),
    ]
    if elapsed_s is not None and math.isfinite(elapsed_s):
        stats.append(("elapsed", "elapsed", _duration(elapsed_s)))
    stat_html = "".join(
        f'<div class="stat stat-{key}" data-stat="{key}"><dt>{label}</dt><dd>{value}</dd></div>'
        for key, label, value in stats
    )
    models = _distinct(_text(record.get("model")) for record in records)
    prompts = _distinct(_text(record.get("prompt")) for record in records)
    facts = []
    if models:
        label = "model" if len(models) == 1 else "models"
        names = ", ".join(f"<code>{escape(m)}</code>" for m in models)
        facts.append(f"<dt>{label}</dt><dd>{names}</dd>")
    if prompts:
        label = "prompt" if len(prompts) == 1 else "prompts"
        shown = "".join(f"<q>{escape(p)}</q>" for p in prompts[:MAX_LISTED_PROMPTS])
        more = len(prompts) - MAX_LISTED_PROMPTS
        if more > 0:
            shown += f' <span class="more">and {more} more</span>'
        facts.append(f"<dt>{label}</dt><dd>{shown}</dd>")
    stamp = _utc(generated_at)
    facts.append(
        f'<dt>generated</dt><dd><time datetime="{stamp.isoformat()}">'
        f"{stamp:%Y-%m-%d %H:%M:%S} UTC</time></dd>"
    )
    simulated = sum(1 for record in records if record.get("simulated") is True)
    notice = _simulated_notice(simulated, described=ok)
    return f'{notice}<dl class="stats">{stat_html}</dl>\n<dl class="facts">{"".join(facts)}</dl>'


def _simulated_notice(simulated: int, *, described: int) -> str:
    """A banner when answers came from the project's simulator: they must not pass for Gemini's."""
    if not simulated:
        return ""
    which = (
        "Every description"
        if simulated >= described
        else f"{simulated:,} of the {described:,} descriptions"
    )
    return (
        '<p class="simulated" role="note"><b>Simulated.</b> '
        f"{which} on this page came from the project's Gemini simulator "
        "(localdev/gemini_sim.py), not from Gemini: they name colours and shapes, "
        "not what the image shows.</p>\n"
    )


def _card(number: int, record: Mapping[str, Any], thumbnail: bytes | None) -> str:
    ok = _is_ok(record)
    data = record.get("data")
    data = data if isinstance(data, Mapping) else {}
    alt_text = _text(data.get("alt_text"))
    description = _text(data.get("description")) or _text(record.get("description"))

    if thumbnail:
        uri = f"data:image/jpeg;base64,{base64.b64encode(thumbnail).decode()}"
        alt = alt_text or f"Thumbnail of image {number}"
        picture = f'<img src="{uri}" alt="{escape(alt)}">'
    else:
        picture = '<span class="none">no preview</span>'

    parts = [
        f'<div class="thumb">{picture}</div>',
        f'<p class="source"><span class="num">#{number}</span> {_source(record.get("source"))}</p>',
    ]
    if ok:
        parts.append(
            f'<p class="desc">{escape(description)}</p>'
            if description
            else '<p class="desc unknown">No description was recorded.</p>'
        )
        if alt_text:
            parts.append(f'<p class="field"><b>Alt text</b> {escape(alt_text)}</p>')
        tags = data.get("tags")
        chips = [escape(tag) for t in (tags if isinstance(tags, list) else []) if (tag := _text(t))]
        if chips:
            parts.append(
                '<ul class="tags">' + "".join(f"<li>{chip}</li>" for chip in chips) + "</ul>"
            )
        text_in_image = _text(data.get("text_in_image"))
        if text_in_image:
            parts.append(f'<p class="field"><b>Text in image</b> {escape(text_in_image)}</p>')
    else:
        code, message = _error(record)
        parts.append(
            f'<p class="err"><span class="code">{escape(code)}</span> '
            f"{escape(message or 'No error message was recorded.')}</p>"
        )
    parts.append(f'<p class="meta">{_meta(record)}</p>')
    status = OK if ok else ERROR
    return f'<article class="card {status}" id="image-{number}">' + "\n".join(parts) + "</article>"


def _source(value: Any) -> str:
    """An http(s) source as a link that leaks nothing to the target, anything else as text."""
    source = _text(value)
    if source is None:
        return '<span class="unknown">unknown source</span>'
    # Browsers drop whitespace and control characters inside URLs, which could turn a harmless
    # looking string into another scheme: such sources stay plain text.
    if _is_web_url(source) and not any(ch.isspace() or ord(ch) < 0x20 for ch in source):
        href = escape(source, quote=True)
        return f'<a href="{href}" rel="noopener noreferrer">{escape(source)}</a>'
    return f"<span>{escape(source)}</span>"


def _is_web_url(source: str) -> bool:
    try:
        parts = urlsplit(source)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _error(record: Mapping[str, Any]) -> tuple[str, str | None]:
    error = record.get("error")
    if isinstance(error, Mapping):
        return _text(error.get("code")) or "error", _text(error.get("message"))
    return "error", _text(error)


def _meta(record: Mapping[str, Any]) -> str:
    bits = ['<span class="sim">simulated</span>'] if record.get("simulated") is True else []
    width, height = _int(record.get("width")), _int(record.get("height"))
    if width is not None and height is not None:
        bits.append(f"{width}\u00d7{height}")
    mime_type = _text(record.get("mime_type"))
    if mime_type:
        bits.append(escape(mime_type))
    usage = _usage(record)
    if usage:
        bits.append(f"{usage['prompt_tokens']:,} + {usage['output_tokens']:,} tokens")
    latency_ms = _int(record.get("latency_ms"))
    if latency_ms:
        bits.append(_duration(latency_ms / 1000))
    attempts = _int(record.get("attempts"))
    if attempts is not None and attempts > 1:
        bits.append(f"{attempts} attempts")
    return " \u00b7 ".join(bits)


def _usage(record: Mapping[str, Any]) -> dict[str, int]:
    """The record's token counts as non-negative ints, or {} when it has none."""
    usage = record.get("usage")
    if not isinstance(usage, Mapping):
        return {}
    return {key: max(_int(usage.get(key)) or 0, 0) for key in ("prompt_tokens", "output_tokens")}


def _is_ok(record: Mapping[str, Any]) -> bool:
    return record.get("status") == OK


def _as_mapping(record: Any) -> Mapping[str, Any]:
    return record if isinstance(record, Mapping) else {}


def _text(value: Any) -> str | None:
    """A string to show, or None when the value is missing, empty or not text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _distinct(values: Iterable[str | None]) -> list[str]:
    """The values that are set, each once, in order of first appearance."""
    return list(dict.fromkeys(v for v in values if v is not None))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def _utc(moment: datetime) -> datetime:
    """The moment in UTC, whole seconds; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


# The empty data: icon stops browsers asking the server for /favicon.ico.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
{summary}
</header>
<main class="grid">
{cards}
</main>
</body>
</html>
"""

_CSS = """
*{box-sizing:border-box}
body{margin:0;padding:24px;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 color:#1f2328;background:#f6f7f9}
h1{margin:0 0 12px;font-size:22px;overflow-wrap:anywhere}
header{margin-bottom:20px}
dl{margin:0}
.stats{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:10px}
.stat{background:#fff;border:1px solid #d8dce1;border-radius:8px;padding:6px 12px;min-width:90px}
.stat dt{font-size:12px;color:#59636e}
.stat dd{margin:0;font-size:18px;font-weight:600}
.stat-ok dd{color:#1a7f37}
.stat-errors dd{color:#cf222e}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;font-size:13px;
 color:#3d444d}
.facts dt{color:#59636e}
.facts dd{margin:0;overflow-wrap:anywhere}
q{display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:16px}
.card{background:#fff;border:1px solid #d8dce1;border-radius:10px;overflow:hidden;
 display:flex;flex-direction:column;min-width:0}
.card.error{border-color:#f0a8ad;border-top:4px solid #cf222e}
.card.ok{border-top:4px solid #2da44e}
.card>p,.card>ul{margin:0;padding:0 14px 10px;overflow-wrap:anywhere}
.thumb{height:200px;display:flex;align-items:center;justify-content:center;
 background:#eef0f3;margin-bottom:10px}
.thumb img{max-width:100%;max-height:100%;display:block}
.none{color:#8c959f;font-size:13px}
.source{font-size:13px;color:#3d444d;word-break:break-all}
.source a{color:#0969da}
.num{font-weight:600;color:#1f2328;margin-right:4px}
.desc{white-space:pre-line}
.field{font-size:13px}
.field b{display:block;font-size:11px;text-transform:uppercase;letter-spacing:.04em;
 color:#59636e}
.tags{list-style:none;display:flex;flex-wrap:wrap;gap:6px}
.tags li{background:#ddf4ff;color:#0a3069;border-radius:999px;padding:1px 10px;font-size:12px}
.err{color:#82071e}
.code{display:inline-block;font:12px ui-monospace,monospace;background:#ffebe9;
 border:1px solid #f0a8ad;border-radius:4px;padding:0 6px;margin-right:4px}
.card>.meta{margin-top:auto;padding-top:6px;font-size:12px;color:#59636e}
.empty,.unknown{color:#59636e}
.simulated{margin:0 0 12px;padding:8px 12px;border:1px solid #d4a72c;border-radius:8px;
 background:#fff8c5;color:#3b2300}
.card .sim{font-size:11px;font-weight:600;color:#7d4e00;text-transform:uppercase}
"""
