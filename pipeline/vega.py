"""Plots that render offline: Vega, Vega-Lite and Vega-Embed fetched from the npm registry at set-up (checked against
their published digests) and inlined into one HTML template that `dvc plots show` uses instead of its CDN scripts.

    python -m pipeline.vega          # make setup runs it; writes .dvc/plots_template.html and .dvc/config.local
"""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGES = {  # name: (version, file in the package, the registry's sha512 of the tarball)
    "vega": (
        "5.30.0",
        "build/vega.min.js",
        "ZGoC8LdfEUV0LlXIuz7hup9jxuQYhSaWek2M7r9dEHAPbPrzSQvKXZ0BbsJbrarM100TGRpTVN/l1AFxCwDkWw==",
    ),
    "vega-lite": (
        "5.21.0",
        "build/vega-lite.min.js",
        "hNxM9nuMqpI1vkUOhEx6ewEf23WWLmJxSFJ4TA86AW43ixJyqcLV+iSCO0NipuVTE0rlDcc2e8joSewWyOlEwA==",
    ),
    "vega-embed": (
        "6.26.0",
        "build/vega-embed.min.js",
        "AZCTdKHDAuhp6TFZRQOOs332tStCwZr/5e4uZMNEuJL69A57cT66NNZJdNiCP6u66REzIToYtMJhMTL9wl5B3A==",
    ),
}
TEMPLATE = "plots_template.html"  # in .dvc/, where DVC resolves plots.html_template
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC plots</title>
    {{refresh_tag}}
    <style>body {{ font-family: sans-serif; }} div {{ margin: 1em 0; }}</style>
    {scripts}
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def script(name: str) -> str:
    """The package's minified bundle as an inline <script> element."""
    version, member, digest = PACKAGES[name]
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != digest:
        raise RuntimeError(f"{url}: its sha512 is not the registry's published one")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        js = tar.extractfile(f"package/{member}").read().decode()
    return "<script>" + js.replace("</script", "<\\/script") + "</script>"


def install(project: Path) -> Path:
    """Write the template into the project's .dvc/ and name it in .dvc/config.local (not committed)."""
    path = project / ".dvc" / TEMPLATE
    page = PAGE.format(scripts="\n".join(script(name) for name in PACKAGES))
    path.write_text(page)
    subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE], cwd=project, check=True
    )
    return path


if __name__ == "__main__":
    print(f"offline plots template: {install(Path.cwd())}")
