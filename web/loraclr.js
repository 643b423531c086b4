// comfyui-loraclr in the editor:
//  * results as text on the nodes: every pack node that returns `ui.text` (merge report, collect
//    summary, training summary, saved file path, evaluation) shows it in a read-only text box, as
//    core "Preview Any" does;
//  * live charts: the CAT training losses per step and the merge objective per layer, drawn in a
//    widget of their own (so no other widget or preview image covers them), with labelled axes,
//    per-layer names and markers.
// The last run's text and chart data are kept in the node's properties, so they come back when the
// workflow is reopened, reloaded or its tab is switched back to.
// The server sends "loraclr.train" and "loraclr.merge" messages (PromptServer.send_sync) carrying
// the node id.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TEXT_NODES = new Set([
  "LoRACLRCollectActivations", "LoRACLRMerge", "LoRACLRSaveLoRA", "LoRACLRMergeAllStages",
  "LoRACLRTrainCAT", "LoRACLRSaveCAT", "LoRACLREvaluate",
]);
const CHART_NODES = { LoRACLRTrainCAT: "train", LoRACLRMerge: "merge" };
const TEXT_WIDGET = "loraclr_result";
const CHART_WIDGET = "loraclr_chart";
const CHART_HEIGHT = 220;
const TEXT_HEIGHT = 90;
const MAX_POINTS = 2000; // training steps kept per line (older points are thinned, never the last)

const COLORS = {
  "diffusion loss": "#42a5f5", "CAT loss": "#ff7043", "start objective": "#bdbdbd", "merged objective": "#66bb6a",
  "concept error": "#ab47bc", "preservation error": "#ffa726",
};

function nodeById(id) {
  const graph = app.graph ?? app.rootGraph;
  return graph?.getNodeById?.(Number(id)) ?? graph?.getNodeById?.(id) ?? null;
}

// ---------------------------------------------------------------------------------------------
// chart data (kept in node.properties.loraclr_chart: JSON-safe, saved with the workflow)

function thin(values) {
  if (values.length <= MAX_POINTS) return values;
  const out = values.filter((_, i) => i % 2 === 0);
  if (out[out.length - 1] !== values[values.length - 1]) out.push(values[values.length - 1]);
  return out;
}

function onTrainMessage(d) {
  const node = nodeById(d.node);
  if (!node) return;
  let c = node.properties?.loraclr_chart;
  if (!c || c.kind !== "train" || d.step <= 1 || (c.x.length && d.step <= c.x[c.x.length - 1])) {
    c = { kind: "train", title: "training loss", xLabel: "step", yLabel: "loss (MSE)", x: [],
          lines: [{ name: "diffusion loss", values: [] }, { name: "CAT loss", values: [] }] };
  }
  c.x.push(d.step);
  c.lines[0].values.push(d.diffusion_loss ?? d.loss);
  c.lines[1].values.push(d.cat_loss ?? 0);
  if (c.x.length > MAX_POINTS) {
    const keep = new Set(thin(c.x.map((_, i) => i)));
    c.x = c.x.filter((_, i) => keep.has(i));
    c.lines.forEach((l) => (l.values = l.values.filter((_, i) => keep.has(i))));
  }
  setChart(node, c);
}

function onMergeMessage(d) {
  const node = nodeById(d.node);
  if (!node) return;
  const layers = d.layers ?? [];
  if (layers.some((l) => l.preservation_error != null)) {
    // with preservation rows: each layer's relative error on the concepts' rows beside its change of
    // the base output on the preservation rows (both relative, one axis)
    setChart(node, {
      kind: "merge", title: `${d.stage ?? ""} merge (${d.method ?? ""}), ${layers.length}${d.total ? "/" + d.total : ""} layers`,
      xLabel: "layer", yLabel: "relative error", x: layers.map((_, i) => i + 1), names: layers.map((l) => shortLayer(l.layer)),
      lines: [
        { name: "concept error", values: layers.map((l) => l.concept_error) },
        { name: "preservation error", values: layers.map((l) => l.preservation_error) },
      ],
    });
    return;
  }
  setChart(node, {
    kind: "merge", title: `${d.stage ?? ""} merge (${d.method ?? ""}), ${layers.length}${d.total ? "/" + d.total : ""} layers`,
    xLabel: "layer", yLabel: "objective", x: layers.map((_, i) => i + 1), names: layers.map((l) => shortLayer(l.layer)),
    lines: [
      { name: "start objective", values: layers.map((l) => l.start_objective) },
      { name: "merged objective", values: layers.map((l) => l.objective) },
    ],
  });
}

