#!/usr/bin/env bash
# Install what the tests need, from this repository's own files:
#   - the project and its `test` extra into the active Python environment;
#   - the Debian packages listed in scripts/apt-packages.txt (apt-get, as root or with sudo);
#   - one virtual environment per file scripts/venvs/NAME.txt, at .venvs/NAME (or under
#     $REPROGRAM_VENVS, so several checkouts can share them), for third-party
#     servers whose pins clash with ours (created once; rebuilt when the file or the project's
#     environment changes). The project's environment is visible inside each one: a .pth file
#     appends its site-packages to the venv's path, after the venv's own packages, so pip
#     installs into the venv only what the project lacks or pins differently (the venv's
#     versions win), and torch is not installed twice.
set -euo pipefail
cd "$(dirname "$0")/.."
# A second checkout (a git worktree) that shares this environment and shadows the installed
# project with PYTHONPATH keeps the environment's editable install where it points.
imported=$(python -c 'import pathlib, reprogram; print(pathlib.Path(reprogram.__file__).resolve().parent.parent)' 2>/dev/null || true)
installed=$(python -c 'import importlib.metadata as m, json; print(json.loads(m.distribution("reprogram").read_text("direct_url.json"))["url"].removeprefix("file://"))' 2>/dev/null || true)
if [ -n "$installed" ] && [ "$installed" != "$PWD" ] && [ "$imported" = "$(pwd -P)" ]; then
  echo "setup: using the environment's install of $installed, shadowed here by PYTHONPATH" >&2
else
  python -m pip install --quiet --disable-pip-version-check -e '.[test]'
fi

mapfile -t wanted < <(grep -v '^\s*#' scripts/apt-packages.txt | awk 'NF {print $1}')
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: apt-get install ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

project_site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for req in scripts/venvs/*.txt; do
  [ -e "$req" ] || continue
  name=$(basename "$req" .txt)
  venv="${REPROGRAM_VENVS:-.venvs}/$name"
  stamp="$venv/.requirements.sha256"
  sum=$( (cat "$req"; echo "$project_site") | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    echo "setup: virtual environment $venv from $req" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$project_site" > "$site/zz-project-env.pth"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$sum" > "$stamp"
  fi
done
