// The status page and playground. Polls GET /status every 2 s (models, workers, adapters,
// cumulative request counters and latency histograms; rates and percentiles are computed
// here from the difference between two polls) and GET /status/series every 5 s (the last
// 15 minutes in 10-second buckets, kept by the gateway and added up over its front doors:
// the charts, drawn by charts.js); streams chat completions with fetch() and a
// ReadableStream. The API key is kept in localStorage; the admin key (the keys view:
// create, show once, revoke, usage from the ledger) only in sessionStorage, this tab's.
"use strict";

const POLL_MS = 2000;
const SERIES_MS = 5000;
const $ = (id) => document.getElementById(id);
let previous = null; // the last /status traffic, with its time
let controller = null; // aborts the running chat request
let lastSeries = null; // the last /status/series answer
let usageKey = null; // the key whose usage is shown

function key() { return localStorage.getItem("gateway-key") || ""; }
function adminKey() { return sessionStorage.getItem("gateway-admin-key") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key()) h["authorization"] = "Bearer " + key();
  return h;
}
// The status routes take either key; the admin key also shows the workers' URLs.
function statusHeaders() {
  return adminKey() ? { authorization: "Bearer " + adminKey() } : headers();
}
function adminHeaders(extra) {
  return Object.assign({ authorization: "Bearer " + adminKey() }, extra || {});
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}
const orDash = (v) => (v === null || v === undefined ? "–" : String(v));

// Quantile q of a cumulative histogram [[le, count], ...] (le null = +Inf), linear
// inside the bucket as Prometheus' histogram_quantile does.
function quantile(buckets, q) {
  if (!buckets.length) return null;
  const total = buckets[buckets.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let lowerLe = 0, lowerCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === null) return lowerLe; // in the +Inf bucket: the highest finite bound
      const inBucket = count - lowerCount;
      return inBucket > 0 ? lowerLe + (le - lowerLe) * ((rank - lowerCount) / inBucket) : le;
    }
    if (le !== null) lowerLe = le;
    lowerCount = count;
  }
  return lowerLe;
}
function diff(now, before) {
  if (!before) return now;
  return now.map(([le, count], i) => [le, count - ((before[i] || [le, 0])[1])]);
}
function ms(seconds) {
  if (seconds === null) return "–";
  return seconds < 1 ? (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 0) + " ms" : seconds.toFixed(2) + " s";
}

function showTraffic(t) {
  const at = performance.now();
  const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
  const errors = (o) => sum(o) - (o["2xx"] || 0);
  const before = previous;
  previous = { at, t };
  $("in-flight").textContent = t.in_flight;
  if (!before) return;
  const dt = (at - before.at) / 1000;
  $("rate").textContent = ((sum(t.requests) - sum(before.t.requests)) / dt).toFixed(2);
  $("err-rate").textContent = ((errors(t.requests) - errors(before.t.requests)) / dt).toFixed(2);
  // Percentiles over the last interval; over all time when nothing happened in it.
  const pick = (name) => {
    const d = diff(t.histograms[name], before.t.histograms[name]);
    const recent = d.length && d[d.length - 1][1] > 0;
    return recent ? d : t.histograms[name];
  };
  const three = (h) => [0.5, 0.95, 0.99].map((q) => ms(quantile(h, q))).join(" / ");
  $("lat").textContent = three(pick("duration"));
  $("ttft").textContent = three(pick("ttft"));
  const itl = pick("itl");
  $("itl").textContent = ms(quantile(itl, 0.5)) + " / " + ms(quantile(itl, 0.99));
}

