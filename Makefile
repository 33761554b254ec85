# One command per task. `make demo` and `make test` work on a fresh machine: they install
# the Python environment (uv, from PyPI) and start real Kafka and Postgres themselves.

UV_VERSION := 0.13.8
# uv through the interpreter, so no PATH or shim set-up is needed after installing it.
export UV := python3 -m uv
SERVICES := deploy/local/services.sh
export KAFKA_LIB_DIR ?= $(CURDIR)/.local/kafka-lib

.PHONY: setup demo test faults lint audit bench bench-sweep load-proof sizing services services-stop schemas clean

setup: ## Install the locked Python environment into .venv
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen

demo: setup ## Local services, a simulated fleet, the worker, and what it stored
	bash scripts/demo.sh

test: setup ## Lint, then every test against real Kafka and Postgres
	bash scripts/test.sh

faults: setup ## The full fault suite: 3 replicas, SIGKILLs, Postgres and broker restarts (docs/reliability.md)
	$(UV) run --frozen python -m tests.faults.run --events 200000 --sigkills 22 \
		--postgres-restarts 3 --broker-restarts 2 $(FAULTS_ARGS)

lint: setup ## ruff, format check, mypy --strict, squawk over the migrations
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy
	$(UV) run --frozen squawk --config .squawk.toml sql/migrations/*.sql

audit: setup ## Known vulnerabilities in the locked dependencies (pip-audit; warns if no service answers)
	bash scripts/audit.sh

bench: setup ## Ingestion benchmark (docs/benchmarks.md); smaller: make bench BENCH_ARGS="--devices 5000 --rounds 3 --runs 1"
	bash scripts/bench.sh $(BENCH_ARGS)

bench-sweep: setup ## One sweep over 1,000,000 silent devices (see docs/benchmarks.md)
	bash scripts/bench.sh --sweep

load-proof: setup ## A few minutes under load; writes docs/load-proof.png and .csv
	bash scripts/bench.sh --load-proof

sizing: setup ## Partitions, replicas, Postgres cores, connections and storage for 1M/10M/50M devices, from docs/measurements (docs/scaling.md)
	$(UV) run --frozen python -m scripts.sizing $(SIZING_ARGS)

services: ## Start local Kafka and Postgres (.local/services) and print their variables
	bash $(SERVICES) start

services-stop: ## Stop the local services
	bash $(SERVICES) stop

schemas: setup ## Export the wire contracts: JSON Schema into schemas/json, AsyncAPI into schemas/asyncapi.yaml
	$(UV) run --frozen license-worker export-schemas schemas/json --asyncapi schemas/asyncapi.yaml

clean: services-stop
	rm -rf .local/services .local/test-services .venv
