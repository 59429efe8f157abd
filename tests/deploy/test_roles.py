"""Issue 16, point 5: the three roles, against a running api-server (FAB auth
manager) through its REST API, one user per role: each allowed action
succeeds, each forbidden one is refused (403). Issue 18: the migration
dashboard in that api-server, behind its login, in headless Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from peers.ports import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
USERS = {"migration-admin": "ada", "migration-operator": "olaf", "compliance": "carla"}


def _airflow(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout


class ApiServer:
    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            **(env or {}),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__AUTH_MANAGER": FAB,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API_AUTH__JWT_SECRET": "roles-test-" + "x" * 32,
            "AIRFLOW__FAB__AUTH_RATE_LIMITED": "False",
            "PYTHONPATH": str(ROOT),
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def prepare(self) -> None:
        _airflow(self.env, "db", "migrate")
        out = subprocess.run(
            [sys.executable, "-m", "include.cli", "sync-roles"], env=self.env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        _airflow(self.env, "sync-perm", "--include-dags")
        for role, user in USERS.items():
            _airflow(
                self.env, "users", "create", "-u", user, "-p", f"{user}-pw", "-r", role,
                "-f", user, "-l", "test", "-e", f"{user}@hospital.example",
            )  # fmt: skip

    def start(self, folder: Path) -> None:
        """The api-server, and the dag-processor that makes the DAGs active."""
        for name in ("api-server", "dag-processor"):
            args = ["--port", str(self.port)] if name == "api-server" else []
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "airflow", name, *args],
                    env=self.env,
                    stdout=open(folder / f"{name}.log", "wb"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if all(self._active(d) for d in ("pacs_migration", "pacs_nightly", "pacs_assessment", "pacs_rollback")):
                return
            assert all(p.poll() is None for p in self.procs), (folder / "api-server.log").read_text()[-3000:]
            time.sleep(1)
        raise AssertionError(f"the DAGs did not become active: {(folder / 'dag-processor.log').read_text()[-3000:]}")

    def _active(self, dag_id: str) -> bool:
        try:
            token = self.token("ada")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        req = urllib.request.Request(f"{self.url}/api/v2/dags/{dag_id}", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as rsp:
                return not json.loads(rsp.read()).get("is_stale", True)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def token(self, user: str) -> str:
        body = json.dumps({"username": user, "password": f"{user}-pw"}).encode()
        req = urllib.request.Request(
            f"{self.url}/auth/token", body, {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read())["access_token"]

    def call(self, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        req = urllib.request.Request(f"{self.url}{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as rsp:
                text = rsp.read()
                return rsp.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}


# (action, method, path, body) and who may: the role x action table of the closing note.
RUN = "/api/v2/dags/pacs_migration/dagRuns"
ALL, TRIGGERS, ADMIN = set(USERS), {"migration-admin", "migration-operator"}, {"migration-admin"}
DAY = "2019-03-01T00:00:00Z"
ACTIONS = [
    ("read the migration's runs", "GET", RUN, None, ALL),
    ("read the DAG's source", "GET", "/api/v2/dagSources/pacs_migration", None, ALL),
    ("trigger a run", "POST", RUN, {"logical_date": None, "conf": {"study_date": "2019-03-01"}}, TRIGGERS),
    ("trigger the nightly", "POST", "/api/v2/dags/pacs_nightly/dagRuns", {"logical_date": None}, TRIGGERS),
    ("backfill", "POST", "/api/v2/backfills", {"dag_id": "pacs_migration", "from_date": DAY, "to_date": DAY}, TRIGGERS),
    ("pause the DAG", "PATCH", "/api/v2/dags/pacs_assessment", {"is_paused": True}, TRIGGERS),
    ("see the rollback DAG", "GET", "/api/v2/dags/pacs_rollback", None, ADMIN),
    ("read the rollbacks", "GET", "/api/v2/dags/pacs_rollback/dagRuns", None, ADMIN),
    (
        "trigger a rollback",
        "POST",
        "/api/v2/dags/pacs_rollback/dagRuns",
        {"logical_date": None, "conf": {"partitions": ["2019-03-01/CT"], "reason": "test"}},
        ADMIN,
    ),
    ("list connections", "GET", "/api/v2/connections", None, ADMIN),
    ("create a connection", "POST", "/api/v2/connections", {"connection_id": "c_{who}", "conn_type": "generic"}, ADMIN),
    ("read variables", "GET", "/api/v2/variables", None, ADMIN),
    ("list users", "GET", "/auth/fab/v1/users", None, ADMIN),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """One api-server (FAB login, the dashboard plugin) for this module's tests;
    its Connections point the dashboard at a bucket of this module's own."""
    pytest.importorskip("airflow.providers.fab")
    bucket = "dashboard-ui"
    s3_server.create_bucket(bucket)
    home = tmp_path_factory.mktemp("api-home")
    env = {
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {"conn_type": "aws", "login": "testing", "password": "testing",
             "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"}}
        ),
        "AIRFLOW_CONN_PACS_SOURCE": json.dumps(
            {"conn_type": "generic", "host": "127.0.0.1", "port": 104,
             "extra": {"called_ae_title": "LEGACYPACS", "calling_ae_title": "PACSMIGRATE"}}
        ),
        "AIRFLOW_VAR_PACS_MIGRATION_BUCKET": bucket,
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",  # the Connections page's Test button
    }  # fmt: skip
    api = ApiServer(home, env)
    api.prepare()
    api.start(home)
    api.bucket = bucket
    yield api
    api.stop()