function showModels(models) {
  fill($("models").tBodies[0], models.map((m) => [
    cell(m.name),
    cell(m.engine),
    cell(m.task),
    cell(m.ready ? "ready" : "not ready" + (m.detail ? ": " + m.detail : ""), m.ready ? "ok" : "bad"),
    cell(m.running),
    cell(m.waiting),
    cell(m.adapters.length ? m.adapters.join(", ") : "–"),
  ]));
  // Bars: in flight (the gateway's own requests on the worker, or the worker's running
  // count, whichever is larger) and queued against the busiest worker; KV cache out of 100 %.
  const all = models.flatMap((m) => m.workers);
  const inFlight = (w) => Math.max(w.outstanding || 0, w.running || 0);
  const maxLoad = Math.max(1, ...all.map(inFlight), ...all.map((w) => w.waiting || 0));
  const maxEvents = Math.max(1, ...all.map((w) => Math.max(w.ejections || 0, w.restarts || 0)));
  const workers = models.flatMap((m) => m.workers.map((w) => [
    cell(m.name),
    cell(w.url),
    cell(w.healthy ? "healthy" : (w.state || "down") + (w.detail ? ": " + w.detail : ""), w.healthy ? "ok" : "bad"),
    barCell(inFlight(w), maxLoad, String(inFlight(w))),
    barCell(w.waiting, maxLoad, orDash(w.waiting), "warn"),
    barCell(w.kv_cache_usage === null ? null : w.kv_cache_usage * 100, 100,
      w.kv_cache_usage === null ? "–" : (w.kv_cache_usage * 100).toFixed(1) + " %", "kv"),
    barCell(w.ejections, maxEvents, orDash(w.ejections) + (w.ejected ? " (out now)" : ""), "bad"),
    barCell(w.restarts, maxEvents, orDash(w.restarts), "bad"),
  ]));
  if (!workers.length) {
    const only = cell("no separate workers: the embedded engines run in the gateway process", "muted");
    only.colSpan = 8;
    workers.push([only]);
  }
  fill($("workers").tBodies[0], workers);
  // The playground's model list: generation models and their adapters.
  const select = $("model");
  const names = models.filter((m) => m.task === "generate").flatMap((m) => [m.name, ...m.adapters]);
  const current = Array.from(select.options).map((o) => o.value);
  if (names.join("\n") !== current.join("\n")) {
    const keep = select.value;
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    if (names.includes(keep)) select.value = keep;
  }
}

function setConn(text, cls) {
  const el = $("conn");
  el.textContent = text;
  el.className = "pill " + (cls || "");
}

async function poll() {
  try {
    const r = await fetch("/status", { headers: statusHeaders() });
    if (r.status === 401) {
      setConn("enter the API key", "bad");
    } else if (!r.ok) {
      setConn("status " + r.status, "bad");
    } else {
      const s = await r.json();
      showModels(s.models);
      showTraffic(s.traffic);
      const ready = s.models.filter((m) => m.ready).length;
      setConn(ready + " / " + s.models.length + " models ready", ready ? "ok" : "bad");
    }
  } catch (e) {
    setConn("gateway unreachable", "bad");
  }
  setTimeout(poll, POLL_MS);
}

// One SSE event's JSON, or null for [DONE] and comments.
function parseEvent(event) {
  const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
  if (!data || data === "[DONE]") return null;
  return JSON.parse(data);
}

async function chat(ev) {
  ev.preventDefault();
  const out = $("output");
  out.textContent = "";
  out.dataset.chunks = "0";
  out.dataset.done = "false";
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("prompt").value });
  const body = { model: $("model").value, messages, stream: true, max_tokens: Number($("max-tokens").value) || 64 };
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("chat-state").textContent = "waiting for the first token…";
  const started = performance.now();
  let first = null, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "content-type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!event) continue;
        if (event.error) throw new Error(event.error.message);
        for (const choice of event.choices || []) {
          const text = (choice.delta && choice.delta.content) || "";
          if (text) {
            if (first === null) first = performance.now();
            out.textContent += text;
            out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const total = (performance.now() - started) / 1000;
    $("chat-state").textContent = "done (" + (finish || "?") + ") · first token " +
      ms(first === null ? null : (first - started) / 1000) + " · total " + ms(total);
  } catch (e) {
    $("chat-state").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    out.dataset.done = "true";
    $("send").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

// ---- the charts: GET /status/series

const seconds = (v) => (v < 1 ? (v * 1000).toFixed(v < 0.01 ? 1 : 0) + " ms" : v.toFixed(v < 10 ? 2 : 0) + " s");
const perSecond = (v) => (v >= 1000 ? (v / 1000).toFixed(1) + "k" : v >= 10 ? v.toFixed(0) : v.toFixed(v ? 2 : 0));
const count = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));

