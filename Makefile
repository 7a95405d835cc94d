# The two commands the README names: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test demo crds deps lint image-check cluster-up cluster-down

## Every test: unit, CRD drift, the PostgreSQL 10-18 matrix, the cluster and end-to-end tests.
## The tests run against the local cluster (e2e/cluster, docs/cluster.md): it comes up first,
## its KUBECONFIG and PATH are exported, and it goes down at the end whatever the outcome
## (PGSNAP_KEEP_CLUSTER=1 leaves it running). A cluster that cannot start fails the target.
test: deps lint image-check
	@mkdir -p target; \
	[[ -n "$$PGSNAP_KEEP_CLUSTER" ]] || trap 'e2e/cluster down' EXIT; \
	e2e/cluster up && eval "$$(e2e/cluster env)" && \
	$(CARGO) test --workspace --locked -- --nocapture 2>&1 | tee target/test.log; exit $${PIPESTATUS[0]}

## One house style and no lint: checked first, before anything slow runs.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --tests --benches --locked -- -D warnings

## The image's build stage, from exactly the files the Dockerfile copies (no engine here).
image-check:
	@hack/image-check

## The test cluster alone: make cluster-up, then eval "$$(e2e/cluster env)"; make cluster-down.
cluster-up:
	@e2e/cluster up
cluster-down:
	@e2e/cluster down

deps:
	@hack/deps

## Regenerate crds/ from the Rust types.
crds:
	$(CARGO) run --quiet --bin pgsnap -- crd > crds/pgsnap.io.yaml
	cp crds/pgsnap.io.yaml charts/pgsnap/crds/pgsnap.io.yaml

## The main job, locally: cluster, database, operator, a backup, a restore, side by side.
demo: deps
	@hack/demo
