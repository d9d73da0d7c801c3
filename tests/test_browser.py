"""The pack in the real ComfyUI web page (frontend 1.32.9), driven by headless Chromium through selenium.

One browser session per module, against the session's real ComfyUI server (`comfy_server`, main.py --cpu).
What is asserted, and how (every check reads the live page, none re-implements the frontend):

* Readiness: `window.app` (the ComfyApp) and `window.comfyAPI` exist, the Vue app reports `app.vueAppReady`,
  `app.graph` / `app.canvas` exist, the node definitions are registered with LiteGraph (KSampler and this
  pack's EPDSampler), the workflow store has an active workflow, and the sidebar's Templates button is there.
* Every UI-format workflow in workflows/*.json is loaded the way a user loads it: sidebar "Templates" ->
  category "ComfyUI-EPD" (under EXTENSIONS) -> click the card. The frontend then fetches
  /api/workflow_templates/ComfyUI-EPD/<name>.json (asserted from the page's resource timing) and calls
  `app.loadGraphData(json, true, true, name, {openSource: "template"})` (asserted by a wrapper).
  - Missing NODE TYPES (not allowed): 1.32.9's loadGraphData collects node types missing from
    `LiteGraph.registered_node_types` and calls `app.showMissingNodesError(types)`, which opens the
    "missing nodes" dialog; the placeholder node it creates has `has_errors`. We wrap that method and record
    its calls, and also check every node's `has_errors`/registration and that no dialog is open.
    `app.showMissingModelsError` (the missing-models dialog, driven by `models` metadata) is recorded the same way.
  - Widget values: the frontend does not validate combo values on load (the server does at queue time),
    and it assigns `widgets_values` to widgets by position without a warning. So we assert on the loaded
    widgets themselves: every widget got a value; combo values are among the widget's options; numbers are
    within min/max; re-serialising the graph gives the file's `widgets_values` back; `app.graphToPrompt()`
    (what the Run button would send) equals the API twin in workflows/api/ (class types, literal values and
    links) - so the UI file and the node definitions agree on every widget's position. The one accepted
    exception is a missing MODEL FILE (a combo value that is a model file name, e.g. the SD1.5 / SDXL / Flux
    checkpoints and their EPD tables, which the test server does not have); the demo workflows must have none.
  - Console / toasts: no console warning or error while loading, other than an allow-list of network noise
    (the offline registry at api.comfy.org; thumbnail variants such as <name>-1.jpg); no toast (1.32.9's
    workflow schema validation and link repair report through toasts).
  A negative control loads a doctored workflow (unknown node type, unknown sampler) and asserts that these
  checks do flag it, so they cannot pass vacuously.
* The KSampler `sampler_name` dropdown offers `epd` and `epd_plugin`: a real click on the widget in the
  canvas opens LiteGraph's context menu; its entries are read from the DOM (and the widget's options agree).
* The demo workflow runs from the page: real click on the "Run" button, wait for the page's
  `execution_success` for that prompt, the SaveImage node's `imgs` are loaded, the server's history has the
  images, and the Queue sidebar shows the output as an <img>.

Screenshots and the browser console go to out/browser/ (gitignored); the README's come from there.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "out" / "browser"
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
DEMO = "epd_demo_txt2img"
PACK = "ComfyUI-EPD"

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.browser]

# A combo value that names a model file the server does not have is a missing model, not a broken workflow.
MODEL_FILE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|sft|gguf|onnx)$", re.I)
# Console lines that are environment noise, not about the workflow: the registry is offline in tests, the
# frontend probes thumbnail variants the pack does not ship (<name>-1.jpg ...), and a fresh user has no user.css /
# saved workflows.
CONSOLE_NOISE = [
    re.compile(r"https://api\.comfy\.org/"),
    re.compile(r"/api/workflow_templates/ComfyUI-EPD/[\w.-]+\.(jpg|jpeg|png|webp)"),
    re.compile(r"/(api/userdata/)?user\.css |/favicon\.ico |/api/userdata[/?]"),
]

READY_JS = """
const a = window.app;
return !!(a && window.comfyAPI && a.vueAppReady && a.graph && a.canvas && window.LiteGraph
  && LiteGraph.registered_node_types.KSampler && LiteGraph.registered_node_types.EPDSampler
  && a.extensionManager && a.extensionManager.workflow && a.extensionManager.workflow.activeWorkflow
  && document.querySelector('button.templates-tab-button'));
