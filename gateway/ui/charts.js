// Hand-drawn SVG charts for the status page: a line chart over time and a stacked bar
// chart. No library: a chart is an <svg> whose children are rebuilt on each update
// (a few hundred elements at most). `data-points` (the longest line's points above zero)
// and `data-bars` on the <svg> say how much was drawn (the browser test reads them).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];

function el(name, attrs, text) {
  const e = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`.
function niceMax(max) {
  if (!(max > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 5, 10]) if (m * p >= max) return m * p;
  return 10 * p;
}

// lineChart(svg, {times: [unix s...], series: [{name, values: [number|null...]}], format})
// Nulls break a line (no data in that bucket).
function lineChart(svg, spec) {
  const W = 460, H = 190, L = 52, R = 8, T = 8, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const fmt = spec.format || ((v) => String(v));
  const times = spec.times;
  const n = times.length;
  let max = 0, points = 0;
  for (const s of spec.series) for (const v of s.values) if (v !== null && v > max) max = v;
  const top = niceMax(max);
  const x = (i) => L + (n > 1 ? (i * (W - L - R)) / (n - 1) : 0);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    svg.append(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(el("text", { x: L - 4, y: y(v) + 3, class: "tick", "text-anchor": "end" }, fmt(v)));
  }
  if (n > 1) {
    const t0 = times[n - 1];
    for (const back of [15, 10, 5, 0]) {
      const i = n - 1 - Math.round((back * 60) / (times[1] - times[0]));
      if (i < 0) continue;
      svg.append(el("text", { x: x(i), y: H - B + 14, class: "tick", "text-anchor": "middle" },
        back ? `-${back} min` : new Date(t0 * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })));
    }
  }
  spec.series.forEach((s, k) => {
    const color = s.color || PALETTE[k % PALETTE.length];
    let d = "", pen = false, drawn = 0;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
      if (v > 0) drawn += 1;
    });
    points = Math.max(points, drawn);
    if (d) svg.append(el("path", { d, class: "line", stroke: color }));
    // The legend, under the axis, with the latest value.
    const last = [...s.values].reverse().find((v) => v !== null && v !== undefined);
    const lx = L + k * ((W - L) / spec.series.length);
    svg.append(el("rect", { x: lx, y: H - 14, width: 9, height: 9, fill: color }));
    svg.append(el("text", { x: lx + 12, y: H - 6, class: "legend" },
      s.name + (last === undefined ? "" : " " + fmt(last))));
  });
  svg.dataset.points = String(points);
}

// stackedBars(svg, {labels: [x labels], stacks: [{name, values: [per label]}], format})
function stackedBars(svg, spec) {
  const W = 720, H = 220, L = 60, R = 8, T = 8, B = 48;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const fmt = spec.format || ((v) => String(v));
  const n = spec.labels.length;
  const totals = spec.labels.map((_, i) => spec.stacks.reduce((a, s) => a + (s.values[i] || 0), 0));
  const top = niceMax(Math.max(0, ...totals));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    svg.append(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(el("text", { x: L - 4, y: y(v) + 3, class: "tick", "text-anchor": "end" }, fmt(v)));
  }
  const slot = (W - L - R) / Math.max(1, n);
  const bw = Math.min(48, slot * 0.7);
  let bars = 0;
  spec.labels.forEach((label, i) => {
    let base = 0;
    const cx = L + slot * i + slot / 2;
    spec.stacks.forEach((s, k) => {
      const v = s.values[i] || 0;
      if (v <= 0) return;
      const r = el("rect", { x: cx - bw / 2, y: y(base + v), width: bw, height: y(base) - y(base + v),
        fill: PALETTE[k % PALETTE.length] });
      r.append(el("title", {}, `${label} · ${s.name}: ${fmt(v)}`));
      svg.append(r);
      base += v;
      bars += 1;
    });
    svg.append(el("text", { x: cx, y: H - B + 14, class: "tick", "text-anchor": "middle" }, label));
  });
  spec.stacks.forEach((s, k) => {
    const lx = L + k * 150;
    svg.append(el("rect", { x: lx, y: H - 14, width: 9, height: 9, fill: PALETTE[k % PALETTE.length] }));
    svg.append(el("text", { x: lx + 12, y: H - 6, class: "legend" }, s.name));
  });
  svg.dataset.bars = String(bars);
}

// A horizontal bar inside a table cell: value / max, with the value as text.
function barCell(value, max, text, cls) {
  const td = document.createElement("td");
  if (value === null || value === undefined) { td.textContent = "–"; return td; }
  const wrap = document.createElement("div");
  wrap.className = "bar" + (cls ? " bar-" + cls : "");
  const fill = document.createElement("span");
  fill.style.width = Math.max(0, Math.min(100, max > 0 ? (100 * value) / max : 0)) + "%";
  const label = document.createElement("em");
  label.textContent = text;
  wrap.append(fill, label);
  td.append(wrap);
  return td;
}
