"""Tests for download.sh, run for real against a small HTTP server on 127.0.0.1.

The server imitates Meta's signed-URL host: files live under `/<path>?Policy=...&Signature=...`,
a wrong signature gets 403, a missing file 404, and `Range: bytes=N-` is honoured (206 / 416) so
resuming can be tested. Individual paths can be told to fail (403, 404, an HTML page, an empty
body) or to serve different bytes than the checklist expects.
"""

import hashlib
import http.server
import os
import pty
import random
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "download.sh"

ALL_MODELS = [
    "7b", "13b", "34b", "70b",
    "7b-Python", "13b-Python", "34b-Python", "70b-Python",
    "7b-Instruct", "13b-Instruct", "34b-Instruct", "70b-Instruct",
]
SHARDS = {"7b": 1, "13b": 2, "34b": 4, "70b": 8}
SHARD_BYTES = 40_000

POLICY, SIGNATURE = "abc", "xyz"
URL_PROMPT = "Enter the URL from email: "
MODEL_PROMPT = (
    "Enter the list of models to download without spaces ("
    + ",".join(ALL_MODELS)
    + "), or press Enter for all: "
)
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Log in</title></head><body>Sign in</body></html>\n"


def shard_count(model):
    return SHARDS[model.split("-")[0]]


def model_files(model):
    """The files of one model folder (without checklist.chk), deterministic per model."""
    rng = random.Random(model)
    files = {}
    for i in range(shard_count(model)):
        files[f"consolidated.{i:02d}.pth"] = b"PK\x03\x04" + rng.randbytes(SHARD_BYTES)
    files["params.json"] = b'{"dim": 4096, "n_layers": 32, "n_heads": 32, "model": "%s"}' % model.encode()
    files["tokenizer.model"] = b"\n\x0e\n\x05<unk>" + rng.randbytes(500)
    return files


def build_site():
    """Every path the script may request, mapped to its bytes."""
    site = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
    }
    for model in ALL_MODELS:
        files = model_files(model)
        checklist = "".join(f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in files.items())
        files["checklist.chk"] = checklist.encode()
        for name, data in files.items():
            site[f"CodeLlama-{model}/{name}"] = data
    return site


SITE = build_site()