"""

# Records what the frontend reports, by wrapping the app's own methods (installed once after readiness).
HOOKS_JS = """
if (window.__epd) return;
performance.clearResourceTimings(); performance.setResourceTimingBufferSize(100000);  // default keeps only 250
const a = window.app, rec = window.__epd = {missingNodes: [], missingModels: [], loads: [], loading: 0,
                                           toasts: [], events: []};
const wrap = (obj, name, fn) => { const orig = obj[name].bind(obj); obj[name] = (...args) => fn(orig, ...args); };
wrap(a, 'showMissingNodesError', (orig, types, ...r) => {
  rec.missingNodes.push(types.map(t => typeof t === 'string' ? t : t.type)); return orig(types, ...r); });
wrap(a, 'showMissingModelsError', (orig, models, ...r) => {
  rec.missingModels.push(models.map(m => m.name)); return orig(models, ...r); });
wrap(a, 'loadGraphData', async (orig, ...args) => {
  rec.loading++;
  try { return await orig(...args); }
  finally { rec.loading--; rec.loads.push({name: args[3], openSource: (args[4] || {}).openSource || null}); } });
const toast = a.extensionManager.toast;
for (const m of ['add', 'addAlert']) wrap(toast, m, (orig, t) => {
  rec.toasts.push(typeof t === 'string' ? t : JSON.stringify(t)); return orig(t); });
