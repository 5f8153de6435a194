"""Test-wide settings: one intra-op thread (tiny tensors: spinning OpenMP threads only cost time); a local HTTP server."""

import functools
import http.server
import os
import threading

import pytest
import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels (--norm-kernel triton) run in Triton's CPU interpreter; it is
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when triton is imported, so before any test imports it


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The suite's caches (decoded images, ZCA fits, random-real baselines) in a folder of its own, not ~/.cache."""
    os.environ["DISTILLERY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base url)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def full_float32_on_cuda():
    """CUDA comparisons at float32 tolerances: no TF32 convolutions or matmuls (PyTorch's cuDNN default is TF32,
    which moves an MTT gradient by ~5e-2 on its own, whatever the path). Nothing changes on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box they cost ~10-100x in spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's stream and graph API on the CPU: streams do nothing, `torch.cuda.graph` runs its block, or raises
    as a capture of an op that cannot be captured would, after `fake_cuda_graphs(fail=True)`."""
    import contextlib

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    failing = {"on": False}

    @contextlib.contextmanager
    def graph(g):
        if failing["on"]:  # as on CUDA: the op fails, then ending the capture fails too, with the first as context
            try:
                raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
            except RuntimeError:
                raise RuntimeError("The CUDA graph capture was invalidated")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return lambda fail: failing.update(on=fail)


class _ReplayOnCpu:
    """`capture.Captured` with CUDA's semantics emulated eagerly: the capture call changes no state (CUDA records
    kernels without running them), every replay runs fn on the static input buffers and the state tensors given at
    capture, and writes into the same output tensors (one tensor, a tuple of them, or None)."""

    def __init__(self, fn, inputs, state=(), warmup=3, option="--fast") -> None:
        self.fn, self.state, self.inputs = fn, list(state), [t.clone() for t in inputs]
        saved = [t.clone() for t in self.state]
        for _ in range(warmup + 1):  # the warm-ups and the capture call: none of them leaves a trace
            self.outputs = fn(*self.state, *self.inputs)
            for t, value in zip(self.state, saved):
                t.copy_(value)

    def __call__(self, inputs):
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        new = self.fn(*self.state, *self.inputs)
        if isinstance(new, torch.Tensor):
            self.outputs.copy_(new)
        elif new is not None:
            for out, value in zip(self.outputs, new):
                out.copy_(value)
        return self.outputs


@pytest.fixture
def replay_on_cpu():
    """`capture.Captured`'s stand-in on the CPU (monkeypatch it where a module imported Captured)."""
    return _ReplayOnCpu
