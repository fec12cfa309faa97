"""ImageNet weights for ``pretrained=True``: download into the hub cache, or stop in one line.

A throw-away HTTP server on 127.0.0.1 stands in for download.pytorch.org (no test
reaches the internet): it serves a generated MobileNet-V2 state dict under a name that
carries its own SHA-256 prefix, as torchvision names its files, and misbehaves on
purpose (interrupted transfer, wrong hash, silence). The weights enum of the model is
replaced by a real torchvision ``WeightsEnum`` pointing at that server, so the code
under test goes through torchvision's weights API unchanged.
"""

import hashlib
import importlib.util
import io
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models._api import Weights, WeightsEnum

import models
from models import weights as weights_module
from raug.errors import ConfigError

SCRIPTS = Path(__file__).resolve().parents[1] / "experiment" / "isic"
NAME = "mobilenet"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the local server


class LocalServer:
    """``ThreadingHTTPServer`` on 127.0.0.1 whose routes are ``path -> handler function``."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()  # lets a silent handler end at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send_file(data: bytes, *, cut_at: int | None = None) -> Callable:
    """A route sending ``data`` with its full Content-Length; ``cut_at`` closes the
    connection after that many bytes (an interrupted transfer)."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data if cut_at is None else data[:cut_at])
        handler.wfile.flush()
        handler.close_connection = True

    return route


