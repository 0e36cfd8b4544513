// Small DOM helpers and hand-drawn charts (no libraries: the page must work offline).

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// replaceChildren that skips null/false and flattens nested arrays, like h().
export function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export const short = (id) => (id ? id.slice(0, 8) : "");
export const pct = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)}%` : "–");
export const num = (x, digits = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–");
// 1536 -> "1.5 KiB": binary units, as quotas are set in MiB.
export function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}
export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);

export function progressBar(fraction, attrs = {}) {
  const width = `${Math.round(100 * Math.max(0, Math.min(1, fraction || 0)))}%`;
  return h("div", { class: "bar", role: "progressbar", "aria-valuenow": width, ...attrs },
    h("span", { style: `width:${width}` }));
}

// Fraction of the whole job done, from its progress {epoch, epochs, step, steps}.
export function jobFraction(job) {
  if (job.status === "succeeded") return 1;
  const p = job.progress || {};
  if (!p.epochs || !p.steps) return 0;
  return ((p.epoch - 1) * p.steps + p.step) / (p.epochs * p.steps);
}

// Horizontal bars: [[label, value, text]] scaled to the largest value (or to 1 for scores).
export function hbars(rows, { max } = {}) {
  const top = max ?? Math.max(1, ...rows.map((r) => r[1]));
  return h("div", { class: "hbars" }, rows.map(([label, value, text]) => [
    h("span", {}, label), progressBar(value / top), h("span", { class: "mono" }, text ?? String(value)),
  ]));
}

const COLORS = { train: "#2f6fde", val: "#e07b00" };

// An SVG line chart of history[i][`${series}_${metric}`] against epoch; redrawn as epochs arrive.
export function lineChart(history, metric, { epochs } = {}) {
  const W = 460, H = 230, L = 44, R = 12, T = 12, B = 38;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.dataset.metric = metric;
  svg.dataset.points = String(history.length);
  const values = history.flatMap((e) => ["train", "val"].map((s) => e[`${s}_${metric}`])).filter(Number.isFinite);
  const lastEpoch = Math.max(epochs || 1, ...history.map((e) => e.epoch), 1);
  let lo = metric === "accuracy" ? 0 : Math.min(0, ...values);
  let hi = metric === "accuracy" ? 1 : Math.max(1e-6, ...values) * 1.1;
  if (hi === lo) hi = lo + 1;
  const x = (epoch) => L + ((epoch - 1) / Math.max(1, lastEpoch - 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eef0f4" });
    add("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2));
  }
  for (let e = 1; e <= lastEpoch; e += Math.max(1, Math.ceil(lastEpoch / 10))) {
    add("text", { x: x(e), y: H - B + 16, "text-anchor": "middle" }, String(e));
  }
  add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "epoch");
  for (const series of ["train", "val"]) {
    const pts = history.filter((e) => Number.isFinite(e[`${series}_${metric}`]))
      .map((e) => [x(e.epoch), y(e[`${series}_${metric}`])]);
    if (!pts.length) continue;
    add("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none", stroke: COLORS[series],
      "stroke-width": 2 });
    for (const [cx, cy] of pts) add("circle", { cx, cy, r: 3, fill: COLORS[series] });
  }
  return svg;
}

export const legend = () => h("div", { class: "legend" },
  Object.entries(COLORS).map(([name, color]) => h("span", {}, h("i", { style: `background:${color}` }), name)));

// A click-or-drop area feeding files to onFiles; the hidden <input> is what tests and keyboards use.
export function dropZone({ id, accept, multiple = false, text, onFiles }) {
  const input = h("input", { type: "file", id: `${id}-input`, accept, multiple, hidden: true,
    onchange: () => input.files.length && onFiles([...input.files]) });
  const zone = h("div", { class: "drop", id, tabindex: 0, onclick: () => input.click(),
    onkeydown: (e) => (e.key === "Enter" || e.key === " ") && input.click() }, text, input);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
  return zone;
}

let toastTimer;
export function toast(message) {
  const node = document.getElementById("toast");
  node.textContent = message;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (node.hidden = true), 6000);
}
