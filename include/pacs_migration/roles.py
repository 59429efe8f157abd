"""The three roles of a migration and what each may hold (Airflow-free; the
FAB auth manager applies them: ``python -m include.cli sync-roles``).

- ``migration-admin``: everything (connections, variables, pools, users, every DAG).
- ``migration-operator``: triggers and backfills the migration DAGs, reads their
  runs and task logs; no connections, variables or users.
- ``compliance``: reads the migration DAGs' runs, task logs and reports; triggers
  nothing, sees no connections or variables.

The operator and compliance roles hold no DAG-wide permission: each DAG grants
them its own (:data:`ACCESS_CONTROL`, the DAGs' ``access_control``), so a DAG
that does not declare them is invisible to them."""

from __future__ import annotations

ADMIN, OPERATOR, COMPLIANCE = "migration-admin", "migration-operator", "compliance"
# Built-in FAB role each starts from.
BASE = {ADMIN: "Admin", OPERATOR: "User", COMPLIANCE: "Viewer"}
# DAG-wide resources the DAGs grant one by one instead.
_PER_DAG = {"DAGs", "DAG Runs"}
_NEVER = {"Connections", "Variables", "Users", "Roles", "Providers", "Config", "Plugins"}

# What each migration DAG grants (migration-admin holds every DAG already).
ACCESS_CONTROL: dict[str, dict[str, set[str]]] = {
    OPERATOR: {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}},
    COMPLIANCE: {"DAGs": {"can_read"}, "DAG Runs": {"can_read"}},
}


def wanted(role: str, base: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(action, resource) pairs of ``role`` from its base role's."""
    if role == ADMIN:
        return set(base)
    return {(a, r) for a, r in base if r not in _PER_DAG and r not in _NEVER}
