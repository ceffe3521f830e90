"""Bootstrap rendering: quoting, the inputs digest, and shell validity of every script."""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from disposabledisco import bootstrap
from disposabledisco.config import Config, ConfigError, parse_config

STATE = tempfile.mkdtemp(prefix="dd-test-bootstrap-")  # the digest key lives here
atexit.register(shutil.rmtree, STATE, True)
BASE = {"AMI": "ami-0123456789abcdef0", "KEY_NAME": "k", "NUM_SLAVES": 2,
        "TAG_KEY": "disco-bootstrap-test", "STATE_DIR": STATE}
APT = {"DISCO_INSTALL": "apt", "DISCO_APT_SOURCE": "deb https://apt.example.org/disco stable main"}
TRICKY = "it's \"quoted\" $HOME `echo tick` $(echo sub) \\ ; & | < > * ?\nsecond line\t!"
SNIPPETS = ("join_read", "join_slave", "join_known_hosts", "join_copy", "join_unpack",
            "disco_apply", "doctor_probe", "doctor_master")


def config(**values: object) -> Config:
    return parse_config({**BASE, **values})


def unchecked(**values: object) -> Config:
    """A config that skipped the schema, as a bug elsewhere could produce."""
    return Config(values={**config().values, **values})


def bash(script: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script, "test", *args], capture_output=True,
                          text=True, timeout=60, check=False, **kwargs)


def shell_values(cfg: Config, role: str, names: list[str]) -> list[str]:
    """Evaluate the rendered assignments in bash and print the named values back."""
    values = bootstrap.script_values(cfg, role)
    show = "".join(f'printf "%s\\0" "${{{n}[@]}}"\n' for n in names)
    result = bash(bootstrap.assignments(values) + show)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\0")[:-1]


# -- quoting --------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["POST_INIT", "MGMT_KEY", "DISCO_APT_SOURCE"])
def test_every_value_reaches_bash_exactly(key: str) -> None:
    assert shell_values(unchecked(**{key: TRICKY}), "master", [key]) == [TRICKY]


def test_settings_reach_bash_exactly() -> None:
    cfg = config(DISCO_SETTINGS={"DISCO_DEBUG": "it's \"x\" $HOME `id`"})
    assert shell_values(cfg, "slave", ["SETTINGS_PY"]) == [
        bootstrap.script_values(cfg, "slave")["SETTINGS_PY"]]


def test_package_with_shell_characters_is_rejected_by_schema_but_still_quoted() -> None:
    evil = "foo;touch /tmp/pwned-by-disposabledisco"
    with pytest.raises(ConfigError):
        config(ADDITIONAL_PACKAGES=[evil])
    with pytest.raises(ConfigError):
        config(PIP_REQUIREMENTS=["numpy; rm -rf /"])
    cfg = unchecked(ADDITIONAL_PACKAGES=[evil, "a b"], PIP_REQUIREMENTS=["x $(id)"])
    packages = shell_values(cfg, "slave", ["PACKAGES"])
    assert evil in packages and "a b" in packages
    assert shell_values(cfg, "slave", ["PIP_REQUIREMENTS"]) == ["x $(id)"]
    assert not Path("/tmp/pwned-by-disposabledisco").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs POST_INIT as root, like a node does")