class FakeMetaServer:
    """A threaded HTTP server on 127.0.0.1 that serves SITE under signed-URL-like paths."""

    def __init__(self):
        self.files = dict(SITE)
        self.fail = {}  # path -> 403 | 404 | "html" | "empty"
        self.ranges = True  # False: ignore Range headers (200 with the whole file), as some servers do
        self.log = []  # (path, Range header or None, status)
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def prefix(self):
        return f"http://127.0.0.1:{self.port}"

    def url(self, signature=SIGNATURE):
        return f"{self.prefix}/*?Policy={POLICY}&Signature={signature}&Key-Pair-Id=K1TEST"

    def requested(self, path):
        return [entry for entry in self.log if entry[0] == path]

    def reply(self, handler, status, body=b"", headers=()):
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def handle(self, handler):
        parts = urllib.parse.urlsplit(handler.path)
        path = urllib.parse.unquote(parts.path).lstrip("/")
        query = urllib.parse.parse_qs(parts.query)
        range_header = handler.headers.get("Range")
        status = self.answer(handler, path, query, range_header)
        with self.lock:
            self.log.append((path, range_header, status))

    def answer(self, handler, path, query, range_header):
        xml = [("Content-Type", "application/xml")]
        if query.get("Policy") != [POLICY] or query.get("Signature") != [SIGNATURE]:
            self.reply(handler, 403, b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", xml)
            return 403
        failure = self.fail.get(path)
        if failure in (403, 404):
            self.reply(handler, failure, b"<?xml version='1.0'?><Error><Code>Nope</Code></Error>", xml)
            return failure
        if failure == "html":
            self.reply(handler, 200, HTML_PAGE, [("Content-Type", "text/html")])
            return 200
        if failure == "empty":
            self.reply(handler, 200, b"", [("Content-Type", "binary/octet-stream")])
            return 200
        if path not in self.files:
            self.reply(handler, 404, b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>", xml)
            return 404
        data = self.files[path]
        octet = [("Content-Type", "binary/octet-stream"), ("Accept-Ranges", "bytes")]
        if not self.ranges:
            self.reply(handler, 200, data, octet[:1])
            return 200
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                self.reply(handler, 416, b"", [("Content-Range", f"bytes */{len(data)}")])
                return 416
            end = min(end, len(data) - 1)
            self.reply(handler, 206, data[start:end + 1],
                       octet + [("Content-Range", f"bytes {start}-{end}/{len(data)}")])
            return 206
        self.reply(handler, 200, data, octet)
        return 200


@pytest.fixture
def server():
    srv = FakeMetaServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def _require(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


@pytest.fixture(params=["curl", "wget"])
def downloader(request):
    _require(request.param)
    return request.param


def base_env(tmp_path, srv=None, **extra):
    """A clean environment: no proxies, no user rc files, the test server's prefix allowed."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "ftp_proxy"}
        and key not in {"PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "DOWNLOADER", "CHECKSUM_TOOL",
                        "CODELLAMA_URL_PREFIX", "CODELLAMA_EXPECTED_SHARD_BYTES", "WGETRC", "CURL_HOME"}
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
               TARGET_FOLDER=str(tmp_path / "weights"),
               CODELLAMA_EXPECTED_SHARD_BYTES=str(SHARD_BYTES + 4))
    if srv is not None:
        env.update(CODELLAMA_URL_PREFIX=srv.prefix, PRESIGNED_URL=srv.url())
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_script(env, stdin=subprocess.DEVNULL, cwd=None):
    kwargs = {"input": stdin} if isinstance(stdin, str) else {"stdin": stdin}
    proc = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, cwd=cwd,
                          **kwargs)
    proc.output = proc.stdout + proc.stderr
    return proc


def assert_model_complete(target, model):
    folder = target / f"CodeLlama-{model}"
    expected = {name: SITE[f"CodeLlama-{model}/{name}"]
                for name in [*model_files(model), "checklist.chk"]}
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    for name, data in expected.items():
        assert (folder / name).read_bytes() == data, f"{folder.name}/{name} differs"


def assert_common_files(target):
    assert (target / "LICENSE").read_bytes() == SITE["LICENSE"]
    assert (target / "USE_POLICY.md").read_bytes() == SITE["USE_POLICY.md"]


def fake_path_without(tmp_path, missing):
    """A PATH directory with links to every program in /usr/bin and /bin except the names in `missing`."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    for source in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(source):
            continue
        for name in os.listdir(source):
            target = bindir / name
            if name in missing or target.exists() or target.is_symlink():
                continue
            target.symlink_to(os.path.join(source, name))
    return str(bindir)


# --------------------------------------------------------------------------- successful downloads


def test_script_is_executable_bash():
    assert SCRIPT.is_file()
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_full_download_7b_and_13b(server, downloader, tmp_path):
    env = base_env(tmp_path, server, MODEL_SIZE="7b,13b", DOWNLOADER=downloader)
    proc = run_script(env)
    assert proc.returncode == 0, proc.output
    target = tmp_path / "weights"
    assert_common_files(target)
    assert_model_complete(target, "7b")
    assert_model_complete(target, "13b")
    assert sorted(p.name for p in target.iterdir()) == ["CodeLlama-13b", "CodeLlama-7b", "LICENSE", "USE_POLICY.md"]
    umask = os.umask(0)
    os.umask(umask)
    for path in (target / "LICENSE", target / "CodeLlama-7b" / "checklist.chk"):  # went through a temporary file
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert f"Using {downloader}" in proc.output
    assert "Downloading LICENSE and Acceptable Usage Policy" in proc.output
    assert "Downloading CodeLlama-7b" in proc.output and "Downloading CodeLlama-13b" in proc.output
    assert "Checking checksums" in proc.output
    assert "consolidated.01.pth: OK" in proc.output
    # Every request carried the signed query and the path in place of the '*'.
    paths = {entry[0] for entry in server.log}
    assert "CodeLlama-13b/consolidated.01.pth" in paths and "*" not in paths


def test_empty_model_size_means_all_models(server, tmp_path):
    _require("curl")
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="", DOWNLOADER="curl"))
    assert proc.returncode == 0, proc.output
    target = tmp_path / "weights"
    assert_common_files(target)
    for model in ALL_MODELS:
        assert_model_complete(target, model)


def test_model_names_are_case_insensitive_and_deduplicated(server, tmp_path):
    _require("curl")
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE=" 7B-python,7b-Python ", DOWNLOADER="curl"))
    assert proc.returncode == 0, proc.output
    target = tmp_path / "weights"
    assert_model_complete(target, "7b-Python")
    assert proc.output.count("Downloading CodeLlama-7b-Python") == 1


