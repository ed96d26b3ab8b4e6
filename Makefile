# The README's commands. `make demo` and `make test` install what a fresh Debian machine lacks.
PYTEST_WORKERS ?= auto

.PHONY: install protos demo test lint bench critest clean

install:
	deploy/install.sh

protos:
	.venv/bin/python protos/build.py

demo: install
	deploy/demo.sh

lint:
	.venv/bin/ruff check adapter isolators tests benchmarks protos
	.venv/bin/ruff format --check adapter isolators tests benchmarks protos
	.venv/bin/mypy

test: install lint
	.venv/bin/pytest -n $(PYTEST_WORKERS) -p no:cacheprovider tests
	# Once more with user namespaces as the node default: the runtime conformance suite on
	# native and containerd, and the Mesos behaviour tests.
	CTZ_TEST_USER_NAMESPACE=1 .venv/bin/pytest -n $(PYTEST_WORKERS) -p no:cacheprovider \
		tests/conformance -k "native or containerd"
	CTZ_TEST_USER_NAMESPACE=1 .venv/bin/pytest -n $(PYTEST_WORKERS) -p no:cacheprovider \
		tests/integration/test_mesos_ecp.py

bench: install
	.venv/bin/python benchmarks/run_all.py

# Kubernetes' CRI judge (cri-tools v1.26.1 critest) against our CRI endpoint.
critest: install
	deploy/critest.sh $(CRITEST_ARGS)

clean:
	rm -rf .venv adapter/api/containerizer adapter/api/mesos adapter/api/containerd build