function drawCharts(s) {
  const select = $("chart-model");
  const names = Object.keys(s.models).filter((m) => m !== "_unknown");
  const current = Array.from(select.options).slice(1).map((o) => o.value);
  if (names.join("\n") !== current.join("\n")) {
    const keep = select.value;
    select.replaceChildren(new Option("all models", ""), ...names.map((n) => new Option(n, n)));
    if (names.includes(keep)) select.value = keep;
  }
  const c = select.value && s.models[select.value] ? s.models[select.value] : s.all;
  const times = c.requests_s.map((_, i) => s.start + (i + 1) * s.bucket_s);
  $("fronts").textContent = "· " + s.bucket_s + "-second buckets, " + s.fronts +
    (s.fronts === 1 ? " front door" : " front doors");
  lineChart($("chart-rate"), { times, format: perSecond, series: [
    { name: "requests", values: c.requests_s },
    { name: "errors", values: c.errors_s, color: "#dc2626" },
    { name: "429", values: c.rate_limited_s, color: "#d97706" },
  ] });
  lineChart($("chart-e2e"), { times, format: seconds, series: [
    { name: "p50", values: c.e2e_p50 }, { name: "p95", values: c.e2e_p95 }, { name: "p99", values: c.e2e_p99 },
  ] });
  lineChart($("chart-ttft"), { times, format: seconds, series: [
    { name: "p50", values: c.ttft_p50 }, { name: "p95", values: c.ttft_p95 }, { name: "p99", values: c.ttft_p99 },
  ] });
  lineChart($("chart-tokens"), { times, format: perSecond, series: [
    { name: "completion", values: c.completion_tokens_s }, { name: "prompt", values: c.prompt_tokens_s },
  ] });
  lineChart($("chart-load"), { times, format: count, series: [
    { name: "in flight", values: c.in_flight },
    { name: "queued (gateway)", values: c.queued },
    { name: "waiting (workers)", values: c.waiting },
  ] });
  lineChart($("chart-models"), { times, format: perSecond,
    series: names.map((n) => ({ name: n, values: s.models[n].requests_s })) });
}

async function pollSeries() {
  try {
    const r = await fetch("/status/series", { headers: statusHeaders() });
    if (r.ok) {
      lastSeries = await r.json();
      drawCharts(lastSeries);
    }
  } catch (e) {
    // shown by the /status poll's pill
  }
  setTimeout(pollSeries, SERIES_MS);
}

// ---- API keys (the admin key): list, create (the secret shown once), revoke, usage

function limitsText(k) {
  const parts = [];
  if (k.rpm) parts.push(k.rpm + " req/min");
  if (k.tpm) parts.push(k.tpm + " tok/min");
  if (k.max_parallel) parts.push(k.max_parallel + " parallel");
  if (k.budget_tokens) parts.push(k.budget_tokens + " tokens budget");
  return parts.length ? parts.join(", ") : "unlimited";
}

