.PHONY: demo test test-fast crds lint

demo:  ## the Dhad recipe on tiny models, on this machine
	bash hack/demo.sh

test:  ## the whole test suite (installs the venv and builds the cached control plane first)
	bash hack/test.sh

test-fast:  ## the unit tests only: no control plane, S3 server or torchrun (the loop while editing)
	bash hack/test.sh --fast

crds:  ## regenerate crds/ and docs/api.md from api/
	.venv/bin/python -m dhad_api.crd
	.venv/bin/python -m dhad_api.docs
	bash hack/sync-chart-crds.sh

lint:
	.venv/bin/ruff check api operator trainer tests bench
