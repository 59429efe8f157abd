"""The migration dashboard as a FastAPI app the plugin mounts in Airflow's
api-server (``plugins/pacs_migration_dashboard.py``), behind Airflow's own
login: every route needs a user the auth manager lets read ``pacs_migration``
(all three roles). Airflow does not authenticate plugin apps itself: this
module does, with the api-server's own ``get_user`` (its JWT, bearer or cookie).

The answers come from :mod:`include.pacs_migration.dashboard`, over the
coverage index, the ledger, the plan and the assessment read from the bucket."""

from __future__ import annotations

import datetime as dt
import mimetypes
from typing import Any

READ_AS = "pacs_migration"  # who may read this DAG may read the dashboard
ARTIFACTS = ("validation.json", "lineage.json", "census.json")  # what a partition's links may open, and gx/...


def create_app() -> Any:
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

    app = FastAPI(title="PACS migration dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    # A default, not Annotated[...]: with postponed annotations FastAPI could not resolve this local name.
    async def reader(user: Any = Depends(get_user)) -> Any:  # noqa: B008
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

        if not get_auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=READ_AS), user=user):
            raise HTTPException(403, f"not allowed to read {READ_AS}")
        return user

    app.state.reader = reader  # the one gate of every route (tests override it)

    @app.exception_handler(HTTPException)
    async def to_login(request: Request, exc: HTTPException) -> Response:
        """A person without a session is sent to Airflow's login; an API caller gets the status."""
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            try:
                return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)))
            except RuntimeError:  # no auth manager here (not inside the api-server): say 401
                pass
        return JSONResponse({"detail": exc.detail}, exc.status_code)

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(reader)])
    def page() -> str:
        from include.pacs_migration.templates import render

        cfg, _store = _sources()
        return render("dashboard.html.j2", bucket_uri=f"s3://{cfg.target.bucket}/{cfg.target.prefix}")

    @app.get("/api/overview", dependencies=[Depends(reader)])
    def overview() -> dict[str, Any]:
        return _answer("overview")

    @app.get("/api/heatmap", dependencies=[Depends(reader)])
    def heatmap(
        granularity: str = Query("month", pattern="^(month|day)$"), year: int | None = Query(None, ge=1900, le=2100)
    ) -> dict[str, Any]:
        return _answer("heatmap", granularity=granularity, year=year)

    @app.get("/api/worklist", dependencies=[Depends(reader)])
    def worklist() -> dict[str, Any]:
        return _answer("worklist")

    @app.get("/api/quarantine.csv", dependencies=[Depends(reader)])
    def quarantine_csv() -> Response:
        from include.pacs_migration import coverage, dashboard

        _cfg, store = _sources()
        body = dashboard.quarantine_csv(coverage.read(store))
        headers = {"Content-Disposition": 'attachment; filename="quarantine-by-reason.csv"'}
        return Response(body, media_type="text/csv", headers=headers)

    @app.get("/partition/{study_date}/{modality}/{name:path}", dependencies=[Depends(reader)])
    def artifact(study_date: str, modality: str, name: str) -> Response:
        """A partition's proof: its verdict, lineage, census summary, GX Data Docs."""
        from include.pacs_migration.manifest import PartitionManifests
        from include.pacs_migration.partition import Partition

        try:
            partition = Partition.parse(f"{study_date}/{modality}")
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if name not in ARTIFACTS and not (name.startswith("gx/") and ".." not in name):
            raise HTTPException(404, "not an artifact of a partition")
        _cfg, store = _sources()
        data = store.get_or_none(PartitionManifests(store, partition).key(name))
        if data is None:
            raise HTTPException(404, f"{partition.key} has no {name}")
        return Response(data, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    return app


def _sources() -> tuple[Any, Any]:
    from include.pacs_migration_airflow import object_store, runtime_config

    cfg = runtime_config()
    return cfg, object_store(cfg)


def _answer(what: str, **args: Any) -> dict[str, Any]:
    """One of the dashboard's answers, from the bucket as it is now."""
    from include.pacs_migration import coverage, dashboard
    from include.pacs_migration.assessment import read_by_date
    from include.pacs_migration.plan import LEDGER_KEY, Ledger

    cfg, store = _sources()
    index = coverage.read(store)
    if what == "heatmap":
        return dashboard.heatmap(index, read_by_date(store), **args)
    now = dt.datetime.now(dt.UTC)
    ledger = Ledger.from_bytes(store.get_or_none(store.target.key(LEDGER_KEY)))
    if what == "worklist":
        return dashboard.worklist(index, ledger, cfg.plan, now.date())
    rate = cfg.assessment.throughput_instances_s
    return {
        "totals": dashboard.totals(index),
        "progress": dashboard.progress(cfg.plan, ledger, read_by_date(store), now, rate),
        "generated_at": now.isoformat(timespec="seconds"),
        "ruleset": cfg.ruleset.label,
    }
