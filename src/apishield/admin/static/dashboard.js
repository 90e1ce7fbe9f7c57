// apishield live dashboard. Vanilla JS, no build step: it polls dashboard/data (relative to
// the page, so the same file works on the gateway's admin listener and under the
// middleware's admin.path) and draws SVG.
//
// Security: everything shown from the data (client addresses, reasons, operation names,
// alert summaries: attacker-controlled input) goes through textContent or SVG text nodes,
// never innerHTML. The admin token lives in this tab's sessionStorage only and is sent as
// `Authorization: Bearer` to this origin (the page's CSP allows no other).
"use strict";

(() => {
  const TOKEN_KEY = "apishield.admin.token";
  const POLL_KEY = "apishield.dashboard.poll";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let updates = 0;
  let inFlight = false;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function clock(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString();
  }

  function number(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // --- the poll -------------------------------------------------------------------------

  function pollSeconds() {
    const value = Number($("poll").value);
    return Number.isFinite(value) && value >= 1 && value <= 300 ? value : 5;
  }

  function initialPoll() {
    // ?poll=N in the page's URL wins, then the last choice in this tab
    const fromUrl = new URLSearchParams(window.location.search).get("poll");
    const wanted = fromUrl || sessionStorage.getItem(POLL_KEY);
    if (!wanted) return;
    const select = $("poll");
    if (![...select.options].some((option) => option.value === wanted)) {
      const seconds = Number(wanted);
      if (!Number.isInteger(seconds) || seconds < 1 || seconds > 300) return;
      select.append(new Option(`${seconds} s`, String(seconds)));
    }
    select.value = wanted;
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, pollSeconds() * 1000);
  }

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      await load();
    } finally {
      inFlight = false;
    }
  }

  async function load() {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch("dashboard/data", { headers, cache: "no-store", credentials: "omit" });
    } catch (error) {
      setStatus(`cannot reach the admin API (${error.message}); retrying`, true);
      schedule();
      return;
    }
    if (response.status === 401) {
      askForToken(token ? "The admin API refused this token." : "This admin API needs its bearer token.");
      return;
    }
    if (!response.ok) {
      setStatus(`the admin API answered ${response.status}; retrying`, true);
      schedule();
      return;
    }
    let data;
    try {
      data = await response.json();
    } catch (error) {
      setStatus(`the admin API sent no JSON (${error.message}); retrying`, true);
      schedule();
      return;
    }
    $("token-form").hidden = true;
    $("panels").hidden = false;
    $("forget-token").hidden = !token;
    render(data);
    updates += 1;
    document.body.dataset.updates = String(updates);
    setStatus(`updated ${clock(data.now)} · every ${pollSeconds()} s`, false);
    schedule();
  }

  function askForToken(why) {
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-why").textContent = why;
    $("token-form").hidden = false;
    $("panels").hidden = true;
    setStatus("waiting for the admin token", true);
    $("token").focus();
  }

  // --- the panels -----------------------------------------------------------------------

  function render(data) {
    $("not-counting").hidden = data.counting !== false;
    $("total-requests").textContent = number(data.totals.requests);
    $("total-refused").textContent = number(data.totals.refused);
    $("total-errors").textContent = number(data.totals.errors);
    $("total-bans").textContent = number(data.bans.active);
    $("total-alerts").textContent = number(data.alerts.fired);
    renderRate(data);
    renderReasons(data.refusals);
    renderRows("refusers", data.refusers,
      (r) => [r.ip, r.refusals, r.last_reason, clock(r.last_at)]);
    renderRows("bans", data.bans.list, (b) => [b.kind, b.value, b.rule, clock(b.until)]);
    renderAlerts(data.alerts.recent);
    renderLatency(data.latency);
  }

  function renderRows(name, rows, cells) {
    const body = $(`${name}-table`).tBodies[0];
    body.replaceChildren(...rows.map((row) => {
      const tr = el("tr");
      for (const cell of cells(row)) tr.append(el("td", cell));
      return tr;
    }));
    $(`${name}-empty`).hidden = rows.length > 0;
  }

  function renderRate(data) {
    const svg = $("rate-chart");
    const width = 640, height = 200, left = 40, bottom = 20, top = 8;
    const points = data.rate;
    // the x axis spans the past the server has (at least a minute, at most ten)
    const end = data.now;
    const span = Math.min(600, Math.max(60, points.length ? end - points[0].at : 0));
    const start = end - span;
    let max = 1;
    for (const p of points) max = Math.max(max, p.requests, p.refused, p.errors);
    max = niceCeiling(max);
    const x = (t) => left + ((t - start) / (end - start)) * (width - left - 4);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    const nodes = [];
    for (const fraction of [0, 0.5, 1]) {
      const value = max * fraction;
      nodes.push(svgEl("line", { class: "grid", x1: left, x2: width, y1: y(value), y2: y(value) }));
      nodes.push(svgEl("text", { class: "axis", x: left - 4, y: y(value) + 3, "text-anchor": "end" },
        formatRate(value)));
    }
    for (const [ago, anchor] of [[span, "start"], [span / 2, "middle"], [0, "end"]]) {
      nodes.push(svgEl("text", { class: "axis", x: x(end - ago), y: height - 4,
        "text-anchor": anchor }, ago === 0 ? "now" : `−${formatSpan(ago)}`));
    }
    for (const series of ["requests", "refused", "errors"]) {
      const coords = points.filter((p) => p.at >= start)
        .map((p) => `${x(p.at).toFixed(1)},${y(p[series]).toFixed(1)}`);
      nodes.push(svgEl("polyline", { class: series, points: coords.join(" ") }));
    }
    svg.replaceChildren(...nodes);
    const last = points[points.length - 1];
    $("rate-now").textContent = last
      ? `now: ${formatRate(last.requests)}/s, refused ${formatRate(last.refused)}/s`
      : "first sample taken: the rate appears after the next one";
  }

  function formatSpan(seconds) {
    return seconds < 120 ? `${Math.round(seconds)} s` : `${Math.round(seconds / 60)} min`;
  }

  function niceCeiling(value) {
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  function formatRate(value) {
    return value >= 10 ? value.toFixed(0) : value.toFixed(value >= 1 ? 1 : 2);
  }

  function renderReasons(rows) {
    renderRows("reasons", rows, (r) => [r.reason, r.total, r.recent]);
    barChart($("reasons-chart"), 420, rows.map((r) => ({ label: r.reason, value: r.total,
      text: String(r.total) })), "refused");
  }

  function renderLatency(latency) {
    const rows = latency.operations;
    renderRows("latency", rows,
      (r) => [r.operation, r.count, r.mean_ms, number(r.p50_ms), number(r.p95_ms), number(r.p99_ms)]);
    $("latency-since").textContent = latency.since
      ? `(since ${clock(latency.since)}; bars: p95)` : "(bars: p95)";
    barChart($("latency-chart"), 640, rows.map((r) => ({ label: r.operation, value: r.p95_ms || 0,
      text: `${number(r.p95_ms)} ms` })), "");
  }

  // Horizontal bars, one row per item: label, bar, value. Labels are SVG text nodes.
  function barChart(svg, width, items, className) {
    const row = 20, labelWidth = Math.round(width * 0.38), countWidth = 70;
    const max = Math.max(1e-9, ...items.map((item) => item.value));
    const nodes = items.map((item, index) => {
      const group = svgEl("g", { transform: `translate(0 ${index * row})` });
      const label = item.label.length > 40 ? `${item.label.slice(0, 39)}…` : item.label;
      group.append(svgEl("text", { class: "label", x: 0, y: 14 }, label));
      const barWidth = Math.max(1, ((width - labelWidth - countWidth) * item.value) / max);
      group.append(svgEl("rect", { class: `bar ${className}`.trim(), x: labelWidth, y: 3,
        height: row - 6, width: barWidth.toFixed(1) }));
      group.append(svgEl("text", { class: "count", x: labelWidth + barWidth + 4, y: 14 }, item.text));
      return group;
    });
    svg.setAttribute("viewBox", `0 0 ${width} ${Math.max(1, items.length) * row}`);
    svg.replaceChildren(...nodes);
  }

  function renderAlerts(alerts) {
    $("alerts-list").replaceChildren(...alerts.map((alert) => {
      const item = el("li");
      item.append(el("span", alert.severity, "severity"), el("span", alert.summary),
        el("span", `${alert.rule} · ${alert.key} · ${clock(alert.at)}`, "when"));
      return item;
    }));
    $("alerts-empty").hidden = alerts.length > 0;
  }

  // --- start ----------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    initialPoll();
    $("poll").addEventListener("change", () => {
      sessionStorage.setItem(POLL_KEY, $("poll").value);
      refresh();
    });
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      refresh();
    });
    $("forget-token").addEventListener("click", () => askForToken("Token forgotten."));
    refresh();
  });
})();
