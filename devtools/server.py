"""Start a real ComfyUI server with PatchLab in custom_nodes, queue prompts, read results.

The server runs ``main.py`` of the ComfyUI checkout in a subprocess, on 127.0.0.1 and
a free port, with ``--base-directory`` pointing at a scratch folder whose
``custom_nodes/`` links to this repository (and optionally the test kit). The ComfyUI
checkout itself is never written to. Stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Tuple

from . import bootstrap

TESTKIT_DIR = bootstrap.REPO_ROOT / "devtools" / "testkit"
PACK_LINK_NAME = "PatchLab"
TESTKIT_LINK_NAME = "patchlab_testkit"


class ServerError(RuntimeError):
    pass


class PromptRejected(ServerError):
    """POST /prompt answered 400: the prompt failed validation."""

    def __init__(self, response: Dict):
        self.response = response
        super().__init__(json.dumps(response, indent=1))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base_directory(base: Path, with_testkit: bool = True, models: Optional[Path] = None) -> Path:
    """A ComfyUI base directory: custom_nodes/ with the pack (and test kit) linked in."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    links = {PACK_LINK_NAME: bootstrap.REPO_ROOT}
    if with_testkit:
        links[TESTKIT_LINK_NAME] = TESTKIT_DIR
    for name, target in links.items():
        link = custom_nodes / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    if models is not None and not (base / "models").exists():
        (base / "models").symlink_to(models, target_is_directory=True)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    write_example_image(base / "input" / "example.png")
    if with_testkit:
        provision_testkit_assets(base)
    return base


def provision_testkit_assets(base: Path) -> None:
    """The test kit's tiny InstantID files in ``base`` (models/instantid, models/insightface, input/face.png)."""
    result = subprocess.run([sys.executable, "-m", "devtools.testkit.assets", str(base / "models"),
                             str(base / "input")], cwd=bootstrap.REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerError(f"writing the test kit's InstantID assets failed:\n{result.stderr[-3000:]}")


def write_example_image(path: Path, size: int = 128) -> None:
    """The picture example workflows load: a colour gradient whose alpha fades out to the right.

    LoadImage turns transparency into the inpainting mask, so the mask is a soft ramp.
    """
    if path.exists():
        return
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = ramp[None, :]
    rgba[..., 1] = ramp[:, None]
    rgba[..., 2] = 128
    rgba[..., 3] = 255 - ramp[None, :]
    Image.fromarray(rgba, "RGBA").save(path)


class ComfyServer:
    """A ComfyUI server process. Use as a context manager, or call start() and stop()."""

    def __init__(self, base_directory: Path, comfyui: Optional[Path] = None, port: Optional[int] = None,
                 cpu: bool = True, extra_args: Optional[List[str]] = None, python: Optional[str] = None):
        self.comfyui = comfyui or bootstrap.comfyui_root()
        self.base = Path(base_directory)
        self.port = port or free_port()
        self.cpu = cpu
        self.extra_args = list(extra_args or [])
        self.python = python or sys.executable
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.base / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_directory(self) -> Path:
        return self.base / "output"

    # --- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 180.0) -> ComfyServer:
        command = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--base-directory", str(self.base), *self.extra_args]
        if self.cpu:
            command.append("--cpu")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.25)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # --- HTTP ----------------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: Dict, timeout: float = 30.0):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return json.loads(body) if body else None

    def object_info(self) -> Dict:
        return self.get("/object_info")

    def queue(self, prompt: Dict, client_id: Optional[str] = None) -> str:
        """POST /prompt; returns the prompt id, or raises PromptRejected with ComfyUI's errors."""
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            return self.post("/prompt", payload)["prompt_id"]
        except urllib.error.HTTPError as error:
            body = error.read()
            if error.code == 400:
                raise PromptRejected(json.loads(body)) from None
            raise ServerError(f"POST /prompt failed with {error.code}: {body[:2000]!r}") from None

    def wait(self, prompt_id: str, timeout: float = 300.0) -> Dict:
        """Poll /history until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: Dict, timeout: float = 300.0) -> Dict:
        """Queue a prompt and wait for it; raises ServerError when execution failed."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            raise ServerError(f"prompt failed: {execution_error(entry)}")
        return entry

    def run_watched(self, prompt: Dict, timeout: float = 300.0) -> Tuple[Dict, List[NodeText]]:
        """Run a prompt as the editor does: over a websocket with its client id, reading what the server sends.

        Returns the history entry and the texts shown on nodes (binary message type 3), in order.
        """
        return asyncio.run(asyncio.wait_for(self._watch(prompt, timeout), timeout))

    async def _watch(self, prompt: Dict, timeout: float) -> Tuple[Dict, List[NodeText]]:
        import aiohttp  # ComfyUI's own dependency

        client_id = uuid.uuid4().hex
        texts: List[NodeText] = []
        done = ("execution_success", "execution_error", "execution_interrupted")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as socket_:
                prompt_id = await asyncio.get_running_loop().run_in_executor(None, self.queue, prompt, client_id)
                async for message in socket_:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        text = NodeText.parse(message.data)
                        if text is not None:
                            texts.append(text)
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(message.data)
                        if event.get("type") in done and event.get("data", {}).get("prompt_id") == prompt_id:
                            break
                    else:
                        raise ServerError(f"the websocket closed while {prompt_id} ran:\n{self.log_tail()}")
        entry = await asyncio.get_running_loop().run_in_executor(None, self.wait, prompt_id, timeout)
        return entry, texts

    def output_images(self, entry: Dict) -> List[Path]:
        """Files of every image a finished prompt saved or previewed."""
        paths = []
        for output in entry.get("outputs", {}).values():
            for image in output.get("images", []):
                root = self.base / image.get("type", "output")
                paths.append(root / image.get("subfolder", "") / image["filename"])
        return paths


@dataclass(frozen=True)
class NodeText:
    """A text the server shows on a node (``PromptServer.send_progress_text``)."""

    node: str
    text: str

    TYPE: ClassVar[int] = 3  # ComfyUI's BinaryEventTypes.TEXT

    @classmethod
    def parse(cls, data: bytes) -> Optional[NodeText]:
        """A binary websocket message: 4-byte big-endian type; for type 3, the node id's length (4 bytes, big
        endian), the node id and the UTF-8 text. None for other types (preview images)."""
        if len(data) < 8 or struct.unpack(">I", data[:4])[0] != cls.TYPE:
            return None
        length = struct.unpack(">I", data[4:8])[0]
        return cls(data[8:8 + length].decode("utf-8"), data[8 + length:].decode("utf-8"))


def execution_error(entry: Dict) -> str:
    """The error message ComfyUI recorded for a failed prompt."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '').strip()}"
    return "unknown error"