def test_answers_from_piped_stdin(server, tmp_path):
    _require("curl")
    env = base_env(tmp_path, server, DOWNLOADER="curl")
    url = env.pop("PRESIGNED_URL")
    proc = run_script(env, stdin=f"  {url}  \n7b\n")
    assert proc.returncode == 0, proc.output
    assert_model_complete(tmp_path / "weights", "7b")


def test_interactive_prompts_in_a_terminal(server, downloader, tmp_path):
    env = base_env(tmp_path, server, DOWNLOADER=downloader)
    url = env.pop("PRESIGNED_URL")
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(SCRIPT)], env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(text, timeout=20.0):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; got {seen!r}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {text!r}; got {seen!r}")
            seen += chunk

    try:
        read_until(URL_PROMPT)
        os.write(master, url.encode() + b"\n")
        read_until(MODEL_PROMPT)
        os.write(master, b"7b\n")
        read_until("All files downloaded and verified")
        assert proc.wait(timeout=30) == 0, seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    assert_model_complete(tmp_path / "weights", "7b")


def test_second_run_downloads_nothing_again(server, downloader, tmp_path):
    env = base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader)
    assert run_script(env).returncode == 0
    server.log.clear()
    proc = run_script(env)
    assert proc.returncode == 0, proc.output
    assert_model_complete(tmp_path / "weights", "7b")
    # Every checked file was already complete: each request asked for the bytes after the end
    # and got 416. The two files without a checksum, and the checksums, are fetched whole again.
    again = {path: status for path, _, status in server.log}
    assert again.pop("LICENSE") == 200 and again.pop("USE_POLICY.md") == 200
    assert again.pop("CodeLlama-7b/checklist.chk") == 200
    assert again and set(again.values()) == {416}, server.log


def test_an_existing_license_is_not_resumed_or_replaced(server, downloader, tmp_path):
    """Run from a source checkout (TARGET_FOLDER=.), the target holds the project's own
    LICENSE: resuming onto it would glue two licenses together."""
    target = tmp_path / "weights"
    target.mkdir()
    (target / "LICENSE").write_bytes(b"MIT License\n" * 200)  # longer than Meta's test copy
    (target / "USE_POLICY.md").write_bytes(SITE["USE_POLICY.md"][:10])  # a cut-off earlier run
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader))
    assert proc.returncode == 0, proc.output
    assert (target / "LICENSE").read_bytes() == b"MIT License\n" * 200
    assert (target / "LICENSE.codellama").read_bytes() == SITE["LICENSE"]
    assert "Kept the existing" in proc.output
    assert (target / "USE_POLICY.md").read_bytes() == SITE["USE_POLICY.md"]  # completed
    assert not (target / "USE_POLICY.md.codellama").exists()
    assert not list(target.glob("*.part"))


def test_a_second_run_keeps_the_saved_license_copy(server, tmp_path):
    _require("curl")
    target = tmp_path / "weights"
    target.mkdir()
    (target / "LICENSE").write_bytes(b"MIT License\n")
    env = base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER="curl")
    assert run_script(env).returncode == 0
    proc = run_script(env)  # LICENSE.codellama is there and holds Meta's text: nothing to do
    assert proc.returncode == 0, proc.output
    assert (target / "LICENSE").read_bytes() == b"MIT License\n"
    assert (target / "LICENSE.codellama").read_bytes() == SITE["LICENSE"]


