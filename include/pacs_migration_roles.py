"""The three roles of a migration, for Airflow's FAB auth manager.

- ``migration-admin``: everything (connections, variables, pools, users, every DAG).
- ``migration-operator``: triggers and backfills the migration DAGs, reads their
  runs and task logs; no connections, variables or users.
- ``compliance``: reads the migration DAGs' runs, task logs and reports; triggers
  nothing, sees no connections or variables.

The operator and compliance roles hold no DAG-wide permission: each DAG grants
them its own (``access_control``, :data:`include.pacs_migration_dags.ACCESS_CONTROL`),
so a DAG that does not declare them is invisible to them.

``python -m include.pacs_migration_roles`` creates or updates the roles
(idempotent); run ``airflow sync-perm --include-dags`` after it.
"""

from __future__ import annotations

import sys

ADMIN, OPERATOR, COMPLIANCE = "migration-admin", "migration-operator", "compliance"
# DAG-wide resources the DAGs grant one by one instead.
_PER_DAG = {"DAGs", "DAG Runs"}
# Built-in role a role starts from, and what it must never hold.
_BASE = {ADMIN: "Admin", OPERATOR: "User", COMPLIANCE: "Viewer"}
_NEVER = {
    ADMIN: set(),
    OPERATOR: {"Connections", "Variables", "Users", "Roles", "Providers", "Config", "Plugins"},
    COMPLIANCE: {"Connections", "Variables", "Users", "Roles", "Providers", "Config", "Plugins"},
}


def wanted(role: str, base: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(action, resource) pairs of ``role`` from its base role's."""
    if role == ADMIN:
        return set(base)
    return {(a, r) for a, r in base if r not in _PER_DAG and r not in _NEVER[role]}


def sync_roles() -> dict[str, int]:
    """Create or update the three roles; returns how many permissions each holds."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    counts = {}
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        for role_name, base_name in _BASE.items():
            base = sm.find_role(base_name)
            pairs = wanted(role_name, {(p.action.name, p.resource.name) for p in base.permissions})
            role = sm.find_role(role_name) or sm.add_role(role_name)
            # DAG-level grants (``DAG:<id>``) come from the DAGs' access_control: keep them.
            dag_level = [p for p in role.permissions if p.resource.name.startswith(("DAG:", "DAG Run:"))]
            perms = [sm.get_permission(a, r) for a, r in sorted(pairs)]
            role.permissions = [p for p in perms if p is not None] + dag_level
            sm.session.commit()
            counts[role_name] = len(role.permissions)
    return counts


if __name__ == "__main__":
    for name, n in sync_roles().items():
        print(f"role {name}: {n} permission(s)")
    sys.exit(0)
