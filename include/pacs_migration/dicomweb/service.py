"""The DICOMweb service (PS3.18) over the migrated archive, with federated
fallback to the legacy PACS: a FastAPI app built from injected parts (the
store, the catalog, the legacy archive, the audit trail, the tokens), run by
uvicorn (``python -m include.dicomweb_serve``, ``make serve``).

Searches merge the study index with the legacy PACS's C-FIND answers (legacy
studies marked: InstanceAvailability NEARLINE, RetrieveAETitle the legacy AE,
``dicomweb.legacy_label`` after the description); retrievals stream migrated
objects from S3 part by part and fetch what is not migrated yet from the legacy
PACS by C-GET. Every request needs a bearer token; accesses are audited."""

from __future__ import annotations

import fnmatch
import hmac
import io
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..audit import AuditTrail
from ..config import DicomWebConfig
from ..locator import StudyLocation, locate, resolve
from ..privacy import PatientKeyer
from ..store import ObjectStore
from ..study_index import COLUMNS, read_header
from ..uids import is_valid_uid
from . import qido, wado
from .catalog import IndexSearch, StudyCatalog
from .legacy import LegacyArchive, LegacyObject, LegacySearch, LegacyUnavailable

log = logging.getLogger(__name__)

SEEN_LIMIT = 4096  # recent (person, study, origin) accesses remembered to batch their audit events
METADATA_CACHE = 4096  # instances' DICOM JSON kept in memory (~10-20 KB each)
PATIENT_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "IssuerOfPatientID"})


@dataclass
class AccessLog:
    """Audit of who searched and opened what: one 110112 per search, one
    110103 per person, study and origin per ``window`` seconds (a viewer's
    hundreds of frame requests are one access), written in batches."""

    trail: AuditTrail | None
    keyer: PatientKeyer | None
    window: float = 5.0
    _seen: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def searched(self, user: str, query: qido.QidoQuery, answers: int, legacy: str) -> None:
        if self.trail is None:
            return
        keys = {"QueryRetrieveLevel": query.level.value}
        for kw, value in query.matches.items():
            keys[kw] = self._keyed(kw, value)
        self.trail.searched(user, keys, f"DICOMweb search: {answers} answer(s); legacy PACS {legacy}")

    def accessed(self, user: str, study_uid: str, patient_id: str | None, origin: str) -> None:
        if self.trail is None:
            return
        now = time.monotonic()
        with self._lock:
            last = self._seen.get((user, study_uid, origin))
            if last is not None and now - last < self.window:
                return
            if len(self._seen) >= SEEN_LIMIT:  # a service runs for months: forget accesses older than the window
                self._seen = {k: t for k, t in self._seen.items() if now - t < self.window}
            self._seen[(user, study_uid, origin)] = now
        keys = [k] if self.keyer and patient_id and (k := self.keyer.key_of(patient_id)) else []
        self.trail.accessed(user, f"DICOMweb retrieve from the {origin}", [study_uid], keys)

    def _keyed(self, kw: str, value: str) -> str:
        if kw == "PatientID" and self.keyer is not None and "*" not in value and "?" not in value:
            return f"patient-key:{self.keyer.key_of(value)}"
        return "<given>" if kw in PATIENT_KEYS else value

    def flush(self) -> None:
        if self.trail is not None:
            try:
                self.trail.flush()
            except Exception as exc:  # the service goes on; the next flush retries what is pending
                log.warning("audit: accesses not recorded yet (%s)", type(exc).__name__)


@dataclass
class Parts:
    """What the service is built from (the entry point or a test makes them)."""

    store: ObjectStore
    config: DicomWebConfig
    tokens: dict[str, str]  # token -> user name (for the audit trail)
    legacy: LegacyArchive | None = None
    audit: AccessLog | None = None
    viewer_dir: Path | None = None  # OHIF's dist/, served at / with our app-config.js
    base_path: str = "/dicomweb"


