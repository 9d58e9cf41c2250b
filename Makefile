# Developer entry points. `make test` needs root for the real-sandbox tests
# (they skip with a reason otherwise).
PYTHON ?= python3

.PHONY: test demo clean

test:
	@$(PYTHON) -c 'import pytest, hypothesis' 2>/dev/null \
		|| $(PYTHON) -m pip install pytest hypothesis
	@status=0; $(PYTHON) -m pytest -v -p no:cacheprovider tests/ || status=$$?; \
	if [ -n "$(PYTEST_STATUS_FILE)" ]; then echo $$status > "$(PYTEST_STATUS_FILE)"; fi; \
	exit $$status

demo:
	$(PYTHON) tests/demo.py

clean:
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis
