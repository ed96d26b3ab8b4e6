from pathlib import Path

import pytest

from adapter.core.config import AgentConfig, load_config
from adapter.core.errors import ConfigError
from adapter.runtimes.native.options import NativeOptions


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "containerizer.toml"
    path.write_text(text)
    return path


def test_no_file_gives_the_native_runtime() -> None:
    config = load_config(None)
    assert config == AgentConfig()
    assert config.default_runtime == "native"
    assert config.runtimes == {"native": NativeOptions()}


def test_full_config_is_typed(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            'version = 1\ndefault_runtime = "native"\nisolators = ["cgroups/cpu", "posix/mem"]\n'
            'cgroups_root = "ctz"\ncgroups_enable_cfs = true\nstate_dir = "/tmp/x"\n'
            'socket = "/tmp/x.sock"\nlisten = "127.0.0.1:7070"\ntermination_retention = 5\n'
            'tls_cert = "/etc/c/server.pem"\ntls_key = "/etc/c/server.key"\n'
            'tls_client_ca = "/etc/c/ca.pem"\n'
            '[runtimes.native]\nsupervisor = "/usr/bin/sup"\n',
        )
    )
    assert config.isolators == ("cgroups/cpu", "posix/mem")
    assert config.cgroups_enable_cfs is True
    assert config.state_dir == Path("/tmp/x")
    assert config.termination_retention == 5.0
    assert config.runtimes["native"] == NativeOptions(supervisor="/usr/bin/sup")
    assert config.listen == "127.0.0.1:7070"
    assert config.tls_client_ca == Path("/etc/c/ca.pem")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("colour = 1", "unknown key 'colour'"),
        ("version = 2", "version: expected the integer 1"),
        ('version = "1"', "version: expected the integer 1"),
        ("cgroups_enable_cfs = 1", "cgroups_enable_cfs: expected true or false"),
        ('isolators = ["cgroups/gpu"]', "isolators: expected a list of"),
        ('cgroups_root = "../etc"', "cgroups_root: expected a single cgroup directory name"),
        ('state_dir = "relative"', "state_dir: expected an absolute path"),
        ('listen = "nowhere"', "listen: expected HOST:PORT"),
        ('tls_cert = "server.pem"', "tls_cert: expected an absolute path"),
        ("termination_retention = true", "termination_retention: expected seconds"),
        ('default_runtime = "kvm"', "default_runtime: expected one of"),
        ("[runtimes.warp]", "runtimes.warp: unknown runtime"),
        ("[runtimes.native]\nspeed = 1", "runtimes.native.speed: unknown key"),
        ('[runtimes.native]\nnamespaces = "yes"', "runtimes.native.namespaces: expected bool"),
        ("[runtimes]\nnative = 1", "runtimes.native: expected a table"),
        ('[runtimes.containerd]\nnamespace = "a b"', "runtimes.containerd.namespace: expected a"),
        ('[runtimes.lxc]\nnetwork = "veth"', "runtimes.lxc.network_link: required with"),
        ("[runtimes.libvirt]\nmemory_mib = true", "runtimes.libvirt.memory_mib: expected int"),
        ("[runtimes.libvirt]\nmemory_mib = 8", "runtimes.libvirt.memory_mib: at least 64"),
        ('[runtimes.docker]\nendpoint = "/run/d.sock"', "runtimes.docker.endpoint: expected unix"),
        ("version = ", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert fragment in str(error.value)
    assert str(path) in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "config").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(example: Path) -> None:
    config = load_config(example)
    assert config.default_runtime in config.runtimes


@pytest.mark.parametrize(
    ("tls", "missing"),
    [
        ("", "tls_cert, tls_key, tls_client_ca"),
        ('tls_cert = "/c.pem"\ntls_key = "/c.key"\n', "tls_client_ca"),
    ],
)
def test_listen_without_client_certificates_is_refused(
    tmp_path: Path, tls: str, missing: str
) -> None:
    """The API launches root containers: a TCP listener without mutual TLS is never started."""
    path = write(tmp_path, f'version = 1\nlisten = "127.0.0.1:7070"\n{tls}')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "listen: a TCP listener needs mutual TLS" in str(error.value)
    assert f"missing: {missing}" in str(error.value)