for (const t of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted', 'executed'])
  a.api.addEventListener(t, e => rec.events.push({type: t, prompt_id: (e.detail || {}).prompt_id || null,
                                                  node: (e.detail || {}).node || null}));
"""

# Everything the widget / node checks need, read from the live graph.
GRAPH_STATE_JS = """
const nodes = app.graph.nodes.map(n => ({
  id: n.id, type: n.type, has_errors: !!n.has_errors, registered: n.type in LiteGraph.registered_node_types,
  widgets: (n.widgets || []).map(w => {
    let values = w.options ? w.options.values : null;
    if (typeof values === 'function') { try { values = values(w, n); } catch (e) { values = null; } }
    return {name: w.name, type: w.type, value: w.value === undefined ? '__undefined__' : w.value,
            values: Array.isArray(values) ? values : null,
            min: w.options ? w.options.min : null, max: w.options ? w.options.max : null};
  })}));
const ser = app.graph.serialize();
return {nodes, serialized: ser.nodes.map(n => ({id: n.id, widgets_values: n.widgets_values || []})),
        links: ser.links.length,
        dialogs: [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText.slice(0, 500))};
"""

FIND_BY_TEXT_JS = ("const [sel, txt] = arguments;"
                   "return [...document.querySelectorAll(sel)].find(e => e.textContent.trim() === txt) || null;")


def _browser_paths():
    chromium = os.environ.get("EPD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("EPD_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("The browser test needs Chromium and chromedriver (Debian: apt-get install chromium "
                    "chromium-driver; `bash scripts/setup_runtime.sh` does it as root) or EPD_CHROMIUM / "
                    f"EPD_CHROMEDRIVER pointing at them. Found chromium={chromium}, chromedriver={driver}.",
                    pytrace=False)
    return chromium, driver


class Page:
    """The ComfyUI page in headless Chromium, with the waits and reads the tests share."""

    def __init__(self, server):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        chromium, driver = _browser_paths()
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                    "--disable-dev-shm-usage", "--lang=en-US", "--no-first-run", "--disable-extensions"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.server = server
        self.driver = webdriver.Chrome(service=Service(driver), options=opts)
        self.driver.set_script_timeout(120)
        self.console: list[dict] = []
        self.banner_dismissed = False
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # ---- plumbing ----------------------------------------------------------------------------------------
    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def js_async(self, body, *args):
        """Run `body` (may use await; `args` is arguments[...]) and return its value."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1], args = [...arguments].slice(0, -1);"
            f"(async () => {{ {body} }})().then(done, e => done({{__error: String(e && e.stack || e)}}));", *args)

    def wait(self, condition, timeout=60, message=""):
        from selenium.webdriver.support.ui import WebDriverWait
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda d: condition(), message=message)

    def wait_js(self, script, timeout=60, message=""):
        return self.wait(lambda: self.js(script), timeout, message or script)

    def by_text(self, selector, text, timeout=30):
        return self.wait(lambda: self.js(FIND_BY_TEXT_JS, selector, text), timeout,
                         f"no {selector} with text {text!r}")

    def css(self, selector, timeout=30):
        from selenium.webdriver.common.by import By
        return self.wait(lambda: next(iter(e for e in self.driver.find_elements(By.CSS_SELECTOR, selector)
                                           if e.is_displayed()), None), timeout, f"no visible {selector}")

    def click(self, element, timeout=15):
        """A real click, retried while a dialog's opening animation (its overlay mask) still covers the page."""
        from selenium.common.exceptions import ElementClickInterceptedException
        deadline = time.time() + timeout
        while True:
            try:
                return element.click()
            except ElementClickInterceptedException:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def drain_console(self) -> list[dict]:
        new = self.driver.get_log("browser")
        self.console.extend(new)
        return new

    def screenshot(self, name: str) -> Path:
        # let finite CSS animations (dialogs fading in, menus) finish, then two frames for the canvas to draw
        try:
            self.wait_js("return document.getAnimations().every(a => a.playState !== 'running'"
                         " || a.effect.getTiming().iterations === Infinity)", 5)
        except Exception:
            pass  # a screenshot mid-animation is still a screenshot
        self.js_async("await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));")
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def close(self):
        try:
            self.drain_console()
            (ARTIFACTS / "console.log").write_text(
                "\n".join(f"{e['level']} {e['source']}: {e['message']}" for e in self.console))
        finally:
            self.driver.quit()

    # ---- the app -----------------------------------------------------------------------------------------
    def open(self):
        self.driver.get(self.server.url)
        self.wait_js(READY_JS, 120, "the ComfyUI app did not become ready")
        self.js(HOOKS_JS)
        # screenshots of large workflows are fitted below LiteGraph's low-detail zoom; draw text anyway
        self.js("app.canvas.min_font_size_for_lod = 0;")

    def dismiss_banner(self):
        """The 'Introducing Nodes 2.0' banner, closed with its X like a user would (it is not always shown)."""
        if self.banner_dismissed:
            return
        self.banner_dismissed = True
        button = self.js("""
          const bar = [...document.querySelectorAll('div')].find(d => d.textContent.includes('Nodes 2.0')
              && d.querySelector('button i[class*="lucide--x"]') && d.getBoundingClientRect().height < 60);
          return bar ? bar.querySelector('button i[class*="lucide--x"]').closest('button') : null;""")
        if button is not None:
            self.click(button)
            self.wait_js("return ![...document.querySelectorAll('div')].some(d => d.textContent.includes("
                         "'Introducing Nodes 2.0') && d.offsetParent)", 10)

    def templates_dialog_open(self) -> bool:
        return bool(self.js("return !!document.querySelector('[role=dialog] "
                            "[data-testid=template-workflows-content]')"))

    def open_pack_templates(self):
        if not self.templates_dialog_open():
            self.click(self.css("button.templates-tab-button"))
        self.click(self.by_text("[role=dialog] [role=button]", PACK))
        self.css("[role=dialog] [data-testid^='template-workflow-epd']")

    def load_from_template_browser(self, name: str, screenshot: str | None = None):
        """Sidebar Templates -> ComfyUI-EPD -> click the card; returns when loadGraphData has finished."""
        self.open_pack_templates()
        if screenshot:
            self.screenshot(screenshot)
        loads = self.js("return window.__epd.loads.length")
        self.drain_console()
        self.click(self.css(f"[role=dialog] [data-testid='template-workflow-{name}']"))
        self.wait_js(f"return window.__epd.loads.length > {loads} && window.__epd.loading === 0", 60,
                     f"{name} was not loaded")
        self.wait_js("return !document.querySelector('[role=dialog] [data-testid=template-workflows-content]')",
                     30, "the template browser did not close")
        self.dismiss_banner()

    def fit_view(self):
        """The canvas's own 'fit view' command; returns once the view has stopped moving (it may animate)."""
        self.js_async("""
          await app.extensionManager.command.execute('Comfy.Canvas.FitView');
          const frame = () => new Promise(r => requestAnimationFrame(r));
          const view = () => JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
          let last = view(), same = 0;
          for (let i = 0; i < 300 && same < 5; i++) {
            await frame(); const v = view(); same = v === last ? same + 1 : 0; last = v;
          }
          app.canvas.setDirty(true, true);""")

    def close_toasts(self):
        from selenium.webdriver.common.by import By
        for button in self.driver.find_elements(By.CSS_SELECTOR, ".p-toast-message .p-toast-close-button"):
            self.click(button)
        self.wait_js("return !document.querySelector('.p-toast-message')", 20, "a toast did not close")

    def graph_state(self) -> dict:
        return self.js(GRAPH_STATE_JS)

    def graph_to_prompt(self) -> dict:
        out = self.js_async("const p = await app.graphToPrompt(); return p.output;")
        assert "__error" not in out, out
        return out


