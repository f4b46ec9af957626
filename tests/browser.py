"""A report page as a person sees it: real headless Chromium (Debian's `chromium`) loads the page, and we read back
which pictures failed to load and what the page wrote to the console; optionally a screenshot."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

# set on the page's load event: how many pictures, and the alt text of those that did not load
PROBE = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
         "document.body.setAttribute('data-images',im.length);document.body.setAttribute('data-broken',"
         "im.filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.alt||i.src.slice(0,40)).join('|'));"
         # cells whose text runs over more than one line (numbers must not wrap)
         "document.body.setAttribute('data-wrapped',[...document.querySelectorAll('td')].filter(td=>{"
         "const r=document.createRange();r.selectNodeContents(td);const tops=new Set([...r.getClientRects()]"
         ".map(x=>Math.round(x.top)));return tops.size>1&&!td.classList.contains('text')}).map(td=>td.textContent)"
         ".join('|'));"
         # tables as laid out: how many, and how many show no row (zero height)
         "const tb=[...document.querySelectorAll('table')];document.body.setAttribute('data-tables',tb.length+':'+"
         "tb.filter(t=>!(t.getBoundingClientRect().height>0&&t.rows.length>0)).length)});</script>")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    return found


def render(page: Path, screenshot: Path | None = None) -> dict:
    """{"images": n, "broken": [alt, ...], "wrapped": [text of a cell that wraps], "tables": n, "empty_tables": n
    (laid out with no height or no row), "console": [message, ...]} of the page loaded in Chromium; the probe runs
    in a copy beside the page (so its relative links resolve), removed afterwards."""
    browser, page = chromium(), Path(page).resolve()
    probe = page.with_name(".probe-" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        run = subprocess.run([browser, *FLAGS, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=120)
    finally:
        probe.unlink()
    body = re.search(r"<body[^>]*data-images=\"(\d+)\"[^>]*data-broken=\"([^\"]*)\"[^>]*data-wrapped=\"([^\"]*)\"",
                     run.stdout)
    assert body, f"the page did not finish loading in Chromium: {run.stderr[-1500:]}"
    console = re.findall(r":CONSOLE[^\]]*\] (.*)", run.stderr)
    if screenshot is not None:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run([browser, *FLAGS, "--window-size=1280,4000", f"--screenshot={Path(screenshot).resolve()}",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
        assert Path(screenshot).is_file(), shot.stderr[-1500:]
    tables = re.search(r"<body[^>]*data-tables=\"(\d+):(\d+)\"", run.stdout)
    return {"images": int(body.group(1)), "broken": [b for b in body.group(2).split("|") if b],
            "tables": int(tables.group(1)), "empty_tables": int(tables.group(2)),
            "wrapped": [w for w in body.group(3).split("|") if w], "console": console}
