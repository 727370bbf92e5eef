"""Screenshots of the TensorBoard panels of a run, for the README: ``make panels``.

Starts ``tensorboard --logdir LOGDIR`` on a free local port, waits until it answers, and has headless
Chromium (Debian's ``chromium``, driven by ``playwright-core`` from npm, installed into ``.panels/`` on
first use) save two screenshots:

* ``docs/images/tensorboard-time-series.png``: the Time Series tab (TensorBoard's default), filtered
  to ``stability/``, where every card overlays the runs ``stability/raw``, ``stability/avg`` and
  ``stability/ens`` in their own colours;
* ``docs/images/tensorboard-custom-scalars.png``: the Custom Scalars tab, one chart per task and metric.

Smoothing is set to 0 and "ignore outliers" off (TensorBoard's stored settings, set before the page
loads), as the end-of-run summary advises. TensorBoard is stopped by its process id, whatever
happens. Look at the pictures after running it: that is what a user sees.

    python docs/panels.py runs/pretrain_tiny_gpt/runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
IMAGES = DOCS / "images"
CAPTURE = DOCS / "panels_capture.mjs"
# playwright-core (npm) drives Debian's chromium; installed here on first use, outside the package.
NODE_PREFIX = DOCS.parent / ".panels"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                if response.status == 200 and b"stability" in response.read():
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"tensorboard did not answer at {url} within {timeout:.0f} s")


def playwright_core() -> Path:
    """The node_modules holding playwright-core, installed from npm when missing."""
    modules = NODE_PREFIX / "node_modules"
    if not (modules / "playwright-core").is_dir():
        subprocess.run(
            [
                "npm",
                "install",
                "--silent",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(NODE_PREFIX),
                "playwright-core",
            ],
            check=True,
            timeout=600,
        )
    return modules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path, help="the directory to give tensorboard --logdir")
    parser.add_argument("--out", type=Path, default=IMAGES, help="where the PNGs go (docs/images)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("panels: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.logdir.is_dir():
        print(f"panels: {args.logdir} is not a directory: run make demo first", file=sys.stderr)
        return 2
    if shutil.which("node") is None or shutil.which("npm") is None:
        print("panels: node and npm are needed (apt-get install nodejs npm)", file=sys.stderr)
        return 2
    modules = playwright_core()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args.out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(tensorboard), "--logdir", str(args.logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_up(url, process)
        time_series = args.out / "tensorboard-time-series.png"
        custom_scalars = args.out / "tensorboard-custom-scalars.png"
        subprocess.run(
            ["node", str(CAPTURE), chromium, url, str(time_series), str(custom_scalars)],
            check=True,
            timeout=600,
            env={**os.environ, "NODE_PATH": str(modules)},
        )
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # what was started, by its process id
        process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
