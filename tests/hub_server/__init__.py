"""A Hugging Face Hub on loopback for tests: olah serves the read API from git repositories, `gateway.py` adds the
write API in front of it (see its docstring).

    with local_hub(tmp_path) as hub:
        env["HF_ENDPOINT"] = hub.endpoint   # push and pull through the gateway; reads are olah's answers

Both servers run as subprocesses of the caller, on free loopback ports, and are stopped when the block exits,
whatever happens inside it (on Linux they are also told to exit if the caller dies without cleaning up).
"""

import contextlib
import dataclasses
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent / "gateway.py"
# Asked until a server answers: info on a repository nobody has (olah offline answers at once, RepoNotFound; its
# index page "/" answers 500 with the Starlette this project gets).
PROBE = "/api/models/local-hub/probe/revision/main"
# urllib would send loopback requests to a proxy named by http_proxy; the probes below talk to the servers directly.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclasses.dataclass
class LocalHub:
    endpoint: str  # HF_ENDPOINT: the gateway
    olah_url: str
    mirrors: Path  # the git repositories: {mirrors}/models/{org}/{name}
    olah_log: Path
    gateway_log: Path

    def repository(self, repo_id, repo_type="models"):
        return self.mirrors / repo_type / repo_id

    def git(self, repo_id, *args):
        """Run git on the bare repository of `repo_id`; returns stdout."""
        return subprocess.run(["git", f"--git-dir={self.repository(repo_id)}", *args], check=True,
                              capture_output=True, text=True).stdout


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if sys.platform == "linux":
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only makes the call

    def _exit_with_parent():
        """preexec_fn: the kernel sends the server SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG),
        so a test run that is killed outright leaves no server behind."""
        _prctl(1, signal.SIGTERM)
else:
    _exit_with_parent = None


def _start(command, log, cwd):
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_exit_with_parent)


def _stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(url, process, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _DIRECT.open(url, timeout=2).close()
            return
        except urllib.error.HTTPError:  # any HTTP answer means it is serving
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url}: no answer after {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def local_hub(root):
    """Start olah (offline, serving `root/mirrors`) and the gateway in front of it; yields a `LocalHub`."""
    root = Path(root)
    mirrors = root / "mirrors"
    mirrors.mkdir(parents=True)
    olah_port, gateway_port = free_port(), free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {olah_port}\n'
        f"repos-path = {str(root / 'olah-cache')!r}\n"  # olah's download cache: unused offline, kept out of cwd
        f"mirrors-path = [{str(mirrors)!r}]\n"
        "[accessibility]\noffline = true\n"  # never contact huggingface.co
    )
    hub = LocalHub(endpoint=f"http://127.0.0.1:{gateway_port}", olah_url=f"http://127.0.0.1:{olah_port}",
                   mirrors=mirrors, olah_log=root / "olah.log", gateway_log=root / "gateway.log")
    processes = []
    try:
        processes.append(_start([sys.executable, "-m", "olah.server", "--config", str(config),
                                 "--log-path", str(root / "olah-logs")], hub.olah_log, cwd=root))
        _wait_until_up(hub.olah_url + PROBE, processes[-1], hub.olah_log)
        processes.append(_start([sys.executable, str(GATEWAY), "--mirrors", str(mirrors), "--olah", hub.olah_url,
                                 "--port", str(gateway_port)], hub.gateway_log, cwd=root))
        _wait_until_up(hub.endpoint + PROBE, processes[-1], hub.gateway_log)
        yield hub
    finally:
        for process in reversed(processes):
            _stop(process)