def test_user_files_beside_the_license_are_not_touched(server, downloader, tmp_path):
    """LICENSE.part and LICENSE.codellama may be the user's own files: neither is deleted
    or overwritten; a LICENSE.codellama that differs stops the script with a message."""
    target = tmp_path / "weights"
    target.mkdir()
    mine = {"LICENSE": b"MIT License\n", "LICENSE.part": b"my notes\n", "LICENSE.codellama": b"mine\n"}
    for name, data in mine.items():
        (target / name).write_bytes(data)
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader))
    assert proc.returncode == 1
    assert f"{target}/LICENSE.codellama already exists" in proc.output
    assert "Move one of them away" in proc.output
    assert {p.name: p.read_bytes() for p in target.iterdir()} == mine  # no temporary file left
    assert not server.requested("CodeLlama-7b/params.json")


@pytest.mark.parametrize("path", ["USE_POLICY.md", "CodeLlama-7b/params.json", "CodeLlama-7b/checklist.chk"])
def test_a_folder_where_a_file_goes_is_refused(server, tmp_path, path):
    _require("curl")
    target = tmp_path / "weights"
    (target / path).mkdir(parents=True)
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER="curl"))
    assert proc.returncode == 1
    assert f"{target}/{path} is a folder" in proc.output
    assert list((target / path).iterdir()) == []


# --------------------------------------------------------------------------- resume


def test_resume_after_interrupted_download(server, downloader, tmp_path):
    path = "CodeLlama-13b/consolidated.01.pth"
    data = SITE[path]
    partial = tmp_path / "weights" / path
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:12_345])
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="13b", DOWNLOADER=downloader))
    assert proc.returncode == 0, proc.output
    assert partial.read_bytes() == data
    assert_model_complete(tmp_path / "weights", "13b")
    assert (path, "bytes=12345-", 206) in server.requested(path), server.requested(path)


def test_server_without_resume_support_downloads_again(server, downloader, tmp_path):
    """A server that ignores Range answers 200 with the whole file: curl stops with exit
    status 33, and resuming can never work, so the file is fetched anew."""
    server.ranges = False
    path = "CodeLlama-7b/consolidated.00.pth"
    partial = tmp_path / "weights" / path
    partial.parent.mkdir(parents=True)
    partial.write_bytes(SITE[path][:12_345])
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader))
    assert proc.returncode == 0, proc.output
    assert_model_complete(tmp_path / "weights", "7b")
    assert "run the script again to resume" not in proc.output


def test_stale_checklist_is_replaced_by_the_servers(server, downloader, tmp_path):
    """A complete checklist.chk from an earlier download (here: other sums, same size)
    must not be kept: its shards would fail on every run, however often they are fetched."""
    env = base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader)
    assert run_script(env).returncode == 0
    checklist = tmp_path / "weights" / "CodeLlama-7b" / "checklist.chk"
    checklist.write_bytes(SITE["CodeLlama-7b/checklist.chk"].replace(b"a", b"b").replace(b"0", b"1"))
    proc = run_script(env)
    assert proc.returncode == 0, proc.output
    assert_model_complete(tmp_path / "weights", "7b")
    assert not list(checklist.parent.glob(".*"))


def test_target_folder_starting_with_a_dash(server, downloader, tmp_path):
    env = base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader, TARGET_FOLDER="-weights")
    proc = run_script(env, cwd=tmp_path)
    assert proc.returncode == 0, proc.output
    assert_common_files(tmp_path / "-weights")
    assert_model_complete(tmp_path / "-weights", "7b")


