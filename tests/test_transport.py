"""TLS with a private CA (verify_tls as a path, the CA variables of the Python ecosystem) and
HTTP proxies from the environment, against servers on 127.0.0.1 that the tests start."""
import http.client
import http.server
import os
import queue
import socketserver
import subprocess
import sys
import threading

import pytest

import semex
from semex import errors as E

HERE = os.path.dirname(os.path.abspath(__file__))
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throw-away CA and a server certificate it signed for 127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=semex test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)
    (d / "cadir").mkdir()
    (d / "cadir" / "ca.pem").write_bytes((d / "ca.pem").read_bytes())
    _openssl("rehash", str(d / "cadir"), cwd=d)
    return d


@pytest.fixture(scope="module")
def https_base(pki):
    from conftest import API_KEY

    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "fakeserver.py"), "--port", "0", "--api-key",
         API_KEY, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    assert line.startswith(b"PORT "), line
    yield f"https://127.0.0.1:{int(line.split()[1])}/v1"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def no_ca_env(monkeypatch):
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def ask(base, **options):
    from conftest import API_KEY

    with semex.LM("m", api_base=base, api_key=API_KEY, max_retries=0, **options) as lm:
        return semex.llm_batch(["tls"], model=lm, errors="objects")[0]


def test_a_private_ca_is_refused_by_default_and_trusted_when_named(https_base, pki, no_ca_env):
    refused = ask(https_base)
    assert isinstance(refused, E.TransportError) and "certificate" in str(refused).lower()
    assert ask(https_base, verify_tls=str(pki / "ca.pem")) == "echo: tls"
    assert ask(https_base, verify_tls=pki / "cadir") == "echo: tls"  # a directory, a PathLike
    assert ask(https_base, verify_tls=False) == "echo: tls"


@pytest.mark.parametrize("variable", CA_VARIABLES)
def test_the_ca_variables_of_the_python_ecosystem_are_honoured(https_base, pki, no_ca_env,
                                                               variable):
    path = pki / ("cadir" if variable == "SSL_CERT_DIR" else "ca.pem")
    no_ca_env.setenv(variable, str(path))
    assert ask(https_base) == "echo: tls"


def test_a_missing_ca_path_is_a_clear_error_before_sending(no_ca_env, tmp_path):
    with pytest.raises(E.ConfigurationError, match="verify_tls.*no such CA bundle"):
        semex.LM("m", api_base="http://127.0.0.1:9/v1", verify_tls=str(tmp_path / "nope"))
    no_ca_env.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "gone.pem"))
    with pytest.raises(E.ConfigurationError, match=r"\$REQUESTS_CA_BUNDLE"):
        semex.LM("m", api_base="http://127.0.0.1:9/v1")
    with pytest.raises(E.ConfigurationError, match="verify_tls must be"):
        semex.LM("m", api_base="http://127.0.0.1:9/v1", verify_tls=3)


def test_one_engine_serves_a_private_ca_and_the_default_in_turn(https_base, pki, no_ca_env,
                                                                server):
    # pooled easy handles must not keep one batch's CA for the next batch
    from conftest import API_KEY

    with semex.LM("m", api_base=https_base, api_key=API_KEY, max_retries=0,
                  verify_tls=str(pki / "ca.pem")) as lm:
        assert semex.llm_batch(["a"], model=lm) == ["echo: a"]
        lm.ca_file = None  # the same engine, now with libcurl's default CAs
        refused = semex.llm_batch(["b"], model=lm, errors="objects")[0]
        assert isinstance(refused, E.TransportError)


class _Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def _proxy_handler(seen):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # a forward proxy: the request line holds the absolute URL
            seen.put(self.path)
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            target = http.client.urlsplit(self.path)
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("proxy-connection", "connection")}
            upstream.request("POST", target.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for k, v in answer.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream.close()

        def log_message(self, *args):
            pass
    return Handler


@pytest.fixture
def proxy():
    seen = queue.Queue()
    httpd = _Proxy(("127.0.0.1", 0), _proxy_handler(seen))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_http_proxy_and_no_proxy_come_from_the_environment(server, make_lm, proxy,
                                                           monkeypatch):
    url, seen = proxy
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("http_proxy", url)
    assert semex.llm_batch(["via proxy"], model=make_lm()) == ["echo: via proxy"]
    assert seen.get(timeout=5).endswith("/v1/chat/completions")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert semex.llm_batch(["direct"], model=make_lm()) == ["echo: direct"]
    assert seen.empty()