def create_app(parts: Parts) -> FastAPI:
    app = FastAPI(title="PACS migration DICOMweb", docs_url=None, redoc_url=None, openapi_url=None)
    catalog = StudyCatalog(parts.store, parts.config.refresh_seconds)
    svc = _Service(parts, catalog)
    base = parts.base_path.rstrip("/")
    app.state.service = svc

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Any]) -> Any:
        path = request.url.path
        if not (path.startswith(base + "/") or path == base or path.startswith("/where/")):
            return await call_next(request)  # the health check and the viewer's files: no patient data
        user = svc.user_of(request)
        if user is None:
            return JSONResponse(
                {"error": "authentication required"}, 401, {"WWW-Authenticate": 'Bearer realm="dicomweb"'}
            )
        request.state.user = user
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "legacy_fallback": parts.legacy is not None}

    @app.get("/where/{value}")
    def where(request: Request, value: str) -> Response:
        return JSONResponse([loc.to_json() for loc in svc.where(request, value)])

    _search_routes(app, svc, base)
    _retrieve_routes(app, svc, base)
    if parts.viewer_dir is not None:
        _mount_viewer(app, parts.viewer_dir, base)
    return app


def _search_routes(app: FastAPI, svc: _Service, base: str) -> None:
    """QIDO-RS: studies, series, instances (PS3.18 10.6)."""

    @app.get(base + "/studies")
    def search_studies(request: Request) -> Response:
        return svc.search(request, qido.Level.STUDY, {})

    @app.get(base + "/studies/{study}/series")
    def search_series(request: Request, study: str) -> Response:
        return svc.search(request, qido.Level.SERIES, {"StudyInstanceUID": study})

    @app.get(base + "/series")
    def search_all_series(request: Request) -> Response:
        return svc.search(request, qido.Level.SERIES, {})

    @app.get(base + "/studies/{study}/series/{series}/instances")
    def search_instances(request: Request, study: str, series: str) -> Response:
        return svc.search(request, qido.Level.IMAGE, {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    @app.get(base + "/studies/{study}/instances")
    def search_study_instances(request: Request, study: str) -> Response:
        return svc.search(request, qido.Level.IMAGE, {"StudyInstanceUID": study})

    @app.get(base + "/instances")
    def search_all_instances(request: Request) -> Response:
        return svc.search(request, qido.Level.IMAGE, {})


def _retrieve_routes(app: FastAPI, svc: _Service, base: str) -> None:
    """WADO-RS: instances, metadata, frames, rendered (PS3.18 10.4)."""

    @app.get(base + "/studies/{study}")
    def retrieve_study(request: Request, study: str) -> Response:
        return svc.retrieve(request, study)

    @app.get(base + "/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> Response:
        return svc.retrieve(request, study, series)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
        return svc.retrieve(request, study, series, sop)

    @app.get(base + "/studies/{study}/metadata")
    def study_metadata(request: Request, study: str) -> Response:
        return svc.metadata(request, study)

    @app.get(base + "/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> Response:
        return svc.metadata(request, study, series)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        return svc.metadata(request, study, series, sop)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}/frames/{numbers}")
    def frames(request: Request, study: str, series: str, sop: str, numbers: str) -> Response:
        return svc.frames(request, study, series, sop, numbers)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}/rendered")
    def rendered(request: Request, study: str, series: str, sop: str) -> Response:
        return svc.rendered(request, study, series, sop, 1, None)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}/frames/{number}/rendered")
    def frame_rendered(request: Request, study: str, series: str, sop: str, number: int) -> Response:
        return svc.rendered(request, study, series, sop, number, None)

    @app.get(base + "/studies/{study}/series/{series}/instances/{sop}/thumbnail")
    def thumbnail(request: Request, study: str, series: str, sop: str) -> Response:
        return svc.rendered(request, study, series, sop, 1, 128)

    @app.get(base + "/studies/{study}/series/{series}/thumbnail")
    def series_thumbnail(request: Request, study: str, series: str) -> Response:
        return svc.series_thumbnail(request, study, series)


class _Service:
    def __init__(self, parts: Parts, catalog: StudyCatalog) -> None:
        self.parts, self.catalog, self.config = parts, catalog, parts.config
        self.store, self.legacy = parts.store, parts.legacy
        self.audit = parts.audit or AccessLog(None, None)
        self._meta: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._meta_lock = threading.Lock()

    # -- who -----------------------------------------------------------------------

    def user_of(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            return None
        for known, user in self.parts.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return user
        return None

    # -- search ----------------------------------------------------------------------

    def search(self, request: Request, level: qido.Level, fixed: dict[str, str]) -> Response:
        try:
            query = qido.parse_query(level, request.query_params.multi_items(), fixed)
        except qido.QueryError as exc:
            raise HTTPException(400, str(exc)) from None
        sql, args = qido.sql(query)
        rows = self.catalog.query(sql, args)
        for r in rows:
            r["InstanceAvailability"] = "ONLINE"
        headers, legacy_state = {}, "not asked"
        if self.legacy is not None and self._ask_legacy(query, rows):
            try:
                rows += self._legacy_rows(query, rows)
                legacy_state = "answered"
            except LegacyUnavailable as exc:
                headers["Warning"] = f'299 pacs-dicomweb "{exc}; only migrated studies are listed"'
                legacy_state = "unavailable"
        total = len(rows)
        rows = rows[query.offset :][: min(query.limit or self.config.max_results, self.config.max_results)]
        if total > query.offset + len(rows) and not query.limit:
            headers["Warning"] = f'299 pacs-dicomweb "{total - query.offset} answers; the first {len(rows)} are sent"'
        self.audit.searched(request.state.user, query, total, legacy_state)
        keywords = list(query.returned)
        if query.include_all:
            keywords += [c for c in COLUMNS if c[0].isupper() and c not in keywords]
        body = [qido.to_json(r, [*keywords, "RetrieveAETitle"]) for r in rows]
        if not body:
            return Response(status_code=204, headers=headers)
        return JSONResponse(body, headers=headers, media_type="application/dicom+json")

    def _ask_legacy(self, query: qido.QidoQuery, local: list[dict[str, Any]]) -> bool:
        """Studies: always (to find what is not migrated); series and
        instances: only of a study the archive does not hold, or holds in part."""
        if not self.config.legacy_fallback:
            return False
        if query.level is qido.Level.STUDY:
            return True
        study = query.matches.get("StudyInstanceUID")
        return study is not None and ((not local and not self._indexed_of([study])) or self._incomplete(study))

    def _incomplete(self, study_uid: str) -> bool:
        """Some of the study's instances did not migrate (quarantined, unresolved): the legacy PACS completes it."""
        sql = f'SELECT max("study_not_migrated") AS n FROM {qido.TABLE} WHERE "StudyInstanceUID" = ?'
        found = self.catalog.query(sql, [study_uid])
        return bool(found and (found[0]["n"] or 0) > 0)

    def _indexed_of(self, uids: list[str]) -> set[str]:
        if not uids:
            return set()
        marks = ", ".join("?" for _ in uids)
        sql = f'SELECT DISTINCT "StudyInstanceUID" FROM {qido.TABLE} WHERE "StudyInstanceUID" IN ({marks})'
        return {str(r["StudyInstanceUID"]) for r in self.catalog.query(sql, uids)}

    def _legacy_rows(self, query: qido.QidoQuery, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.legacy is not None
        answers = self.legacy.search(query)
        key = {qido.Level.STUDY: "StudyInstanceUID", qido.Level.SERIES: "SeriesInstanceUID"}.get(
            query.level, "SOPInstanceUID"
        )
        known = {str(r.get(key)) for r in local}  # what the archive holds: its answer stands
        if query.level is qido.Level.STUDY:  # (migrated studies outside this answer: one query for all)
            known |= self._indexed_of(
                sorted({str(r["StudyInstanceUID"]) for r in answers if r.get("StudyInstanceUID")})
            )
        out = []
        for r in answers:
            if r.get(key) in known:
                continue
            if not _legacy_matches(r, query):
                continue  # the legacy PACS may ignore a key it does not support: match again here
            r["InstanceAvailability"] = "NEARLINE"
            r["RetrieveAETitle"] = self.legacy.ae_title
            if query.level is qido.Level.STUDY:
                r["StudyDescription"] = f"{r.get('StudyDescription') or ''}{self.config.legacy_label}".strip()
            out.append(r)
        return out

    # -- retrieve ------------------------------------------------------------------------

    def _objects(self, study: str, series: str | None = None, sop: str | None = None) -> list[dict[str, Any]]:
        where = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop}
        for name, uid in where.items():
            if uid is not None and not is_valid_uid(uid):
                raise HTTPException(400, f"{name}: not a valid UID")
        cond = " AND ".join(f'"{k}" = ?' for k, v in where.items() if v)
        return self.catalog.query(
            f"SELECT * FROM {qido.TABLE} WHERE {cond} ORDER BY {qido.INSTANCE_ORDER}",
            [v for v in where.values() if v],
        )

    def _legacy(self, request: Request, study: str, series: str | None, sop: str | None) -> list[LegacyObject]:
        if self.legacy is None or not self.config.legacy_fallback:
            raise HTTPException(404, "not in the archive")
        try:
            objects = self.legacy.retrieve(study, series, sop)
        except LegacyUnavailable as exc:
            raise HTTPException(502, f"not in the archive, and {exc}") from None
        if not objects:
            raise HTTPException(404, "neither in the archive nor on the legacy PACS")
        self.audit.accessed(request.state.user, study, None, "legacy PACS")
        return objects

    def retrieve(self, request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
        try:
            wado.check_accept(request.headers.get("accept"), wado.DICOM)
        except wado.NotAcceptable as exc:
            raise HTTPException(406, str(exc)) from None
        mark = wado.boundary()
        rows = self._objects(study, series, sop)
        if rows:
            self.audit.accessed(request.state.user, study, rows[0].get("PatientID"), "archive")
            parts: Iterator[tuple[str, Any]] = itertools.chain(
                (
                    (f"{wado.DICOM}; transfer-syntax={r['TransferSyntaxUID']}", self.store.iter_chunks(r["object_key"]))
                    for r in rows
                ),
                ((wado.DICOM, [o.data]) for o in self._completion(request, study, series, sop, rows)),
            )
        else:
            objects = self._legacy(request, study, series, sop)
            parts = ((wado.DICOM, [o.data]) for o in objects)
        return StreamingResponse(wado.multipart(parts, mark), media_type=wado.content_type(wado.DICOM, mark))

    def _completion(
        self, request: Request, study: str, series: str | None, sop: str | None, rows: list[dict[str, Any]]
    ) -> list[LegacyObject]:
        """The legacy PACS's instances of an incomplete study (or series) that the archive lacks;
        none when the legacy PACS does not answer (the archive's part is still served)."""
        if sop is not None or self.legacy is None or not self._incomplete(study):
            return []
        have = {str(r["SOPInstanceUID"]) for r in rows}
        wanted = {str(r["SeriesInstanceUID"]) for r in rows} if series is None else {series}
        try:
            found = [
                o for s in sorted(wanted) for o in self.legacy.retrieve(study, s) if o.sop_instance_uid not in have
            ]
        except LegacyUnavailable:
            log.warning("an incomplete study was served without its legacy part: the legacy PACS did not answer")
            return []
        if found:
            self.audit.accessed(request.state.user, study, None, "legacy PACS")
        return found

    def metadata(self, request: Request, study: str, series: str | None = None, sop: str | None = None) -> Response:
        rows = self._objects(study, series, sop)
        if rows:
            self.audit.accessed(request.state.user, study, rows[0].get("PatientID"), "archive")
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(8, thread_name_prefix="metadata") as pool:
                body = list(pool.map(self._instance_metadata, rows))
            body += [_legacy_metadata(o) for o in self._completion(request, study, series, sop, rows)]
        else:
            body = [_legacy_metadata(o) for o in self._legacy(request, study, series, sop)]
        return JSONResponse(body, media_type="application/dicom+json")

    def _instance_metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        """One migrated instance's DICOM JSON; the last ones asked are kept in
        memory (a study is opened again and again; an object never changes under its key and hash)."""
        ident = (row["object_key"], row["object_sha256"])
        with self._meta_lock:
            hit = self._meta.get(ident)
            if hit is not None:
                self._meta.move_to_end(ident)
                return hit
        header, _ = read_header(self.store, row["object_key"])
        value = wado.metadata(header, row["TransferSyntaxUID"])
        with self._meta_lock:
            self._meta[ident] = value
            while len(self._meta) > METADATA_CACHE:
                self._meta.popitem(last=False)
        return value

    def _instance_bytes(self, request: Request, study: str, series: str, sop: str) -> bytes:
        rows = self._objects(study, series, sop)
        if rows:
            self.audit.accessed(request.state.user, study, rows[0].get("PatientID"), "archive")
            return b"".join(self.store.iter_chunks(rows[0]["object_key"]))
        return self._legacy(request, study, series, sop)[0].data

    def frames(self, request: Request, study: str, series: str, sop: str, numbers: str) -> Response:
        try:
            wanted = [int(n) for n in numbers.split(",") if n.strip()]
        except ValueError:
            raise HTTPException(400, "frames: a comma-separated list of frame numbers") from None
        try:
            wado.check_accept(request.headers.get("accept"), wado.OCTETS)
        except wado.NotAcceptable as exc:
            raise HTTPException(406, str(exc)) from None
        data = self._instance_bytes(request, study, series, sop)
        try:
            ts, found = wado.frames(data, wanted)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        mark = wado.boundary()
        part = f"{wado.OCTETS}; transfer-syntax={ts}"
        body = b"".join(wado.multipart(((part, [f]) for f in found), mark))
        return Response(body, media_type=wado.content_type(wado.OCTETS, mark))

    def rendered(self, request: Request, study: str, series: str, sop: str, frame: int, size: int | None) -> Response:
        accept = request.headers.get("accept") or "image/png"
        media = "image/jpeg" if "image/jpeg" in accept and "image/png" not in accept else "image/png"
        data = self._instance_bytes(request, study, series, sop)
        try:
            return Response(wado.rendered(data, frame, media, size), media_type=media)
        except Exception as exc:  # a pixel encoding without a decoder here
            raise HTTPException(406, f"cannot render this instance ({type(exc).__name__})") from None

    def series_thumbnail(self, request: Request, study: str, series: str) -> Response:
        rows = self._objects(study, series)
        if rows:
            sop = rows[len(rows) // 2]["SOPInstanceUID"]
        else:
            objects = self._legacy(request, study, series, None)
            sop = objects[len(objects) // 2].sop_instance_uid
        return self.rendered(request, study, series, sop, 1, 128)

    # -- the locator -------------------------------------------------------------------------

    def where(self, request: Request, value: str) -> list[StudyLocation]:
        index = IndexSearch(self.catalog)
        legacy = LegacySearch(self.legacy) if self.legacy is not None else None
        found = [locate(self.store, uid, index, legacy) for uid in resolve(value, index, legacy)]
        for loc in found:
            self.audit.accessed(request.state.user, loc.study_instance_uid, None, "locator")
        return found


def _legacy_metadata(o: LegacyObject) -> dict[str, Any]:
    ds = pydicom.dcmread(io.BytesIO(o.data), stop_before_pixels=True)
    return wado.metadata(ds, str(ds.file_meta.TransferSyntaxUID))


def _legacy_matches(row: dict[str, Any], query: qido.QidoQuery) -> bool:
    for kw, value in query.matches.items():
        if kw not in row or value in ("", "*"):
            continue
        have = row.get(kw)
        if have is None:
            continue  # the PACS did not return it: trust its matching
        if kw == "ModalitiesInStudy":
            if not set(str(have).split("\\")) & set(value.replace("\\", ",").split(",")):
                return False
        elif kw.endswith("UID"):
            if str(have) not in {v.strip() for v in value.replace("\\", ",").split(",")}:
                return False
        elif qido.dictionary_VR(kw) in ("DA", "TM") and "-" in value:
            low, _, high = value.partition("-")
            if (low and str(have) < low) or (high and str(have)[: len(high)] > high):
                return False
        elif "*" in value or "?" in value:
            if not fnmatch.fnmatchcase(str(have).lower(), value.lower()):
                return False
        elif str(have).lower() != value.lower() if qido.dictionary_VR(kw) == "PN" else str(have) != value:
            return False
    return True


APP_CONFIG = """window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: false,
  defaultDataSourceName: 'archive',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'archive',
      configuration: {{
        friendlyName: 'Migrated archive (and the legacy PACS, until it is retired)',
        name: 'archive',
        wadoUriRoot: '{base}',
        qidoRoot: '{base}',
        wadoRoot: '{base}',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
      }},
    }},
  ],
  httpErrorHandler: error => {{
    console.warn('DICOMweb request failed', error.status);
  }},
}};
"""


def _mount_viewer(app: FastAPI, root: Path, base: str) -> None:
    """OHIF's prebuilt viewer at the root (its build expects /), from the same
    origin as DICOMweb, with a configuration pointing at this service (the
    viewer's files hold no patient data). Registered last: it answers any
    path the service does not."""
    config = APP_CONFIG.format(base=base)
    root = root.resolve()

    @app.get("/app-config.js")
    def app_config() -> Response:
        return Response(config, media_type="application/javascript")

    @app.get("/{path:path}")
    def viewer(path: str) -> Response:
        target = (root / path).resolve()
        if not path or not target.is_file() or root not in target.parents:
            target = root / "index.html"  # the viewer's own routes (/viewer?StudyInstanceUIDs=...)
        return FileResponse(target)
