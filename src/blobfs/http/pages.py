"""HTML of the HTTP face: the directory index and the live log viewer.

Self-contained pages (inline style and script, no external assets). Every value that
comes from a key or a query is escaped for where it lands (HTML text, attribute, or a
JSON string inside the script).
"""

from __future__ import annotations

import json
from html import escape
from urllib.parse import quote

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
header{position:sticky;top:0;background:#223;color:#eee;padding:.4em .8em;display:flex;
gap:1.2em;align-items:baseline}
header b{font-weight:600}#state{margin-left:auto}
pre{margin:0;padding:.6em .8em;font:13px/1.35 ui-monospace,monospace;white-space:pre-wrap;
word-break:break-all}
.ended{color:#7c7}.gone{color:#f77}
table{border-collapse:collapse;margin:.8em}td,th{padding:.2em .8em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
"""


def _json_for_script(value: object) -> str:
    # json.dumps does not escape '<': '</script>' in a key must not end the script.
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")


def _href(path: str, token: str | None) -> str:
    url = quote(path)
    if token:
        url += "?token=" + quote(token, safe="")
    return escape(url, quote=True)


def index(dir_key: str, rows: list[dict[str, object]], token: str | None) -> str:
    """The HTML listing of one directory (`dir_key` '' or ending in '/')."""
    lines = []
    if dir_key:
        parent = dir_key.rstrip("/").rpartition("/")[0]
        up = _href("/files/" + (parent + "/" if parent else ""), token)
        lines.append(f'<tr><td><a href="{up}">../</a></td><td></td><td></td><td></td></tr>')
    for row in rows:
        name = str(row["name"])
        key = dir_key + name
        view = "" if row["dir"] else \
            f'<a href="{_href("/view/" + key, token)}">view live</a>'
        lines.append(
            f'<tr><td><a href="{_href("/files/" + key, token)}">{escape(name)}</a></td>'
            f'<td class="n">{"" if row["dir"] else row["size"]}</td>'
            f'<td>{escape(_when(row["mtime"]))}</td><td>{view}</td></tr>')
    title = escape("/" + dir_key)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body><header><b>blobfs</b>{title}</header>"
            "<table><tr><th>name</th><th>size</th><th>modified (UTC)</th><th></th></tr>"
            + "".join(lines) + "</table></body></html>")


def _when(mtime: object) -> str:
    import time

    try:
        # Any value may come in; what float() refuses is caught below.
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(mtime)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


#: How much of the end of a log the viewer loads before following it.
VIEW_TAIL = 1 << 20

_SCRIPT = """
const cfg = %(cfg)s;
const out = document.getElementById('log');
const state = document.getElementById('state');
const count = document.getElementById('lines');
let lines = 0, partial = false;
function atBottom() {
  const el = document.scrollingElement;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}
function show(text) {
  if (!text) return;
  const follow = atBottom();
  out.appendChild(document.createTextNode(text));
  const nl = text.split('\\n').length - 1;
  lines += nl;
  partial = !text.endsWith('\\n') ? true : false;
  count.textContent = (lines + (partial ? 1 : 0)) + ' lines';
  if (follow) window.scrollTo(0, document.scrollingElement.scrollHeight);
}
function say(text, cls) { state.textContent = text; state.className = cls; }
async function run() {
  const headers = {'Range': 'bytes=-' + cfg.tail};
  if (cfg.token) headers['Authorization'] = 'Bearer ' + cfg.token;
  let resp;
  try {
    resp = await fetch(cfg.url, {headers: headers, cache: 'no-store'});
  } catch (e) { say('cannot reach the server: ' + e, 'gone'); return; }
  if (resp.status === 416) {  // empty so far: follow from the start
    const h = {}; if (cfg.token) h['Authorization'] = 'Bearer ' + cfg.token;
    resp = await fetch(cfg.url, {headers: h, cache: 'no-store'});
  }
  if (!resp.ok) { say('error ' + resp.status + ': ' + await resp.text(), 'gone'); return; }
  const start = Number(resp.headers.get('X-Blobfs-Offset') || 0);
  if (start > 0) show('[... the first ' + start + ' bytes are not shown ...]\\n');
  say('following', '');
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  try {
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      show(dec.decode(value, {stream: true}));
    }
    show(dec.decode());
    say('the log ended (finished, or no growth for a while): reload to follow again',
        'ended');
  } catch (e) {
    say('the stream broke off: the log was replaced or deleted, or the server went away'
        + ' (reload to see the current version)', 'gone');
  }
}
run();
"""


def viewer(key: str, token: str | None) -> str:
    """The live viewer of `key`: follows /files/KEY?follow=1 from its last MiB."""
    cfg = {"url": quote("/files/" + key) + "?follow=1", "token": token or "",
           "tail": VIEW_TAIL}
    script = _SCRIPT % {"cfg": _json_for_script(cfg)}
    title = escape(key)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>"
            f"<meta name=viewport content='width=device-width'><style>{_STYLE}</style>"
            f"</head><body><header><b>{title}</b><span id=lines>0 lines</span>"
            "<span id=state>connecting</span></header><pre id=log></pre>"
            f"<script>{script}</script></body></html>")
