"""Render an HTML page with headless Chromium (the report's browser test, the README image)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CHROMIUM_FLAGS", "find_chromium", "screenshot"]

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary (``$CHROMIUM`` first), or None."""
    candidates = [os.environ.get("CHROMIUM", "")]
    candidates += ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    for c in candidates:
        if c and (path := shutil.which(c)):
            return path
    return None


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1100,
    height: int = 700,
    chromium: str | None = None,
    budget_ms: int = 5000,
    timeout: float = 180.0,
) -> Path:
    """Render ``html_path`` with headless Chromium and save a PNG of the window.

    Raises when Chromium leaves no image behind (it writes only to a path ending in ``.png``).
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium found: apt-get install chromium (or set $CHROMIUM)")
    png_path = Path(png_path).resolve()
    if png_path.suffix != ".png":
        raise ValueError(f"{png_path}: Chromium writes screenshots only to a .png path")
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="spare-tl-chromium-") as profile:
        subprocess.run(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={png_path}",
                Path(html_path).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    if not png_path.is_file() or png_path.stat().st_size == 0:
        raise RuntimeError(f"Chromium exited without writing {png_path}")
    return png_path