def test_html_page_from_an_earlier_attempt_is_replaced(server, tmp_path):
    _require("curl")
    path = "CodeLlama-7b/consolidated.00.pth"
    stale = tmp_path / "weights" / path
    stale.parent.mkdir(parents=True)
    stale.write_bytes(HTML_PAGE)
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER="curl"))
    assert proc.returncode == 0, proc.output
    assert "HTML page left from an earlier attempt" in proc.output
    assert_model_complete(tmp_path / "weights", "7b")


# --------------------------------------------------------------------------- verification


@pytest.fixture(params=["md5sum", "md5", "openssl"])
def checksum_tool(request, tmp_path):
    """Yields (CHECKSUM_TOOL, extra PATH dir); `md5` is a stand-in that behaves like macOS `md5 -q`."""
    if request.param == "md5":
        _require("md5sum")
        shim_dir = tmp_path / "shim"
        shim_dir.mkdir()
        shim = shim_dir / "md5"
        shim.write_text('#!/bin/sh\n[ "$1" = -q ] || exit 2\nset -- $(md5sum "$2")\necho "$1"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
        return "md5", str(shim_dir)
    _require(request.param)
    return request.param, None


def _env_with_tool(tmp_path, server, tool, extra_dir, **extra):
    env = base_env(tmp_path, server, CHECKSUM_TOOL=tool, DOWNLOADER="curl", **extra)
    if extra_dir:
        env["PATH"] = extra_dir + os.pathsep + env["PATH"]
    return env


def test_checksum_tools_accept_good_files(server, checksum_tool, tmp_path):
    _require("curl")
    tool, extra_dir = checksum_tool
    proc = run_script(_env_with_tool(tmp_path, server, tool, extra_dir, MODEL_SIZE="7b"))
    assert proc.returncode == 0, proc.output
    assert f"{tool} to verify" in proc.output
    assert_model_complete(tmp_path / "weights", "7b")


def test_corrupted_file_fails_and_is_named(server, checksum_tool, tmp_path):
    _require("curl")
    tool, extra_dir = checksum_tool
    bad = "CodeLlama-13b/consolidated.01.pth"
    damaged = bytearray(SITE[bad])
    damaged[1000] ^= 0xFF
    server.files[bad] = bytes(damaged)
    # 13b first: the failure is reported at the end, after the other model was still fetched.
    proc = run_script(_env_with_tool(tmp_path, server, tool, extra_dir, MODEL_SIZE="13b,7b"))
    assert proc.returncode != 0
    assert "consolidated.01.pth: FAILED" in proc.output
    assert "consolidated.00.pth: OK" in proc.output
    assert "checksum verification failed for 1 file(s)" in proc.output
    assert "CodeLlama-13b/consolidated.01.pth" in proc.output
    assert_model_complete(tmp_path / "weights", "7b")


def test_file_missing_from_checklist_fails(server, tmp_path):
    _require("curl")
    path = "CodeLlama-7b/checklist.chk"
    server.files[path] = b"".join(line + b"\n" for line in SITE[path].splitlines() if b"params.json" not in line)
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER="curl"))
    assert proc.returncode != 0
    assert "params.json: FAILED (not listed in checklist.chk" in proc.output


# --------------------------------------------------------------------------- server errors


@pytest.mark.parametrize("where", ["signature", "path"])
def test_http_403_explains_expired_link(server, downloader, tmp_path, where):
    env = base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader)
    if where == "signature":  # the whole link is refused, as with an expired link
        env["PRESIGNED_URL"] = server.url(signature="expired")
    else:
        server.fail["CodeLlama-7b/consolidated.00.pth"] = 403
    proc = run_script(env)
    assert proc.returncode != 0
    assert "HTTP 403" in proc.output
    assert "24 hours" in proc.output and "limited number of downloads" in proc.output
    assert "Request a new link" in proc.output and "llama-downloads" in proc.output
    if where == "signature":
        assert not (tmp_path / "weights" / "LICENSE").exists()  # no empty file left behind
    else:
        assert not (tmp_path / "weights" / "CodeLlama-7b" / "consolidated.00.pth").exists()


