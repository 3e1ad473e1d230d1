// The candidate view's user page (stream/page.py): keeps the freshness ticking and reloads the page when
// the view holds a newer recall message for this user. It polls /users/<id>/latest (a table lookup, a few
// hundred bytes) every 2 s; no build step, no library.
"use strict";
(() => {
  const body = document.body;
  const version = body.dataset.version;
  const produced = Number(body.dataset.producedAt);
  const latestUrl = body.dataset.latestUrl;
  const live = document.getElementById("live");
  const fresh = document.getElementById("freshness");
  const POLL_MS = 2000;

  function age(s) {
    if (s < 0) return `${(-s).toFixed(1)} s in the future`;
    if (s < 90) return `${s.toFixed(1)} s ago`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min ago`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} days ago`;
  }

  function tick() {
    if (fresh) fresh.textContent = age(Date.now() / 1000 - produced);
  }

  function status(text, ok) {
    live.textContent = text;
    live.classList.toggle("stale", !ok);
  }

  async function poll() {
    try {
      const r = await fetch(latestUrl, { cache: "no-store", headers: { Accept: "application/json" } });
      if (r.ok) {
        const j = await r.json();
        if (j.version !== version) {
          status("new recall message: reloading", true);
          window.location.reload();
          return;
        }
        status("live: up to date", true);
      } else {
        status(`live: the view answered ${r.status}`, false);
      }
    } catch (e) {
      status("live: the view is unreachable, retrying", false);
    }
    window.setTimeout(poll, POLL_MS);
  }

  tick();
  window.setInterval(tick, 1000);
  window.setTimeout(poll, POLL_MS);
})();
