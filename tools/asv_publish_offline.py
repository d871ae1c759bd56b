"""`asv publish`, then make the dashboard open offline.

asv's index.html loads jQuery, flot (+ time, selection, categories, orderBars), stupidtable,
blueimp-md5 and Bootstrap from CDNs, so without a network the page is blank (its onerror handler
jumps to error.html). This script runs ``asv publish`` and rewrites every CDN ``<script>`` /
``<link>`` of the published HTML to the copies in ``tools/asv_dashboard/vendor/`` (installed from
the npm registry, see package.json there; ``--update-vendor`` reinstalls them with npm and copies
them again), which it copies to ``html/vendor/``.

    python tools/asv_publish_offline.py                 # asv_bench/html, from asv_bench/results
    python tools/asv_publish_offline.py --html-dir DIR  # (used by the tests)
    python -m http.server -d asv_bench/html 8080        # then open http://localhost:8080/
    python tools/asv_publish_offline.py --screenshot /tmp/dash.png [--page '#bench_engine.ProductPasses.track_passes_grad']
                                                        # serve on localhost, load in headless Chromium

(The page reads its JSON with XMLHttpRequest, so it needs a local server, as ``asv preview``
gives; file:// URLs work only with a browser flag such as --allow-file-access-from-files.)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENDOR_DIR = os.path.join(HERE, "asv_dashboard", "vendor")
ASV_DIR = os.path.join(ROOT, "asv_bench")

# the file each CDN reference of asv 0.6's www/index.html is replaced with (matched on the URL's end)
VENDOR = {
    "jquery-3.3.1.min.js": "jquery.min.js",
    "jquery.flot.min.js": "jquery.flot.js",
    "jquery.flot.time.min.js": "jquery.flot.time.js",
    "jquery.flot.selection.min.js": "jquery.flot.selection.js",
    "jquery.flot.categories.min.js": "jquery.flot.categories.js",
    "jquery.flot.orderBars.js": "jquery.flot.orderBars.js",
    "stupidtable.min.js": "stupidtable.min.js",
    "md5.min.js": "md5.min.js",
    "bootstrap.min.js": "bootstrap.min.js",
    "bootstrap.min.css": "bootstrap.min.css",
}
# npm package files → vendor/ (for --update-vendor)
NPM_FILES = {
    "jquery/dist/jquery.min.js": "jquery.min.js",
    "flot/jquery.flot.js": "jquery.flot.js",
    "flot/jquery.flot.time.js": "jquery.flot.time.js",
    "flot/jquery.flot.selection.js": "jquery.flot.selection.js",
    "flot/jquery.flot.categories.js": "jquery.flot.categories.js",
    "flot-orderbars/js/jquery.flot.orderBars.js": "jquery.flot.orderBars.js",
    "stupid-table-plugin/stupidtable.min.js": "stupidtable.min.js",
    "blueimp-md5/js/md5.min.js": "md5.min.js",
    "bootstrap/dist/js/bootstrap.min.js": "bootstrap.min.js",
    "bootstrap/dist/css/bootstrap.min.css": "bootstrap.min.css",
}

TAG = re.compile(r'<(script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"[^>]*>', re.I)


def update_vendor():
    pkg = os.path.dirname(VENDOR_DIR)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=pkg, check=True)
    nm = os.path.join(pkg, "node_modules")
    os.makedirs(os.path.join(VENDOR_DIR, "fonts"), exist_ok=True)
    for src, dst in NPM_FILES.items():
        shutil.copy(os.path.join(nm, src), os.path.join(VENDOR_DIR, dst))
    fonts = os.path.join(nm, "bootstrap", "dist", "fonts")
    for f in os.listdir(fonts):
        shutil.copy(os.path.join(fonts, f), os.path.join(VENDOR_DIR, "fonts", f))


def localize(html_dir):
    """Rewrite the CDN references of every .html file in ``html_dir``; returns the files changed.
    Raises if a CDN reference is left that has no vendored copy."""
    out = os.path.join(html_dir, "vendor")
    shutil.copytree(VENDOR_DIR, out, dirs_exist_ok=True)
    # bootstrap.min.css looks for ../fonts/ relative to itself
    shutil.copytree(os.path.join(VENDOR_DIR, "fonts"), os.path.join(html_dir, "fonts"), dirs_exist_ok=True)
    changed = []
    for name in sorted(os.listdir(html_dir)):
        if not name.endswith(".html"):
            continue
        path = os.path.join(html_dir, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        missing = []

        def repl(mo):
            kind, url = mo.group(1).lower(), mo.group(2)
            base = url.rsplit("/", 1)[-1]
            if base not in VENDOR:
                missing.append(url)
                return mo.group(0)
            local = "vendor/" + VENDOR[base]
            if kind == "script":
                return f'<script src="{local}"' + (' onerror="js_load_failure()"' if "onerror" in mo.group(0) else "") + ">"
            return f'<link rel="stylesheet" href="{local}">'

        new = TAG.sub(repl, text)
        if missing:
            raise SystemExit(f"{name}: no vendored copy for {missing} (add it to tools/asv_dashboard)")
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed.append(name)
    return changed


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(html_dir, png, page="", size="1400,900"):
    """Serve ``html_dir`` on a free localhost port and save headless Chromium's screenshot of it
    (nothing else is reachable: the page must load every script from the server)."""
    import functools
    import http.server
    import tempfile
    import threading

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (apt-get install -y chromium)")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=html_dir)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as prof:
            url = f"http://127.0.0.1:{srv.server_address[1]}/index.html{page}"
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={prof}", f"--window-size={size}",
                            "--virtual-time-budget=10000", f"--screenshot={os.path.abspath(png)}", url],
                           check=True, capture_output=True, timeout=120)
    finally:
        srv.shutdown()
    return png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html-dir", help="asv's html_dir (default: asv_bench/html)")
    ap.add_argument("--config", default=os.path.join(ASV_DIR, "asv.conf.json"), help="asv config")
    ap.add_argument("--no-publish", action="store_true", help="only rewrite an already published html dir")
    ap.add_argument("--update-vendor", action="store_true", help="npm ci in tools/asv_dashboard and copy the files")
    ap.add_argument("--screenshot", metavar="PNG", help="then load the page in headless Chromium and save a screenshot")
    ap.add_argument("--page", default="", help="URL fragment of the page to shoot, e.g. '#summarylist'")
    a = ap.parse_args(argv)
    if a.update_vendor:
        update_vendor()
    html = a.html_dir or os.path.join(ASV_DIR, "html")
    if not a.no_publish:
        cmd = ["asv", "publish", "--config", a.config]
        if a.html_dir:
            cmd += ["--html-dir", a.html_dir]
        subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(a.config)), check=True)
    changed = localize(html)
    print(f"offline dashboard: {html} ({', '.join(changed) or 'nothing to rewrite'}); "
          f"serve it with: python -m http.server -d {os.path.relpath(html)} 8080")
    if a.screenshot:
        print(f"screenshot: {screenshot(html, a.screenshot, a.page)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