async function adminCall(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: adminHeaders(body ? { "content-type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || "HTTP " + r.status);
  return data;
}

async function loadKeys() {
  const section = $("keys-section");
  if (!adminKey()) { section.hidden = true; return; }
  section.hidden = false;
  try {
    const list = await adminCall("GET", "/admin/keys");
    $("keys-state").textContent = list.data.length + (list.data.length === 1 ? " key" : " keys");
    fill($("keys").tBodies[0], list.data.map((k) => {
      const actions = document.createElement("td");
      const usage = document.createElement("button");
      usage.type = "button";
      usage.textContent = "usage";
      usage.className = "small";
      usage.dataset.usage = k.id;
      usage.addEventListener("click", () => showUsage(k.id));
      actions.append(usage);
      if (!k.revoked) {
        const revoke = document.createElement("button");
        revoke.type = "button";
        revoke.textContent = "revoke";
        revoke.className = "small danger";
        revoke.dataset.revoke = k.id;
        revoke.addEventListener("click", async () => {
          if (!confirm("Revoke key " + k.id + (k.name ? " (" + k.name + ")" : "") + "?")) return;
          await adminCall("DELETE", "/admin/keys/" + encodeURIComponent(k.id)).catch((e) => alert(e.message));
          loadKeys();
        });
        actions.append(revoke);
      }
      return [
        cell(k.id), cell(k.name || "–"), cell(limitsText(k)),
        cell(k.models ? k.models.join(", ") : "all"),
        cell(new Date(k.created * 1000).toLocaleString()),
        cell(k.revoked ? "revoked" : "active", k.revoked ? "bad" : "ok"),
        actions,
      ];
    }));
    if (usageKey) showUsage(usageKey);
  } catch (e) {
    $("keys-state").textContent = "keys: " + e.message;
  }
}

async function createKey(ev) {
  ev.preventDefault();
  const policy = { name: $("new-name").value.trim() };
  for (const [id, field] of [["new-rpm", "rpm"], ["new-tpm", "tpm"], ["new-parallel", "max_parallel"], ["new-budget", "budget_tokens"]]) {
    if ($(id).value !== "") policy[field] = Number($(id).value);
  }
  const models = $("new-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) policy.models = models;
  try {
    const made = await adminCall("POST", "/admin/keys", policy);
    $("secret-value").textContent = made.key; // shown once: never stored by the page
    $("secret").hidden = false;
    $("create-key").reset();
    await loadKeys();
  } catch (e) {
    $("keys-state").textContent = "create: " + e.message;
  }
}

// The ledger (days × models) as stacked bars of tokens per day, one colour per model.
async function showUsage(id) {
  usageKey = id;
  try {
    const u = await adminCall("GET", "/admin/keys/" + encodeURIComponent(id) + "/usage");
    const days = Object.keys(u.days).sort();
    const models = [...new Set(days.flatMap((d) => Object.keys(u.days[d])))].sort();
    const tokens = (d, m) => {
      const f = (u.days[d] || {})[m] || {};
      return (f.prompt_tokens || 0) + (f.completion_tokens || 0);
    };
    const requests = days.reduce((a, d) => a + models.reduce((b, m) =>
      b + Object.entries((u.days[d] || {})[m] || {}).filter(([k]) => k.startsWith("requests_")).reduce((c, [, v]) => c + v, 0), 0), 0);
    $("usage").hidden = false;
    $("usage-key").textContent = id;
    $("usage-now").textContent = "· tokens per day by model · " + requests + " requests · in flight now " +
      u.in_flight + ", " + u.reserved_tokens + " tokens reserved";
    stackedBars($("chart-usage"), {
      labels: days.length ? days : ["no usage yet"],
      stacks: models.map((m) => ({ name: m, values: days.map((d) => tokens(d, m)) })),
      format: count,
    });
  } catch (e) {
    $("usage-now").textContent = "usage: " + e.message;
  }
}

$("key").value = key();
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("gateway-key", $("key").value.trim());
  previous = null;
  setConn("connecting…");
});
$("admin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("admin-key").value.trim();
  if (v) sessionStorage.setItem("gateway-admin-key", v);
  else sessionStorage.removeItem("gateway-admin-key");
  $("admin-key").value = "";
  $("admin-key").placeholder = v ? "admin key set (this tab)" : "for the keys view (this tab only)";
  loadKeys();
});
$("create-key").addEventListener("submit", createKey);
$("secret-hide").addEventListener("click", () => {
  $("secret-value").textContent = "";
  $("secret").hidden = true;
});
$("chart-model").addEventListener("change", () => lastSeries && drawCharts(lastSeries));
$("chat-form").addEventListener("submit", chat);
$("stop").addEventListener("click", () => controller && controller.abort());
if (adminKey()) $("admin-key").placeholder = "admin key set (this tab)";
poll();
pollSeries();
loadKeys();
