PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean trace bench bench-scheduler bench-cget bench-s3-requests bench-dag-processor ui-screenshots serve viewer viewer-screenshots hl7-listen

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	# the project as an Airflow provider (its `dicom` connection type): metadata only, the code is on the path
	$(PY) -m pip install --quiet --no-deps --no-build-isolation . && rm -rf build pacs_migration.egg-info
	touch $(STAMP)

venv: $(STAMP)

## The OHIF Viewer's prebuilt files (npm @ohif/app, pinned), fetched into .viewer/dist (not committed).
OHIF_VERSION ?= 3.13.2
VIEWER := .viewer/dist/index.html
$(VIEWER):
	@command -v npm >/dev/null 2>&1 || { [ "$$CI" != true ] || { echo "npm is required to fetch the OHIF viewer"; exit 1; }; \
		echo "npm not found: the OHIF viewer is not fetched (its test skips; CI=true fails it)"; exit 0; }
	rm -rf .viewer && mkdir -p .viewer
	cd .viewer && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz \
		&& mv package/dist dist && rm -rf package ohif-app-$(OHIF_VERSION).tgz
	@test -f $(VIEWER)
viewer: $(VIEWER)

## The DICOMweb service (and OHIF at /): CONFIG=<migration.yaml> TOKENS=<file of "user token" lines>;
## the bucket from the AWS environment (ENDPOINT_URL for MinIO), the legacy PACS from $$AIRFLOW_CONN_PACS_SOURCE.
PORT ?= 8042
serve: $(STAMP) $(VIEWER)
	PYTHONPATH=$(CURDIR) $(PY) -m include.dicomweb_serve --port $(PORT) --viewer .viewer/dist \
		$(if $(CONFIG),--config $(CONFIG)) $(if $(TOKENS),--tokens-file $(TOKENS)) $(if $(ENDPOINT_URL),--endpoint-url $(ENDPOINT_URL))

## The MLLP listener the RIS pushes its reports (HL7 v2 ORU^R01) to: CONFIG=<migration.yaml> HL7_PORT=<port>;
## each message is kept in the bucket's report inbox, then acknowledged.
hl7-listen: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m include.hl7_listen $(if $(HL7_PORT),--port $(HL7_PORT)) \
		$(if $(CONFIG),--config $(CONFIG)) $(if $(ENDPOINT_URL),--endpoint-url $(ENDPOINT_URL))

## OHIF's study list and a migrated CT as PNGs under docs/, from the viewer test.
viewer-screenshots: $(STAMP) $(VIEWER)
	VIEWER_SCREENSHOTS=$(CURDIR)/docs PYTHONPATH=$(CURDIR) GX_ANALYTICS_ENABLED=False $(PY) -m pytest -q \
		tests/integration/test_dicomweb.py -k ohif

## Run the demo: a real migration of a synthetic archive through Airflow (scheduler + backfill).
demo: $(STAMP)
	PYTHONPATH=$(CURDIR) GX_ANALYTICS_ENABLED=False $(PY) -m demo.run $(if $(filter 1,$(KEEP)),--keep)

## The UI's main pages (the dashboard, the grid, the Assets view) as PNGs under docs/, from a demo run.
ui-screenshots: $(STAMP)
	PYTHONPATH=$(CURDIR) GX_ANALYTICS_ENABLED=False $(PY) -m demo.run --screenshots docs

## Run the tests, on TEST_WORKERS processes (pytest-xdist, a file per worker in order; 0: one process).
TEST_WORKERS ?= 2
test: $(STAMP) $(VIEWER)
	PYTHONPATH=$(CURDIR) GX_ANALYTICS_ENABLED=False $(PY) -m pytest --durations=12 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

## Lint: ruff (rules and format) over the repository, mypy over the core. CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## Benchmark: the pipeline's data path vs getscu + s5cmd/boto3 on the same peers (not part of make test).
## SCALE=0.1 REPEATS=3 for a quick run; results in benchmarks/results/<date>.{json,md}.
SCALE ?= 1
REPEATS ?= 5
bench: $(STAMP)
	$(PY) -m pip install --quiet -r benchmarks/requirements.txt
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.bench --scale $(SCALE) --repeats $(REPEATS) $(if $(LABEL),--label $(LABEL))

## Benchmark: one study date through the scheduler (LocalExecutor; CeleryExecutor on the local PostgreSQL and
## Redis) vs the same steps and vs native tools (R_date), per task instance (not part of make test).
bench-scheduler: $(STAMP)
	$(PY) -m pip install --quiet -r benchmarks/requirements.txt
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.bench --scheduler-only --airflow-scale $(or $(AIRFLOW_SCALE),0.1) \
		--airflow-repeats $(or $(AIRFLOW_REPEATS),3) --executors $(or $(EXECUTORS),local,celery) $(if $(LABEL),--label $(LABEL))

## Benchmark: the census of a busy day vs findscu (CENSUS_SCALE=1: 2,000 studies; loading Orthanc takes ~20 min;
## BEFORE=<checkout> times that checkout's census too).
bench-census: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.census_scale --scale $(or $(CENSUS_SCALE),0.1) \
		$(if $(BEFORE),--before $(BEFORE)) $(if $(LABEL),--label $(LABEL))

## Benchmark: a transfer task's peak memory with one instance of 50 MB, 500 MB, 2 GB (BEFORE=<checkout> to compare).
bench-object-size: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.object_size $(if $(BEFORE),--before $(BEFORE)) $(if $(LABEL),--label $(LABEL))

## Benchmark: C-GET throughput from Orthanc, ours beside DCMTK getscu (not part of make test).
bench-cget: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.cget_throughput

## Benchmark: the client's CPU per instance PUT and GET, botocore's pipeline vs the lean path (moto's server).
bench-s3-requests: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.s3_requests $(if $(LABEL),--label $(LABEL))

bench-dag-processor: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.dag_processor $(if $(LABEL),--label $(LABEL))

## Trace one instance of the demo bucket: make trace UID=<SOPInstanceUID>
trace: $(STAMP)
	@PYTHONPATH=$(CURDIR) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing $(PY) -m demo.trace $(UID) --reason "$(or $(REASON),demo lookup)"

clean:
	rm -rf .airflow demo-output .demo
