"""What a process of the pipeline sets before it touches DICOM: no patient
data in logs, received C-STOREs streamed to disk. Called explicitly (the
Airflow glue, the CLI, each normalize process, and before any association),
never as a side effect of an import."""

from __future__ import annotations

import logging
import os
import warnings

from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config  # pynetdicom's documented settings module


def configure_logging() -> None:
    """Idempotent."""
    # pynetdicom (C-MOVE, C-ECHO, the C-MOVE listener) logs the identifiers of every
    # request unless told not to, and its INFO/DEBUG lines carry AE titles and UIDs.
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # The C-MOVE listener's received C-STOREs are written to a temporary file
    # fragment by fragment, never held whole in memory; the task moves it into staging.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    # pydicom's WARN validation logs and warns with the offending value (a
    # birth date, a name). Our rules validate values themselves (rules.py).
    # Writing too: a rule that sets PatientAge to "093 years" would log it.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    # What pydicom still logs below ERROR can quote an element ("Invalid value ...").
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    # Files this process writes (staging, pynetdicom's temporaries) are the
    # worker user's alone: 0600 files, 0700 folders.
    os.umask(0o077)