function shortLayer(key) {
  // a few characters per layer: "L10 q" (text encoder layer 10, q_proj), "in1.1 tb0 attn2 k" (UNet)
  const k = String(key ?? "").replace(/\.weight$/, "");
  const te = k.match(/layers\.(\d+)\.(?:self_attn\.(\w+?)_proj|mlp\.(fc\d))$/);
  if (te) return `L${te[1]} ${te[2] ?? te[3]}`;
  return k.replace(/^diffusion_model\./, "")
    .replace(/input_blocks\.(\d+)\.(\d+)/, "in$1:$2").replace(/output_blocks\.(\d+)\.(\d+)/, "out$1:$2")
    .replace(/middle_block\.(\d+)/, "mid$1").replace(/transformer_blocks\.(\d+)/, "tb$1")
    .replace(/\.to_out\.0$/, ".out").replace(/\.to_(\w)$/, ".$1").replace(/ff\.net\.0\.proj$/, "ff1")
    .replace(/ff\.net\.2$/, "ff2").replace(/\./g, " ");
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText("…" + t).width > width) t = t.slice(1);
  return "…" + t;
}

function setChart(node, chart) {
  node.properties = node.properties ?? {};
  node.properties.loraclr_chart = chart;
  ensureFits(node);
  node.__loraclrChartEl?.redraw();
  node.setDirtyCanvas?.(true, true);
}

// ---------------------------------------------------------------------------------------------
// drawing

function niceTicks(lo, hi, n) {
  const span = hi - lo || Math.abs(hi) || 1;
  const step0 = span / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) ?? 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
  return out;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

export function drawChart(canvas, chart) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return [];
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  const points = [];
  if (!chart) {
    ctx.fillStyle = "#888";
    ctx.fillText("the chart appears here when the node runs", 10, h / 2);
    return points;
  }
  const L = 52, R = 10, T = 30, B = chart.kind === "merge" ? 44 : 30;
  const pw = Math.max(10, w - L - R), ph = Math.max(10, h - T - B);
  const vals = chart.lines.flatMap((l) => l.values).filter((v) => Number.isFinite(v));
  const xs = chart.x;
  const n = xs.length;
  // title and legend
  ctx.fillStyle = "#ddd";
  ctx.fillText(chart.title ?? "", 8, 12);
  let lx = 8;
  chart.lines.forEach((l) => {
    ctx.fillStyle = COLORS[l.name] ?? "#fff";
    ctx.fillRect(lx, 19, 10, 4);
    ctx.fillStyle = "#bbb";
    ctx.fillText(l.name, lx + 13, 25);
    lx += ctx.measureText(l.name).width + 26;
  });
  if (!vals.length || !n) return points;
  const pos = vals.every((v) => v > 0);
  const logY = pos && Math.max(...vals) / Math.min(...vals) > 100;
  const ty = (v) => (logY ? Math.log10(v) : v);
  let lo = Math.min(...vals.map(ty)), hi = Math.max(...vals.map(ty));
  if (hi - lo < 1e-12) { lo -= 0.5 * (Math.abs(lo) || 1); hi += 0.5 * (Math.abs(hi) || 1); }
  const pad = (hi - lo) * 0.06;
  lo -= pad; hi += pad;
  const x0 = xs[0], x1 = xs[n - 1];
  const X = (i) => L + (n > 1 ? ((xs[i] - x0) / (x1 - x0 || 1)) * pw : pw / 2);
  const Y = (v) => T + ph - ((ty(v) - lo) / (hi - lo)) * ph;
  // axes, ticks and grid
  ctx.strokeStyle = "#555";
  ctx.strokeRect(L, T, pw, ph);
  ctx.fillStyle = "#aaa";
  ctx.textAlign = "right";
  const yt = logY ? niceTicks(Math.ceil(lo), Math.floor(hi), 4).filter(Number.isInteger) : niceTicks(lo, hi, 4);
  yt.forEach((t) => {
    const y = T + ph - ((t - lo) / (hi - lo)) * ph;
    if (y < T - 1 || y > T + ph + 1) return;
    ctx.strokeStyle = "#2c2c2c";
    ctx.beginPath(); ctx.moveTo(L + 1, y); ctx.lineTo(L + pw - 1, y); ctx.stroke();
    ctx.fillText(logY ? fmt(10 ** t) : fmt(t), L - 4, y + 4);
  });
  ctx.textAlign = "center";
  if (chart.kind === "merge") {
    // per-layer names under the markers, as many as fit side by side; every name is in the report
    const every = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(pw / 64))));
    const room = (n > 1 ? (pw / (n - 1)) * every : pw) - 6;
    for (let i = 0; i < n; i += every) ctx.fillText(fitText(ctx, chart.names?.[i] ?? String(xs[i]), room), X(i), T + ph + 13);
  } else {
    niceTicks(x0, x1, Math.max(2, Math.floor(pw / 70))).filter((t) => t >= x0 && t <= x1 && Number.isInteger(t))
      .forEach((t) => ctx.fillText(String(t), L + (n > 1 ? ((t - x0) / (x1 - x0 || 1)) * pw : pw / 2), T + ph + 13));
  }
  ctx.fillText(chart.xLabel + (chart.kind === "merge" ? " (every layer's figures: the report below)" : ""), L + pw / 2, h - 4);
  ctx.save();
  ctx.translate(11, T + ph / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText(chart.yLabel + (logY ? " (log)" : ""), 0, 0);
  ctx.restore();
  ctx.textAlign = "left";
  // lines and markers: the first line hollow and larger, so coinciding lines stay visible
  const markers = chart.kind === "merge" || n <= 60;
  chart.lines.forEach((line, li) => {
    const color = COLORS[line.name] ?? "#fff";
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    line.values.forEach((v, i) => {
      if (!Number.isFinite(v)) { started = false; return; }
      const x = X(i), y = Y(v);
      started ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      started = true;
    });
    ctx.stroke();
    line.values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      const x = X(i), y = Y(v);
      points.push({ line: line.name, x, y });
      if (!markers && i !== line.values.length - 1) return;
      ctx.beginPath();
      ctx.arc(x, y, li === 0 ? 4.5 : 2.5, 0, 2 * Math.PI);
      if (li === 0) { ctx.lineWidth = 1.5; ctx.stroke(); } else { ctx.fillStyle = color; ctx.fill(); }
    });
  });
  ctx.lineWidth = 1;
  return points;
}

