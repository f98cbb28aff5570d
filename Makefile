.PHONY: demo test crds lint

demo:  ## the Dhad recipe on tiny models, on this machine
	bash hack/demo.sh

test:  ## the whole test suite (installs the venv and builds the cached control plane first)
	bash hack/test.sh

crds:  ## regenerate crds/ and docs/api.md from api/
	.venv/bin/python -m dhad_api.crd
	.venv/bin/python -m dhad_api.docs
	bash hack/sync-chart-crds.sh

lint:
	.venv/bin/ruff check api operator trainer tests bench