@pytest.fixture(scope="module")
def page(comfy_server):
    first_visit = comfy_server.get("/settings/Comfy.TutorialCompleted") is not True
    p = Page(comfy_server)
    try:
        p.open()
        if first_visit:  # a new user gets the template browser by itself; keep what they see
            try:
                p.wait(p.templates_dialog_open, 30)
                p.screenshot("00_first_visit")
            except Exception:  # frontend behaviour, not the pack's: note it, carry on
                (ARTIFACTS / "00_first_visit_missing.txt").write_text("no template browser on first visit\n")
        yield p
    finally:
        p.close()


# ---- checks shared by the positive tests and the negative control ------------------------------------------
def console_problems(entries: list[dict]) -> list[str]:
    return [e["message"][:400] for e in entries if e["level"] in ("WARNING", "SEVERE")
            and not any(rx.search(e["message"]) for rx in CONSOLE_NOISE)]


def widget_problems(state: dict, ui: dict) -> tuple[list[str], list[str]]:
    """(problems, missing model files) of the loaded graph, against the workflow file it came from."""
    problems, missing_files = [], []
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node in state["nodes"]:
        where = f"node {node['id']} {node['type']}"
        for w in node["widgets"]:
            value = w["value"]
            if value == "__undefined__":
                problems.append(f"{where}: widget {w['name']} has no value")
            elif w["type"] == "combo" and w["values"] is not None and value not in w["values"]:
                if isinstance(value, str) and MODEL_FILE.search(value):
                    missing_files.append(f"{where}.{w['name']} = {value}")
                else:
                    problems.append(f"{where}: {w['name']} = {value!r} is not one of its options")
            elif w["type"] == "number" and not isinstance(value, (int, float)):
                problems.append(f"{where}: {w['name']} = {value!r} is not a number")
            elif w["type"] == "number" and (
                    (w["min"] is not None and value < w["min"]) or (w["max"] is not None and value > w["max"])):
                problems.append(f"{where}: {w['name']} = {value} outside [{w['min']}, {w['max']}]")
    for node in state["serialized"]:
        want = by_id.get(node["id"], {}).get("widgets_values", [])
        if node["widgets_values"] != want:
            problems.append(f"node {node['id']}: widgets_values {want} load back as {node['widgets_values']}")
    return problems, missing_files


def node_problems(page: Page, state: dict, ui: dict, missing_before: int) -> list[str]:
    rec = page.js("return window.__epd")
    problems = [f"missing node types reported: {t}" for t in rec["missingNodes"][missing_before:]]
    problems += [f"node {n['id']} {n['type']}: " + ("has_errors" if n["has_errors"] else "type not registered")
                 for n in state["nodes"] if n["has_errors"] or not n["registered"]]
    if len(state["nodes"]) != len(ui["nodes"]):
        problems.append(f"{len(state['nodes'])} nodes in the page, {len(ui['nodes'])} in the file")
    if state["links"] != len(ui["links"]):
        problems.append(f"{state['links']} links in the page, {len(ui['links'])} in the file")
    problems += [f"dialog open: {d[:200]!r}" for d in state["dialogs"]]
    return problems