// ---------------------------------------------------------------------------------------------
// widgets

function ensureFits(node) {
  const min = node.computeSize?.();
  if (min && (node.size[0] < min[0] || node.size[1] < min[1])) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

function addTextWidget(node) {
  const el = document.createElement("textarea");
  el.readOnly = true;
  el.className = "comfy-multiline-input loraclr-result";
  el.placeholder = "the result appears here when the node runs";
  el.style.cssText = "width:100%;height:100%;resize:none;font:11px monospace;white-space:pre;overflow:auto;" +
    "background:#151515;color:#ddd;border:1px solid #333;border-radius:4px;padding:3px;box-sizing:border-box;";
  const widget = node.addDOMWidget(TEXT_WIDGET, "loraclr_text", el, {
    serialize: false,
    getValue: () => el.value,
    setValue: (v) => (el.value = v ?? ""),
    getMinHeight: () => TEXT_HEIGHT,
  });
  widget.serialize = false; // not in the workflow's widgets_values (the value lives in properties)
  node.__loraclrText = el;
}

function addChartWidget(node) {
  const canvas = document.createElement("canvas");
  canvas.className = "loraclr-chart";
  canvas.style.cssText = "width:100%;height:100%;display:block;border-radius:4px;";
  canvas.redraw = () => {
    canvas.__points = drawChart(canvas, node.properties?.loraclr_chart);
  };
  new ResizeObserver(() => canvas.redraw()).observe(canvas);
  const widget = node.addDOMWidget(CHART_WIDGET, "loraclr_chart", canvas, {
    serialize: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => CHART_HEIGHT,
    getMaxHeight: () => CHART_HEIGHT,
  });
  widget.serialize = false;
  node.__loraclrChartEl = canvas;
}

// The editor keeps each open workflow as a serialized state and reloads it on a tab switch; a
// before/after-change pair makes it take the node's new properties into that state (and its undo).
function persist() {
  app.canvas?.emitBeforeChange?.();
  app.canvas?.emitAfterChange?.();
}

function setText(node, text) {
  node.properties = node.properties ?? {};
  node.properties.loraclr_text = text;
  if (node.__loraclrText) node.__loraclrText.value = text;
  ensureFits(node);
}

app.registerExtension({
  name: "comfyui-loraclr.results",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (!TEXT_NODES.has(name) && !(name in CHART_NODES)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      if (name in CHART_NODES) addChartWidget(this);
      if (TEXT_NODES.has(name)) addTextWidget(this);
      ensureFits(this);
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      executed?.apply(this, arguments);
      const text = output?.text;
      if (text != null) setText(this, Array.isArray(text) ? text.join("\n") : String(text));
      persist(); // the last run's text and chart survive a tab switch, a reload and a reopen
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = configured?.apply(this, arguments);
      if (this.properties?.loraclr_text != null && this.__loraclrText) this.__loraclrText.value = this.properties.loraclr_text;
      this.__loraclrChartEl?.redraw();
      return r;
    };
  },
  setup() {
    api.addEventListener("loraclr.train", ({ detail }) => detail?.node != null && onTrainMessage(detail));
    api.addEventListener("loraclr.merge", ({ detail }) => detail?.node != null && onMergeMessage(detail));
  },
});