def test_http_404_explains(server, downloader, tmp_path):
    server.fail["CodeLlama-34b/params.json"] = 404
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="34b", DOWNLOADER=downloader))
    assert proc.returncode != 0
    assert "CodeLlama-34b/params.json (HTTP 404" in proc.output
    assert "24 hours" in proc.output and "new link" in proc.output
    assert not (tmp_path / "weights" / "CodeLlama-34b" / "params.json").exists()
    assert not server.requested("CodeLlama-34b/consolidated.00.pth")  # stopped before the big files


@pytest.mark.parametrize("path", ["CodeLlama-7b/params.json", "CodeLlama-7b/consolidated.00.pth", "LICENSE"])
def test_html_page_instead_of_file(server, downloader, tmp_path, path):
    server.fail[path] = "html"
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader))
    assert proc.returncode != 0
    assert f"web page (HTML) instead of {path}" in proc.output
    assert "request a new" in proc.output
    assert not (tmp_path / "weights" / path).exists()


def test_empty_file_is_an_error(server, tmp_path):
    _require("curl")
    server.fail["CodeLlama-7b/tokenizer.model"] = "empty"
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER="curl"))
    assert proc.returncode != 0
    assert "empty file for CodeLlama-7b/tokenizer.model" in proc.output


# --------------------------------------------------------------------------- input checks


def test_unknown_model(server, tmp_path):
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b,42b"))
    assert proc.returncode == 1
    assert "Unknown model: 42b" in proc.output
    assert ",".join(ALL_MODELS) in proc.output
    assert server.log == []  # nothing was fetched, not even LICENSE


