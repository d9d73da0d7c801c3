"""A real ComfyUI server for tests and the demo: `main.py --cpu` in a throw-away base directory with this
pack (and optionally the test-only node pack) linked into custom_nodes/."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
TEST_NODES = REPO / "tests" / "comfy_test_nodes"  # the test-only node pack (with_test_nodes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, with_test_nodes: bool = True, python: str = sys.executable,
                 env: dict | None = None, args: list[str] | tuple = ()):
        self.base = Path(base_dir).resolve()  # the server runs with cwd=ComfyUI: relative paths would move
        self.extra_env = dict(env or {})  # added to (or replacing in) the server's environment, e.g. a URL override
        self.extra_args = list(args)  # more main.py options, e.g. --fp16-unet to halve a big model's memory
        self.repo = REPO
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.python = python
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        for name, target in (("ComfyUI-EPD", REPO), ("epd_test_nodes", TEST_NODES if with_test_nodes else None)):
            link = self.base / "custom_nodes" / name
            if target is not None and not link.exists():
                link.symlink_to(target, target_is_directory=True)
        for sub in ("models/epd_params", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.log_path = self.base / "server.log"

    # ---- life cycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = [self.python, str(COMFYUI / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "EPD_TEST_LOG_DIR": str(self.base / "calls"), **self.extra_env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(COMFYUI), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- HTTP API --------------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict | None = None):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload or {}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        out = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if "prompt_id" not in out:
            raise PromptRejected(out)
        return out["prompt_id"]

    def interrupt(self) -> None:
        self.post("/interrupt")

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt is done; returns its history entry (outputs + status)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not done in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0, messages: list | None = None, on_message=None) -> dict:
        """Queue and wait; with `messages`, also collect this client's websocket messages meanwhile (binary
        previews as {"type": "binary", "size": n}); `on_message(msg)` sees each one as it arrives."""
        ws = None
        if on_message is not None and messages is None:
            messages = []
        if messages is not None:
            import websocket  # websocket-client
            ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                             timeout=timeout)
        try:
            pid = self.queue(prompt)
            if ws is not None:
                deadline = time.time() + timeout
                while time.time() < deadline:
                    raw = ws.recv()
                    msg = binary_message(raw) if isinstance(raw, bytes) else json.loads(raw)
                    messages.append(msg)
                    if on_message is not None:
                        on_message(msg)
                    data = msg.get("data", {})
                    if data.get("prompt_id") == pid and (
                            (msg["type"] == "executing" and data.get("node") is None)
                            or msg["type"] in ("execution_error", "execution_interrupted", "execution_success")):
                        break
            return self.wait(pid, timeout)
        finally:
            if ws is not None:
                ws.close()

    def output_path(self, file_info: dict) -> Path:
        return self.base / "output" / file_info.get("subfolder", "") / file_info["filename"]

    def call_log(self, tag: str) -> list[dict]:
        path = self.base / "calls" / f"{tag}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def binary_message(raw: bytes) -> dict:
    """A binary websocket message: {"type": "binary", "size": n}, and for a node's progress text (event type 3,
    PromptServer.send_progress_text) also its "node" and "text"."""
    msg = {"type": "binary", "size": len(raw)}
    if len(raw) >= 8 and int.from_bytes(raw[:4], "big") == 3:
        n = int.from_bytes(raw[4:8], "big")
        msg.update(node=raw[8:8 + n].decode("utf-8", "replace"), text=raw[8 + n:].decode("utf-8", "replace"))
    return msg


class PromptRejected(RuntimeError):
    def __init__(self, response: dict):
        super().__init__(json.dumps(response)[:2000])
        self.response = response


def error_message(entry: dict) -> str:
    """The readable error of a failed prompt, from its history entry."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""
