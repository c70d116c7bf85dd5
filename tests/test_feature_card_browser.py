"""The committed feature cards in the report, in headless Chromium: a card per functional
feature, every card's figure drawn without a JavaScript error, a screenshot that is not blank."""

from __future__ import annotations

import re
import subprocess

import pytest

from spare_tl.viz import CHROMIUM_FLAGS, build_report, find_chromium, load_report_inputs, screenshot

pytestmark = pytest.mark.integration

COUNTER = """<script>
window.addEventListener('load', function () {
  setTimeout(function () {
    var plots = document.querySelectorAll('details.feature-card .js-plotly-plot');
    var drawn = Array.prototype.filter.call(plots, function (p) {
      return p.querySelector('svg.main-svg') !== null && p.querySelectorAll('.trace').length > 0;
    });
    document.body.setAttribute('data-plots', plots.length);
    document.body.setAttribute('data-drawn', drawn.length);
  }, 500);
});
window.addEventListener('error', function (e) { document.body.setAttribute('data-error', e.message); });
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return binary


def test_every_committed_feature_has_a_card_that_renders(chromium, tmp_path):
    inputs = load_report_inputs()
    if inputs.examples is None or inputs.effects is None:
        pytest.skip("no committed feature examples / causal effects")
    page = build_report(**inputs.kwargs())
    features = inputs.features
    n = sum(a + b for a, b in features.counts().values())
    n += sum(a + b for a, b in features.to_memory.counts().values())
    assert page.count("<details class='feature-card'") == n
    assert "What drives context" in page and "What drives memory" in page
    # a card draws its panels from the feature-examples stage: the committed stage must
    # have seen every committed feature (a feature set chosen after it ran would leave
    # cards with empty panels)
    unseen = {
        (f.hook_name, latent)
        for fset in (features, features.to_memory)
        for f in fset.layers.values()
        for latent in [*f.context_features.tolist(), *f.memory_features.tolist()]
        if f.hook_name not in inputs.examples.by_hook
        or latent not in inputs.examples.by_hook[f.hook_name].latents
    }
    path = tmp_path / "report.html"
    path.write_text(page.replace("</body>", COUNTER + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'p'}",
            "--virtual-time-budget=8000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert not re.search(r"<body[^>]*\sdata-error=", dom), "a JavaScript error on the page"
    plots = int(re.search(r'data-plots="(\d+)"', dom).group(1))
    drawn = int(re.search(r'data-drawn="(\d+)"', dom).group(1))
    assert not unseen, (
        f"feature examples are stale for {sorted(unseen)}: rerun `spare-tl features examples`"
    )
    assert plots == n and drawn == n

    one = tmp_path / "card.html"
    card = page[page.index("<details class='feature-card'") :]
    card = card[: card.index("</details>") + len("</details>")].replace(
        "<details class='feature-card'>", "<details class='feature-card' open>", 1
    )
    head = page[: page.index("<body>") + len("<body>")]
    one.write_text(head + card + "</body></html>", encoding="utf-8")
    png = screenshot(one, tmp_path / "card.png", width=1100, height=900)
    assert png.stat().st_size > 30_000  # a blank page compresses to a few kB
