"""The dashboard web app: server-rendered pages (jinja2) over the registry and run folders, JSON endpoints under
``/api``, and server-sent events for live training curves.  Every script and style ships in ``static/``.

Security (see ``security.py``): an optional access token (cookie after ``?token=`` or a header), a Host check against
DNS rebinding on loopback, and same-origin + CSRF-token checks on every POST.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from lmforge.dashboard import security
from lmforge.dashboard.store import PageError, Store, iter_dir_files, read_metrics

HERE = Path(__file__).parent
TRAINING_STAGES = ("pretrain", "sft", "dpo")
CURVE_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")
TEXT_VIEW_BYTES = 200_000
log = logging.getLogger("lmforge.dashboard")


PAGE_SIZE = 200


@lru_cache(maxsize=None)
def headline(stage: str) -> tuple[str, ...]:
    from lmforge.cli import HEADLINE  # the key metrics `lmforge runs` shows, per stage

    return tuple(HEADLINE.get(stage, []))


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def create_app(home: str | Path, token: str | None = None, allowed_hosts: set[str] | None = None,
               jobs_dir: str | Path | None = None) -> FastAPI:
    store = Store(home)
    app = FastAPI(title="lmforge dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.guard = security.Guard(token, allowed_hosts)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["fmt"] = fmt
    templates.env.filters["duration"] = fmt_duration
    templates.env.globals["headline"] = headline
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    security.install(app)

    def page(request: Request, name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("nav", name.split(".")[0])
        ctx["csrf"] = app.state.guard.csrf_token
        return templates.TemplateResponse(request, name, ctx, status_code=code)

    @app.exception_handler(PageError)
    async def page_error(request: Request, err: PageError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": err.message}, status_code=err.status)
        return page(request, "error.html", err.status, message=err.message)

    @app.exception_handler(Exception)
    async def any_error(request: Request, err: Exception) -> Response:
        log.exception("dashboard error on %s", request.url.path)
        message = f"internal error: {type(err).__name__}: {err}"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=500)
        return page(request, "error.html", 500, message=message)

    # -- runs ---------------------------------------------------------------------------------------------------------
    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request, stage: str = "", status: str = "", q: str = "", skip: int = 0) -> HTMLResponse:
        skip = max(skip, 0)
        rows = store.runs(stage, status, q, PAGE_SIZE + 1, skip)
        more, rows = len(rows) > PAGE_SIZE, rows[:PAGE_SIZE]
        for r in rows:  # the key metrics as one string here: per-row template logic was most of the page's time
            m = r["metrics_d"]
            r["key_metrics"] = ", ".join(f"{k}={fmt(m[k])}" for k in headline(r["stage"]) if k in m)
        return page(request, "runs.html", runs=rows, more=more, skip=skip,
                    page_size=PAGE_SIZE, stages=store.stages(), stage=stage, status=status, q=q,
                    registry=store.db, has_registry=store.db.is_file(),
                    states=["running", "done", "failed", "interrupted"])

    @app.get("/api/runs")
    def runs_api(stage: str = "", status: str = "", q: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        return [_public(r) for r in store.runs(stage, status, q, limit)]

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        run = store.run(run_id)
        manifest, problem = store.manifest(run)
        folder = Path(run["path"])
        exists = folder.is_dir()
        inputs = []
        for e in store.inputs_of(run_id):
            fp = e.get("src_fingerprint") or ""
            src = store.run_at(e["src"]) if not fp.startswith("run:") else _try(store.run, fp[4:])
            if src is None and not fp.startswith("run:"):  # a file inside another run's folder
                src = store.run_containing(e["src"], run["started_at"])
            inputs.append({"role": e["role"], "path": e["src"], "fingerprint": fp, "run": src})
        users = []
        for e in store.users_of(run["path"], run_id):
            dst = _try(store.run, e["dst_run"])
            if dst:
                users.append({"role": e["role"], "run": dst})
        files = list(iter_dir_files(folder)) if exists else []
        metrics = (manifest or {}).get("metrics") or run["metrics_d"]
        return page(request, "run.html", run=run, manifest=manifest, problem=problem, exists=exists, inputs=inputs,
                    users=users, files=files, metrics=metrics, logs=store.log_tail(run),
                    config=(manifest or {}).get("config") or run["config_d"],
                    has_curves=exists and (folder / "metrics.jsonl").is_file(),
                    has_data=exists and (folder / "stats.json").is_file(), nav="runs")

    @app.get("/api/runs/{run_id}")
    def run_api(run_id: str) -> dict[str, Any]:
        run = store.run(run_id)
        manifest, problem = store.manifest(run)
        return {"run": _public(run), "manifest": manifest, "problem": problem}

    @app.get("/runs/{run_id}/file", response_class=HTMLResponse)
    def file_page(request: Request, run_id: str, path: str) -> HTMLResponse:
        run = store.run(run_id)
        target = store.file(run, path)
        if target.is_dir():
            rows = [(str(Path(path) / n), s) for n, s in iter_dir_files(target)]
            return page(request, "file.html", run=run, path=path, listing=rows, text=None, nav="runs")
        size = target.stat().st_size
        with open(target, "rb") as f:
            blob = f.read(TEXT_VIEW_BYTES)
        if b"\0" in blob[:4096]:
            text, note = None, f"binary file, {size:,} bytes"
        else:
            text = blob.decode("utf-8", "replace")
            note = f"first {TEXT_VIEW_BYTES:,} of {size:,} bytes" if size > TEXT_VIEW_BYTES else f"{size:,} bytes"
        return page(request, "file.html", run=run, path=path, listing=None, text=text, note=note, nav="runs")

    # -- training curves ----------------------------------------------------------------------------------------------
    @app.get("/curves", response_class=HTMLResponse)
    def curves_page(request: Request, run: list[str] = Query(default=[])) -> HTMLResponse:
        chosen = [store.run(r) for r in dict.fromkeys(run)]
        candidates = sorted((r for st in TRAINING_STAGES for r in store.runs(st, limit=100)
                             if (Path(r["path"]) / "metrics.jsonl").is_file()), key=lambda r: -r["started_at"])
        return page(request, "curves.html", chosen=chosen, candidates=candidates, keys=CURVE_KEYS)

    @app.get("/api/runs/{run_id}/metrics")
    def metrics_api(run_id: str, offset: int = 0) -> dict[str, Any]:
        run = store.run(run_id)
        path = store.folder(run) / "metrics.jsonl"
        if run["state"] == "running" and not path.exists():  # started, no step logged yet
            return {"run_id": run_id, "records": [], "offset": 0, "bad_lines": 0, "state": run["state"]}
        records, new_offset, bad = read_metrics(path, max(0, offset))
        return {"run_id": run_id, "records": records, "offset": new_offset, "bad_lines": bad, "state": run["state"]}

    @app.get("/api/runs/{run_id}/metrics/stream")
    async def metrics_stream(request: Request, run_id: str, offset: int = 0, poll: float = 0.5) -> StreamingResponse:
        run = store.run(run_id)
        path = store.folder(run) / "metrics.jsonl"
        poll = min(max(poll, 0.1), 5.0)

        async def events():
            pos, quiet = max(0, offset), 0
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                try:
                    records, pos2, bad = read_metrics(path, pos)
                except PageError as err:
                    if not Path(run["path"]).is_dir():
                        yield f"event: problem\ndata: {json.dumps(err.message)}\n\n"
                        return
                    records, pos2, bad = [], pos, 0  # not written yet
                if records or pos2 != pos:
                    quiet = 0
                    yield f"data: {json.dumps({'records': records, 'offset': pos2, 'bad_lines': bad})}\n\n"
                else:
                    quiet += 1
                pos = pos2
                if quiet >= 4:
                    state = _try(store.run, run_id)
                    if state is None or state["state"] != "running":
                        yield f"event: end\ndata: {json.dumps((state or {}).get('state', 'gone'))}\n\n"
                        return
                    quiet = 0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(poll)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- lineage ------------------------------------------------------------------------------------------------------
    @app.get("/runs/{run_id}/lineage", response_class=HTMLResponse)
    def lineage_page(request: Request, run_id: str) -> HTMLResponse:
        from lmforge.dashboard import graph

        g = graph.build(store, run_id)
        return page(request, "lineage.html", run=store.run(run_id), g=graph.layout(g), truncated=g.truncated,
                    nav="lineage")

    @app.get("/lineage", response_class=HTMLResponse)
    def lineage_pick(request: Request, path: str = "") -> Response:
        if path:
            run = store.run_at(str(Path(path).resolve())) or store.run_at(path)
            if run is None:
                raise PageError(f"no run recorded for {path}", 404)
            return RedirectResponse(f"/runs/{run['run_id']}/lineage", status_code=303)
        return page(request, "lineage_pick.html", runs=store.runs(limit=300))

    @app.get("/api/runs/{run_id}/lineage")
    def lineage_api(run_id: str) -> dict[str, Any]:
        from lmforge.dashboard import graph

        g = graph.build(store, run_id)
        return {"focus": g.focus, "nodes": [vars(n) for n in g.nodes.values()],
                "edges": [{"src": s, "dst": d, "role": r} for s, d, r in g.edges], "truncated": g.truncated}

    # -- data ---------------------------------------------------------------------------------------------------------
    @app.get("/data", response_class=HTMLResponse)
    def data_pick(request: Request) -> HTMLResponse:
        runs = [r for r in store.runs("data", limit=300)]
        return page(request, "data_pick.html", runs=runs)

    @app.get("/runs/{run_id}/data", response_class=HTMLResponse)
    def data_page(request: Request, run_id: str, kind: str = "kept", field: str = "", value: str = "",
                  text: str = "", n: int = 20, skip: int = 0) -> HTMLResponse:
        from lmforge.dashboard import data_view

        run = store.run(run_id)
        folder = store.folder(run)
        stats, problem = data_view.load_stats(folder)
        docs, doc_problem, more = data_view.browse(folder, kind == "dropped", field, value, text, n, skip)
        return page(request, "data.html", run=run, stats=stats, problem=problem, charts=data_view.charts(stats),
                    docs=docs, doc_problem=doc_problem, more=more, kind=kind, field=field, value=value, text=text,
                    n=n, skip=skip, nav="data")

    # -- launch -------------------------------------------------------------------------------------------------------
    from lmforge.dashboard import jobs as jobs_mod

    jobs = jobs_mod.Jobs(Path(jobs_dir) if jobs_dir else store.home)
    app.state.jobs = jobs

    @app.get("/launch", response_class=HTMLResponse)
    def launch_page(request: Request) -> HTMLResponse:
        return page(request, "launch.html", stages=list(jobs_mod.STAGES), jobs=jobs.all())

    @app.get("/launch/{stage}", response_class=HTMLResponse)
    def launch_form(request: Request, stage: str) -> HTMLResponse:
        entry = jobs_mod.stage(stage)
        return page(request, "launch_form.html", entry=entry, fields=jobs_mod.form_fields(entry), nav="launch")

    @app.post("/launch/{stage}")
    async def launch_submit(request: Request, stage: str) -> RedirectResponse:
        from urllib.parse import parse_qsl

        entry = jobs_mod.stage(stage)
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        form.pop("csrf", None)
        out = form.pop("out", "")
        bools = {f["name"] for f in jobs_mod.form_fields(entry) if f["kind"] == "bool"}
        for name in bools:  # an unchecked box is not sent: it means false
            form[name] = form.get(name, "false")
        job = jobs.start(entry, form, out)
        return RedirectResponse(f"/jobs/{job['id']}", status_code=303)

    @app.post("/api/jobs")
    async def launch_api(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise PageError('send JSON: {"stage": NAME, "config": {field: value}, "out": FOLDER}', 400) from None
        if not isinstance(body, dict) or not isinstance(body.get("config", {}), dict):
            raise PageError('send JSON: {"stage": NAME, "config": {field: value}, "out": FOLDER}', 400)
        entry = jobs_mod.stage(str(body.get("stage", "")))
        values = {k: ", ".join(map(str, v)) if isinstance(v, list) else str(v)
                  for k, v in body.get("config", {}).items()}
        return jobs.start(entry, values, str(body.get("out") or ""))

    @app.get("/api/jobs")
    def jobs_api() -> list[dict[str, Any]]:
        return jobs.all()

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str) -> HTMLResponse:
        job = jobs.get(job_id)
        run = store.run_at(job["out"])
        return page(request, "job.html", job=job, run=run, nav="launch")

    @app.get("/api/jobs/{job_id}")
    def job_api(job_id: str) -> dict[str, Any]:
        return jobs.get(job_id)

    @app.post("/jobs/{job_id}/cancel")
    def job_cancel(job_id: str) -> RedirectResponse:
        jobs.cancel(job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    @app.get("/api/jobs/{job_id}/log/stream")
    async def job_log_stream(request: Request, job_id: str, offset: int = 0, poll: float = 0.5) -> StreamingResponse:
        path = jobs.log_path(job_id)
        poll = min(max(poll, 0.1), 5.0)

        async def events():
            pos = max(0, offset)
            while not await request.is_disconnected():
                try:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        chunk = f.read(1 << 20)
                except FileNotFoundError:
                    yield f"event: problem\ndata: {json.dumps(f'{path} is gone')}\n\n"
                    return
                if chunk:
                    pos += len(chunk)
                    yield f"data: {json.dumps({'text': chunk.decode('utf-8', 'replace'), 'offset': pos})}\n\n"
                    continue
                state = jobs.get(job_id)["state"]
                if state != "running":
                    yield f"event: end\ndata: {json.dumps(state)}\n\n"
                    return
                await asyncio.sleep(poll)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- serving monitor and playground ------------------------------------------------------------------------------
    from lmforge.dashboard import monitor

    @app.get("/serving", response_class=HTMLResponse)
    def serving_page(request: Request, url: str = "") -> HTMLResponse:
        return page(request, "serving.html", url=url)

    @app.get("/api/serving")
    def serving_api(url: str) -> dict[str, Any]:
        return monitor.scrape(url)

    @app.get("/api/machine")
    def machine_api() -> dict[str, Any]:
        return monitor.machine()

    @app.get("/playground", response_class=HTMLResponse)
    def playground_page(request: Request, base_url: str = "http://127.0.0.1:8000/v1") -> HTMLResponse:
        return page(request, "playground.html", base_url=base_url)

    @app.get("/api/playground/models")
    async def playground_models(base_url: str) -> dict[str, Any]:
        import httpx

        url = monitor.check_url(base_url) + "/models"
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                resp = await http.get(url)
            return {"models": [m["id"] for m in resp.json().get("data", [])]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise PageError(f"cannot list models at {url}: {type(err).__name__}: {err or 'no answer'}", 502) from None

    @app.post("/api/playground/chat")
    async def playground_chat(request: Request) -> StreamingResponse:
        """Relays a streaming chat completion from an OpenAI-compatible server (no CORS trouble in the browser)."""
        import httpx

        try:
            body = await request.json()
            base = monitor.check_url(str(body["base_url"]))
            payload = {k: body[k] for k in ("model", "messages", "temperature", "top_p", "max_tokens", "seed")
                       if body.get(k) not in (None, "")}
        except (ValueError, KeyError, TypeError):
            raise PageError('send JSON: {"base_url", "model", "messages", ...}', 400) from None
        payload["stream"] = True
        http = httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5))
        try:
            upstream = await http.send(http.build_request("POST", base + "/chat/completions", json=payload),
                                       stream=True)
        except httpx.HTTPError as err:
            await http.aclose()
            raise PageError(f"cannot reach {base}/chat/completions: {type(err).__name__}: {err or 'no answer'}. "
                            "Is the server running?", 502) from None
        if upstream.status_code != 200:
            text = (await upstream.aread()).decode("utf-8", "replace")
            await upstream.aclose()
            await http.aclose()
            try:
                detail = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = text[:300]
            raise PageError(f"the server answered HTTP {upstream.status_code}: {detail}", 502)

        async def relay():
            try:
                async for line in upstream.aiter_lines():
                    if line:
                        yield line + "\n\n"
            except httpx.HTTPError as err:
                yield f"event: problem\ndata: {json.dumps(f'the stream broke: {err}')}\n\n"
            finally:
                await upstream.aclose()
                await http.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- production feedback (lmforge serve --record) ------------------------------------------------------------------
    from lmforge.dashboard import feedback_view

    @app.get("/feedback", response_class=HTMLResponse)
    def feedback_page(request: Request, rating: str = "", annotator: str = "", serve_run: str = "", q: str = "",
                      skip: int = 0) -> HTMLResponse:
        head, rows, more = feedback_view.listing(store.home, rating, annotator, serve_run, q, skip)
        return page(request, "feedback.html", head=head, rows=rows, more=more, rating=rating, annotator=annotator,
                    serve_run=serve_run, q=q, skip=max(skip, 0), page_size=feedback_view.PAGE_SIZE,
                    db=feedback_view.db_path(store.home), ratings=list(feedback_view.RATING_FILTERS))

    @app.get("/feedback/{response_id}", response_class=HTMLResponse)
    def feedback_item(request: Request, response_id: str) -> HTMLResponse:
        r = feedback_view.response(store.home, response_id)
        return page(request, "feedback_item.html", r=r, serve=_try(store.run, r["serve_run"]), nav="feedback")

    @app.get("/api/feedback")
    def feedback_api(rating: str = "", annotator: str = "", serve_run: str = "", q: str = "",
                     skip: int = 0) -> dict[str, Any]:
        head, rows, more = feedback_view.listing(store.home, rating, annotator, serve_run, q, skip)
        return {"summary": head, "responses": rows, "more": more}

    # -- evaluation ---------------------------------------------------------------------------------------------------
    @app.get("/eval", response_class=HTMLResponse)
    def eval_page(request: Request) -> HTMLResponse:
        from lmforge.dashboard import data_view

        board, problem = data_view.leaderboard(store)
        return page(request, "eval.html", board=board, problem=problem)

    # -- labelling ----------------------------------------------------------------------------------------------------
    from lmforge.dashboard.labels import Labelling

    labelling = Labelling(store.home)
    app.state.guard.annotator_of = labelling.who  # annotator tokens open their own assignment only (security.py)

    async def form_of(request: Request) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))

    @app.get("/label", response_class=HTMLResponse)
    def label_home(request: Request) -> HTMLResponse:
        return page(request, "label_home.html", projects=labelling.projects(), nav="label")

    @app.post("/label")
    async def label_create(request: Request) -> RedirectResponse:
        form = await form_of(request)
        generate = None
        if form.get("generate_from", "").strip():  # candidate answers from a model folder or an endpoint
            from lmforge.dashboard import candidates

            try:
                n, max_tokens = int(form.get("candidates") or 2), int(form.get("max_tokens") or 128)
                temperature, seed = float(form.get("temperature") or 0.8), int(form.get("seed") or 0)
            except ValueError:
                raise PageError("candidates, max tokens and seed are whole numbers, temperature a number", 400) \
                    from None

            def generate(prompts: list[str]) -> list[list[dict[str, Any]]]:
                return candidates.generate(prompts, form["generate_from"], n, max_tokens, temperature, seed,
                                           form.get("model", "").strip())
        overlap = form.get("overlap", "").strip()
        if overlap and not overlap.isdigit():
            raise PageError(f"annotators per item: a whole number (got {overlap!r})", 400)
        project = await asyncio.to_thread(  # generating takes a while: off the event loop
            labelling.create, form.get("name", ""), form.get("items", ""), form.get("guidelines", ""),
            [a.strip() for a in form.get("annotators", "").split(",") if a.strip()], generate,
            int(overlap) if overlap else None)
        return RedirectResponse(f"/label/{project['name']}", status_code=303)

    @app.get("/label/{name}", response_class=HTMLResponse)
    def label_project(request: Request, name: str) -> HTMLResponse:
        project = labelling.project(name)
        total = len(labelling.items(name))
        labels = labelling.labels(name)
        progress = {}
        for a in project["annotators"]:
            mine = {i["id"] for i in labelling.assigned(name, a)}
            progress[a] = (len(mine & set(labels.get(a, {}))), len(mine))
        base = str(request.base_url).rstrip("/")
        links = {a: f"{base}/?annotator_token={t}" for a, t in labelling.tokens(name).items()}
        return page(request, "label_project.html", project=project, total=total, progress=progress, links=links,
                    agreement=labelling.agreement(name), nav="label")

    @app.get("/label/{name}/as/{annotator}", response_class=HTMLResponse)
    def label_next(request: Request, name: str, annotator: str) -> HTMLResponse:
        labelling.check_annotator(name, annotator)
        item, done, total = labelling.next_item(name, annotator)
        return page(request, "label_item.html", project=labelling.project(name), annotator=annotator, item=item,
                    done=done, total=total, nav="label")

    @app.post("/label/{name}/as/{annotator}/{item_id}")
    async def label_submit(request: Request, name: str, annotator: str, item_id: str) -> RedirectResponse:
        form = await form_of(request)
        rating = form.get("rating", "")
        labelling.add(name, annotator, item_id, int(rating) if rating.isdigit() else None,
                      [t.strip() for t in form.get("tags", "").split(",") if t.strip()], form.get("edited", "").strip(),
                      form.get("choice") or None)
        return RedirectResponse(f"/label/{name}/as/{annotator}", status_code=303)

    @app.get("/label/{name}/export")
    def label_export(name: str, kind: str = "sft") -> Response:
        text = labelling.export(name, kind)
        return Response(text, media_type="application/jsonl",
                        headers={"Content-Disposition": f'attachment; filename="{name}-{kind}.jsonl"'})

    @app.get("/runs/{run_id}/items/{task}", response_class=HTMLResponse)
    def items_page(request: Request, run_id: str, task: str, only: str = "") -> HTMLResponse:
        """Per-item results of one task of an eval run (``items/<task>.jsonl``); ``only=wrong`` keeps failures."""
        run = store.run(run_id)
        path = store.file(run, f"items/{task}.jsonl")
        try:
            metric = json.loads((path.parent.parent / "results.json").read_text())["tasks"][task]["metric"]
        except (OSError, ValueError, KeyError, TypeError):
            metric = "acc"
        rows, bad = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and not (only == "wrong" and rec.get(metric) not in (0, 0.0, False)):
                rows.append(rec)
        cols = list(dict.fromkeys(k for r in rows[:200] for k in r))
        return page(request, "items.html", run=run, task=task, rows=rows[:1000], cols=cols, bad=bad, metric=metric,
                    total=len(rows), nav="eval")

    return app


def _try(fn, *args):
    try:
        return fn(*args)
    except PageError:
        return None


def _public(run: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k not in ("config", "metrics")}
    out["config"], out["metrics"] = out.pop("config_d"), out.pop("metrics_d")
    return out
