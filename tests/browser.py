"""Headless Chromium (Debian's `chromium`, installed by .ci/run) for the tests of HTML pages.

`images_loaded` opens a copy of a page with one script appended that, once the page has
loaded, writes how many of its images decoded into the DOM; `--dump-dom` prints that DOM.
Host names resolve to nothing, so an image that needed the network would count as not loaded.
`screenshot` saves a PNG of the whole page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHECK_ID = "glm-infill-image-check"
CHECK_SCRIPT = f"""<script>
window.addEventListener("load", () => {{
  const images = [...document.images];
  const check = document.createElement("pre");
  check.id = "{CHECK_ID}";
  check.textContent = JSON.stringify({{
    images: images.length,
    loaded: images.filter(image => image.complete && image.naturalWidth > 0).length,
    height: document.documentElement.scrollHeight}});
  document.body.appendChild(check);
}});
</script>"""
WIDTH = 1100
TIMEOUT_S = 60


def chromium() -> str:
    """The browser; skips the test where it is missing, except in CI (.ci/run installs it)."""
    found = shutil.which("chromium")
    if found is None:
        message = "needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def images_loaded(page: Path, work: Path) -> dict[str, int]:
    """{"images", "loaded", "height"} of the page once loaded in Chromium."""
    work.mkdir(parents=True, exist_ok=True)
    checked = work / f"checked-{page.name}"
    checked.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _run(["--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
               work / "profile").stdout
    found = re.search(rf'<pre id="{CHECK_ID}">(.*?)</pre>', dom)
    assert found, f"the check did not run; DOM starts: {dom[:500]}"
    return json.loads(found.group(1))


def screenshot(page: Path, png: Path, height: int, work: Path) -> Path:
    """A PNG of the whole page (`height`: its scroll height, from `images_loaded`)."""
    _run([f"--window-size={WIDTH},{height}", f"--screenshot={png}", page.as_uri()],
         work / "profile")
    assert png.stat().st_size > 0
    return png
