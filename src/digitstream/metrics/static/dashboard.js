// The digitstream dashboard: polls /api/stats once a second and redraws.
// Everything is built with textContent, never innerHTML: stage names, reasons
// and the model card come from the model bundle and the stream.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------ formatting
function fmtRate(x) {
  if (x == null || !isFinite(x)) return "–";
  if (x >= 1e6) return (x / 1e6).toFixed(x >= 1e7 ? 1 : 2) + "M";
  if (x >= 1e4) return (x / 1e3).toFixed(0) + "k";
  if (x >= 1e3) return (x / 1e3).toFixed(1) + "k";
  return x.toFixed(x > 0 && x < 10 ? 1 : 0);
}
function fmtShort(n) {
  return n >= 1000 ? fmtRate(n) : String(Math.round(n));
}
function fmtCount(n) {
  if (n == null) return "–";
  return Number(n).toLocaleString("en-US");
}
function fmtDur(s) {
  if (s == null || !isFinite(s)) return "–";
  if (s < 1e-3) return (s * 1e6).toPrecision(3) + " µs";
  if (s < 1) return (s * 1e3).toPrecision(3) + " ms";
  return s.toPrecision(3) + " s";
}
function fmtUptime(s) {
  if (s == null) return "–";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${sec}s`;
  return `${sec}s`;
}
function fmtSize(n) {
  if (n >= 1 << 20) return (n / (1 << 20)) + "M";
  if (n >= 1024) return (n / 1024) + "k";
  return String(n);
}
function fmtPercent(x, digits = 1) {
  return x == null ? "–" : (100 * x).toFixed(digits) + "%";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child == null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

// ------------------------------------------------------------ charts
const AXIS = { stroke: "#8a94a6", grid: { stroke: "#232936", width: 1 }, ticks: { stroke: "#232936", width: 1 } };
const charts = {};

function makeChart(id, series, yOpts, plugins) {
  const box = $(id);
  const opts = {
    plugins: plugins || [],
    width: box.clientWidth,
    height: box.clientHeight - 30,
    cursor: { drag: { x: false, y: false } },
    legend: { live: true },
    // at least a minute wide, so a young stream grows from the right instead of filling the chart
    scales: { x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] }, y: yOpts.scale },
    axes: [
      { ...AXIS },
      { ...AXIS, size: 64, values: (u, vals) => vals.map(yOpts.format) },
    ],
    series: [{ value: (u, v) => (v == null ? "–" : new Date(v * 1000).toLocaleTimeString()) },
      ...series.map((s) => ({ width: 2, points: { show: false }, value: (u, v) => yOpts.format(v), ...s }))],
  };
  const chart = new uPlot(opts, [[], ...series.map(() => [])], box);
  new ResizeObserver(() => chart.setSize({ width: box.clientWidth, height: box.clientHeight - 30 })).observe(box);
  return chart;
}

// Model swaps (dashed) and refused bundles (dotted) as vertical lines on a chart:
// `marks()` gives {swap: [...], refused: [...]}, Unix times. The chart's box records
// how many of each it drew (data-swap-marks, data-refused-marks), for tests and tools.
const MARK_STYLES = {
  swap: { color: "--swap", fallback: "#c792ea", dash: [5, 4], label: "swap" },
  refused: { color: "--bad", fallback: "#ff6b6b", dash: [2, 3], label: "refused" },
};

function swapMarks(marks) {
  return {
    hooks: {
      draw: [(u) => {
        const [min, max] = [u.scales.x.min, u.scales.x.max];
        const { ctx, bbox } = u;
        const dpr = devicePixelRatio;
        const all = marks();
        ctx.save();
        ctx.lineWidth = 2 * dpr;
        ctx.font = `${11 * dpr}px sans-serif`;
        ctx.textBaseline = "top";
        for (const [kind, style] of Object.entries(MARK_STYLES)) {
          const shown = (all[kind] || []).filter((t) => min != null && t >= min && t <= max);
          const color = getComputedStyle(document.documentElement).getPropertyValue(style.color).trim() || style.fallback;
          ctx.strokeStyle = color;
          ctx.fillStyle = color;
          ctx.setLineDash(style.dash.map((d) => d * dpr));
          // refusals labelled lower down, so a swap and a refusal close together stay readable
          const labelY = bbox.top + (kind === "swap" ? 2 : 16) * dpr;
          for (const t of shown) {
            const x = Math.round(u.valToPos(t, "x", true));
            ctx.beginPath();
            ctx.moveTo(x, bbox.top);
            ctx.lineTo(x, bbox.top + bbox.height);
            ctx.stroke();
            // the label on the line's left near the right edge, where the newest mark is
            const right = x > bbox.left + bbox.width - 60 * dpr;
            ctx.textAlign = right ? "right" : "left";
            ctx.fillText(right ? style.label + " " : " " + style.label, x, labelY);
          }
          u.root.parentElement.dataset[kind + "Marks"] = String(shown.length);
        }
        ctx.restore();
      }],
    },
  };
}

function setData(chart, data) {
  chart.setData(data);
  // away from the cursor the legend shows the latest second rather than dashes
  const last = data[0].length - 1;
  if (last >= 0 && chart.cursor.idx == null) chart.setLegend({ idx: last });
}

function drawCharts(h) {
  if (!window.uPlot) return;
  if (!charts.throughput) {
    charts.throughput = makeChart("chart-throughput", [
      { label: "out", stroke: "#5ab0ff", fill: "rgba(90,176,255,0.12)" },
      { label: "in", stroke: "#ffb35a", dash: [4, 4] },
      { label: "rejected", stroke: "#ff6b6b" },
    ], { scale: { range: (u, min, max) => [0, Math.max(10, max * 1.1)] }, format: fmtRate },
    [swapMarks(() => markTimes)]);
    charts.latency = makeChart("chart-latency", [
      { label: "p50", stroke: "#47c97e" },
      { label: "p99", stroke: "#ffb35a" },
    ], { scale: { distr: 3 }, format: fmtDur });
  }
  setData(charts.throughput, [h.t, h.out_per_s, h.in_per_s, h.rejected_per_s]);
  // a log scale has no room for zero: a second with no messages is a gap
  const positive = (xs) => xs.map((x) => (x > 0 ? x : null));
  setData(charts.latency, [h.t, positive(h.latency_p50), positive(h.latency_p99)]);
}

// ------------------------------------------------------------ sections
function drawHeader(s) {
  setText("app-name", s.name);
  const pill = $("status");
  pill.className = "pill " + s.status;
  setText("status", s.status);
  setText("uptime", fmtUptime(s.uptime_seconds));
  setText("engine", s.engine || "–");
  setText("formats", `${s.input_format} → ${s.output_format}`);
  setText("updated", "updated " + new Date(s.now * 1000).toLocaleTimeString());
}

function drawPipeline(s) {
  const box = $("pipeline");
  const stages = s.latency.stages;
  const key = JSON.stringify([s.pipeline, s.addresses]);
  if (box.dataset.key !== key) {
    box.dataset.key = key;
    box.replaceChildren();
    const conn = s.connectors || {};
    const parts = [["source", `${(conn.source || {}).connector || "tcp"} source`, s.addresses.in, "io"]];
    for (const name of s.pipeline) {
      const kind = name === "decode" || name === "encode" ? "codec" : "model step";
      parts.push([name, kind, null, kind === "model step" ? "model" : ""]);
    }
    parts.push(["sink", `${(conn.sink || {}).connector || "tcp"} sink`, s.addresses.out, "io"]);
    parts.forEach(([name, kind, where, cls], i) => {
      if (i) box.append(el("div", { class: "arrow" }, "→"));
      box.append(el("div", { class: "stage " + cls, "data-stage": name },
        el("div", { class: "stage-kind" }, kind),
        el("div", { class: "stage-name" }, name),
        el("div", { class: "stage-figure" }, where || "")));
    });
  }
  for (const node of box.querySelectorAll(".stage")) {
    const name = node.dataset.stage;
    const fig = node.querySelector(".stage-figure");
    if (stages[name]) {
      const st = stages[name];
      fig.replaceChildren("p99 ", el("b", {}, fmtDur(st.p99)), el("br"), fmtCount(st.count) + " msgs");
    } else if (name === "source") {
      fig.replaceChildren(s.addresses.in, el("br"), fmtRate(s.throughput.in_per_s) + " msg/s in",
        ...connectorLines((s.connectors || {}).source));
    } else if (name === "sink") {
      fig.replaceChildren(s.addresses.out, el("br"), fmtRate(s.throughput.out_per_s) + " msg/s out",
        ...connectorLines((s.connectors || {}).sink));
    }
  }
}

// A connector that counts its entries (Redis Streams): one line of totals, one of what is pending.
function connectorLines(report) {
  if (!report) return [];
  const join = (o) => Object.entries(o || {}).map(([k, v]) => `${k.replace("_", " ")} ${fmtCount(v)}`).join(" · ");
  return [el("br"), join(report.counters), el("br"), join(report.gauges)];
}

function drawTiles(s) {
  const t = s.throughput, m = s.messages, e2e = s.latency.end_to_end;
  setText("throughput-now", fmtRate(t.out_per_s));
  setText("throughput-1m", fmtRate(t.out_per_s_1m));
  setText("throughput-peak", fmtRate(t.peak_out_per_s));
  setText("messages-out", fmtCount(m.out));
  setText("messages-in", fmtCount(m.in));
  setText("in-flight", fmtCount(m.in_flight));
  setText("latency-p99", fmtDur(e2e.p99));
  setText("latency-p50", fmtDur(e2e.p50));
  setText("latency-p999", fmtDur(e2e.p99_9));
  setText("connections-open", fmtCount(s.connections.open));
  setText("connections-total", fmtCount(s.connections.total));
  setText("connection-errors", fmtCount(Object.values(s.connections.errors).reduce((a, b) => a + b, 0)));
  setText("rejected-total", fmtCount(m.rejected));
  setText("rejected-share", m.out ? fmtPercent(m.rejected / m.out, 2) + " of answers" : "–");
  const a = s.accuracy;
  setText("accuracy", a.accuracy == null ? "–" : fmtPercent(a.accuracy, 2));
  setText("accuracy-sub", a.labelled ? `${fmtCount(a.correct)} of ${fmtCount(a.labelled)} labelled` : "no labelled inputs yet");
}

function shortHash(h) {
  if (typeof h !== "string") return "–";
  const colon = h.indexOf(":");
  return colon >= 0 ? h.slice(0, colon + 13) : h.slice(0, 12);
}

function modelName(card) {
  if (typeof card.model === "string" && card.model) return card.model;
  if (Array.isArray(card.steps) && card.steps.length) return card.steps.join(" → ");
  return "–";
}

function fmtTime(t) {
  return new Date(t * 1000).toLocaleTimeString();
}

// What serves now, and the swaps: the tile at the top and the list under the model card.
function drawSwaps(s) {
  const card = s.model || {}, swaps = s.model_swaps || [], refusals = s.swap_refusals || [];
  const total = s.model_swaps_total != null ? s.model_swaps_total : swaps.length;
  setText("model-now", modelName(card));
  $("model-now").title = card.content_hash || "";
  setText("model-hash", shortHash(card.content_hash));
  setText("model-swaps", fmtCount(total));
  setText("model-refused", fmtCount(s.model_swaps_refused || 0));
  const last = swaps[swaps.length - 1];
  setText("model-last-swap", last ? "last swap " + fmtTime(last.time) : "no swap yet");
  const events = swaps.slice(-5).map((sw) => [sw.time, "", `${fmtTime(sw.time)} swapped in ${shortHash(sw.new_hash)} (was ${shortHash(sw.old_hash)})`]);
  for (const r of refusals.slice(-5)) events.push([r.time, "refused", `${fmtTime(r.time)} refused: ${r.reason}`]);
  events.sort((a, b) => b[0] - a[0]);
  $("model-events").replaceChildren(...events.slice(0, 6).map(([, cls, text]) => el("li", cls ? { class: cls } : {}, text)));
}

function latencyRow(name, st, share, cls) {
  const bar = share == null ? "" : el("div", { class: "share" }, el("div", { style: { width: (100 * share).toFixed(1) + "%" } }));
  return el("tr", cls ? { class: cls } : {},
    el("td", {}, name), el("td", {}, fmtCount(st.count)), el("td", {}, fmtDur(st.p50)),
    el("td", {}, fmtDur(st.p95)), el("td", {}, fmtDur(st.p99)), el("td", {}, fmtDur(st.p99_9)),
    el("td", {}, fmtDur(st.max)), el("td", {}, bar));
}

function drawLatencyTable(s) {
  const body = $("latency-table").tBodies[0];
  const stages = Object.entries(s.latency.stages);
  const total = stages.reduce((sum, [, st]) => sum + (st.mean || 0), 0);
  const rows = [latencyRow("end to end", s.latency.end_to_end, null, "total")];
  for (const [name, st] of stages) rows.push(latencyRow(name, st, total ? (st.mean || 0) / total : 0));
  body.replaceChildren(...rows);
}

function drawWorkers(s) {
  const body = $("worker-table").tBodies[0];
  body.replaceChildren(...s.workers.map((w) => {
    const e2e = w.latency.end_to_end;
    return el("tr", {},
      el("td", {}, w.name), el("td", { class: "state-" + w.state }, w.state),
      el("td", {}, fmtRate(w.out_per_s)), el("td", {}, fmtCount(w.messages)),
      el("td", {}, fmtDur(e2e.p50)), el("td", {}, fmtDur(e2e.p99)), el("td", {}, fmtDur(e2e.p99_9)));
  }));
  if (!s.workers.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no batch yet")));
  const events = s.worker_events.slice(-6).reverse();
  $("worker-events").replaceChildren(...events.map((ev) =>
    el("li", {}, `${new Date(ev.time * 1000).toLocaleTimeString()} ${ev.worker} ${ev.event}`)));
}

function drawBars(id, labels, counts, alt) {
  const max = Math.max(1, ...counts);
  $(id).replaceChildren(...counts.map((c, i) => el("div", { class: "bar", title: `${labels[i]}: ${fmtCount(c)}` },
    el("div", { class: "count" }, c ? fmtShort(c) : ""),
    el("div", { class: "fill" + (alt ? " alt" : ""), style: { height: (100 * c / max).toFixed(1) + "%" } }),
    el("div", { class: "label" }, labels[i]))));
}

function drawDistributions(s) {
  drawBars("classes", s.classes.labels, s.classes.counts, false);
  const sizes = s.batches.sizes;
  let first = sizes.findIndex((b) => b.count > 0);
  let last = sizes.length - 1 - [...sizes].reverse().findIndex((b) => b.count > 0);
  if (first < 0) { first = 0; last = 7; }
  // a few empty buckets either side keep one batch size from filling the whole card
  first = Math.max(0, Math.min(first - 2, last - 7));
  last = Math.min(sizes.length - 1, Math.max(last + 1, first + 7));
  const shown = sizes.slice(first, last + 1);
  drawBars("batch-sizes", shown.map((b) => (b.le == null ? "more" : "≤" + fmtSize(b.le))),
    shown.map((b) => b.count), true);
  const mean = s.batches.mean_size;
  setText("batch-summary", `${fmtCount(s.batches.count)} batches · mean ${mean == null ? "–" : fmtRate(mean)} messages`);
}

function drawRejected(s) {
  const rows = [];
  for (const [reason, n] of Object.entries(s.rejected)) rows.push(el("tr", {}, el("td", {}, reason), el("td", {}, fmtCount(n))));
  for (const [kind, n] of Object.entries(s.connections.errors)) {
    rows.push(el("tr", {}, el("td", {}, "connection: " + kind.replace(/_/g, " ")), el("td", {}, fmtCount(n))));
  }
  $("rejected-table").tBodies[0].replaceChildren(...rows);
  $("rejected-empty").hidden = rows.length > 0;
}

function drawConfusion(s) {
  const a = s.accuracy, box = $("confusion");
  $("confusion-empty").hidden = a.labelled > 0;
  if (!a.labelled) { box.replaceChildren(); return; }
  const { labels, matrix } = a.confusion;
  const max = Math.max(1, ...matrix.flat());
  const head = el("tr", {}, el("th", {}, "true ╲ pred"), ...labels.map((l) => el("th", {}, l)));
  const rows = matrix.map((row, i) => el("tr", {}, el("th", {}, labels[i]), ...row.map((c, j) => {
    const alpha = c ? 0.15 + 0.85 * Math.sqrt(c / max) : 0;
    const color = i === j ? `rgba(71,201,126,${alpha})` : `rgba(255,107,107,${alpha})`;
    return el("td", { class: i === j ? "diag" : "", title: `true ${labels[i]}, predicted ${labels[j]}: ${c}`,
      style: { background: color } }, c ? fmtShort(c) : "");
  })));
  box.replaceChildren(el("table", { class: "matrix" }, head, ...rows));
}

// The card is the bundle's model.json: show what a person checks before trusting
// a model, in that order; lists of lists (the held-out confusion matrix, the
// search) stay in the file.
const CARD_FIELDS = [
  ["model", "model"], ["description", "about"], ["dataset", "data set"],
  ["heldout_accuracy", "held-out accuracy"], ["held_out_accuracy", "held-out accuracy"],
  ["split", "held out"], ["steps", "steps"], ["estimators", "estimators"], ["n_features", "features"],
  ["classes", "classes"], ["versions", "versions"], ["trained_at", "trained"],
  ["content_hash", "content hash"],
];
const CARD_SKIP = new Set(["format", "pipeline_file", "confusion_matrix", "search"]);

function cardValue(key, v) {
  if (v == null) return "–";
  if (/accuracy/.test(key) && typeof v === "number") return fmtPercent(v, 2);
  if (key === "split" && typeof v === "object" && v.n_held_out != null) {
    return `${fmtCount(v.n_held_out)} of ${fmtCount(v.n_held_out + (v.n_train || 0))} images` +
      (v.stratified ? ", stratified" : "");
  }
  if (key === "dataset" && typeof v === "object" && v.spec != null) {
    return [v.spec, v.n_samples != null ? fmtCount(v.n_samples) + " images" : null,
      v.n_features != null ? v.n_features + " features" : null].filter(Boolean).join(" · ");
  }
  if (key === "content_hash" && typeof v === "string") return v.length > 23 ? v.slice(0, 23) + "…" : v;
  if (Array.isArray(v)) {
    if (v.some((x) => typeof x === "object" && x !== null)) return null;
    return v.map(String).join(key === "steps" ? " → " : ", ");
  }
  if (typeof v === "object") {
    const parts = Object.entries(v).filter(([, x]) => typeof x !== "object").map(([k, x]) => `${k} ${x}`);
    return parts.length ? parts.join(" · ") : null;
  }
  return String(v);
}

function drawModelCard(s) {
  const box = $("model-card");
  const key = JSON.stringify(s.model);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  const card = s.model || {};
  const known = new Set(CARD_FIELDS.map(([k]) => k));
  const fields = CARD_FIELDS.filter(([k]) => k in card);
  for (const k of Object.keys(card)) {
    if (!known.has(k) && !CARD_SKIP.has(k)) fields.push([k, k.replace(/_/g, " ")]);
  }
  const items = [];
  for (const [k, label] of fields) {
    const text = cardValue(k, card[k]);
    if (text != null) items.push(el("dt", {}, label), el("dd", {}, text));
  }
  items.push(el("dt", {}, "served as"), el("dd", {}, s.pipeline.join(" → ")));
  items.push(el("dt", {}, "digitstream"), el("dd", {}, s.version || "–"));
  box.replaceChildren(...items);
}

// ------------------------------------------------------------ the model monitor
// Per-pixel drift as an image: each feature's Jensen-Shannon distance from the reference,
// 0 dark to 0.5 and more bright. The canvas records what it drew (data-cells, data-max).
const HEAT_STOPS = [[0, [11, 14, 19]], [0.25, [59, 31, 92]], [0.5, [181, 49, 91]],
  [0.75, [247, 165, 65]], [1, [255, 243, 176]]];

function heatColor(value) {
  const x = Math.min(1, Math.max(0, value / 0.5));
  for (let i = 1; i < HEAT_STOPS.length; i++) {
    const [x1, c1] = HEAT_STOPS[i];
    if (x <= x1) {
      const [x0, c0] = HEAT_STOPS[i - 1];
      const f = (x - x0) / (x1 - x0);
      return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
    }
  }
  return HEAT_STOPS[HEAT_STOPS.length - 1][1];
}

function drawHeat(drift) {
  const canvas = $("drift-heat");
  const values = drift.features || [];
  const side = Math.ceil(Math.sqrt(values.length)) || 1;
  const [h, w] = drift.image || [side, side];
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  values.forEach((v, i) => {
    const [r, g, b] = heatColor(v);
    image.data.set([r, g, b, 255], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
  canvas.dataset.cells = String(values.length);
  canvas.dataset.max = values.length ? Math.max(...values).toFixed(3) : "";
}

const TEST_TITLES = {
  inputs: "the mean over features of each feature's distance from the reference (training part)",
  classes: "the predicted classes' distance from those on the held-out part",
  confidence: "the winning probabilities' distance from those on the held-out part",
};

function drawDrift(s) {
  const drift = s.drift || { enabled: false, reason: "no monitor" };
  const state = $("drift-state");
  $("drift-off").hidden = drift.enabled;
  $("drift-body").hidden = !drift.enabled;
  if (!drift.enabled) {
    state.className = "pill";
    setText("drift-state", "off");
    setText("drift-off", "Not judged: " + drift.reason + ".");
    setText("drift-summary", "");
    return;
  }
  state.className = "pill " + (drift.detected ? "drift" : "calm");
  setText("drift-state", drift.detected ? "drift since " + fmtTime(drift.since) : "no drift");
  setText("drift-summary", `window ${fmtCount(drift.window)} messages · ${fmtCount(drift.rows)} sampled`);
  drawHeat(drift);
  const rows = Object.entries(drift.tests || {}).map(([name, t]) => el("tr", {},
    el("td", { title: TEST_TITLES[name] || "" }, name),
    el("td", { class: t.score != null && t.score > drift.threshold ? "bad-text" : "" },
      t.score == null ? "–" : t.score.toFixed(1)),
    el("td", {}, t.statistic.toFixed(3) + (t.threshold == null ? "" : " / " + t.threshold.toFixed(3))),
    el("td", {}, fmtCount(t.n))));
  $("drift-tests").tBodies[0].replaceChildren(...rows);
  const a = s.accuracy || {}, window = a.window || {}, labels = s.labels || {}, drop = a.drop || {};
  const facts = [["threshold", `score above ${drift.threshold} · ${drift.episodes || 0} drift(s) so far`]];
  const estimate = s.estimated_accuracy == null ? "–" : fmtPercent(s.estimated_accuracy, 1);
  const measured = window.accuracy == null ? "no labels in the window"
    : `measured ${fmtPercent(window.accuracy, 1)} (${fmtCount(window.labelled)} labels)`;
  facts.push(["estimated accuracy", `${estimate} · ${measured}`]);
  if (drift.detected && s.estimated_accuracy != null) {
    facts.push(["", el("span", { class: "warn-text" }, "not to be trusted while the inputs drift")]);
  }
  if (labels.enabled) {
    facts.push(["late labels", `${fmtCount(labels.matched)} of ${fmtCount(labels.received)} matched · ` +
      `${fmtCount(labels.unknown)} unknown · ${fmtCount(labels.expired)} expired · ${fmtCount(labels.pending)} pending`]);
  }
  facts.push(["accuracy drop", drop.detected ? el("span", { class: "bad-text" }, "since " + fmtTime(drop.since)) : "none"]);
  $("monitor-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function drawDriftChart(drift) {
  if (!window.uPlot) return;
  const history = (drift && drift.history) || { t: [], score: [] };
  driftThreshold = drift && drift.threshold != null ? drift.threshold : 5;
  if (!charts.drift) {
    charts.drift = makeChart("chart-drift", [
      { label: "score", stroke: "#5ab0ff", fill: "rgba(90,176,255,0.10)" },
      { label: "threshold", stroke: "#ff6b6b", dash: [6, 4] },
    ], {
      scale: { range: (u, min, max) => [Math.min(0, min ?? 0), Math.max(1.5 * driftThreshold, (max ?? 0) * 1.1)] },
      format: (v) => (v == null ? "–" : v.toFixed(1)),
    });
  }
  setData(charts.drift, [history.t, history.score, history.t.map(() => driftThreshold)]);
}

function drawShadow(s) {
  const shadow = s.shadow;
  $("shadow-off").hidden = !!shadow;
  $("shadow-body").hidden = !shadow;
  if (!shadow) { setText("shadow-name", ""); return; }
  const card = shadow.model || {};
  setText("shadow-name", `${modelName(card)} · ${shortHash(shadow.content_hash)}`);
  const perBatch = shadow.seconds_per_batch || {};
  const facts = [
    ["agreement", shadow.agreement == null ? "–"
      : `${fmtPercent(shadow.agreement, 2)} of ${fmtCount(shadow.scored)} messages`],
    ["accuracy", shadow.labelled
      ? `served ${fmtPercent(shadow.served_accuracy, 2)} · shadow ${fmtPercent(shadow.shadow_accuracy, 2)} (${fmtCount(shadow.labelled)} labelled)`
      : "no labelled message scored by both yet"],
    ["time per batch", `served ${fmtDur(perBatch.served)} · shadow ${fmtDur(perBatch.shadow)}`],
    ["batches", `${fmtCount(shadow.batches)} scored · ${fmtCount(shadow.skipped_batches)} skipped of ` +
      `${fmtCount(shadow.offered_batches)} · ${fmtCount(shadow.in_flight)} in flight`],
    ["since", fmtTime(shadow.since) + (shadow.swaps ? ` · ${shadow.swaps} swap(s)` : "")],
  ];
  $("shadow-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const { labels, matrix } = shadow.disagreement;
  const max = Math.max(1, ...matrix.flat());
  const head = el("tr", {}, el("th", { title: "rows: served class, columns: shadow class" }, "╲"),
    ...labels.map((l) => el("th", {}, l)));
  const rows = matrix.map((row, i) => el("tr", {}, el("th", {}, labels[i]), ...row.map((c, j) => {
    const alpha = c ? 0.15 + 0.85 * Math.sqrt(c / max) : 0;
    const color = i === j ? `rgba(71,201,126,${alpha})` : `rgba(255,107,107,${alpha})`;
    return el("td", { class: i === j ? "diag" : "", title: `served ${labels[i]}, shadow ${labels[j]}: ${c}`,
      style: { background: color } }, c ? fmtShort(c) : "");
  })));
  $("shadow-matrix").replaceChildren(el("table", { class: "matrix" }, head, ...rows));
}

// ------------------------------------------------------------ the loop
const HISTORY_POINTS = 600;
const COLUMNS = ["t", "in_per_s", "out_per_s", "bytes_in_per_s", "rejected_per_s", "latency_p50", "latency_p99"];
let history = null;
let startedAt = null;
let markTimes = {};  // Unix times of model swaps and refused bundles, marked on the throughput chart
let driftThreshold = 5;  // the drift verdict's threshold, drawn on its chart

// After the first answer only the new seconds are asked for (?since=), so a poll
// costs the application little however long the history is.
function mergeHistory(fresh) {
  const old = history, n = old.t.length, m = fresh.t.length;
  const merged = { workers: {} };
  for (const c of COLUMNS) merged[c] = old[c].concat(fresh[c]).slice(-HISTORY_POINTS);
  for (const name of new Set([...Object.keys(old.workers), ...Object.keys(fresh.workers)])) {
    const before = old.workers[name] || new Array(n).fill(0);
    const after = fresh.workers[name] || new Array(m).fill(0);
    merged.workers[name] = before.concat(after).slice(-HISTORY_POINTS);
  }
  return merged;
}

function statsUrl() {
  if (history && history.t.length) return "/api/stats?since=" + history.t[history.t.length - 1];
  return "/api/stats";
}

function draw(s, incremental) {
  history = incremental && history && s.started_at === startedAt ? mergeHistory(s.history) : s.history;
  startedAt = s.started_at;
  markTimes = {
    swap: (s.model_swaps || []).map((sw) => sw.time),
    refused: (s.swap_refusals || []).map((r) => r.time),
  };
  drawHeader(s);
  drawPipeline(s);
  drawTiles(s);
  drawSwaps(s);
  drawCharts(history);
  drawLatencyTable(s);
  drawWorkers(s);
  drawDistributions(s);
  drawRejected(s);
  drawConfusion(s);
  drawModelCard(s);
  drawDrift(s);
  drawDriftChart(s.drift);
  drawShadow(s);
}

async function poll() {
  try {
    const url = statsUrl();
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    draw(await response.json(), url.includes("since="));
  } catch (err) {
    const pill = $("status");
    pill.className = "pill down";
    pill.textContent = "unreachable";
    console.warn("digitstream: /api/stats failed:", err);
  }
  setTimeout(poll, POLL_MS);
}

poll();
