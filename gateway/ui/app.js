// The status page and playground. Polls GET /status every 2 s (models, workers, adapters,
// cumulative request counters and latency histograms; rates and percentiles are computed
// here from the difference between two polls) and streams chat completions with fetch()
// and a ReadableStream. The key from the key field is kept in localStorage.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let previous = null; // the last /status traffic, with its time
let controller = null; // aborts the running chat request

function key() { return localStorage.getItem("gateway-key") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key()) h["authorization"] = "Bearer " + key();
  return h;
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
  const workers = models.flatMap((m) => m.workers.map((w) => [
    cell(m.name),
    cell(w.url),
    cell(w.healthy ? "healthy" : (w.state || "down") + (w.detail ? ": " + w.detail : ""), w.healthy ? "ok" : "bad"),
    cell(orDash(w.running)),
    cell(orDash(w.waiting)),
    cell(w.kv_cache_usage === null ? "–" : (w.kv_cache_usage * 100).toFixed(1) + " %"),
    cell(orDash(w.restarts)),
  ]));
  if (!workers.length) {
    const only = cell("no separate workers: the embedded engines run in the gateway process", "muted");
    only.colSpan = 7;
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
    const r = await fetch("/status", { headers: headers() });
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

$("key").value = key();
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("gateway-key", $("key").value.trim());
  previous = null;
  setConn("connecting…");
});
$("chat-form").addEventListener("submit", chat);
$("stop").addEventListener("click", () => controller && controller.abort());
poll();
