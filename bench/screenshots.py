"""Regenerate the UI screenshots in docs/: run the browser tests (tests/test_ui.py: headless Chromium against
a live API + worker on Postgres and Redis, as `make test` needs), then copy the pages they photograph.

    python bench/screenshots.py            # runs tests/test_ui.py, then copies
    python bench/screenshots.py --no-run   # copies what the last run left in test-artifacts/ui/
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = {"job-page.png": "job-page.png", "model-page.png": "model-page.png", "projects-page.png": "projects-page.png"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="only copy the screenshots of the last test run")
    args = parser.parse_args()
    source = ROOT / "test-artifacts" / "ui"
    if not args.no_run:
        for name in SHOTS:
            (source / name).unlink(missing_ok=True)  # never copy a stale picture
        status = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_ui.py"], cwd=ROOT).returncode
        if status != 0:
            print("the UI tests failed; docs/ left as it was", file=sys.stderr)
            return status
    for name, target in SHOTS.items():
        shutil.copyfile(source / name, ROOT / "docs" / target)
        print(f"docs/{target} <- test-artifacts/ui/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
