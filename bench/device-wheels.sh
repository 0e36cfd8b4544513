#!/usr/bin/env bash
# The wheels the GPU machine lacks, for bench/gpu.sh: that machine (kind nvidia-h200) has Python 3.12, torch
# 2.11 / torchvision 0.26 and ~200 other packages (bench/device-packages.txt, from the device docs' KINDS.md),
# but no network. This script
#   1. splits pyproject.toml's [project].dependencies into what the image provides (torch and torchvision are
#      always taken from the image: never downloaded) and what it lacks; HEDGE names packages the image has but
#      at a version nobody has read there, carried in case it is older than our bound (pillow>=12.2);
#   2. resolves the lacking ones transitively for cp312 manylinux x86_64 against PyPI and downloads exactly
#      that set into .whl/ (git-ignored; one version of each, stale files removed), including the few
#      dependencies the image has too (anyio, click, ...), so that the set installs on its own;
#   3. proves the set complete, offline:  pip install --dry-run --no-index --find-links .whl
#      --python-version 3.12 --only-binary=:all: --target /tmp/x <our deps minus the device's>.
#
#   bash bench/device-wheels.sh            # download (PyPI) + check; prints the size of .whl/
#   bash bench/device-wheels.sh --check    # only the offline completeness check
#   bash bench/device-wheels.sh --list     # only print the split (no network)
#   bash bench/device-wheels.sh --refresh-list   # rewrite bench/device-packages.txt from the device docs
#
# Then carry it: the run tool's  carry [".whl"]  (64 MiB limit for the whole tree; this set is ~15 MiB), and
# bench/gpu.sh installs it with  python3 -m pip install --no-index --find-links .whl -r .whl/requirements.txt
# (the same list): pip keeps what the image already satisfies and installs the rest from .whl/.
# PIP_PYTHON: a Python 3.12 to run pip with (markers are evaluated for the running interpreter); default
# python3.12, else python3 with --python-version 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-download}
WHL=${WHL:-.whl}
HEDGE=${HEDGE:-pillow}
KINDS=${KINDS:-/work/.library/device/KINDS.md}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:)
for p in "${PLATFORMS[@]}"; do TARGET+=(--platform "$p"); done
# Only PyPI and .whl/: no pip.conf find-links, extra indexes or constraints of this machine.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX

if [ -z "${PIP_PYTHON:-}" ]; then
  PIP_PYTHON=python3
  for candidate in python3.12 "$(command -v pyenv >/dev/null && pyenv root)/versions/3.12.1/bin/python3.12"; do
    if "$candidate" -c 'import sys, pip; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      PIP_PYTHON=$candidate
      break
    fi
  done
fi

if [ "$MODE" = --refresh-list ]; then
  exec "$PIP_PYTHON" - "$KINDS" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
names = [n.strip() for n in re.search(r"Packages: (.*?)\.\s*$", text, re.M).group(1).split(",")]
row = re.search(r"One session's pip list[^:]*: (.*?)\|", text)
versions = dict(re.findall(r"([A-Za-z0-9_.-]+) (\d[\w.+]*)(?:,|\s*\|)", row.group(0))) if row else {}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
versions = {norm(k): v for k, v in versions.items()}
path = "bench/device-packages.txt"
head = [line for line in open(path).read().splitlines() if line.startswith("#")]
body = [f"{n}=={versions[n]}" if n in versions else n for n in sorted({norm(n) for n in names})]
open(path, "w").write("\n".join(head + [""] + body) + "\n")
print(f"{path}: {len(body)} packages, {len(versions)} with versions")
EOF
fi

# The split: prints "carry <requirement>" / "device <requirement> <why>" lines.
split=$("$PIP_PYTHON" - "$HEDGE" <<'EOF'
import re, sys, tomllib
from pip._vendor.packaging.requirements import Requirement

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
device = {}
for line in open("bench/device-packages.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, _, version = line.partition("==")
        device[norm(name)] = version or None
hedge = {norm(n) for n in sys.argv[1].replace(",", " ").split()}
for text in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(text)
    name = norm(req.name)
    if name in ("torch", "torchvision"):
        print(f"device {text} the image's {device.get(name)} (never downloaded)")
    elif name not in device:
        print(f"carry {text}")
    elif device[name] and not req.specifier.contains(device[name], prereleases=True):
        print(f"carry {text}")  # the image's version is too old for us
    elif name in hedge and not device[name]:
        print(f"carry {text}")  # present, version unread: carried in case it is older than our bound
    else:
        print(f"device {text} {device[name] or 'version unread'}")
EOF
)
mapfile -t CARRY < <(awk '$1 == "carry" {print $2}' <<<"$split")
echo "from the image: $(awk '$1 == "device" {printf "%s%s", sep, $2; sep=", "}' <<<"$split")"
echo "carried (our deps minus the device's, + hedge '$HEDGE'): ${CARRY[*]}"
[ "$MODE" = --list ] && exit 0

check() {
  echo "== check (offline): pip install --dry-run --no-index --find-links $WHL --python-version 3.12" \
       "--only-binary=:all: --target /tmp/x ${CARRY[*]}"
  local target
  target=$(mktemp -d)
  "$PIP_PYTHON" -m pip install --dry-run --no-index --find-links "$WHL" "${TARGET[@]}" --target "$target" \
    "${CARRY[@]}" | grep -v '^Looking in links\|^Processing '
  rmdir "$target" 2>/dev/null || true
  local count size
  count=$(find "$WHL" -name '*.whl' | wc -l)
  size=$(du -sk "$WHL" | cut -f1)
  echo "== $WHL: $count wheels, $((size / 1024)) MiB ($size KiB; the run tool carries at most 64 MiB in all)"
  [ "$size" -lt $((60 * 1024)) ] || { echo "$WHL is over 60 MiB: too big to carry with the tree" >&2; return 1; }
}
[ "$MODE" = --check ] && { check; exit; }

# Resolve against PyPI for the device's Python and platform, then download exactly that set.
report=$(mktemp)
target=$(mktemp -d)
"$PIP_PYTHON" -m pip install --dry-run --quiet --ignore-installed "${TARGET[@]}" \
  --target "$target" --report "$report" "${CARRY[@]}"
mapfile -t PINS < <("$PIP_PYTHON" -c '
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$report")
rm -rf "$report" "$target"
mkdir -p "$WHL"
printf '%s\n' "${CARRY[@]}" >"$WHL/requirements.txt"  # what bench/gpu.sh installs from here
"$PIP_PYTHON" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$WHL" "${PINS[@]}"
# One version of each: remove wheels from earlier runs that the resolution no longer names.
"$PIP_PYTHON" - "$WHL" "${PINS[@]}" <<'EOF'
import re, sys
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
pins = {(norm(p.split("==")[0]), p.split("==")[1]) for p in sys.argv[2:]}
device = {norm(line.split("==")[0].strip()) for line in open("bench/device-packages.txt")
          if line.strip() and not line.startswith("#")}
for wheel in Path(sys.argv[1]).glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if (norm(name), version) not in pins:
        print(f"removing stale {wheel.name}")
        wheel.unlink()
lacking = sorted(f"{n}=={v}" for n, v in pins if n not in device)
also = sorted(f"{n}=={v}" for n, v in pins if n in device)
print(f"the image lacks ({len(lacking)}, transitively): {', '.join(lacking)}")
print(f"carried though the image has them ({len(also)}; for a self-contained set, or a hedge): {', '.join(also)}")
EOF
check
