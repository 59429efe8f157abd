"""Patient identity under a key: the manifests' ``patient_key`` is an
HMAC-SHA-256 of the patient's identity under a secret the hospital keeps
(an Airflow Variable or Connection), so a reader of the bucket cannot brute
force an MRN back from it (an unkeyed SHA-256 of a 7-digit MRN falls in seconds).

The secret must stay the same for the whole migration: keys made under
another secret do not compare (one patient per study is checked on them)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

MIN_SECRET_BYTES = 16
SECRET_VARIABLE = "pacs_patient_key_secret"  # Airflow Variable (masked: its name says secret)
SECRET_CONNECTION = "pacs_patient_key"  # or the password of this Airflow Connection


class MissingSecret(Exception):
    """The patient-key secret is absent or too short: say where it is expected."""


def identity_digest(patient_id: str, issuer: str) -> str:
    """SHA-256 of (PatientID, IssuerOfPatientID): never stored, only keyed."""
    return hashlib.sha256(f"{patient_id}\x1f{issuer}".encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class PatientKeyer:
    """Turns an identity digest into the manifests' patient key."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise MissingSecret(
                f"the patient-key secret (Airflow Variable {SECRET_VARIABLE} or the password of "
                f"Connection {SECRET_CONNECTION}) is shorter than {MIN_SECRET_BYTES} bytes"
            )

    @classmethod
    def from_secret(cls, secret: str | bytes | None) -> PatientKeyer:
        if not secret:
            raise MissingSecret(
                f"no patient-key secret: set the Airflow Variable {SECRET_VARIABLE} "
                f"(or the password of Connection {SECRET_CONNECTION}) to a random value of "
                f"{MIN_SECRET_BYTES}+ characters, the same for the whole migration"
            )
        return cls(secret.encode() if isinstance(secret, str) else secret)

    def key(self, digest: str | None) -> str | None:
        if not digest:
            return None
        return "h1:" + hmac.new(self.secret, digest.encode("ascii"), hashlib.sha256).hexdigest()

    def key_of(self, patient_id: str, issuer: str = "") -> str | None:
        """The key of a patient as a person names them (``audit``, ``trace``)."""
        return self.key(identity_digest(patient_id.strip(), issuer.strip())) if patient_id.strip() else None
