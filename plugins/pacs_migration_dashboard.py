"""The migration dashboard in Airflow's navigation: a FastAPI app mounted at
``/pacs-migration`` (behind Airflow's login, see include/pacs_migration_airflow.py)
and a nav entry opening it."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


def _apps() -> list[dict]:
    from include.pacs_migration_airflow import create_app

    return [{"app": create_app(), "url_prefix": "/pacs-migration", "name": "PACS migration dashboard"}]


class PacsMigrationDashboard(AirflowPlugin):
    name = "pacs_migration_dashboard"
    fastapi_apps = _apps()
    external_views = [
        {
            "name": "Migration",
            "href": "pacs-migration/",
            "destination": "nav",
            "url_route": "pacs-migration",
        }
    ]
