"""The HTML page `dvc plots show` / `dvc plots diff` write, with Vega inlined so that it renders offline.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN (blank without network). This page
carries them, bundled by vl-convert, in its head instead; `.dvc/config` names it as DVC's
``plots.html_template``, and `make setup` writes it (``python -m pipeline.report.offline_page PATH``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from detection.io import write_text_atomic


def offline_template() -> str:
    """A DVC plots HTML template (``{plot_divs}`` and ``{refresh_tag}`` are DVC's placeholders) with the
    Vega libraries inlined, defining the global ``vegaEmbed`` that DVC's plot elements call."""
    import vl_convert

    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>DVC plots</title>\n{refresh_tag}\n"
            f"<script>\n{vl_convert.javascript_bundle()}\n</script>\n"
            "<style>body { font-family: sans-serif; } table { border-collapse: collapse; }</style>\n"
            "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


if __name__ == "__main__":
    write_text_atomic(Path(sys.argv[1]), offline_template())