@pytest.fixture
def server():
    srv = LocalServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def served_state_dict() -> tuple[dict, bytes, str]:
    """A seeded torchvision MobileNet-V2 state dict, its file bytes and torchvision-style name."""
    torch.manual_seed(3)
    sd = torchvision.models.mobilenet_v2().state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    data = buffer.getvalue()
    return sd, data, f"mobilenet_v2-{hashlib.sha256(data).hexdigest()[:8]}.pth"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty ``TORCH_HOME``; returns its ``hub/checkpoints`` directory (not yet created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def serve_weights(monkeypatch, url: str) -> None:
    """Make ``url`` the MobileNet-V2 ImageNet weights, as a real torchvision weights enum."""
    enum = WeightsEnum("LocalWeights", {"IMAGENET1K_V1": Weights(url=url, transforms=None, meta={})})
    monkeypatch.setitem(weights_module.IMAGENET_WEIGHTS, NAME, enum.IMAGENET1K_V1)


def free_port() -> int:
    """A port on 127.0.0.1 with nobody listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_one_line_error(err: Exception, url: str, path: Path) -> str:
    msg = str(err)
    assert "\n" not in msg
    assert url in msg
    assert str(path) in msg
    assert "copy that file" in msg
    assert "_pretrained=False" in msg
    return msg


# ---------------------------------------------------------------- download


def test_missing_file_is_downloaded_hash_checked_and_reused(server, hub, monkeypatch,
                                                            served_state_dict):
    sd, data, filename = served_state_dict
    server.routes["/" + filename] = send_file(data)
    serve_weights(monkeypatch, server.url("/" + filename))

    net = models.create_model(NAME, 8, pretrained=True)

    assert server.requests == ["/" + filename]
    assert sorted(p.name for p in hub.iterdir()) == [filename]  # no partial file left
    assert (hub / filename).read_bytes() == data
    own = net.state_dict()
    backbone = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    for key, value in backbone.items():
        assert torch.equal(own["features.0." + key[len("features.") :]], value), key
    assert own["classifier.weight"].shape == (8, 1280)
    models.create_model(NAME, 8, pretrained=True)
    assert len(server.requests) == 1  # the cached file is used from now on


def test_interrupted_transfer_leaves_no_file(server, hub, monkeypatch, served_state_dict):
    _, data, filename = served_state_dict
    server.routes["/" + filename] = send_file(data, cut_at=len(data) // 2)
    url = server.url("/" + filename)
    serve_weights(monkeypatch, url)
    with pytest.raises(models.PretrainedWeightsNotFound) as err:
        models.ensure_imagenet_weights(NAME, progress=False)
    assert_one_line_error(err.value, url, hub / filename)
    assert list(hub.iterdir()) == []


def test_wrong_hash_leaves_no_file(server, hub, monkeypatch, served_state_dict):
    _, data, _ = served_state_dict
    filename = "mobilenet_v2-00000000.pth"  # the served bytes hash to something else
    server.routes["/" + filename] = send_file(data)
    url = server.url("/" + filename)
    serve_weights(monkeypatch, url)
    with pytest.raises(models.PretrainedWeightsNotFound) as err:
        models.ensure_imagenet_weights(NAME, progress=False)
    msg = assert_one_line_error(err.value, url, hub / filename)
    assert 'invalid hash value (expected "00000000"' in msg
    assert list(hub.iterdir()) == []


def test_unreachable_host_fails_at_once(hub, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/mobilenet_v2-b0353104.pth"
    serve_weights(monkeypatch, url)
    start = time.monotonic()
    with pytest.raises(models.PretrainedWeightsNotFound) as err:
        models.create_model(NAME, 8, pretrained=True)
    assert time.monotonic() - start < 5
    msg = assert_one_line_error(err.value, url, hub / "mobilenet_v2-b0353104.pth")
    assert "Connection refused" in msg
    assert list(hub.iterdir()) == []


def test_silent_host_times_out(server, hub, monkeypatch):
    server.routes["/mobilenet_v2-b0353104.pth"] = lambda handler: server.release.wait(30)
    url = server.url("/mobilenet_v2-b0353104.pth")
    serve_weights(monkeypatch, url)
    before = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(models.PretrainedWeightsNotFound) as err:
        models.ensure_imagenet_weights(NAME, progress=False, timeout_s=0.5)
    assert time.monotonic() - start < 5  # without a timeout urllib would wait 30 s here
    assert "timed out" in assert_one_line_error(err.value, url, hub / "mobilenet_v2-b0353104.pth")
    assert socket.getdefaulttimeout() == before  # the process default is restored
    assert list(hub.iterdir()) == []


# ---------------------------------------------------------------- torchrun


def test_other_local_ranks_wait_for_local_rank_0(server, hub, monkeypatch, served_state_dict):
    _, data, filename = served_state_dict
    server.routes["/" + filename] = send_file(data)
    serve_weights(monkeypatch, server.url("/" + filename))
    monkeypatch.setenv("LOCAL_RANK", "1")
    hub.mkdir(parents=True)

    def local_rank_0():  # stands in for rank 0's atomic move into place
        time.sleep(0.5)
        (hub / "tmp.partial").write_bytes(data)
        (hub / "tmp.partial").rename(hub / filename)

    writer = threading.Thread(target=local_rank_0)
    writer.start()
    try:
        assert models.ensure_imagenet_weights(NAME, wait_s=20) == hub / filename
    finally:
        writer.join()
    assert server.requests == []  # only local rank 0 downloads


def test_other_local_rank_gives_up_after_waiting(server, hub, monkeypatch):
    url = server.url("/mobilenet_v2-b0353104.pth")
    serve_weights(monkeypatch, url)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(models.PretrainedWeightsNotFound) as err:
        models.ensure_imagenet_weights(NAME, wait_s=0.2)
    msg = assert_one_line_error(err.value, url, hub / "mobilenet_v2-b0353104.pth")
    assert "local rank 3 waited 0.2 s for local rank 0" in msg
    assert server.requests == []


# ---------------------------------------------------------------- the scripts' pre-run step


def script_experiment(name: str):
    """The ``ex`` of ``experiment/isic/<name>.py``, imported without running it."""
    spec = importlib.util.spec_from_file_location(f"download_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ex


@pytest.mark.parametrize("script", ["isic", "isic_d_kd"])
def test_failed_download_stops_main_command_before_the_run_folder(
    script, hub, monkeypatch, tmp_path, prepared_isic
):
    ex = script_experiment(script)
    model = "_model_name" if script == "isic" else "_model_name_student"
    url = f"http://127.0.0.1:{free_port()}/mobilenet_v2-b0353104.pth"
    serve_weights(monkeypatch, url)
    out = tmp_path / "out"
    updates = {"_pretrained": True, "_base_path": str(prepared_isic), "_save_folder": str(out),
               "_device": "cpu", model: NAME, "_kd_method": "none"}
    if script == "isic":
        del updates["_kd_method"]
    with pytest.raises(ConfigError) as err:
        ex.run(config_updates=updates, named_configs=["quick"])
    assert_one_line_error(err.value, url, hub / "mobilenet_v2-b0353104.pth")
    assert not out.exists()


def test_print_config_does_not_download(server, hub, monkeypatch, served_state_dict):
    _, data, filename = served_state_dict
    server.routes["/" + filename] = send_file(data)
    serve_weights(monkeypatch, server.url("/" + filename))
    run = script_experiment("isic_d_kd").run(
        "print_config", config_updates={"_pretrained": True, "_kd_method": "none"}
    )
    assert run.config["_pretrained"] is True
    assert server.requests == []
    assert not hub.exists()
