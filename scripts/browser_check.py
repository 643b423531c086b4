"""Open every example workflow in the real ComfyUI frontend (headless Chromium driven by Playwright),
as a user does, and record what the frontend shows; ``tests/browser`` judges the record.

For each template: open the templates browser, pick the pack's category and click the template's
card; then read back what the frontend holds (node types it knows, widget values and options, the
prompt it would send, node sizes and the sizes it needs, the saved view and what lies on top of
each node's title on screen). Templates named in ``--run`` are run with the Run button; after they
finish the record holds each node's result text, the chart points drawn and whether each point is
the topmost thing on screen, before and after switching to another tab and back. Console errors,
page errors and failed requests are recorded throughout.

Runs under a Python with Playwright (``.venv-browser``, made by scripts/setup_browser.sh) and the
Debian ``chromium``; the server is started by the caller:

    python scripts/browser_check.py --url http://127.0.0.1:8188 --out /tmp/check --run all
    python scripts/browser_check.py --url ... --out ... --run all --update-docs   # thumbnails, docs/screenshots

Writes ``<out>/report.json`` and screenshots into ``<out>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import requests
from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_client  # noqa: E402
import make_workflows  # noqa: E402

ROOT = make_workflows.ROOT
PACK = "comfyui-loraclr"
VIEWPORT = {"width": 1920, "height": 1080}

READ_GRAPH = """() => {
  const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
  const canvas = app.canvas;
  const el = canvas.canvas;
  const r = el.getBoundingClientRect();
  const ds = canvas.ds;
  const toScreen = (x, y) => [r.left + (x + ds.offset[0]) * ds.scale, r.top + (y + ds.offset[1]) * ds.scale];
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = (LG.NODE_TEXT_SIZE ?? 14) * 0.85 + 'px Arial';
  const nodes = app.graph.nodes.map((n) => {
    const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
    const [tx, ty] = toScreen(n.pos[0] + Math.min(60, n.size[0] / 2), n.pos[1] - 15);
    const top = document.elementFromPoint(tx, ty);
    return {
      id: String(n.id), type: n.type, title: n.title, known: !!LG.registered_node_types[n.type],
      has_def: !!n.constructor?.nodeData, pos: Array.from(n.pos), size: Array.from(n.size), bounding: b,
      min_size: n.computeSize ? Array.from(n.computeSize()) : null,
      title_on_top: top === el, title_point: [tx, ty], title_covered_by: top === el ? null : (top ? top.tagName + '.' + String(top.className).slice(0, 60) : 'outside the window'),
      widgets: (n.widgets ?? []).map((w) => ({
        name: w.name, type: w.type, value: (typeof w.value === 'object' ? null : w.value),
        values: Array.isArray(w.options?.values) ? w.options.values : null,
        min: w.options?.min ?? null, max: w.options?.max ?? null,
        text_width: ctx.measureText(String(w.label ?? w.name) + '  ' + String(w.value ?? '')).width,
      })),
    };
  });
  return {scale: ds.scale, offset: Array.from(ds.offset), nodes, canvas_rect: [r.left, r.top, r.width, r.height]};
}"""

PROMPT = "async () => (await app.graphToPrompt()).output"

# Center a node at zoom 1 (as a user does to look at it), redraw, and read its text and chart.
READ_RESULTS = """async (id) => {
  const n = app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id);
  const canvas = app.canvas, el = canvas.canvas, r = el.getBoundingClientRect();
  canvas.ds.scale = 1;
  canvas.ds.offset[0] = r.width / 2 / 1 - (n.pos[0] + n.size[0] / 2);
  canvas.ds.offset[1] = r.height / 2 / 1 - (n.pos[1] + n.size[1] / 2);
  if (n.size[1] > r.height - 80) canvas.ds.offset[1] = 60 - n.pos[1] + (r.height - 120 - n.size[1]);
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  await new Promise((res) => setTimeout(res, 600));
  const out = {id: String(id), type: n.type, text: n.widgets?.find((w) => w.name === 'loraclr_result')?.value ?? null,
               has_chart_widget: !!n.widgets?.find((w) => w.name === 'loraclr_chart'),
               chart_data: n.properties?.loraclr_chart ?? null, text_property: n.properties?.loraclr_text ?? null};
  const c = n.__loraclrChartEl;
  if (c) {
    c.redraw();
    const cr = c.getBoundingClientRect();
    const pts = c.__points ?? [];
    const ctx = c.getContext('2d');
    const dpr = c.width / Math.max(1, cr.width);
    const sample = pts.filter((_, i) => i % Math.max(1, Math.floor(pts.length / 40)) === 0);
    let onTop = 0, painted = 0;
    for (const p of sample) {
      const t = document.elementFromPoint(cr.left + p.x, cr.top + p.y);
      if (t === c) onTop++;
      // painted: a pixel within 2 px of the point differs clearly from the chart's background
      const px = ctx.getImageData(Math.round((p.x - 2) * dpr), Math.round((p.y - 2) * dpr), Math.ceil(5 * dpr), Math.ceil(5 * dpr)).data;
      let hit = false;
      for (let q = 0; q < px.length; q += 4) hit ||= Math.abs(px[q] - 0x1b) + Math.abs(px[q + 1] - 0x1b) + Math.abs(px[q + 2] - 0x1b) > 90;
      if (hit) painted++;
    }
    const others = [];
    for (const w of n.widgets ?? []) {
      const e = w.element ?? w.inputEl;
      if (!e || e === c) continue;
      const o = e.getBoundingClientRect();
      if (o.width && o.height) others.push({name: w.name, rect: [o.left, o.top, o.width, o.height]});
    }
    out.chart = {rect: [cr.left, cr.top, cr.width, cr.height], visible: c.offsetParent !== null && cr.width > 0,
                 points: pts.length, sampled: sample.length, on_top: onTop, painted,
                 lines: [...new Set(pts.map((p) => p.line))], other_dom_widgets: others,
                 node_rect: (() => { const ds = canvas.ds; return [r.left + (n.pos[0] + ds.offset[0]) * ds.scale,
                   r.top + (n.pos[1] + ds.offset[1]) * ds.scale, n.size[0] * ds.scale, n.size[1] * ds.scale]; })()};
  }
  return out;
}"""


def _command(page, cmd):
    page.evaluate("async (c) => await app.extensionManager.command.execute(c)", cmd)


def _close_dialogs(page):
    for _ in range(3):
        page.keyboard.press("Escape")
        page.wait_for_timeout(150)


def open_from_templates_browser(page, stem: str, n_nodes: int) -> dict:
    """Templates browser → the pack's category → the template's card. Returns what happened."""
    rec = {"opened": False}
    _close_dialogs(page)
    _command(page, "Comfy.BrowseTemplates")
    page.get_by_text(PACK, exact=True).first.click(timeout=20000)
    card_title = page.get_by_text(stem, exact=True).first
    card_title.wait_for(timeout=20000)
    rec["card_title"] = card_title.inner_text()
    # the card's thumbnail: the frontend asks for <stem>.jpg next to the workflow
    rec["thumbnail_loaded"] = page.evaluate(
        """(stem) => { const imgs = [...document.querySelectorAll('img')].filter((i) => decodeURIComponent(i.src).includes('/' + stem + '.jpg'));
                       return imgs.map((i) => ({src: i.src, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})); }""", stem)
    before = page.evaluate("() => app.graph.nodes.length")
    card_title.click()
    page.wait_for_function(f"() => app.graph.nodes.length === {n_nodes} && !document.querySelector('.p-dialog-mask')",
                           timeout=30000)
    page.wait_for_timeout(1200)
    rec["opened"] = True
    rec["nodes_before"] = before
    rec["workflow_name"] = page.evaluate(
        "() => app.extensionManager?.workflow?.activeWorkflow?.filename ?? app.extensionManager?.workflow?.activeWorkflow?.path ?? null")
    return rec


def press_run(page, timeout_s: float) -> dict:
    """Press the Run button and wait for the prompt to end (success, error, interruption, or the
    server refusing it at validation, whose answer is recorded)."""
    page.evaluate("""() => { window.__loraclrRun = {events: []};
        for (const t of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted'])
          app.api.addEventListener(t, (e) => window.__loraclrRun.events.push({type: t, detail: e.detail})); }""")
    refused = []

    def on_response(r):
        if r.url.endswith("/prompt") and r.request.method == "POST" and r.status != 200:
            refused.append({"status": r.status, "body": r.text()[:4000]})

    page.on("response", on_response)
    t0 = time.time()
    button = page.get_by_role("button", name="Run", exact=True)
    pressed = "button"
    if button.count():
        button.first.click()
    else:  # the queue button's label differs between frontend versions; say so in the record
        pressed = "command Comfy.QueuePrompt"
        _command(page, "Comfy.QueuePrompt")
    end = None
    while time.time() - t0 < timeout_s and end is None:
        page.wait_for_timeout(500)
        if refused:
            end = {"type": "refused", "detail": refused[0]}
            break
        events = page.evaluate("() => window.__loraclrRun.events")
        done = [e for e in events if e["type"] != "execution_start"]
        end = done[-1] if done else None
    page.remove_listener("response", on_response)
    if end is None:
        raise TimeoutError(f"no end of the run within {timeout_s} s")
    page.wait_for_timeout(800)  # the last "executed" messages reach the nodes
    return {"pressed": pressed, "outcome": end["type"], "detail": end["detail"], "seconds": round(time.time() - t0, 1)}


def docs_screenshot(page, path: str):
    """The whole graph after its run, as the docs show it: the view fitted to every node, the
    minimap hidden (it would cover the outputs in the corner); the minimap setting is put back."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    setting = "Comfy.Minimap.Visible"
    shown = page.evaluate("(k) => app.extensionManager.setting.get(k)", setting)
    page.evaluate("(k) => app.extensionManager.setting.set(k, false)", setting)
    _command(page, "Comfy.Canvas.FitView")
    page.wait_for_timeout(1000)
    page.screenshot(path=path)
    page.evaluate("([k, v]) => app.extensionManager.setting.set(k, v)", [setting, shown])


def switch_tab_and_back(page):
    _command(page, "Comfy.NewBlankWorkflow")
    page.wait_for_timeout(800)
    blank = page.evaluate("() => app.graph.nodes.length")
    _command(page, "Workspace.PreviousOpenedWorkflow")
    page.wait_for_timeout(1500)
    return blank


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--run", default="all", help="template keys to run (comma-separated), all, or none")
    ap.add_argument("--only", default="", help="check only these template keys")
    ap.add_argument("--chromium", default=os.environ.get("LORACLR_CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--run-timeout", type=float, default=600)
    ap.add_argument("--update-docs", action="store_true", help="write thumbnails and docs/screenshots")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    keys = [k for k in make_workflows.WORKFLOWS if not args.only or k in args.only.split(",")]
    run = set(keys) if args.run == "all" else set() if args.run == "none" else set(args.run.split(","))
    object_info = requests.get(args.url + "/object_info", timeout=120).json()
    report = {"url": args.url, "templates": {}, "console": [], "page_errors": [], "failed_requests": []}
    t_start = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--headless=new"])
        page = browser.new_page(viewport=VIEWPORT)
        page.on("console", lambda m: report["console"].append(
            {"type": m.type, "text": m.text[:2000], "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: report["page_errors"].append({"message": str(e)[:2000], "stack": (e.stack or "")[:4000]}))
        page.on("response", lambda r: r.status >= 400 and report["failed_requests"].append({"url": r.url, "status": r.status}))
        page.on("requestfailed", lambda r: report["failed_requests"].append({"url": r.url, "status": r.failure}))
        # a user who has closed the frontend's "Nodes 2.0" promotion once: the frontend keeps that
        # in localStorage, so the screenshots show the editor without the banner over it
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        page.goto(args.url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.graphToPrompt && app.extensionManager?.command",
                               timeout=180000)
        page.wait_for_timeout(2000)
        report["frontend_version"] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        report["extensions"] = page.evaluate("() => (app.extensions ?? []).map((e) => e.name).filter((n) => n.includes('loraclr'))")
        for key in keys:
            name = make_workflows.WORKFLOWS[key][0]
            stem = name[: -len(".json")]
            wf = comfy_client.load_workflow(make_workflows.path(key))
            rec = {"stem": stem, "file_view": wf["extra"]["ds"], "problems": []}
            report["templates"][key] = rec
            try:
                rec["open"] = open_from_templates_browser(page, stem, len(wf["nodes"]))
            except Exception as e:  # recorded; the test names the failure
                rec["problems"].append(f"could not open from the templates browser: {e}")
                page.screenshot(path=os.path.join(args.out, f"{key}_open_failed.png"))
                continue
            rec["graph"] = page.evaluate(READ_GRAPH)
            rec["frontend_prompt"] = page.evaluate(PROMPT)
            rec["converter_prompt"] = comfy_client.ui_to_api(wf, object_info)
            rec["intent"] = make_workflows.intent(key)
            shot = os.path.join(args.out, f"{key}_opened.png")
            page.screenshot(path=shot)
            if args.update_docs:
                page.screenshot(path=os.path.join(make_workflows.OUT_DIR, stem + ".jpg"), type="jpeg", quality=40)
            if key not in run:
                continue
            try:
                rec["run"] = press_run(page, args.run_timeout)
            except Exception as e:
                rec["problems"].append(f"run did not finish: {e}")
                continue
            ids = [n["id"] for n in rec["graph"]["nodes"] if n["type"].startswith("LoRACLR")]
            rec["results"] = {i: page.evaluate(READ_RESULTS, i) for i in ids}
            charts = [i for i, r in rec["results"].items() if r.get("chart")]
            if charts:
                page.evaluate(READ_RESULTS, charts[0])
            page.screenshot(path=os.path.join(args.out, f"{key}_run.png"))
            if args.update_docs:
                docs_screenshot(page, os.path.join(ROOT, "docs", "screenshots", f"{key}.png"))
            rec["blank_tab_nodes"] = switch_tab_and_back(page)
            rec["after_tab_switch"] = {i: page.evaluate(READ_RESULTS, i) for i in ids}
        browser.close()
    report["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"browser_check: {len(keys)} templates, {len(run & set(keys))} run, {report['seconds']} s, frontend "
          f"{report.get('frontend_version')}; report in {args.out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