@pytest.mark.parametrize("models", ["7?", "[7]b", "7*", "*", "7 b", "./7b", "7b/", "7b/../13b", "~", ","])
def test_model_names_must_be_exact(server, tmp_path, models):
    """Only the twelve names (in any letter case) pass: patterns are not expanded against
    the files of the current folder, and nothing else is read as a name."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "7b").write_text("a file whose name a pattern would match")
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE=models), cwd=cwd)
    assert proc.returncode == 1, proc.output
    assert "Valid models: " + ",".join(ALL_MODELS) in proc.output
    assert server.log == []


@pytest.mark.parametrize("url", [
    "https://example.com/*?Policy=abc&Signature=xyz",
    "http://download.llamameta.net/*?Policy=abc&Signature=xyz",
    "https://download.llamameta.net.example.com/*?Policy=abc",
    "download.llamameta.net/*?Policy=abc",
])
def test_wrong_host_is_refused(tmp_path, url):
    proc = run_script(base_env(tmp_path, PRESIGNED_URL=url, MODEL_SIZE="7b"))
    assert proc.returncode != 0
    assert "must start with https://download.llamameta.net" in proc.output


def test_local_server_needs_explicit_override(server, tmp_path):
    env = base_env(tmp_path, server, MODEL_SIZE="7b")
    del env["CODELLAMA_URL_PREFIX"]
    proc = run_script(env)
    assert proc.returncode != 0
    assert "must start with https://download.llamameta.net" in proc.output
    assert server.log == []


def test_facebook_redirect_link_is_explained(tmp_path):
    url = ("https://l.facebook.com/l.php?u=https%3A%2F%2Fdownload.llamameta.net%2F*%3FPolicy%3Dabc"
           "&h=AT0abc")
    proc = run_script(base_env(tmp_path, PRESIGNED_URL=url, MODEL_SIZE="7b"))
    assert proc.returncode != 0
    assert "l.facebook.com" in proc.output and "redirect" in proc.output
    assert "copy the text of the link itself" in proc.output


def test_link_without_star_is_refused(tmp_path):
    proc = run_script(base_env(tmp_path, PRESIGNED_URL="https://download.llamameta.net/LICENSE?Policy=a",
                               MODEL_SIZE="7b"))
    assert proc.returncode != 0
    assert "no '*'" in proc.output


@pytest.mark.parametrize("url", [
    "https://download.llamameta.net/*?Policy=abc&Signature=xyz",
    "https://download6.llamameta.net/*?Policy=abc&Signature=xyz",
    "'https://download2.llamameta.net/*?Policy=abc&Signature=xyz'",
    "https://download.llamameta.net/%2A?Policy=abc&Signature=xyz",  # '*' URL-encoded by a mail client
])
def test_real_meta_hosts_pass_the_check(tmp_path, url):
    # An unknown model stops the script right after the link check, before any network access.
    proc = run_script(base_env(tmp_path, PRESIGNED_URL=url, MODEL_SIZE="bogus"))
    assert proc.returncode == 1
    assert "Unknown model: bogus" in proc.output
    assert "must start with" not in proc.output and "no '*'" not in proc.output


def test_no_link_on_closed_stdin(tmp_path):
    proc = run_script(base_env(tmp_path, MODEL_SIZE="7b"))
    assert proc.returncode != 0
    assert "No download link was given" in proc.output


# --------------------------------------------------------------------------- tools and disk


def test_forced_downloader_must_exist(tmp_path):
    env = base_env(tmp_path, PRESIGNED_URL="https://download.llamameta.net/*?x", MODEL_SIZE="7b",
                   DOWNLOADER="curl", PATH=fake_path_without(tmp_path, {"curl"}))
    proc = run_script(env)
    assert proc.returncode != 0
    assert "DOWNLOADER=curl was requested but 'curl' is not installed" in proc.output
    assert "apt-get install curl" in proc.output


def test_missing_downloader_explains_install(tmp_path):
    env = base_env(tmp_path, PRESIGNED_URL="https://download.llamameta.net/*?x", MODEL_SIZE="7b",
                   PATH=fake_path_without(tmp_path, {"wget", "curl"}))
    proc = run_script(env)
    assert proc.returncode != 0
    assert "Neither wget nor curl is installed" in proc.output
    assert "apt-get install wget" in proc.output and "brew install wget" in proc.output


def test_missing_checksum_tool_explains_install(tmp_path):
    env = base_env(tmp_path, PRESIGNED_URL="https://download.llamameta.net/*?x", MODEL_SIZE="7b",
                   PATH=fake_path_without(tmp_path, {"md5sum", "md5", "openssl"}))
    proc = run_script(env)
    assert proc.returncode != 0
    assert "No md5 tool found" in proc.output
    assert "apt-get install coreutils" in proc.output and "brew install coreutils" in proc.output


def test_bad_expected_shard_bytes_stops_before_downloading(server, tmp_path):
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b",
                               CODELLAMA_EXPECTED_SHARD_BYTES="10GB"))
    assert proc.returncode == 1
    assert "CODELLAMA_EXPECTED_SHARD_BYTES must be a number of bytes, not '10GB'" in proc.output
    assert server.log == []


def test_not_enough_disk_space_stops_before_the_shard(server, tmp_path):
    _require("curl")
    env = base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER="curl",
                   CODELLAMA_EXPECTED_SHARD_BYTES=10**18)
    proc = run_script(env)
    assert proc.returncode != 0
    assert "Not enough free disk space" in proc.output and "consolidated.00.pth" in proc.output
    assert not server.requested("CodeLlama-7b/consolidated.00.pth")


def _dev_full_is_a_device():
    # In some containers /dev/full is missing or a plain file (that a write through the link grows).
    try:
        return stat.S_ISCHR(os.stat("/dev/full").st_mode)
    except OSError:
        return False


@pytest.mark.skipif(not _dev_full_is_a_device(), reason="needs /dev/full as a device")
def test_failed_write_is_reported_as_disk_problem(server, downloader, tmp_path):
    folder = tmp_path / "weights" / "CodeLlama-7b"
    folder.mkdir(parents=True)
    (folder / "params.json").symlink_to("/dev/full")  # every write fails with ENOSPC
    proc = run_script(base_env(tmp_path, server, MODEL_SIZE="7b", DOWNLOADER=downloader))
    assert proc.returncode != 0
    assert "Could not write" in proc.output and "params.json" in proc.output, proc.output
    assert "disk is probably full" in proc.output
    assert "Free space on that disk: " in proc.output and " GB." in proc.output
