"""Refuse to start a deployment with a placeholder, empty or weak secret.

``python -m include.deploy_preflight`` (docker-compose's airflow-init runs it
first): checks the environment, prints each problem naming the variable,
exits 1 if there is any. No secret value is printed."""

from __future__ import annotations

import base64
import binascii
import os
import sys
from collections.abc import Mapping

PLACEHOLDERS = ("change-me", "changeme", "replace-me", "minioadmin", "password", "secret", "admin", "airflow")
SECRETS = {  # variable -> minimum length
    "AIRFLOW__API_AUTH__JWT_SECRET": 32,
    "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": 32,
    "_AIRFLOW_WWW_USER_PASSWORD": 12,
}


def _weak(value: str, minimum: int) -> str | None:
    if not value:
        return "is empty"
    if any(p in value.lower() for p in PLACEHOLDERS) and len(value) < 64:
        return "is a placeholder (it contains a well-known default)"
    if len(value) < minimum:
        return f"is shorter than {minimum} characters"
    return None


def _fernet(value: str) -> str | None:
    if not value:
        return "is empty: Connections' passwords would be stored in clear"
    try:
        ok = len(base64.urlsafe_b64decode(value.encode())) == 32
    except (binascii.Error, ValueError):
        ok = False
    return None if ok else "is not a Fernet key (32 url-safe base64 bytes)"


def problems(env: Mapping[str, str]) -> list[str]:
    out = [f"{k} {why}" for k, n in SECRETS.items() if (why := _weak(env.get(k, ""), n))]
    if why := _fernet(env.get("AIRFLOW__CORE__FERNET_KEY", "")):
        out.append(f"AIRFLOW__CORE__FERNET_KEY {why}")
    for key, value in sorted(env.items()):
        if key.startswith("AIRFLOW_CONN_") and "REPLACE-ME" in value:
            out.append(f"{key} still holds REPLACE-ME")
    return out


def main() -> int:
    found = problems(os.environ)
    for p in found:
        print(f"refusing to start: {p}", file=sys.stderr)
    if found:
        print("set them in .env (see .env.example for how to make each)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
