"""Screenshots of the dashboard's pages for the docs (docs/img/dashboard-*.png).

    python scripts/dashboard_screenshots.py [OUT_DIR]

Builds the small test workspace (raw JSONL → data → tokenizer → tiny pretrain), serves the dashboard over it and
captures each page in headless Chromium (Debian's /usr/bin/chromium through Playwright)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    import httpx
    from playwright.sync_api import sync_playwright

    from dashboard_fixtures import build_workspace

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "img")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ws = build_workspace(Path(tmp))
        env = dict(os.environ, LMFORGE_HOME=str(ws["home"]), PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "dashboard", "--port", "8799"], env=env)
        base = "http://127.0.0.1:8799"
        try:
            for _ in range(240):
                try:
                    if httpx.get(base + "/api/runs").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            ids = {r["stage"]: r["run_id"] for r in httpx.get(base + "/api/runs").json()}
            pages = {"runs": "/runs", "run": f"/runs/{ids['pretrain']}", "curves": f"/curves?run={ids['pretrain']}",
                     "lineage": f"/runs/{ids['tokenizer']}/lineage", "data": f"/runs/{ids['data']}/data",
                     "launch": "/launch/pretrain"}
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run",
                                            "--disable-background-networking", "--disable-component-update"])
                pg = b.new_page(viewport={"width": 1100, "height": 640})
                for name, url in pages.items():
                    pg.goto(base + url)
                    pg.wait_for_timeout(700)
                    pg.screenshot(path=str(out / f"dashboard-{name}.png"))
                    print(out / f"dashboard-{name}.png")
                b.close()
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
