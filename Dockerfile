# The Airflow image of the deployment: the official image plus our pinned requirements.
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt constraints.txt /opt/pacs-migration/
RUN pip install --no-cache-dir -r /opt/pacs-migration/requirements.txt -c /opt/pacs-migration/constraints.txt
ENV PYTHONPATH=/opt/airflow
