# The two commands the README names: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test demo unit crds deps

## Every test: unit, CRD drift, the PostgreSQL 10-18 matrix, the cluster and end-to-end tests.
test: deps
	$(CARGO) test --workspace --locked -- --nocapture 2>&1 | tee target/test.log; exit $${PIPESTATUS[0]}

deps:
	@hack/deps

## Regenerate crds/ from the Rust types.
crds:
	$(CARGO) run --quiet -- crd > crds/pgsnap.io.yaml

## The main job, locally: cluster, database, operator, a backup, a restore, side by side.
demo: deps
	@hack/demo
