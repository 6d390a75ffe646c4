"""Screenshots of what a user sees in the MLflow UI, taken by headless Chromium, saved into ``docs/images/``.

    python docs/screenshots.py                              # a tiny real run into a fresh store, then the pictures
    python docs/screenshots.py --store sqlite:///mlflow.db  # an existing store (mlflow ui is started on it)
    python docs/screenshots.py --server http://127.0.0.1:5000 --experiment gan-pipeline   # a running UI/server

Needs Debian's ``chromium`` (``apt-get install chromium``; no driver: ``chromium --headless --screenshot``).
``mlflow ui`` binds 127.0.0.1 on a free port and is stopped at the end. Pages: the experiment's training runs
(with their Datasets column), a run's sample grids, the experiment's Models tab (scored checkpoints ranked by
domain FD) and the registered model. MLflow's UI is a React app: a page is captured once it shows what it is about
(a text it must hold, no spinner left), through the DevTools protocol on a pipe (no driver, no extra package).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
WINDOW = (1600, 1000)
SAVED_WIDTH = 1200          # what the README shows; PNGs stay small (< 300 KB)
# MLflow 3.17's sidebar offers GenAI and "Model training" views; this picks the second for every page
TRAINING_VIEW = "workflowType=machine_learning"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@dataclass(frozen=True)
class Page:
    file: str
    url: str
    what: str
    expect: str  # a text the rendered page holds
    then: str = ""  # JavaScript run once it does (e.g. filter the charts), then the page settles again


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"mlflow ui did not answer {url} within {timeout:.0f} s")


def start_ui(store: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow ui`` on ``store``, loopback only, on a free port."""
    port = free_port()
    mlflow_exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(workdir / "mlflow-ui.log", "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([mlflow_exe, "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                            env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", 120, proc)
    return proc, uri


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tiny_run(workdir: Path, steps: int) -> str:
    """A real ``gan-pipeline run`` (prepare, train on Ray, evaluate, register) into a fresh SQLite store."""
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    exe = str(Path(sys.executable).parent / "gan-pipeline")
    every = max(steps // 6, 1)
    cmd = [exe, "run", "--model", "cgan", "--max-steps", str(steps), "--checkpoint-every", str(every),
           "--sample-every", str(every), "--log-every", str(max(every // 5, 1)), "--runs-dir", str(workdir / "runs"),
           "--tracking-uri", store]
    print("[screenshots]", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=workdir, check=True)
    return store


def _search_charts(text: str) -> str:
    """JavaScript typing ``text`` into the run page's chart search box (a React input: the native setter, then an
    input event)."""
    return ("const box = document.querySelector('input[placeholder=\"Search metric charts\"]');"
            "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, "
            f"{text!r}); box.dispatchEvent(new Event('input', {{bubbles: true}}));")


def pages(uri: str, experiment: str, model: str | None = None) -> list[Page]:
    """The pages to capture, found through the tracking API of the server at ``uri``."""
    from mlflow.tracking import MlflowClient

    from pipelines import tags

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment named {experiment!r} at {uri}; pass --experiment")
    base, view = f"{uri}/#/experiments/{exp.experiment_id}", TRAINING_VIEW
    shots = []
    trained = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tags.STAGE}` = 'train'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not trained:
        raise SystemExit(f"experiment {experiment!r} at {uri} holds no training run")
    run = trained[0]
    shots.append(Page("mlflow_runs.png", f"{base}/runs?{view}", "training runs, with their Datasets column",
                      run.info.run_name))
    shots.append(Page("mlflow_run_samples.png", f"{base}/runs/{run.info.run_id}/model-metrics?{view}",
                      "a run's sample grids on a step slider and its checkpoint scores", "Auto-refresh",
                      then=_search_charts("samples|domain_fd_cheap")))
    grids = sorted((f.path for f in client.list_artifacts(run.info.run_id, "images") if f.path.endswith(".png")),
                   key=lambda path: int(path.split("+step+")[1].split("+")[0]) if "+step+" in path else -1)
    if grids:  # the last sample grid, full size, in the run's artifact viewer
        shots.append(Page("mlflow_run_sample_grid.png", f"{base}/runs/{run.info.run_id}/artifacts/{grids[-1]}?{view}",
                          "the run's last sample grid (one row per class)", "samples+step+"))
    shots.append(Page("mlflow_models_tab.png", f"{base}/models?{view}",
                      "scored checkpoints as LoggedModels (domain FD among their metrics)", f"{run.info.run_name}-step"))
    model = model or next((v.name for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")), None)
    if model:
        shots.append(Page("mlflow_registry.png", f"{uri}/#/models/{model}?{view}", "the registered generator, its versions"
                                                                                " and aliases", "candidate"))
    return shots


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
    ending in NUL on file descriptors 3 and 4), so no driver and no websocket library: pages are captured when
    their content is there, not after a guessed delay, and MLflow's assistant panel can be closed."""

    def __init__(self, executable: str, profile: str):
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()

        def wire() -> None:  # in the child: fd 3 reads our commands, fd 4 writes its answers
            import fcntl

            high_in, high_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child))
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen([executable, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                                      f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
                                     preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self.out, self.inp = os.fdopen(from_parent, "wb"), os.fdopen(to_parent, "rb")
        self.buffer, self.next_id = b"", 0
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, session: bool = True, **params) -> dict:
        import json

        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session and getattr(self, "session", None):
            message["sessionId"] = self.session
        self.out.write(json.dumps(message).encode() + b"\0")
        self.out.flush()
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.inp.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def shoot(self, page: Page, timeout: float = 120) -> bytes:
        """``page`` as PNG bytes, once its text holds ``page.expect`` and no longer says it is loading."""
        import base64

        self.call("Page.navigate", url=page.url)
        deadline = time.monotonic() + timeout
        ready = (f"document.body && document.body.innerText.includes({page.expect!r}) && "
                 "!/page loading|^Loading/im.test(document.body.innerText)")
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{page.url} did not show {page.expect!r} within {timeout:.0f} s")
            time.sleep(0.5)
        # the assistant panel opens itself on a first visit; closed, it stays closed for this profile
        self.evaluate("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
        if page.then:
            self.evaluate(page.then)
            time.sleep(15)  # charts and images render after the filter
        time.sleep(2)  # charts settle after the text
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        stop(self.proc)
        self.out.close()
        self.inp.close()


def save(png: bytes, target: Path) -> Path:
    """At ``SAVED_WIDTH`` pixels' width, palette-compressed (a README picture, not a pixel-exact record)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    height = round(image.height * SAVED_WIDTH / image.width)
    image = image.resize((SAVED_WIDTH, height), Image.LANCZOS).quantize(colors=128, method=Image.MEDIANCUT)
    image.save(target, optimize=True)
    return target


def capture_all(executable: str, shots: list[Page], out_dir: Path) -> list[Path]:
    saved = []
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = Browser(executable, profile)
        try:
            for page in shots:
                started = time.perf_counter()
                path = save(browser.shoot(page), out_dir / page.file)
                print(f"[screenshots] {path} ({path.stat().st_size // 1024} KB, {time.perf_counter() - started:.0f} s):"
                      f" {page.what}", flush=True)
                saved.append(path)
        finally:
            browser.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store", help="an MLflow backend store URI (mlflow ui is started on it)")
    source.add_argument("--server", help="a running MLflow UI/server (http://127.0.0.1:PORT)")
    parser.add_argument("--experiment", default="gan-pipeline")
    parser.add_argument("--model", help="registered model to show (default: the latest training run's)")
    parser.add_argument("--steps", type=int, default=300, help="steps of the tiny run (when no store is given)")
    parser.add_argument("--out", default=str(IMAGES))
    parser.add_argument("--only", nargs="*", help="file names of the pages to capture (default: all)")
    args = parser.parse_args(argv)

    browser = chromium()
    if browser is None:
        print("[screenshots] no Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="gan-screenshots-") as tmp:
        workdir, proc = Path(tmp), None
        try:
            uri = args.server
            if uri is None:
                store = args.store or tiny_run(workdir, args.steps)
                proc, uri = start_ui(store, workdir)
            shots = [p for p in pages(uri, args.experiment, args.model) if not args.only or p.file in args.only]
            capture_all(browser, shots, out_dir)
        finally:
            if proc is not None:
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