def test_post_init_runs_as_written(tmp_path: Path) -> None:
    """POST_INIT goes through the real run_post_init: same output as the script run by hand."""
    out = tmp_path / "out"
    post_init = (f"exec >{out}\n"
                 "echo \"it's $HOME\" 'single $HOME' `echo back` $(echo sub)\n"
                 "printf '%s\\n' \"a\\\"b\" 'c\"d' \\$HOME\n")
    by_hand = bash(post_init, env={"HOME": "/root", "PATH": os.environ["PATH"]})
    assert by_hand.returncode == 0, by_hand.stderr
    expected = out.read_text()
    out.unlink()
    script = bootstrap.render(unchecked(POST_INIT=post_init), "slave")
    harness = script.replace('main "$@" </dev/null', "") + \
        f"STATE_DIR={tmp_path}\nrun_post_init\nrun_post_init\n"
    result = bash(harness, env={"HOME": "/root", "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert out.read_text() == expected
    assert result.stderr.count("running POST_INIT") == 1  # once per content
    assert (tmp_path / "post_init.sha256").exists()


# -- digest ---------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "master", "slave"), [
    ({"POST_INIT": "echo hi"}, True, True),
    ({"ADDITIONAL_PACKAGES": ["jq"]}, True, True),
    ({"BASE_PACKAGES": ["python3"]}, True, True),
    ({"PIP_REQUIREMENTS": ["numpy>=1.24"]}, True, True),
    ({"MGMT_KEY": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host"}, True, True),
    ({"DISCO_USER": "mapred"}, True, True),
    ({"DISCO_ROOT": "/data/disco"}, True, True),
    ({"DISCO_PORT": 9000}, True, True),
    ({"DISCO_SETTINGS": {"DISCO_GC_AFTER": 60}}, True, True),
    ({"DISCO_INSTALL": "none"}, True, True),
    ({"NUM_SLAVES": 0}, True, True),           # DDFS replicas 3 -> 1
    ({"NUM_SLAVES": 7}, False, False),         # replicas stay at 3
    ({"MAX_BID": "0.55"}, False, False),
    ({"SSH_CONCURRENCY": 4}, False, False),
    ({"MANAGE_HOSTS_FILE": False}, False, False),
    (APT, True, True),
    ({**APT, "DISCO_APT_PACKAGES": ["disco-master", "disco-node", "disco-tools"]}, True, True),
])
def test_digest_changes_exactly_when_an_input_changes(change, master: bool, slave: bool) -> None:
    before, after = config(), config(**change)
    for role, changed in (("master", master), ("slave", slave)):
        assert (bootstrap.digest(before, role) != bootstrap.digest(after, role)) is changed, role


def test_digest_is_stable_and_differs_per_role() -> None:
    assert bootstrap.digest(config(), "master") == bootstrap.digest(config(), "master")
    assert bootstrap.digest(config(), "master") != bootstrap.digest(config(), "slave")


def test_local_tarball_content_is_a_master_input(tmp_path: Path) -> None:
    tarball = tmp_path / "disco.tar.gz"
    tarball.write_bytes(b"one")
    cfg = config(DISCO_INSTALL="tarball", DISCO_TARBALL=str(tarball))
    master, slave = bootstrap.digest(cfg, "master"), bootstrap.digest(cfg, "slave")
    tarball.write_bytes(b"two!")
    assert bootstrap.digest(cfg, "master") != master
    assert bootstrap.digest(cfg, "slave") == slave  # slaves get it from the master at join


def test_missing_local_tarball_is_a_clear_error(tmp_path: Path) -> None:
    cfg = config(DISCO_INSTALL="tarball", DISCO_TARBALL=str(tmp_path / "nope.tar"))
    with pytest.raises(bootstrap.BootstrapError, match="nope.tar"):
        bootstrap.digest(cfg, "master")


def test_url_tarball_is_fetched_by_the_node() -> None:
    url = "https://example.org/disco-0.5.4-installed.tar.gz"
    values = bootstrap.script_values(config(DISCO_INSTALL="tarball", DISCO_TARBALL=url), "slave")
    assert values["DISCO_TARBALL_URL"] == url


# -- packages -------------------------------------------------------------------------

def test_packages_add_what_disco_needs_without_repeats() -> None:
    cfg = config(BASE_PACKAGES=["python3"], ADDITIONAL_PACKAGES=["jq", "python3"],
                 PIP_REQUIREMENTS=["numpy"], **APT)
    for role in bootstrap.ROLES:
        assert bootstrap.packages(cfg, role) == ["python3", "jq", "python-is-python3",
                                                 "erlang-nox", "python3-venv"]
    assert bootstrap.packages(config(BASE_PACKAGES=[], DISCO_INSTALL="none"), "master") == [
        "python-is-python3"]


def test_source_mode_gives_build_tools_to_the_master_only() -> None:
    cfg = config(BASE_PACKAGES=[], DISCO_INSTALL="source")
    assert bootstrap.packages(cfg, "master") == [
        "python-is-python3", "erlang-nox", "python3", "erlang-dev", "rebar", "erlang-eunit",
        "erlang-tools", "make", "git"]
    assert bootstrap.packages(cfg, "slave") == ["python-is-python3", "erlang-nox", "python3"]
    # the build script names the same packages when a tool is missing
    assert " ".join(bootstrap.BUILD_PACKAGES) in bootstrap.disco_source.build_script()


def test_apt_packages_split_between_roles() -> None:
    cfg = config(**APT, DISCO_APT_PACKAGES=["disco-master", "disco-node", "disco-tools"])
    assert bootstrap.apt_packages_for(cfg, "master") == ["disco-master", "disco-tools"]
    assert bootstrap.apt_packages_for(cfg, "slave") == ["disco-node", "disco-tools"]
    assert bootstrap.apt_packages_for(config(), "master") == []


# -- shell validity -------------------------------------------------------------------

VARIANTS = [
    {},
    {"DISCO_INSTALL": "none", "POST_INIT": "echo hi", "PIP_REQUIREMENTS": ["numpy"]},
    APT,
    {"DISCO_INSTALL": "tarball", "DISCO_TARBALL": "s3://bucket/disco.tar.gz"},
    {"DISCO_INSTALL": "source"},  # carries disco_source.py and the build script
    {"DISCO_INSTALL": "source", "DISCO_SOURCE": "https://example.org/disco-src.tar.gz"},
]


def rendered_scripts() -> list[tuple[str, str]]:
    scripts = [(f"{role}-{i}", bootstrap.render(config(**variant), role))
               for i, variant in enumerate(VARIANTS) for role in bootstrap.ROLES]
    scripts += [(name, bootstrap.snippet(config(), name)) for name in SNIPPETS]
    # snippets that carry a Python helper, rendered with the values their callers give
    scripts.append(("doctor_job", bootstrap.snippet(
        config(), "doctor_job", JOB_PY=bootstrap.template("doctor_job.py"), HARD_SECONDS=60)))
    scripts.append(("idle_probe", bootstrap.snippet(
        config(), "idle_probe", JOBLIST_URL="http://10.0.0.4:8989/disco/ctrl/joblist",
        PROBE_PY=bootstrap.template("idle_probe.py"))))
    return scripts


SCRIPTS = rendered_scripts()
SCRIPT_IDS = [name for name, _ in SCRIPTS]


@pytest.mark.parametrize(("name", "script"), SCRIPTS, ids=SCRIPT_IDS)
def test_scripts_pass_bash_n(name: str, script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f"{name}: {result.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize(("name", "script"), SCRIPTS, ids=SCRIPT_IDS)
def test_scripts_pass_shellcheck(name: str, script: str) -> None:
    """Excluded: SC2034 (a value a given script does not use) and SC2317 (lib.sh helpers
    a given snippet does not call)."""
    result = subprocess.run(["shellcheck", "-s", "bash", "-e", "SC2034,SC2317", "-"], input=script,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{name}:\n{result.stdout}"


def test_scripts_wait_and_check_instead_of_sleeping() -> None:
    script = bootstrap.render(config(), "master")
    assert "set -Eeuo pipefail" in script
    assert 'main "$@" </dev/null' in script.splitlines()[-1]
    assert "cloud-init status --wait" in script
    assert "Failed to fetch" in script and "Some index files failed" in script
    assert re.findall(r"\bsleep \S+", script) == ["sleep 1"]  # one poll, with a deadline
    assert not re.search(r"^\s*eval\b", script, re.MULTILINE)


# -- the public bootstrap tag is a keyed digest ---------------------------------------

def test_digest_is_keyed_per_cluster_so_the_tag_reveals_nothing(tmp_path: Path) -> None:
    secret = "export TOKEN=hunter2\n"
    one = config(POST_INIT=secret, STATE_DIR=str(tmp_path / "one"))
    two = config(POST_INIT=secret, STATE_DIR=str(tmp_path / "two"))
    script = bootstrap.render(one, "master")
    plain = hashlib.sha256(script.encode()).hexdigest()
    # what a DescribeTags reader could compute from a guess is not what the tag holds
    assert bootstrap.digest(one, "master") != plain
    assert bootstrap.digest(one, "master") != bootstrap.digest(two, "master")
    key_file = one.state_dir / bootstrap.DIGEST_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = bytes.fromhex(key_file.read_text().strip())
    assert len(key) == 32
    assert bootstrap.digest(one, "master") == hmac.new(key, script.encode(),
                                                       hashlib.sha256).hexdigest()
    assert bootstrap.digest(one, "master") == bootstrap.digest(one, "master")  # stable


def test_digest_key_is_never_read_or_made_through_a_link(tmp_path: Path) -> None:
    cfg = config(STATE_DIR=str(tmp_path))
    cfg.state_dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("ab" * 32 + "\n")
    (cfg.state_dir / bootstrap.DIGEST_KEY_FILE).symlink_to(victim)
    with pytest.raises(ConfigError, match="bootstrap.key is a symbolic link"):
        bootstrap.digest(cfg, "master")
    assert victim.read_text() == "ab" * 32 + "\n"


# -- https downloads: no redirect to plain http, DISCO_TARBALL_SHA256 checked ------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory):
    """An https server on 127.0.0.1 (self-signed, trusted through CURL_CA_BUNDLE) that
    serves /file and redirects /to-http and /to-https; plus a plain http server that
    records whether anyone reached it."""
    import http.server
    import ssl
    import threading

    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    hits: list[str] = []
    body = b"tarball bytes\n"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(f"{self.server.scheme} {self.path}")
            if self.path.startswith("/to-"):
                scheme = self.path[4:]
                port = servers[scheme].server_address[1]
                self.send_response(302)
                self.send_header("Location", f"{scheme}://127.0.0.1:{port}/file")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    servers = {}
    for scheme in ("https", "http"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.scheme = scheme
        if scheme == "https":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[scheme] = server
    yield servers["https"].server_address[1], cert, hits, hashlib.sha256(body).hexdigest()
    for server in servers.values():
        server.shutdown()


def fetch(tmp_path: Path, url: str, sha256: str, cert: Path) -> subprocess.CompletedProcess:
    """The master script's real fetch_disco_tarball, with unpacking stubbed out."""
    cfg = unchecked(DISCO_INSTALL="tarball", DISCO_TARBALL=url, DISCO_TARBALL_SHA256=sha256)
    script = bootstrap.render(cfg, "master").replace('main "$@" </dev/null', "")
    harness = script + (f"STATE_DIR={tmp_path}\nSTAGED_TARBALL={tmp_path}/disco.tar\n"
                        "unpack_tarball() { echo \"unpacked $1\"; }\nfetch_disco_tarball\n")
    return bash(harness, env={"PATH": os.environ["PATH"], "CURL_CA_BUNDLE": str(cert)})


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="needs curl and openssl")
def test_https_download_never_follows_a_redirect_to_plain_http(tmp_path: Path,
                                                               tls_server) -> None:
    port, cert, hits, sha = tls_server
    hits.clear()
    refused = fetch(tmp_path, f"https://127.0.0.1:{port}/to-http", "", cert)
    assert refused.returncode != 0 and "unpacked" not in refused.stdout
    assert hits == ["https /to-http"], hits  # the plain http server was never asked
    assert not (tmp_path / "disco.tar").exists()
    followed = fetch(tmp_path, f"https://127.0.0.1:{port}/to-https", sha.upper(), cert)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == f"unpacked {tmp_path}/disco.tar\n"


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="needs curl and openssl")
def test_download_with_another_sha256_is_refused_as_the_configs_fault(tmp_path: Path,
                                                                     tls_server) -> None:
    port, cert, _, sha = tls_server
    wrong = "0" * 64
    result = fetch(tmp_path, f"https://127.0.0.1:{port}/file", wrong, cert)
    assert result.returncode == 78, result.stderr  # EXIT_CONFIG: never burns the node
    assert f"has sha256 {sha}, DISCO_TARBALL_SHA256 says {wrong}" in result.stderr
    assert not list(tmp_path.glob("disco.tar*")) and "unpacked" not in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="runs POST_INIT as root, like a node does")
def test_a_failing_post_init_is_the_configs_fault(tmp_path: Path) -> None:
    script = bootstrap.render(unchecked(POST_INIT="exit 4"), "slave")
    harness = script.replace('main "$@" </dev/null', "") + \
        f"STATE_DIR={tmp_path}\nrun_post_init\n"
    result = bash(harness, env={"HOME": "/root", "PATH": os.environ["PATH"]})
    assert result.returncode == 78 and "POST_INIT failed (status 4)" in result.stderr
    assert not (tmp_path / "post_init.sha256").exists()


# -- source mode: what goes into the digest ----------------------------------------------

SOURCE = {"DISCO_INSTALL": "source"}


def test_the_source_bundle_hash_is_a_master_input_and_names_the_join(tmp_path: Path) -> None:
    from disposabledisco.reconcile import desired_state

    bundle = tmp_path / "src.tar.gz"
    bundle.write_bytes(b"bundle one")
    cfg = config(**SOURCE, DISCO_SOURCE=str(bundle))
    values = bootstrap.script_values(cfg, "master")
    assert values["DISCO_SOURCE_SHA256"] == hashlib.sha256(b"bundle one").hexdigest()
    assert values["DISCO_BUILD_SH"] == bootstrap.disco_source.build_script()
    before = {role: bootstrap.digest(cfg, role) for role in bootstrap.ROLES}
    join_before = desired_state(cfg).join_suffix
    bundle.write_bytes(b"bundle two, another size")
    after = {role: bootstrap.digest(cfg, role) for role in bootstrap.ROLES}
    assert after["master"] != before["master"]  # the master builds the new bundle
    assert after["slave"] == before["slave"]  # slaves get the tree at join ...
    assert desired_state(cfg).join_suffix not in ("", join_before)  # ... so they join again
    assert "DISCO_SOURCE_SHA256" not in bootstrap.script_values(cfg, "slave")


@pytest.mark.parametrize(("first", "second"), [
    ({"DISCO_SOURCE": "https://example.org/a.tgz"}, {"DISCO_SOURCE": "https://example.org/b.tgz"}),
    ({"DISCO_SOURCE": "https://example.org/a.tgz"},
     {"DISCO_SOURCE": "https://example.org/a.tgz", "DISCO_SOURCE_SHA256": "ab" * 32}),
    ({}, {"DISCO_SOURCE_BASE_URL": "file:///srv/mirror"}),
])
def test_each_source_input_changes_the_masters_digest(first: dict, second: dict) -> None:
    one, two = config(**SOURCE, **first), config(**SOURCE, **second)
    assert bootstrap.digest(one, "master") != bootstrap.digest(two, "master")
    assert bootstrap.digest(one, "slave") == bootstrap.digest(two, "slave")
    assert bootstrap.source_identity(one) != bootstrap.source_identity(two)


def test_without_a_source_the_master_carries_the_assembler_and_its_base_url() -> None:
    values = bootstrap.script_values(config(**SOURCE), "master")
    assert values["DISCO_SOURCE_PY"] == (
        Path(bootstrap.__file__).with_name("disco_source.py").read_text())
    assert (values["DISCO_SOURCE_BASE_URL"], values["DISCO_SOURCE_URL"]) == (
        "https://github.com", "")
    with_url = bootstrap.script_values(config(**SOURCE, DISCO_SOURCE="s3://bucket/k.tgz"), "master")
    assert (with_url["DISCO_SOURCE_PY"], with_url["DISCO_SOURCE_URL"]) == ("", "s3://bucket/k.tgz")


# -- the one settings writer, on this machine with its paths moved to a temp folder ----------

INSTALLED = ('# an install\'s own file\nDISCO_HOME = "/opt/disco"\nDISCO_ROOT = "/usr/var/disco"\n'
             'DISCO_WWW_ROOT = "/opt/disco/www"\nDISCO_FLAGS = ""\nDDFS_BLOB_REPLICAS = 3\n'
             'DISCO_COMPUTED = "a" + "b"\n')


def settings_harness(tmp_path: Path, cfg: Config, role: str, calls: str) -> \
        subprocess.CompletedProcess:
    """The rendered script of `role` up to its functions, then `calls` with STATE_DIR and
    the settings file under tmp_path."""
    script = bootstrap.render(cfg, role).replace('main "$@" </dev/null', "")
    paths = (f"STATE_DIR={tmp_path}/state\nSETTINGS_FILE={tmp_path}/etc/disco/settings.py\n"
             f"INSTALLED_SETTINGS=$STATE_DIR/installed-settings.py\n")
    return bash(script + paths + calls, env={"PATH": os.environ["PATH"]})


def read_settings(path: Path) -> dict[str, object]:
    values: dict[str, object] = {}
    exec(path.read_text(), {}, values)  # noqa: S102 - our own plain assignments
    return values


@pytest.mark.skipif(os.geteuid() != 0, reason="writes files as root:root, like a node does")
@pytest.mark.parametrize("mode", ["source", "tarball", "apt", "preinstalled"])
def test_every_install_mode_keeps_what_the_install_sets_under_ours(tmp_path: Path,
                                                                   mode: str) -> None:
    extra = {"source": {}, "tarball": {"DISCO_TARBALL": "s3://bucket/k.tgz"}, "apt": APT,
             "preinstalled": {}}[mode]
    cfg = config(**{"DISCO_INSTALL": mode, **extra},
                 DISCO_SETTINGS={"DISCO_WWW_ROOT": "/mine/www"})
    settings = tmp_path / "etc/disco/settings.py"
    if mode in ("source", "tarball"):  # unpack_tarball keeps the tarball's file aside
        tree = tmp_path / "tree"
        (tree / "etc/disco").mkdir(parents=True)
        (tree / "etc/disco/settings.py").write_text(INSTALLED)
        subprocess.run(["tar", "-czf", str(tmp_path / "t.tgz"), "-C", str(tree), "."],
                       check=True)
        calls = (f"mkdir -p $STATE_DIR\ntar -xOf {tmp_path}/t.tgz --wildcards --no-anchored "
                 "'etc/disco/settings.py' >$INSTALLED_SETTINGS\n")
    else:  # apt and the AMI leave their file where Disco reads it
        settings.parent.mkdir(parents=True)
        settings.write_text(INSTALLED)
        calls = ""
    result = settings_harness(tmp_path, cfg, "master", calls + "write_disco_settings master\n"
                              "write_disco_settings master\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "changed\n"  # the second write finds the file as it wants it
    values = read_settings(settings)
    assert values["DISCO_HOME"] == "/opt/disco"  # the install's (issue 8: dropped before)
    assert values["DISCO_FLAGS"] == ""
    assert values["DISCO_WWW_ROOT"] == "/mine/www"  # the user's DISCO_SETTINGS win
    assert (values["DISCO_ROOT"], values["DDFS_BLOB_REPLICAS"]) == ("/srv/disco", 3)
    assert values["DISCO_MASTER_HOST"] == subprocess.run(
        ["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    assert "DISCO_COMPUTED" not in values and "not a plain value" in result.stderr
    assert settings.read_text().startswith("# Written by disposabledisco")
    assert (tmp_path / "state/settings.sha256").read_text().split() == [
        hashlib.sha256(settings.read_bytes()).hexdigest()]


@pytest.mark.skipif(os.geteuid() != 0, reason="writes files as root:root, like a node does")
def test_without_an_installed_file_disco_gets_its_make_install_paths(tmp_path: Path) -> None:
    result = settings_harness(tmp_path, config(), "slave", "write_disco_settings slave\n")
    assert result.returncode == 0, result.stderr
    values = read_settings(tmp_path / "etc/disco/settings.py")
    assert (values["DISCO_HOME"], values["DISCO_WWW_ROOT"]) == (
        "/usr/lib/disco", "/usr/share/disco/master/www")
    assert "DISCO_MASTER_HOST" not in values  # slaves learn the master from Disco itself


@pytest.mark.skipif(os.geteuid() != 0, reason="writes files as root:root, like a node does")
def test_a_drifted_file_of_ours_is_rewritten_and_never_taken_for_the_installs(
        tmp_path: Path) -> None:
    first = settings_harness(tmp_path, config(), "slave", "write_disco_settings slave\n")
    assert first.returncode == 0, first.stderr
    settings = tmp_path / "etc/disco/settings.py"
    settings.write_text(settings.read_text().replace("'/srv/disco'", "'/elsewhere'"))
    again = settings_harness(tmp_path, config(), "slave", "write_disco_settings slave\n")
    assert again.stdout == "changed\n"
    assert read_settings(settings)["DISCO_ROOT"] == "/srv/disco"
    assert not (tmp_path / "state/installed-settings.py").exists()


# -- source mode: the build step's failure is the config's, naming the step -------------------

def source_harness(tmp_path: Path, cfg: Config, calls: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = bootstrap.render(cfg, "master").replace('main "$@" </dev/null', "")
    paths = (f"STATE_DIR={tmp_path}/state\nSTAGED_SOURCE=$STATE_DIR/disco-source.tar.gz\n"
             f"STAGED_TARBALL=$STATE_DIR/disco.tar\nBUILD_DIR=$STATE_DIR/build\n"
             "mkdir -p $STATE_DIR\nunpack_tarball() { echo \"unpacked $1\"; }\n")
    return bash(script + paths + calls, env={"PATH": os.environ["PATH"], **(env or {})})


def test_a_failed_build_exits_78_naming_the_step_with_the_log_tail(tmp_path: Path) -> None:
    bundle = tmp_path / "src.tgz"
    bundle.write_bytes(b"bundle")
    fake_build = ("echo 'disco build: step compile' >&2\necho 'src/x.erl:3: syntax error' >&2\n"
                  "echo 'disco build: FAILED: step compile' >&2\nexit 1\n")
    cfg = unchecked(**SOURCE, DISCO_SOURCE=str(bundle))
    stage = f"cp {bundle} $STAGED_SOURCE\nDISCO_BUILD_SH={shlex.quote(fake_build)}\n"
    result = source_harness(tmp_path, cfg, stage + "build_disco_from_source\n")
    assert result.returncode == 78, result.stderr  # EXIT_CONFIG: the master is kept
    assert "src/x.erl:3: syntax error" in result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        "at step compile (its log tail is above): fix the source bundle in DISCO_SOURCE")
    assert "unpacked" not in result.stdout


def test_a_built_bundle_is_not_built_again(tmp_path: Path) -> None:
    bundle = tmp_path / "src.tgz"
    bundle.write_bytes(b"bundle")
    sha = hashlib.sha256(b"bundle").hexdigest()
    counter = tmp_path / "builds"
    fake_build = (f"echo built >>{counter}\nprintf tree >\"$3/disco-installed-$2.tar.gz\"\n"
                  "echo 'disco build: built it' >&2\n")
    cfg = unchecked(**SOURCE, DISCO_SOURCE=str(bundle))
    stage = f"cp {bundle} $STAGED_SOURCE\nDISCO_BUILD_SH={shlex.quote(fake_build)}\n"
    result = source_harness(tmp_path, cfg, stage + "build_disco_from_source\n"
                            "build_disco_from_source\n")
    assert result.returncode == 0, result.stderr
    assert counter.read_text() == "built\n"
    assert result.stdout == f"unpacked {tmp_path}/state/disco.tar\n" * 2
    assert (tmp_path / "state/disco.tar").read_text() == "tree"
    assert "Disco already built from the source bundle " + sha in result.stderr


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="needs curl and openssl")
def test_a_downloaded_bundle_with_another_sha256_is_the_configs_fault(tmp_path: Path,
                                                                     tls_server) -> None:
    port, cert, _, sha = tls_server
    url, wrong = f"https://127.0.0.1:{port}/file", "0" * 64
    cfg = unchecked(**SOURCE, DISCO_SOURCE=url, DISCO_SOURCE_SHA256=wrong)
    result = source_harness(tmp_path, cfg, "fetch_disco_source\n",
                            {"CURL_CA_BUNDLE": str(cert)})
    assert result.returncode == 78, result.stderr
    assert f"{url} has sha256 {sha}, DISCO_SOURCE_SHA256 says {wrong}" in result.stderr
    assert not list((tmp_path / "state").glob("disco-source*"))
    good = source_harness(tmp_path, unchecked(**SOURCE, DISCO_SOURCE=url,
                                              DISCO_SOURCE_SHA256=sha),
                          "fetch_disco_source\nfetch_disco_source\n",
                          {"CURL_CA_BUNDLE": str(cert)})
    assert good.returncode == 0, good.stderr
    assert good.stderr.count("already here") == 1  # downloaded once per URL


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_master_that_cannot_assemble_the_bundle_names_the_repository(tmp_path: Path) -> None:
    """DISCO_SOURCE null: the shipped disco_source.py runs on the master; a base URL without
    the pinned repositories is the config's fault, naming the first one it could not get."""
    base = f"file://{tmp_path}/mirror"
    result = source_harness(tmp_path, config(**SOURCE, DISCO_SOURCE_BASE_URL=base),
                            "fetch_disco_source\n")
    assert result.returncode == 78, result.stderr
    first = bootstrap.disco_source.PINS[0]
    assert f"disco bundle: {base}/{first.repo} at {first.commit}: git fetch failed" in \
        result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        "(with DISCO_SOURCE null the master fetches from DISCO_SOURCE_BASE_URL: allow it "
        "outbound https, or set DISCO_SOURCE to a bundle file)")
    assert not list((tmp_path / "state").glob("*source*"))
