# The Airflow image of the deployment: the official image plus our pinned requirements.
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt constraints.txt /opt/pacs-migration/
RUN pip install --no-cache-dir -r /opt/pacs-migration/requirements.txt -c /opt/pacs-migration/constraints.txt
# The project as an Airflow provider (the `dicom` connection type); its code is mounted on PYTHONPATH.
COPY pyproject.toml /opt/pacs-migration/
RUN pip install --no-cache-dir --no-deps /opt/pacs-migration
ENV PYTHONPATH=/opt/airflow
