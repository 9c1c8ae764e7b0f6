# make train: set up .venv (pinned) and run the embedded demo (HVT on scikit-learn digits).
# make test:  set up .venv and run the whole test suite.
# make study: set up .venv and run study.py's embedded demo (every token-reduction method on a ViT trained on digits).
# make study-finetune: the same demo, every reduced row fine-tuned 10 epochs at lr 5e-4 (outputs/study-digits-finetune).
# make visualize: set up .venv and draw what each method keeps, merges or clusters on the demo ViT
#                 (outputs/visualize/tokens.png).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test study study-finetune visualize setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $@

train: setup
	$(PY) main.py --config config/demo-digits.json

study: setup
	$(PY) study.py

study-finetune: setup
	$(PY) study.py --finetune-epochs 10 --finetune-lr 5e-4 --output-dir outputs/study-digits-finetune

visualize: setup
	$(PY) visualize.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