def api_inputs(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


# ---- tests --------------------------------------------------------------------------------------------------
def test_page_is_ready_and_has_the_pack(page):
    types = page.js("return Object.keys(LiteGraph.registered_node_types)")
    info = page.server.object_info()
    pack = sorted(k for k, v in info.items() if v.get("python_module", "").endswith(PACK))
    assert pack, "the server reports no nodes of this pack"
    assert set(pack) <= set(types), f"node types the page does not know: {sorted(set(pack) - set(types))}"
    assert page.js("return app.vueAppReady === true && typeof app.loadGraphData === 'function'")


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_loads_from_the_template_browser_without_errors(page, path):
    name = path.stem
    ui = json.loads(path.read_text())
    api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    rec = page.js("return window.__epd")
    missing_before, models_before, toasts_before = (len(rec["missingNodes"]), len(rec["missingModels"]),
                                                    len(rec["toasts"]))

    page.load_from_template_browser(name)
    state = page.graph_state()
    rec = page.js("return window.__epd")
    page.fit_view()
    page.screenshot(f"workflow_{name}")

    # it came through the template route, like a user's click
    assert rec["loads"][-1] == {"name": name, "openSource": "template"}
    fetched = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith(f"/api/workflow_templates/{PACK}/{name}.json") for u in fetched)

    assert node_problems(page, state, ui, missing_before) == []
    problems, missing_files = widget_problems(state, ui)
    assert problems == []
    if name.startswith("epd_demo"):
        assert missing_files == [], "the demo workflows must run out of the box"
    assert api_inputs(page.graph_to_prompt()) == api_inputs(api), "the page's prompt differs from the API twin"
    # the missing-models dialog only runs on `models` metadata; whatever it reported must be model files
    assert all(MODEL_FILE.search(m) for batch in rec["missingModels"][models_before:] for m in batch)
    assert rec["toasts"][toasts_before:] == []
    assert console_problems(page.drain_console()) == []


def test_ksampler_dropdown_offers_epd(page):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    page.load_from_template_browser(DEMO, screenshot="template_browser_epd")
    page.fit_view()
    options = page.js("return app.graph.nodes.find(n => n.type === 'KSampler')"
                      ".widgets.find(w => w.name === 'sampler_name').options.values")
    assert {"epd", "epd_plugin"} <= set(options)
    select_options = page.js("return LiteGraph.createNode('KSamplerSelect')"
                             ".widgets.find(w => w.name === 'sampler_name').options.values")
    assert {"epd", "epd_plugin"} <= set(select_options)

    # a real click on the widget in the canvas opens LiteGraph's dropdown menu
    x, y = page.js("""
      const n = app.graph.nodes.find(n => n.type === 'KSampler'), w = n.widgets.find(w => w.name === 'sampler_name');
      const h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT;
      const c = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] * 0.6, n.pos[1] + (w.y ?? w.last_y) + h / 2]);
      const r = app.canvas.canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
      return [Math.round(r.left + c[0] / dpr), Math.round(r.top + c[1] / dpr)];""")
    click = ActionBuilder(page.driver)
    click.pointer_action.move_to_location(x, y)
    click.pointer_action.click()
    click.perform()
    menu = page.css(".litecontextmenu")
    entries = page.js("return [...document.querySelectorAll('.litecontextmenu .litemenu-entry')]"
                      ".map(e => e.textContent.trim())")
    assert {"epd", "epd_plugin"} <= set(entries), entries
    # the menu's filter box, as a user would type
    menu_filter = page.js("return document.querySelector('.litecontextmenu input')")
    if menu_filter is not None:
        menu_filter.send_keys("epd")
        page.wait_js("return [...document.querySelectorAll('.litecontextmenu .litemenu-entry')]"
                     ".filter(e => e.offsetParent !== null).every(e => e.textContent.includes('epd'))", 10)
    page.screenshot("ksampler_sampler_dropdown")
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(page.driver).send_keys(Keys.ESCAPE).perform()
    if page.js("return !!document.querySelector('.litecontextmenu')"):
        page.js("LiteGraph.closeAllContextMenus && LiteGraph.closeAllContextMenus(window)")
    page.wait_js("return !document.querySelector('.litecontextmenu')", 10, "the dropdown did not close")
    assert menu is not None
    assert page.js("return app.graph.nodes.find(n => n.type === 'KSampler')"
                   ".widgets.find(w => w.name === 'sampler_name').value") == "epd"


