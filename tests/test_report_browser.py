"""The HTML report in a real browser: headless Chromium loads it offline, runs plotly, and
must draw every figure without a JavaScript error.

Chromium is the Debian package ``chromium``; when it is missing the fixture installs it
(root + apt-get; set ``SPARE_TL_NO_APT=1`` to forbid that) and skips with the reason only if
it cannot. JavaScript errors are caught by a collector injected at the top of ``<head>``
that writes each error into the DOM; ``--dump-dom`` then shows them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spare_tl.viz import CHROMIUM_FLAGS, build_report, find_chromium

torch.set_num_threads(1)

COLLECTOR = """<script>
window.__jsErrors = [];
function __record(message) {
  window.__jsErrors.push(String(message));
  var p = document.createElement('pre');
  p.className = 'js-error';
  p.textContent = String(message);
  (document.body || document.documentElement).appendChild(p);
}
window.addEventListener('error', function (e) {
  __record('error: ' + e.message + ' at ' + e.filename + ':' + e.lineno);
});
window.addEventListener('unhandledrejection', function (e) {
  __record('unhandled rejection: ' + e.reason);
});
var __consoleError = console.error;
console.error = function () {
  __record('console.error: ' + Array.prototype.join.call(arguments, ' '));
  __consoleError.apply(console, arguments);
};
</script>"""

COUNTER = """<script>
window.addEventListener('load', function () {
  setTimeout(function () {
    var plots = document.querySelectorAll('.js-plotly-plot');
    var drawn = Array.prototype.filter.call(plots, function (p) {
      return p.querySelector('svg.main-svg') !== null && p.querySelectorAll('.trace').length > 0;
    });
    document.body.setAttribute('data-plots', plots.length);
    document.body.setAttribute('data-drawn', drawn.length);
  }, 500);
});
</script>"""


def _install_chromium() -> str | None:
    if os.environ.get("SPARE_TL_NO_APT"):
        return None
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600, check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            env=env,
            capture_output=True,
            timeout=1200,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return find_chromium()


@pytest.fixture(scope="session")
def chromium() -> str:
    binary = find_chromium() or _install_chromium()
    if binary is None:
        pytest.skip(
            "headless Chromium is not installed and could not be installed here "
            "(needs root + apt-get and network: `apt-get install -y chromium`)"
        )
    return binary


def instrument(page: str) -> str:
    """The page with the error collector first in <head> and the plot counter last."""
    assert "<head>" in page and "</body>" in page
    return page.replace("<head>", "<head>" + COLLECTOR, 1).replace("</body>", COUNTER + "</body>")


def load_dom(chromium: str, page: str, tmp_path: Path) -> str:
    """Load ``page`` from a file:// URL in headless Chromium; the DOM after 5 s virtual time."""
    path = tmp_path / "page.html"
    path.write_text(instrument(page), encoding="utf-8")
    profile = tmp_path / "profile"
    profile.mkdir()
    proc = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<body" in proc.stdout, f"no DOM from chromium: {proc.stderr[-2000:]}"
    return proc.stdout


def js_errors(dom: str) -> list[str]:
    return re.findall(r'<pre class="js-error">(.*?)</pre>', dom, flags=re.S)


def body_attr(dom: str, name: str) -> int:
    m = re.search(rf'<body[^>]*\s{name}="(\d+)"', dom)
    assert m, f"the page never set {name}: did it load?"
    return int(m.group(1))


def test_collector_catches_errors(chromium, tmp_path):
    page = (
        "<!DOCTYPE html><html><head></head><body><p>x</p>"
        "<script>console.error('boom');</script><script>notAFunction();</script></body></html>"
    )
    errors = js_errors(load_dom(chromium, page, tmp_path))
    assert any("boom" in e for e in errors)
    assert any("notAFunction" in e for e in errors)


def synthetic_results() -> list[tuple[str, object]]:
    def cond(c, m, cs, ms):
        return {"EM_C": c, "EM_M": m, "EM_C_std": cs, "EM_M_std": ms, "neither": 100 - c - m}

    evaluation = {
        "model": "Meta-Llama-3-8B",
        "dataset": "nqswap (synthetic numbers)",
        "n_items": 100,
        "seeds": [0, 1, 2, 3, 4],
        "demo_type": "doo",
        "no_steering": cond(42.7, 26.6, 1.0, 1.2),
        "steer_to_context": cond(77.7, 5.0, 1.5, 0.7),
        "steer_to_memory": cond(10.0, 47.5, 1.1, 2.0),
        "transitions": {"EM_C->M": {"mean": 40.0, "std": 2.0}},
    }
    sweep = [
        {
            "proportion": k,
            "edit_strength": a,
            "direction": d,
            "EM_C": 40 + 10 * a,
            "EM_M": 20 + 5 * a,
        }
        for k in (0.05, 0.07)
        for a in (1.0, 2.0, 3.0)
        for d in ("context", "memory")
    ]
    layers = [
        {"layer": layer, "direction": d, "EM_C": 40.0 + layer, "EM_M": 20.0 + layer / 2}
        for layer in (12, 13, 14, 15, 16)
        for d in ("context", "memory")
    ]
    return [("evaluation", evaluation), ("sweep", sweep), ("per-layer", layers)]


def test_report_renders_in_chromium(chromium, reference_cache, tmp_path):
    from spare_tl.studies.original import OriginalCache

    original = OriginalCache(reference_cache / "Meta-Llama-3-8B")
    page = build_report(results=synthetic_results(), original=original, top_n=500)
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, flags=re.I)
    n_figures = len(re.findall(r'<div id="figure-\d+"', page))
    # evaluation, sweep over K and over α, per-layer, paper: layer-wise MI, scatter, behaviours
    assert n_figures == 7

    dom = load_dom(chromium, page, tmp_path)
    assert js_errors(dom) == []
    assert body_attr(dom, "data-plots") == n_figures
    assert body_attr(dom, "data-drawn") == n_figures
    assert "Meta-Llama-3-8B: mutual information per layer" in dom
