// RoleMesh gateway dashboard: polls dashboard/data and draws it. No dependencies, no build step.
// Every value from the gateway is written with textContent (never as HTML): node ids and error
// messages come from nodes and clients.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEY_NAME = "rolemesh.dashboard.key";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let key = sessionStorage.getItem(KEY_NAME);
  let timer = null;
  let lastOk = 0;
  let lastData = null;
  let showAllErrors = false;
  const SHORT_ERRORS = 8;
  let inFlight = false;
  let again = false;
  const colours = new Map(); // alias -> palette index, stable while the page is open

  // -- formatting ----------------------------------------------------------------------------
  const dash = "–";
  function num(x, digits) {
    if (x === null || x === undefined) return dash;
    if (x === 0) return "0";
    const d = digits !== undefined ? digits : x < 10 ? 1 : 0;
    return x.toLocaleString(undefined, { minimumFractionDigits: d, maximumFractionDigits: d });
  }
  function rate(x) {
    if (x === null || x === undefined) return dash;
    if (x === 0) return "0";
    if (x < 0.1) return "<0.1";
    return num(x);
  }
  function seconds(s) {
    if (s === null || s === undefined) return dash;
    if (s < 1) return `${Math.max(1, Math.round(s * 1000))} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    return `${(s / 60).toFixed(1)} min`;
  }
  function ago(s) {
    if (s < 60) return `${s.toFixed(1)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  }
  function percent(r) {
    if (r === null || r === undefined) return dash;
    if (r === 0) return "0 %";
    const p = r * 100;
    return `${p < 1 ? p.toFixed(2) : p < 10 ? p.toFixed(1) : p.toFixed(0)} %`;
  }
  function uptime(s) {
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    return `${m} min ${Math.floor(s % 60)} s`;
  }
  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString(undefined, { hour12: false });
  }

  // -- small DOM helpers ---------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function setText(e, text) {
    if (e.textContent !== text) e.textContent = text; // untouched text keeps a selection alive
  }
  function setClass(e, cls) {
    if (e.className !== cls) e.className = cls;
  }
  // Keep one <tr> per key, in order; `fill(tr, item, fresh)` fills it in.
  function syncRows(tbody, items, keyOf, cells, fill) {
    const old = new Map();
    for (const tr of tbody.rows) old.set(tr.dataset.key, tr);
    let at = 0;
    for (const item of items) {
      const k = keyOf(item);
      let tr = old.get(k);
      const fresh = !tr;
      if (fresh) {
        tr = el("tr");
        tr.dataset.key = k;
        for (const c of cells) tr.append(el("td", c));
      }
      old.delete(k);
      fill(tr, item, fresh);
      if (tbody.rows[at] !== tr) tbody.insertBefore(tr, tbody.rows[at] || null);
      at += 1;
    }
    for (const tr of old.values()) tr.remove();
  }
  function colourOf(alias) {
    if (!colours.has(alias)) colours.set(alias, colours.size % 8);
    return `s${colours.get(alias)}`;
  }
  function pill(kind, symbol, text) {
    const p = el("span", `pill ${kind}`);
    p.append(el("span", "sym", symbol), document.createTextNode(text));
    p.setAttribute("aria-label", text);
    return p;
  }
  function replace(td, node) {
    td.replaceChildren(node);
  }

  // -- states, in colour and in words ----------------------------------------------------------
  const STATES = {
    fresh: ["ok", "●", "fresh"],
    stale: ["warn", "◌", "stale"],
    ejected: ["bad", "✕", "ejected"],
    draining: ["info", "↧", "draining"],
  };

  // -- rendering -----------------------------------------------------------------------------
  function render(d) {
    const t = d.totals;
    setText($("meta"), `v${d.version} · up ${uptime(d.uptime_s)}`);
    setText($("k-rps"), rate(t.requests_per_s));
    setText($("k-rps-hint"), `${num(t.requests, 0)} requests in all`);
    const err = $("k-err");
    setText(err, percent(t.error_ratio));
    setClass(err, `value${t.error_ratio > 0.05 ? " bad" : t.error_ratio > 0 ? " warn" : ""}`);
    setText($("k-err-hint"), t.error_ratio === null ? "no requests in the last minute" : "of answers were 5xx");
    setText($("k-tps"), rate(t.completion_tokens_per_s));
    setText($("k-tps-hint"), `over the last ${d.windows.rate_s} s`);
    setText($("k-inflight"), num(t.inflight, 0));
    setText($("k-inflight-hint"), t.queue_waiting ? `${t.queue_waiting} waiting in queues` : "none waiting in queues");
    const n = t.nodes;
    const all = n.fresh + n.stale + n.ejected + n.draining;
    setText($("k-nodes"), `${n.fresh} / ${all}`);
    const others = ["stale", "ejected", "draining"].filter((s) => n[s]).map((s) => `${n[s]} ${s}`);
    setText($("k-nodes-hint"), others.length ? others.join(" · ") : all ? "all fresh" : "none registered");
    setText($("stale-after"), `stale after ${d.stale_after_s} s without a heartbeat`);

    for (const a of d.aliases) colourOf(a.alias);
    renderCharts(d);
    renderAliases(d.aliases);
    renderNodes(d.nodes);
    renderErrors(d.errors);
  }

  function renderAliases(aliases) {
    const cells = [
      "col-alias", "col-status", "num col-requests", "num col-rps", "num col-errors", "num col-p50",
      "num col-p95", "num col-ttft", "num col-tps", "num col-inflight", "num col-queue",
    ];
    syncRows($("aliases").tBodies[0], aliases, (a) => a.alias, cells, (tr, a, fresh) => {
      const c = tr.cells;
      if (fresh) {
        const main = el("div", "main");
        main.append(el("span", `swatch ${colourOf(a.alias)}`), el("span", "", a.alias));
        c[0].append(main, el("div", "sub"));
      }
      let what = `${a.type} → ${a.upstream}`;
      if (a.nodes) {
        const all = a.nodes.fresh + a.nodes.stale + a.nodes.ejected + a.nodes.draining;
        what = `discovered · role ${a.role} · ${a.strategy} · ${a.nodes.fresh} of ${all} node${all === 1 ? "" : "s"} fresh`;
      }
      setText(c[0].lastChild, what);
      const key = a.available ? "ok" : `no:${a.reason}`;
      if (c[1].dataset.v !== key) {
        c[1].dataset.v = key;
        c[1].replaceChildren(a.available ? pill("ok", "✓", "available") : pill("bad", "✕", "unavailable"));
        if (!a.available) c[1].append(el("div", "reason", a.reason));
      }
      setText(c[2], num(a.requests, 0));
      setText(c[3], rate(a.requests_per_s));
      setText(c[4], percent(a.error_ratio));
      setClass(c[4], `num col-errors${a.error_ratio > 0.05 ? " bad" : a.error_ratio > 0 ? " warn" : a.error_ratio === null ? " dim" : ""}`);
      setText(c[5], seconds(a.latency_p50_s));
      setText(c[6], seconds(a.latency_p95_s));
      setText(c[7], seconds(a.ttft_p50_s));
      setText(c[8], rate(a.completion_tokens_per_s));
      setText(c[9], num(a.inflight, 0));
      setText(c[10], a.queue_rejected ? `${a.queue_waiting} (${a.queue_rejected} refused)` : num(a.queue_waiting, 0));
    });
  }

  function renderNodes(nodes) {
    $("nodes-empty").hidden = nodes.length > 0;
    $("nodes").hidden = nodes.length === 0;
    const cells = ["col-node", "col-roles", "col-state", "num col-heartbeat", "num col-inflight", "col-slots", "col-version"];
    syncRows($("nodes").tBodies[0], nodes, (n) => n.node_id, cells, (tr, n, fresh) => {
      const c = tr.cells;
      if (fresh) c[0].append(el("div", "main", n.node_id), el("div", "sub mono", n.base_url));
      else setText(c[0].lastChild, n.base_url);
      const roles = n.roles.join(" ");
      if (c[1].dataset.v !== roles) {
        c[1].dataset.v = roles;
        c[1].replaceChildren(...n.roles.map((r) => el("span", "chip", r)));
      }
      if (c[2].dataset.v !== n.state) {
        c[2].dataset.v = n.state;
        const [kind, sym, word] = STATES[n.state] || ["idle", "?", n.state];
        replace(c[2], pill(kind, sym, word));
      }
      setText(c[3], ago(n.seconds_since_heartbeat));
      setClass(c[3], `num col-heartbeat${n.state === "stale" ? " warn" : ""}`);
      setText(c[4], num(n.inflight, 0));
      if (fresh) {
        const bar = el("div", "bar");
        bar.append(el("span"));
        const box = el("div", "slotbox");
        box.append(bar, el("span"));
        c[5].append(box);
      }
      const [bar, label] = c[5].firstChild.children;
      if (n.slots_total) {
        const busy = n.slots_busy || 0;
        bar.hidden = false;
        bar.firstChild.style.width = `${Math.min(100, (100 * busy) / n.slots_total)}%`;
        setClass(bar, `bar${busy >= n.slots_total ? " full" : ""}${n.state === "stale" ? " old" : ""}`);
        setText(label, `${busy} / ${n.slots_total}`);
      } else {
        bar.hidden = true;
        setText(label, dash);
      }
      setText(c[6], n.version || dash);
      setClass(c[6], `col-version${n.version ? "" : " dim"}`);
    });
  }

  function renderErrors(all) {
    $("errors-empty").hidden = all.length > 0;
    $("errors").hidden = all.length === 0;
    const more = $("errors-more");
    more.hidden = all.length <= SHORT_ERRORS;
    setText(more, showAllErrors ? `Show the latest ${SHORT_ERRORS}` : `Show all ${all.length}`);
    const errors = showAllErrors ? all : all.slice(0, SHORT_ERRORS);
    const cells = ["col-time", "col-code", "col-alias", "col-node", "mono col-rid", "col-msg"];
    const keyOf = (e) => `${e.time}|${e.request_id}`;
    syncRows($("errors").tBodies[0], errors, keyOf, cells, (tr, e, fresh) => {
      if (!fresh) return; // an error does not change once recorded
      const c = tr.cells;
      c[0].textContent = clock(e.time);
      c[0].title = new Date(e.time * 1000).toString();
      c[1].append(pill(e.status >= 500 ? "bad" : "warn", "", String(e.status)));
      c[2].textContent = e.alias || dash;
      c[3].textContent = e.node || dash;
      c[4].textContent = e.request_id || dash;
      c[5].textContent = e.message;
    });
  }

  // -- charts: hand-drawn SVG, one line per alias ---------------------------------------------
  const CHARTS = [
    ["c-rps", "requests_per_s"],
    ["c-err", "errors_per_s"],
    ["c-tps", "completion_tokens_per_s"],
  ];

  function renderCharts(d) {
    const legend = $("legend");
    const names = d.aliases.map((a) => a.alias);
    if (legend.dataset.v !== names.join("\n")) {
      legend.dataset.v = names.join("\n");
      const all = el("span");
      all.append(el("span", "swatch all"), document.createTextNode("all aliases"));
      legend.replaceChildren(
        ...names.map((name) => {
          const s = el("span");
          s.append(el("span", `swatch ${colourOf(name)}`), document.createTextNode(name));
          return s;
        }),
        all,
      );
    }
    // The last 10 minutes, or less while there is less history (at least 2 minutes).
    const age = d.history.t.length ? d.time - d.history.t[0] : 0;
    const span = Math.min(d.windows.history_s, Math.max(120, Math.ceil(age / 60) * 60));
    for (const [id, field] of CHARTS) {
      const series = names.map((name) => ({
        name,
        cls: colourOf(name),
        values: (d.history.aliases[name] || {})[field] || [],
      }));
      drawChart($(id), d.history.t, series, d.history.total[field] || [], d.time, span);
    }
  }

  function niceMax(x) {
    if (!(x > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
    return 10 * p;
  }

  function axisLabel(v) {
    return v >= 1000 ? `${+(v / 1000).toFixed(1)}k` : String(+v.toFixed(2));
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function drawChart(box, times, series, total, now, span) {
    const w = box.clientWidth, h = box.clientHeight;
    if (!w || !h) return;
    const pad = { l: 44, r: 6, t: 8, b: 20 };
    const iw = w - pad.l - pad.r, ih = h - pad.t - pad.b;
    const t0 = now - span;
    let max = 0;
    for (const v of total) if (v > max) max = v;
    for (const s of series) for (const v of s.values) if (v > max) max = v;
    const top = niceMax(max);
    const x = (t) => pad.l + (Math.max(0, t - t0) / span) * iw;
    const y = (v) => pad.t + ih - (v / top) * ih;
    const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img" });
    for (const f of [0, 0.5, 1]) {
      const v = top * f;
      root.append(svg("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      root.append(svg("text", { class: "axis", x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" }, axisLabel(v)));
    }
    const back = (sec) => (sec >= 60 ? `−${+(sec / 60).toFixed(1)} min` : `−${sec} s`);
    for (const [frac, label] of [[0, back(span)], [0.5, back(span / 2)], [1, "now"]]) {
      const anchor = frac === 0 ? "start" : frac === 1 ? "end" : "middle";
      root.append(svg("text", { class: "axis", x: pad.l + frac * iw, y: h - 4, "text-anchor": anchor }, label));
    }
    // All aliases together, as a soft area behind the lines.
    let area = "";
    let run = [];
    const close = () => {
      if (run.length) area += `M${run[0][0]},${y(0)}L${run.map((p) => p.join(",")).join("L")}L${run[run.length - 1][0]},${y(0)}Z`;
      run = [];
    };
    total.forEach((v, i) => {
      if (v === null || times[i] < t0) close();
      else run.push([x(times[i]).toFixed(1), y(v).toFixed(1)]);
    });
    close();
    if (area) root.append(svg("path", { class: "area", d: area }));
    let any = false;
    for (const s of series) {
      let dpath = "";
      let pen = false;
      s.values.forEach((v, i) => {
        if (v === null || times[i] < t0) { pen = false; return; }
        dpath += `${pen ? "L" : "M"}${x(times[i]).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      if (dpath) {
        any = true;
        root.append(svg("path", { class: `line ${s.cls}`, d: dpath }));
      }
    }
    if (!any) {
      root.append(svg("text", { class: "nodata", x: pad.l + iw / 2, y: pad.t + ih / 2, "text-anchor": "middle" }, "collecting…"));
    }
    const cursor = svg("line", { class: "cursor", y1: pad.t, y2: pad.t + ih, visibility: "hidden" });
    root.append(cursor);
    box.replaceChildren(root);
    const tip = el("div", "tip");
    tip.hidden = true;
    box.append(tip);

    root.addEventListener("mousemove", (ev) => {
      const r = root.getBoundingClientRect();
      const px = ev.clientX - r.left;
      let best = -1, dist = Infinity;
      times.forEach((t, i) => {
        const d = Math.abs(x(t) - px);
        if (t >= t0 && d < dist) { dist = d; best = i; }
      });
      if (best < 0 || dist > 30) { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; return; }
      const cx = x(times[best]);
      cursor.setAttribute("x1", cx);
      cursor.setAttribute("x2", cx);
      cursor.setAttribute("visibility", "visible");
      const rows = [el("div", "when", clock(times[best]))];
      const sum = el("div", "row");
      const label = el("span");
      label.append(el("span", "swatch all"), document.createTextNode(" all aliases"));
      sum.append(label, el("b", "", rate(total[best])));
      rows.push(sum);
      for (const s of series) {
        const row = el("div", "row");
        const name = el("span");
        name.append(el("span", `swatch ${s.cls}`), document.createTextNode(` ${s.name}`));
        row.append(name, el("b", "", rate(s.values[best])));
        rows.push(row);
      }
      tip.replaceChildren(...rows);
      tip.hidden = false;
      const left = cx + 12 + tip.offsetWidth > w ? cx - 12 - tip.offsetWidth : cx + 12;
      tip.style.left = `${left}px`;
    });
    root.addEventListener("mouseleave", () => {
      cursor.setAttribute("visibility", "hidden");
      tip.hidden = true;
    });
  }

  // -- status line, login, polling -----------------------------------------------------------
  function status(kind, text) {
    const s = $("status");
    setClass(s, `status ${kind}`);
    setText(s.lastChild, text);
  }

  function showLogin(message) {
    clearTimeout(timer);
    $("main").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    const err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
    $("login-button").disabled = false;
    $("login-button").textContent = "Open dashboard";
    status("", "Not signed in");
    $("key").focus();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    clearTimeout(timer);
    if (inFlight) {
      again = true; // asked again meanwhile (a key entered): once this one is done
      return;
    }
    again = false;
    if (document.visibilityState === "hidden") return; // resumed by visibilitychange
    inFlight = true;
    const sentKey = key;
    const headers = sentKey ? { Authorization: `Bearer ${sentKey}` } : {};
    const abort = new AbortController();
    const limit = setTimeout(() => abort.abort(), 8000);
    try {
      const r = await fetch("dashboard/data", { headers, cache: "no-store", credentials: "omit", signal: abort.signal });
      if (sentKey !== key) {
        again = true; // the key changed (entered, or forgotten) while this was on its way
        return;
      }
      if (r.status === 401 || r.status === 403) {
        let why = `HTTP ${r.status}`;
        try {
          const body = await r.json();
          if (body && body.error && body.error.message) why += `: ${body.error.message}`;
        } catch (e) { /* not JSON: the status says enough */ }
        if (sentKey) {
          sessionStorage.removeItem(KEY_NAME);
          key = null;
          showLogin(`The gateway refused this key (${why}). Use an admin key, or a client key if the gateway has no admin keys.`);
        } else {
          showLogin("");
        }
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const data = await r.json();
      $("login").hidden = true;
      $("main").hidden = false;
      $("forget").hidden = !sentKey;
      lastOk = Date.now();
      status("live", `Live · updated ${clock(data.time)}`);
      lastData = data;
      render(data);
      schedule();
    } catch (e) {
      const since = lastOk ? ` · last update ${clock(lastOk / 1000)}` : "";
      status("down", `Gateway unreachable (${e.name === "AbortError" ? "timed out" : e.message}), retrying${since}`);
      schedule();
    } finally {
      clearTimeout(limit);
      inFlight = false;
      if (again) poll();
    }
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault(); // never a real submission: the key must not reach a URL
    const input = $("key");
    const value = input.value.trim();
    if (!value) {
      showLogin("Enter a key.");
      return;
    }
    input.value = "";
    key = value;
    sessionStorage.setItem(KEY_NAME, value);
    $("login-button").disabled = true;
    $("login-button").textContent = "Checking…";
    poll();
  });
  $("errors-more").addEventListener("click", () => {
    showAllErrors = !showAllErrors;
    if (lastData) renderErrors(lastData.errors);
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_NAME);
    key = null;
    showLogin("");
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && !$("main").hidden) poll();
  });
  let redraw = 0;
  window.addEventListener("resize", () => {
    cancelAnimationFrame(redraw);
    redraw = requestAnimationFrame(() => {
      if (lastData && !$("main").hidden) renderCharts(lastData);
    });
  });

  poll(); // with the key of this tab, or none (a gateway without keys needs none)
})();
