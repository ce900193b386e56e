// Baton's web view: keeps a run's page and the runs list current without a
// reload. Everything shown is rendered (and escaped) by the server; this only
// fetches fresh fragments from the same origin and swaps them in.
(function () {
  "use strict";

  // Whether the user is filling in a form in el: then its fragment is not
  // replaced (what they typed would be lost) until they are done.
  function editing(el) {
    const active = document.activeElement;
    if (active && el.contains(active) && (active.tagName === "INPUT" || active.tagName === "SELECT")) {
      return true;
    }
    return Array.from(el.querySelectorAll("input[type=text]")).some((i) => i.value !== i.defaultValue);
  }

  // Replaces el's children with the server-rendered fragment at url, unless
  // the user is editing in it, before the request or when the answer arrives.
  async function swap(el, url) {
    if (editing(el)) return false;
    const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (!res.ok) return false;
    const html = await res.text();
    // Checked again with nothing awaited between the check and the swap.
    if (editing(el)) return false;
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    el.replaceChildren(tpl.content);
    return true;
  }

  // A run: refresh when its server-sent events report a change, and every two
  // seconds while it goes on (the time axis moves).
  const panel = document.getElementById("panel");
  if (panel) {
    const url = panel.dataset.panel;
    let busy = false;
    let again = false;
    const refresh = async () => {
      if (busy) { again = true; return; }
      busy = true;
      try { await swap(panel, url); } catch (_) { /* the next event or tick retries */ }
      busy = false;
      if (again) { again = false; refresh(); }
    };
    const running = () => panel.querySelector('[data-running="true"]') !== null;
    if (panel.dataset.live) {
      const events = new EventSource(panel.dataset.live);
      events.addEventListener("history", refresh);
      events.addEventListener("end", () => { events.close(); refresh(); });
    }
    setInterval(() => { if (running()) refresh(); }, 2000);
  }

  // The runs list: statuses change while you look.
  const runs = document.getElementById("runs-table");
  if (runs) {
    const container = runs.parentElement;
    const url = runs.dataset.refresh;
    setInterval(async () => {
      try {
        const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
        if (!res.ok) return;
        const tpl = document.createElement("template");
        tpl.innerHTML = await res.text();
        const fresh = tpl.content.getElementById("runs-table");
        const current = document.getElementById("runs-table");
        if (fresh && current) container.replaceChild(fresh, current);
      } catch (_) { /* next tick */ }
    }, 3000);
  }
})();
