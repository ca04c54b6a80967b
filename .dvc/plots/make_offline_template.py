"""Build .dvc/plots/offline.html: the page `dvc plots show` writes, with vega, vega-lite and vega-embed inlined.

DVC's own page loads the three libraries from a CDN, so on a cluster node or a laptop without internet it renders a
blank page. This page carries them (the versions DVC's page asks for, BSD-3-Clause, from the npm registry, each
checked against the registry's sha512), so the plots render offline. .dvc/config points `plots.html_template` at it.
Run again only to change versions: `python .dvc/plots/make_offline_template.py`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

# (package, version, file in its tarball, sha512 of the tarball as the npm registry publishes it)
LIBRARIES = (
    (
        "vega",
        "5.20.2",
        "package/build/vega.min.js",
        "qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    (
        "vega-lite",
        "5.2.0",
        "package/build/vega-lite.min.js",
        "Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    (
        "vega-embed",
        "6.18.2",
        "package/build/vega-embed.min.js",
        "wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
)

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>vggdepth: DVC plots</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, member: str, sha512: str) -> str:
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        blob = response.read()
    found = base64.b64encode(hashlib.sha512(blob).digest()).decode()
    if found != sha512:
        raise SystemExit(f"error: {url} has sha512 {found}, not {sha512}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        code = tar.extractfile(member).read().decode()
    if "</script" in code.lower():
        raise SystemExit(f"error: {name} {version} holds '</script', which would end its inline script early")
    return code


def main() -> None:
    scripts = "\n".join(
        f"    <!-- {name} {version} (BSD-3-Clause), {member} of the npm registry's tarball -->\n"
        f"    <script>\n{fetch(name, version, member, sha512)}\n    </script>"
        for name, version, member, sha512 in LIBRARIES
    )
    page = PAGE.format(scripts=scripts)
    for placeholder in ("{plot_divs}", "{refresh_tag}"):
        if page.count(placeholder) != 1:
            raise SystemExit(f"error: the page must hold {placeholder} exactly once (DVC fills it in)")
    if "{scripts}" in page:  # DVC would put its CDN links there
        raise SystemExit("error: the inlined libraries hold '{scripts}', which DVC would replace")
    target = Path(__file__).with_name("offline.html")
    partial = target.with_name(target.name + ".part")
    partial.write_text(page)
    partial.replace(target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