def test_demo_runs_from_the_run_button_and_shows_its_images(page):
    page.load_from_template_browser(DEMO)
    page.fit_view()
    events_before = len(page.js("return window.__epd.events"))
    started = time.time()
    page.click(page.css("button[aria-label='Run']"))
    page.wait_js(f"return window.__epd.events.slice({events_before}).some(e => e.type === 'execution_start')",
                 60, "the Run button queued nothing")
    pid = page.js(f"return window.__epd.events.slice({events_before}).find(e => e.type === 'execution_start')"
                  ".prompt_id")
    page.wait_js(f"return window.__epd.events.some(e => e.prompt_id === {json.dumps(pid)} && ['execution_success',"
                 "'execution_error', 'execution_interrupted'].includes(e.type))", 240, "the demo did not finish")
    seconds = time.time() - started
    done = page.js(f"return window.__epd.events.filter(e => e.prompt_id === {json.dumps(pid)}).map(e => e.type)")
    assert "execution_success" in done, (done, page.server.log_tail())

    entry = page.server.get(f"/history/{pid}")[pid]
    assert entry["status"]["status_str"] == "success"
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    batch = next(n for n in json.loads((REPO / "workflows" / f"{DEMO}.json").read_text())["nodes"]
                 if n["type"] == "EmptyLatentImage")["widgets_values"][2]
    assert len(images) == batch

    # the SaveImage node in the canvas has its images, loaded
    page.wait_js(f"""const n = app.graph.nodes.find(n => n.type === 'SaveImage');
                     return n && n.imgs && n.imgs.length === {batch}
                            && n.imgs.every(i => i.complete && i.naturalWidth > 0);""", 60,
                 "the SaveImage node shows no images")
    shown = page.js("return app.graph.nodes.find(n => n.type === 'SaveImage').imgs.map(i => i.src)")
    assert all(any(f"filename={i['filename']}" in s for s in shown) for i in images)
    page.screenshot("demo_run_canvas")

    # ... and the Queue sidebar lists the run with its image, as an <img> in the DOM
    page.click(page.css("button.queue-tab-button"))
    first = images[0]["filename"]
    page.wait_js(f"""return [...document.querySelectorAll('img')].some(i => i.src.includes('filename={first}')
                     && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 50)""", 60,
                 "the Queue sidebar shows no output image")
    page.screenshot("demo_run_queue")
    page.click(page.css("button.queue-tab-button"))  # close the sidebar again
    (ARTIFACTS / "demo_run.json").write_text(json.dumps({"prompt_id": pid, "seconds": round(seconds, 1),
                                                         "images": images}, indent=1))


def test_the_checks_catch_a_broken_workflow(page):
    """Negative control: an unknown node type, an unknown sampler and a dangling link must be flagged."""
    ui = json.loads((REPO / "workflows" / f"{DEMO}.json").read_text())
    broken = copy.deepcopy(ui)
    decode = next(n for n in broken["nodes"] if n["type"] == "EPDDemoDecode")
    decode["type"] = "EPDNoSuchNode"
    ksampler = next(n for n in broken["nodes"] if n["type"] == "KSampler")
    ksampler["widgets_values"][4] = "no_such_sampler"
    broken["links"].append([99, 1, 0, 42, 0, "MODEL"])  # to a node that does not exist
    broken["last_link_id"] = 99
    rec = page.js("return window.__epd")
    missing_before, toasts_before = len(rec["missingNodes"]), len(rec["toasts"])
    out = page.js_async("await app.loadGraphData(args[0], true, true, 'broken', {openSource: 'template'});"
                        "return 1;", broken)
    assert out == 1
    page.wait_js("return document.querySelectorAll('[role=dialog]').length > 0", 30, "no missing-nodes dialog")
    state = page.graph_state()
    page.screenshot("negative_control_missing_nodes_dialog")
    problems = node_problems(page, state, broken, missing_before)
    assert "missing node types reported: ['EPDNoSuchNode']" in problems
    assert any("EPDNoSuchNode: has_errors" in p for p in problems)
    assert any("EPDNoSuchNode" in d for d in state["dialogs"])
    widgets, _ = widget_problems(state, broken)
    assert any("sampler_name = 'no_such_sampler' is not one of its options" in p for p in widgets)
    assert f"{len(ui['links'])} links in the page, {len(broken['links'])} in the file" in problems
    assert any("Workflow Validation" in t for t in page.js("return window.__epd.toasts")[toasts_before:])
    # close the dialog like a user (Escape), leaving the page clean for the next test
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(page.driver).send_keys(Keys.ESCAPE).perform()
    page.wait_js("return document.querySelectorAll('[role=dialog]').length === 0", 30, "dialog did not close")
    page.close_toasts()
    page.drain_console()