def test_each_role_may_do_what_it_needs_and_nothing_more(server):
    tokens = {role: server.token(user) for role, user in USERS.items()}
    table: dict[str, dict[str, int]] = {}
    for label, method, path, body, _allowed in ACTIONS:
        for role, user in USERS.items():
            payload = json.loads(json.dumps(body).replace("{who}", user)) if body else None
            status, answer = server.call(tokens[role], method, path, payload)
            table.setdefault(label, {})[role] = status
            if label == "backfill" and status == 200:  # one running backfill per DAG: make room
                server.call(tokens["migration-admin"], "PUT", f"/api/v2/backfills/{answer['id']}/cancel")
    # Task logs of a run (none has run here: 404 is "allowed, nothing yet"; 403 is refused).
    _, runs = server.call(tokens["migration-admin"], "GET", RUN)
    logs = f"{RUN}/{runs['dag_runs'][0]['dag_run_id']}/taskInstances/census/logs/1"
    table["read task logs"] = {role: server.call(tokens[role], "GET", logs)[0] for role in USERS}
    grants = {}
    for role in ("migration-operator", "compliance"):
        status, answer = server.call(tokens["migration-admin"], "GET", f"/auth/fab/v1/roles/{role}")
        assert status == 200
        grants[role] = {(a["action"]["name"], a["resource"]["name"]) for a in answer["actions"]}
    print(json.dumps(table, indent=1))
    assert all(status in (200, 404) for status in table.pop("read task logs").values())
    # Only what each DAG grants: no DAG-wide permission (a DAG that does not declare them is not theirs).
    for role, pairs in grants.items():
        assert not {r for _a, r in pairs} & {"DAGs", "DAG Runs", "Connections", "Variables"}, role
        assert ("can_read", "DAG:pacs_migration") in pairs, role
        assert not {r for _a, r in pairs if r.endswith(":pacs_rollback")}, role  # admin only
    assert ("can_create", "DAG Run:pacs_migration") in grants["migration-operator"]
    assert ("can_create", "DAG Run:pacs_migration") not in grants["compliance"]
    for label, *_, allowed in ACTIONS:
        for role in USERS:
            status = table[label][role]
            if role in allowed:
                assert status < 400, (label, role, status)
            else:
                assert status == 403, (label, role, status)


def _chromium() -> str:
    from tests.peers import require_binary

    return require_binary("chromium", "chromium")


def test_the_dashboard_behind_the_login(server, s3_server, tmp_path):
    """Logged in as compliance in headless Chromium, the dashboard in Airflow's
    navigation shows the heat map and the worklist with the index's figures;
    without a session its API answers 401 and its page sends to the login."""
    from playwright.sync_api import sync_playwright

    from include.pacs_migration import coverage
    from include.pacs_migration.config import TargetConfig
    from include.pacs_migration.store import ObjectStore
    from tests.integration.test_dashboard import synthetic_index

    store = ObjectStore(s3_server.client(), TargetConfig(bucket=server.bucket))
    index = synthetic_index(dt.date(2023, 1, 1), 730, ("CT", "MR", "CR"))
    store.put(coverage.INDEX_KEY, coverage._bytes(index), "application/vnd.apache.parquet")
    base = f"{server.url}/pacs-migration"

    anonymous = urllib.request.Request(f"{base}/api/overview")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=30)
    assert refused.value.code == 401
    status, overview = server.call(server.token("carla"), "GET", "/pacs-migration/api/overview")
    assert status == 200 and overview["totals"]["partitions"] == len(index)
    _, plugins = server.call(server.token("ada"), "GET", "/api/v2/plugins")
    views = [v for p in plugins["plugins"] for v in p["external_views"]]
    assert any(v["name"] == "Migration" and v["href"] == "pacs-migration/" for v in views)  # in the navigation

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{base}/", wait_until="networkidle")
        assert "/auth/login" in page.url  # no session: Airflow's login first
        page.fill("input[name=username]", "carla")
        page.fill("input[name=password]", "carla-pw")
        page.click("input[type=submit], button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{base}/", wait_until="networkidle")
        page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
        cells = page.locator("#heatmap svg rect")
        assert cells.count() == 24 * 3  # two years of months x three modalities
        failed = int((index["state"] == "failed").sum())
        assert page.locator("#worklist table[data-list=failed] tbody tr").count() == failed
        assert page.locator("#worklist table[data-list=quarantine]").count() == 1
        assert page.locator("td[data-field=partitions]").inner_text() == str(len(index))
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        browser.close()
    assert not errors, errors


def test_the_test_button_of_a_dicom_connection(server, pacs):
    """What the Connections page's Test button sends: a C-ECHO through the
    `dicom` hook, answered by the simulated PACS; a closed port says why."""
    token = server.token("ada")
    extra = json.dumps({"called_ae_title": "LEGACYPACS", "calling_ae_title": "PACSMIGRATE"})
    body = {
        "connection_id": "pacs_new",
        "conn_type": "dicom",
        "host": "127.0.0.1",
        "port": pacs.port,
        "extra": extra,
    }
    status, answer = server.call(token, "POST", "/api/v2/connections/test", body)
    assert status == 200 and answer["status"] is True, (status, answer)
    assert answer["message"] == f"LEGACYPACS@127.0.0.1:{pacs.port} answered a C-ECHO from PACSMIGRATE"
    status, answer = server.call(token, "POST", "/api/v2/connections/test", {**body, "port": free_port()})
    assert status == 200 and answer["status"] is False and "did not answer a C-ECHO" in answer["message"]
    # the form the UI draws for the type
    status, hooks = server.call(token, "GET", "/ui/connections/hook_meta")
    dicom = next(h for h in hooks if h["connection_type"] == "dicom")
    assert dicom["hook_name"] == "DICOM (legacy PACS)" and "called_ae_title" in json.dumps(dicom["extra_fields"])
