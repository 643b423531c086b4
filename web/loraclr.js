// Live charts for comfyui-loraclr: the merge objective per layer and the CAT training losses,
// drawn under the node that sent them. The server sends "loraclr.merge" and "loraclr.train"
// messages (PromptServer.send_sync) carrying the node id.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_HEIGHT = 110;
const series = new Map(); // node id -> {kind, lines: [{name, color, values}]}

function nodeById(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
}

function drawChart(ctx, node, data) {
  const w = node.size[0] - 20;
  const top = node.size[1] - CHART_HEIGHT - 6;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(10, top, w, CHART_HEIGHT);
  const all = data.lines.flatMap((l) => l.values).filter(Number.isFinite);
  if (all.length > 1) {
    const lo = Math.min(...all), hi = Math.max(...all);
    const span = hi - lo || 1;
    data.lines.forEach((line) => {
      const n = line.values.length;
      ctx.strokeStyle = line.color;
      ctx.beginPath();
      line.values.forEach((v, i) => {
        const x = 10 + (n > 1 ? (i / (n - 1)) * w : 0);
        const y = top + CHART_HEIGHT - 4 - ((v - lo) / span) * (CHART_HEIGHT - 18);
        i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#aaa";
    ctx.font = "10px sans-serif";
    ctx.fillText(`${data.lines.map((l) => l.name).join(" / ")}  [${lo.toPrecision(3)} … ${hi.toPrecision(3)}]`, 14, top + 11);
  }
  ctx.restore();
}

function attach(node) {
  if (node.__loraclrChart) return;
  node.__loraclrChart = true;
  const orig = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    orig?.apply(this, arguments);
    const data = series.get(String(this.id));
    if (data) drawChart(ctx, this, data);
  };
}

function update(id, data) {
  series.set(String(id), data);
  const node = nodeById(id);
  if (!node) return;
  attach(node);
  const need = node.computeSize?.()[1] + CHART_HEIGHT + 10;
  if (need && node.size[1] < need) node.setSize([node.size[0], need]);
  app.graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "comfyui-loraclr.charts",
  setup() {
    api.addEventListener("loraclr.merge", ({ detail }) => {
      if (detail?.node == null) return;
      update(detail.node, {
        kind: "merge",
        lines: [
          { name: "start objective", color: "#888", values: detail.layers.map((l) => l.start_objective) },
          { name: "merged objective", color: "#4caf50", values: detail.layers.map((l) => l.objective) },
        ],
      });
    });
    api.addEventListener("loraclr.train", ({ detail }) => {
      if (detail?.node == null) return;
      const prev = series.get(String(detail.node));
      const fresh = !prev || detail.step <= 1;
      const lines = fresh
        ? [
            { name: "diffusion loss", color: "#42a5f5", values: [] },
            { name: "CAT loss", color: "#ff7043", values: [] },
          ]
        : prev.lines;
      lines[0].values.push(detail.diffusion_loss ?? detail.loss);
      lines[1].values.push(detail.cat_loss ?? 0);
      update(detail.node, { kind: "train", lines });
    });
  },
});
