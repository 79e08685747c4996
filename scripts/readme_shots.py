"""The README's pictures of the MLflow UI (model-training view), taken from the runs of :mod:`scripts.readme_runs`.

Each function opens one page in headless Chromium (``scripts/cdp.py``), puts it in the state a user would (a
section scrolled to, a slider at the last step, a search typed) with real input events, and writes one PNG:

- ``lr_sweep_charts.png``: the chart view of the ``lr-sweep`` experiment, val charts (val/mIoU curves per run).
- ``run_images.png``: the default pipeline's training run, ``val/prediction`` at its last step (slider moved there).
- ``model_scores.png``: the registered version's LoggedModel page, its mIoU scores (training and evaluation).
- ``model_version.png``: the registered version of the default pipeline (aliases, scores as tags).
- ``formats_version.png``: the ``-onnx-int8`` version, its description the accuracy-and-latency table.
- ``sweep_runs.png``, ``sweep_charts.png``, ``sweep_top_trials.png``: the Optuna sweep's parent run with its child
  runs, the trials' val/mIoU curves, and its prediction grid of the best trials.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

from scripts.cdp import Browser
from scripts.readme_runs import EXPERIMENTS, MODEL

ML_VIEW = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'));"
)
# The innermost element whose text is exactly ``t`` (a chart title, a button label).
BY_TEXT = (
    "(t => [...document.querySelectorAll('*')]"
    ".find(e => e.childElementCount === 0 && (e.innerText || '').trim() === t))"
)
NO_SPINNER = "!document.querySelector('[role=progressbar], .du-bois-light-spin, [data-testid*=spinner]')"


def _centre(element_js: str) -> str:
    return _point(element_js, "r.x + r.width / 2")


def _point(element_js: str, x: str) -> str:
    """JS for ``[x, y]`` (``x`` an expression of the element's rect ``r``, y its middle), or null when absent."""
    return (
        f"(() => {{ const e = {element_js}; if (!e) return null; const r = e.getBoundingClientRect(); "
        f"return [{x}, r.y + r.height / 2]; }})()"
    )


def _card(title: str) -> str:
    """JS for the chart card titled ``title`` (the nearest ancestor holding a slider or a chart)."""
    return (
        f"(() => {{ let c = {BY_TEXT}({json.dumps(title)}); "
        "for (let i = 0; c && i < 12; i++) { c = c.parentElement; "
        "if (c.querySelector('[role=slider], canvas, svg.main-svg')) return c; } return null; })()"
    )


class Pages:
    """One browser for all pictures of one tracking server."""

    def __init__(self, browser: Browser, uri: str, output_dir: Path, timeout: float) -> None:
        self.browser, self.uri, self.output_dir, self.timeout = browser, uri, output_dir, timeout
        browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": ML_VIEW})

    def open(self, fragment: str, ready_text: str, still: bool = True) -> None:
        """Navigate to ``#/<fragment>`` and wait until ``ready_text`` shows (and, when ``still``, nothing spins)."""
        self.browser.goto(f"{self.uri}/#/{fragment}")
        self.browser.wait_for(
            f"document.body && document.body.innerText.includes({json.dumps(ready_text)})"
            + (f" && {NO_SPINNER}" if still else ""),
            self.timeout,
            f"{ready_text!r} on #/{fragment}",
        )
        time.sleep(2.0)  # charts and tables animate in after their data arrives

    def shoot(self, name: str, height: int | None = None) -> Path:
        time.sleep(1.0)
        return self.browser.screenshot(self.output_dir / name, height)

    def scroll_to(self, text: str) -> None:
        self.browser.wait_for(f"!!{BY_TEXT}({json.dumps(text)})", self.timeout, f"{text!r} on the page")
        self.browser.evaluate(f"{BY_TEXT}({json.dumps(text)}).scrollIntoView({{block: 'start'}})")
        time.sleep(2.0)

    def search(self, placeholder: str, text: str) -> None:
        """Type ``text`` into the search box whose placeholder starts with ``placeholder``."""
        found = self.browser.evaluate(
            f"(() => {{ const i = [...document.querySelectorAll('input')].find(x => "
            f"(x.placeholder || '').startsWith({json.dumps(placeholder)})); if (i) i.focus(); return !!i; }})()"
        )
        if not found:
            raise RuntimeError(f"no search box {placeholder!r} on the page")
        self.browser.type_text(text)
        time.sleep(2.0)

    def slide_to_last_step(self, title: str) -> None:
        """Click the right end of the step slider of the image card ``title`` (the last logged step)."""
        track = (
            f"(() => {{ const c = {_card(title)}; const s = c && c.querySelector('[role=slider]'); "
            "return s && s.parentElement.parentElement; })()"
        )
        self.browser.click(_point(track, "r.right - 2"), f"the step slider of {title!r}")
        time.sleep(2.0)


def lr_sweep_charts(pages: Pages, experiment_id: str) -> Path:
    pages.open(f"experiments/{experiment_id}/runs?compareRunsMode=CHART", "Add chart", still=False)
    pages.search("Search metric charts", "val/")
    return pages.shoot("lr_sweep_charts.png")


def run_images(pages: Pages, experiment_id: str, run_id: str) -> Path:
    """The run's val/prediction card at the last step, its image opened in the UI's preview.

    The window is made tall for this one: the preview opens in its middle, below the card, so the slider at the last
    step stays in sight.
    """
    size = pages.browser.size
    pages.browser.resize(size[0], max(size[1], 1500))
    try:
        pages.open(f"experiments/{experiment_id}/runs/{run_id}/model-metrics", "Auto-refresh", still=False)
        pages.search("Search metric charts", "val/prediction")  # the cards below the fold are not rendered
        pages.scroll_to("val/prediction")
        pages.slide_to_last_step("val/prediction")
        image = f"(() => {{ const c = {_card('val/prediction')}; return c && c.querySelector('img'); }})()"
        pages.browser.evaluate(f"{image}.scrollIntoView({{block: 'nearest'}})")  # the card scrolls within
        time.sleep(1.0)
        pages.browser.click(_centre(image), "the val/prediction image at the last step")
        time.sleep(3.0)  # the preview zooms in
        return pages.shoot("run_images.png", height=size[1])  # the top: the card, and the preview below it
    finally:
        pages.browser.resize(*size)


def model_scores(pages: Pages, experiment_id: str, model_id: str) -> Path:
    pages.open(f"experiments/{experiment_id}/models/{model_id}", "Metrics")
    pages.search("Search metrics", "mIoU")
    return pages.shoot("model_scores.png")


def model_version(pages: Pages, name: str, version: str, filename: str, description: str = "") -> Path:
    """A registered version's page; with ``description`` (text it holds), its description is unfolded until that
    text shows (the toggle's first click can fold a section the page thinks open but has not drawn)."""
    pages.open(f"models/{urllib.parse.quote(name)}/versions/{version}", f"Version {version}")
    header = (
        "[...document.querySelectorAll('[role=button]')]"
        ".find(e => (e.innerText || '').trim().startsWith('Description'))"
    )
    shown = f"document.body.innerText.includes({json.dumps(description)})"
    clicks = 0
    while description and not pages.browser.evaluate(shown):
        if clicks == 3:
            raise RuntimeError(f"the description of {name} version {version} does not show {description!r}")
        pages.browser.click(_point(header, "r.x + 12"), "the Description toggle")  # its chevron
        clicks += 1
        time.sleep(2.0)
    return pages.shoot(filename)


def expand_run(pages: Pages, run_name: str, child_name: str) -> None:
    """Unfold ``run_name``'s child runs in the runs list (table or chart view) unless ``child_name`` shows."""
    if pages.browser.evaluate(f"!!{BY_TEXT}({json.dumps(child_name)})"):
        return
    expand = (
        f"(() => {{ const row = {BY_TEXT}({json.dumps(run_name)}).closest('[role=row], .ag-row, tr'); "
        "return row && (row.querySelector('button[data-component-id*=runnamecellrenderer]') "
        "|| row.querySelector('button')); })()"
    )
    pages.browser.click(_centre(expand), f"the expander of run {run_name!r}")
    pages.browser.wait_for(f"!!{BY_TEXT}({json.dumps(child_name)})", pages.timeout, f"child run {child_name!r}")
    time.sleep(2.0)


def sweep_runs(pages: Pages, experiment_id: str, parent_name: str) -> Path:
    """The runs table with the sweep's parent expanded (its child runs listed under it)."""
    pages.open(f"experiments/{experiment_id}/runs?compareRunsMode=TABLE", parent_name)
    expand_run(pages, parent_name, "trial-0")
    return pages.shoot("sweep_runs.png")


def sweep_charts(pages: Pages, experiment_id: str, parent_name: str) -> Path:
    """The trials' val/mIoU chart, opened full size from the experiment's chart view."""
    pages.open(f"experiments/{experiment_id}/runs?compareRunsMode=CHART", "Add chart", still=False)
    expand_run(pages, parent_name, "trial-0")
    pages.search("Search metric charts", "val/mIoU")
    pages.scroll_to("val/mIoU")
    pages.browser.click(
        _centre(f"{_card('val/mIoU')}.querySelector('button')"), "the val/mIoU chart's full-size button"
    )
    time.sleep(3.0)
    return pages.shoot("sweep_charts.png")


def artifact(pages: Pages, experiment_id: str, run_id: str, path: str, filename: str) -> Path:
    pages.open(f"experiments/{experiment_id}/runs/{run_id}/artifacts/{path}", Path(path).name)
    pages.browser.wait_for(
        "[...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 200)",
        pages.timeout,
        f"the preview of {path}",
    )
    return pages.shoot(filename)


def _get(uri: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.load(r)


def _post(uri: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def _experiment(uri: str, name: str) -> str:
    return _get(uri, "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]


def _runs(uri: str, experiment_id: str, filter_string: str) -> list[dict]:
    body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 50}
    return _post(uri, "runs/search", body).get("runs", [])


def capture_all(browser: Browser, uri: str, output_dir: Path, timeout: float) -> list[Path]:
    """Every README picture of the runs :func:`scripts.readme_runs.make_runs` made on ``uri``.

    Raises:
        ValueError: a run or model the pictures need is missing (run ``scripts.readme_runs`` first).
    """
    pages = Pages(browser, uri, output_dir, timeout)
    pipeline = _experiment(uri, EXPERIMENTS["pipeline"])
    production = _get(uri, "registered-models/alias", name=MODEL, alias="production")["model_version"]
    train_run, model_id = production["run_id"], production["source"].removeprefix("models:/")
    int8 = f"{MODEL}-onnx-int8"
    int8_versions = _get(uri, "model-versions/search", filter=f"name = '{int8}'").get("model_versions", [])
    if not int8_versions:
        raise ValueError(f"{uri}: no version of {int8!r}; run scripts.readme_runs first")
    sweep = _experiment(uri, EXPERIMENTS["sweep"])
    # The sweep's run is the one with the study tag and no parent (``mlflow run`` names it, not the sweep).
    finished = _runs(uri, sweep, "attributes.status = 'FINISHED' and tags.`sweep.study` != ''")
    parents = [r for r in finished if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
    if not parents:
        raise ValueError(f"{uri}: experiment {EXPERIMENTS['sweep']!r} has no finished sweep parent run")
    parent = parents[0]["info"]
    return [
        lr_sweep_charts(pages, _experiment(uri, EXPERIMENTS["lr_sweep"])),
        run_images(pages, pipeline, train_run),
        model_scores(pages, pipeline, model_id),
        model_version(pages, MODEL, production["version"], "model_version.png"),
        model_version(
            pages,
            int8,
            max((v["version"] for v in int8_versions), key=int),
            "formats_version.png",
            description="argmax agreement",
        ),
        sweep_runs(pages, sweep, parent["run_name"]),
        sweep_charts(pages, sweep, parent["run_name"]),
        artifact(pages, sweep, parent["run_id"], "sweep/top_trials.png", "sweep_top_trials.png"),
    ]
