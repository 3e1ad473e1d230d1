"""The candidate view's user page, rendered on the server: one HTML document per request, the coupling
heatmap as an inline PNG (matplotlib), a stylesheet and a small script served as static files beside it
(stream/static/). No build chain, no third-party script.

Every value that comes from a message, a store or the URL goes through html.escape; the page sets a
Content-Security-Policy that allows only its own script and stylesheet and inline images (so no inline
script or style attribute either: colours are CSS classes, weights are <meter> elements).
"""

from __future__ import annotations

import base64
import html
import io
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stream.inspect import UserLook

STATIC = Path(__file__).resolve().parent / "static"
# a stable colour per interest index (matplotlib's tab10), the same in the heatmap and the tables
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MAX_LABEL = 14  # characters of an item id under the heatmap


def colour(k: int) -> str:
    return PALETTE[k % len(PALETTE)] if k >= 0 else "#999999"


def version_token(msg: dict[str, Any]) -> str:
    """What identifies one stored recall message: the page reloads when the view's changes."""
    return f"{msg.get('click_offset', -1)}:{msg['event_id']}:{float(msg['produced_at']):.6f}"


def latest(msg: dict[str, Any]) -> dict[str, Any]:
    """The cheap JSON the page polls: which recall message the view holds for the user now."""
    return {
        "user_id": msg["user_id"],
        "click_partition": msg.get("click_partition"),
        "click_offset": msg.get("click_offset"),
        "event_id": msg["event_id"],
        "produced_at": msg["produced_at"],
        "version": version_token(msg),
    }


