# Sourced by scripts/run and scripts/test: find Python >= 3.12 (3.13 preferred), create .venv,
# install the pinned dependencies and douane itself. Idempotent and quiet when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  local candidates=() root
  if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
    for v in 3.13 3.12; do
      for p in "$root"/versions/"$v".*/bin/python"$v"; do [ -x "$p" ] && candidates+=("$p"); done
    done
  fi
  for v in 3.14 3.13 3.12; do
    command -v "python$v" >/dev/null 2>&1 && candidates+=("$(command -v "python$v")")
  done
  candidates+=(python3)
  for p in "${candidates[@]}"; do
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  echo "douane needs Python >= 3.12 (3.13 preferred); none found (tried: ${candidates[*]})" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "douane: creating .venv with $PY ($("$PY" --version))" >&2
  "$PY" -m venv "$VENV"
fi
# installed once per content of the lock and pyproject.toml (a checkout or rebase that rewrites
# them unchanged reinstalls nothing); --no-compile: compiling every installed module (spaCy's
# languages, Faker's locales...) was 70% of the install's CPU, and Python compiles (once, here)
# what is imported on first use
STAMP="$VENV/.douane-installed"
WANT="$(cat "$ROOT/scripts/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "douane: installing pinned dependencies (scripts/requirements.lock)" >&2
  "$VENV/bin/python" -m pip install -q --no-compile --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q --no-compile -r "$ROOT/scripts/requirements.lock" >&2
  "$VENV/bin/python" -m pip install -q --no-compile --no-deps -e "$ROOT" >&2
  echo "$WANT" > "$STAMP"
fi
# bytecode written once, on first import, not compiled anew in every process (the suite starts
# hundreds: gateways, CLI runs, workers) where the environment says PYTHONDONTWRITEBYTECODE
unset PYTHONDONTWRITEBYTECODE
export PATH="$VENV/bin:$PATH"