def heatmap_png(w: np.ndarray, labels: list[str]) -> bytes:
    """Coupling coefficients w [L, K] as a PNG: interests as rows, behaviours (oldest -> newest) as columns,
    like the paper's Fig. 5 and `mind explain`; values printed in the cells when they fit."""
    L, K = w.shape
    fig = Figure(figsize=(min(max(5.0, 0.55 * L + 2.2), 16.0), 1.5 + 0.5 * K), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    im = ax.imshow(w.T, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(K), [f"interest {k}" for k in range(K)])
    for k, tick in enumerate(ax.get_yticklabels()):
        tick.set_color(colour(k))
        tick.set_fontweight("bold")
    short = [s if len(s) <= MAX_LABEL else s[: MAX_LABEL - 1] + "…" for s in labels]
    ax.set_xticks(range(L), short, rotation=55, ha="right", fontsize=8)
    ax.set_xlabel("behaviour (oldest → newest)")
    if L * K <= 400:
        for i in range(L):
            for k in range(K):
                v = float(w[i, k])
                ax.text(
                    i,
                    k,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.6 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="w")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    if seconds < 0:
        return f"{-seconds:.1f} s in the future"
    if seconds < 90:
        return f"{seconds:.1f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min ago"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _k(k: int) -> str:
    """The CSS class of interest k's colour (user.css .k0 .. .k9 = PALETTE; no inline styles: CSP)."""
    return f"k{k % len(PALETTE)}" if k >= 0 else "none"


def _chip(k: int) -> str:
    return f'<span class="chip {_k(k)}">{k if k >= 0 else "–"}</span>'


def _weight_bar(w: float, k: int) -> str:
    return f'<meter class="{_k(k)}" min="0" max="1" value="{w:.3f}"></meter> <span class="w">{w:.2f}</span>'


def render_user_page(
    look: UserLook, heatmap: bytes | None, now: float | None = None, n: int | None = None
) -> str:
    """The whole HTML document for one user (`n`: show only the best n candidates)."""
    now = time.time() if now is None else now
    e = html.escape
    msg = look.msg
    user = e(look.user_id)
    quoted = urllib.parse.quote(look.user_id, safe="")
    cands = msg["candidates"] if n is None else msg["candidates"][:n]
    produced = float(msg["produced_at"])
    k = len(look.interests)
    out: list[str] = []
    add = out.append
    add("<!doctype html>")
    add('<html lang="en"><head><meta charset="utf-8">')
    add('<meta name="viewport" content="width=device-width, initial-scale=1">')
    add(f"<title>{user} · MIND Stream candidates</title>")
    add('<link rel="icon" href="data:,">')  # no favicon request (it would be a 404)
    add('<link rel="stylesheet" href="/static/user.css"></head>')
    add(
        f'<body data-user="{user}" data-version="{e(version_token(msg))}" data-produced-at="{produced!r}" '
        f'data-latest-url="/users/{e(quoted)}/latest">'
    )
    # ---- header: who, which model, how fresh ----------------------------------------------------------
    add('<header><div class="title">')
    add(f'<h1>User <code id="user-id">{user}</code></h1>')
    add('<span id="live" class="live">live</span></div>')
    add('<dl class="facts">')
    facts = [
        ("model version", f'<code id="model-version">{e(str(msg["model_version"]))}</code>'),
        ("index version", f"<code>{e(str(msg['index_version']))}</code>"),
        (
            "freshness",
            f'<span id="freshness" title="now − produced_at">{e(_age(now - produced))}</span>'
            f"<small>produced {e(_when(produced))}</small>",
        ),
        (
            "triggering click",
            f'<code id="event-id">{e(str(msg["event_id"]))}</code><small>{e(_when(msg["event_timestamp"]))}'
            + (
                f" · partition {int(msg['click_partition'])} offset {int(msg['click_offset'])}"
                if "click_partition" in msg and "click_offset" in msg
                else ""
            )
            + "</small>",
        ),
        ("interests", f'<span id="interest-count">{k}</span>'),
        ("candidates", f'<span id="candidate-count">{len(msg["candidates"])}</span>'),
    ]
    for name, value in facts:
        add(f"<div><dt>{name}</dt><dd>{value}</dd></div>")
    add("</dl></header><main>")
    # ---- what is missing ------------------------------------------------------------------------------
    if look.notes:
        add('<section id="notes" class="notes"><h2>Not shown, or to keep in mind</h2><ul>')
        add("".join(f"<li>{e(note)}</li>" for note in look.notes))
        add("</ul></section>")
    # ---- behaviours and the heatmap ---------------------------------------------------------------------
    add('<div class="row">')
    add('<section id="behaviours" class="card"><h2>Recent behaviours <small>oldest first</small></h2>')
    if look.behaviours:
        add('<table class="behaviours"><thead><tr><th>#</th><th>item</th><th>side ids</th>')
        add("<th>gathered by</th></tr></thead><tbody>")
        for pos, b in enumerate(look.behaviours):
            side = ", ".join(e(s) for s in b.side) or '<span class="muted">none</span>'
            took = _chip(b.interest) + (f" {_weight_bar(b.weight, b.interest)}" if b.interest >= 0 else "")
            add(
                f'<tr class="behaviour"><td class="num">{pos}</td><td><code>{e(b.item_id)}</code></td>'
                f"<td>{side}</td><td>{took}</td></tr>"
            )
        add("</tbody></table>")
        if look.window_key:
            add(f'<p class="muted small">window <code>{e(look.window_key)}</code></p>')
    else:
        add('<p class="muted">No behaviours to show (see the notes above).</p>')
    add("</section>")
    add('<section id="coupling" class="card"><h2>Which behaviour fed which interest</h2>')
    if heatmap is not None:
        src = "data:image/png;base64," + base64.b64encode(heatmap).decode()
        add(
            f'<img id="heatmap" class="heatmap" src="{src}" alt="coupling heatmap: coupling coefficients '
            f'w_ij of {len(look.behaviours)} behaviours and {k} interests">'
        )
        add(
            '<p class="muted small">Coupling coefficients w<sub>ij</sub> of the last routing iteration '
            f"(each behaviour's weights sum to 1 over the interests), from the user tower "
            f"<code>{e(look.coupling_version or '?')}</code> for the window above.</p>"
        )
    else:
        add('<p class="muted">No coupling coefficients (see the notes above).</p>')
    add("</section></div>")
    # ---- one panel per interest -------------------------------------------------------------------------
    add(f'<section id="interests"><h2>Interests <small>{k} active')
    if look.interests_ts is not None:
        add(f" · stored {e(_when(look.interests_ts))} by model <code>{e(look.interests_version)}</code>")
    add('</small></h2><div class="panels">')
    for it in look.interests:
        add(f'<article class="interest-panel card {_k(it.k)}" data-interest="{it.k}">')
        add(f"<h3>{_chip(it.k)} interest {it.k}</h3>")
        add(f'<p class="muted small">{it.candidates} of the merged candidates came from it</p>')
        add("<h4>Behaviours it gathered</h4>")
        if it.gathered:
            add('<ol class="gathered">')
            for pos, w in it.gathered:
                b = look.behaviours[pos]
                bar = _weight_bar(w, it.k)
                add(f"<li><code>{e(b.item_id)}</code> <span class='muted'>#{pos}</span> {bar}</li>")
            add("</ol>")
        else:
            add('<p class="muted small">none (or no coupling coefficients)</p>')
        add("<h4>Its own top items</h4>")
        if it.top:
            merged = {str(c["item_id"]) for c in msg["candidates"]}
            add('<ol class="top">')
            for item, score in it.top:
                star = ' <span class="star" title="in the merged list">★</span>' if item in merged else ""
                add(f"<li><code>{e(item)}</code> <span class='score'>{score:.3f}</span>{star}</li>")
            add("</ol>")
        else:
            add('<p class="muted small">not available (see the notes above)</p>')
        add("</article>")
    if not look.interests:
        add('<p class="muted">No interests to show (see the notes above).</p>')
    add("</div></section>")
    # ---- the merged list ----------------------------------------------------------------------------------
    shown = f"best {len(cands)} of {len(msg['candidates'])}" if len(cands) < len(msg["candidates"]) else ""
    add(f'<section id="candidates" class="card"><h2>Merged candidates <small>{shown}')
    add(" max over interests of e<sub>i</sub>·v<sub>u</sub><sup>k</sup>, seen items dropped</small></h2>")
    add('<table id="candidate-table" class="candidates"><thead><tr><th>rank</th><th>item</th><th>score</th>')
    add("<th>interest</th></tr></thead><tbody>")
    for rank, c in enumerate(cands, start=1):
        j = int(c.get("interest", -1))
        add(
            f'<tr class="candidate" data-interest="{j}"><td class="num">{rank}</td>'
            f"<td><code>{e(str(c['item_id']))}</code></td><td class='score'>{float(c['score']):.4f}</td>"
            f"<td>{_chip(j)}</td></tr>"
        )
    add("</tbody></table></section>")
    timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in look.timings_ms.items())
    add(
        f'</main><footer>JSON: <a href="/users/{e(quoted)}/candidates">/users/{user}/candidates</a> · '
        f"read from the stores in {e(timings or '0 ms')}</footer>"
    )
    add('<script src="/static/user.js"></script></body></html>')
    return "\n".join(out)


def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of the page's stylesheet and script, read once at start."""
    types = {".css": "text/css", ".js": "text/javascript"}
    return {p.name: (p.read_bytes(), types[p.suffix]) for p in sorted(STATIC.iterdir()) if p.suffix in types}
