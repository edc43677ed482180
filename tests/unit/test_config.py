import pytest

from proxy.config import (
    Config,
    TCPMount,
    UnixMount,
    parse_instance_arg,
    parse_instance_uri,
    plan_mounts,
)
from proxy.errors import BadCommandError

URI = "projects/proj/locations/region/clusters/clust/instances/inst"


def test_uri_parts_and_short_name():
    uri = parse_instance_uri(URI)
    assert (uri.project, uri.region, uri.cluster, uri.instance) == (
        "proj",
        "region",
        "clust",
        "inst",
    )
    assert uri.short == "proj.region.clust.inst"
    assert uri.cluster_name == "projects/proj/locations/region/clusters/clust"


def test_domain_scoped_project_and_socket_dir():
    uri = parse_instance_uri("projects/google.com:Proj/locations/r/clusters/c/instances/I")
    assert uri.project == "google.com:Proj"
    assert uri.socket_dir_name == "google.com_proj.r.c.i"


def test_unanchored_like_go():
    assert parse_instance_uri("/" + URI).instance == "inst"


@pytest.mark.parametrize("bad", ["projects/proj/locations/region/clusters/clust/", "nope", ""])
def test_bad_uri_message(bad):
    with pytest.raises(BadCommandError) as err:
        parse_instance_uri(bad)
    assert str(err.value) == f'could not parse instance uri: "{bad}"'


def test_query_params():
    cfg = parse_instance_arg(URI + "?address=0.0.0.0&port=6000&public-ip=true&psc&auto-iam-authn=f")
    assert cfg.address == "0.0.0.0" and cfg.port == 6000
    assert cfg.public_ip is True and cfg.psc is True and cfg.auto_iam_authn is False


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("address=bogus", 'address query param is not a valid IP address: "bogus"'),
        ("address=", 'address query param is not a valid IP address: ""'),
        ("port=x", 'port query param is not a valid integer: "x"'),
        ("psc=maybe", 'psc query param should be true or false, got: "maybe"'),
        ("psc=t&psc=f", 'psc param should be only one value: ["t" "f"]'),
        (
            "address=1.2.3.4&unix-socket=/tmp",
            "cannot specify both address and unix-socket query params",
        ),
        ("port=1&unix-socket=/tmp", "cannot specify both port and unix-socket query params"),
        (
            "address=1.2.3.4&unix-socket-path=/tmp/x",
            "cannot specify both address and unix-socket-path query params",
        ),
        (
            "port=1&unix-socket-path=/tmp/x",
            "cannot specify both port and unix-socket-path query params",
        ),
        (
            "unix-socket=/a&unix-socket-path=/b",
            "cannot specify both unix-socket-path and unix-socket query params",
        ),
        ("port=%zz", 'could not parse query: "port=%zz"'),
    ],
)
def test_query_errors(query, message):
    with pytest.raises(BadCommandError) as err:
        parse_instance_arg(f"{URI}?{query}")
    assert str(err.value) == message


def test_unknown_query_keys_are_ignored():
    assert parse_instance_arg(URI + "?bogus=1").address is None


def _config(*args, **kwargs):
    return Config(instances=tuple(parse_instance_arg(a) for a in args), **kwargs)


def test_ports_increment_and_explicit_port_does_not_consume():
    a, b, c = (URI[: -len("inst")] + n for n in "abc")
    plan = plan_mounts(_config(a, b + "?port=6000", c))
    assert [m for _, m in plan] == [
        TCPMount("127.0.0.1", 5432),
        TCPMount("127.0.0.1", 6000),
        TCPMount("127.0.0.1", 5433),
    ]
    plan = plan_mounts(_config(a, b, port=7000))
    assert [m.port for _, m in plan] == [7000, 7001]


def test_unix_socket_layout():
    plan = plan_mounts(_config(URI, unix_socket="/tmp/s"))
    assert plan[0][1] == UnixMount(
        "/tmp/s/proj.region.clust.inst", "/tmp/s/proj.region.clust.inst/.s.PGSQL.5432"
    )
    plan = plan_mounts(_config(URI + "?unix-socket-path=/tmp/x/.s.PGSQL.5432"))
    assert plan[0][1] == UnixMount("/tmp/x", "/tmp/x/.s.PGSQL.5432")
    # address or port on the instance forces TCP even with a global unix socket
    plan = plan_mounts(_config(URI + "?port=7000", unix_socket="/tmp/s"))
    assert plan[0][1] == TCPMount("127.0.0.1", 7000)


def test_ip_type_and_auto_iam():
    cfg = _config(URI, URI + "?public-ip", URI + "?psc&public-ip", public_ip=False)
    assert [cfg.ip_type_for(i) for i in cfg.instances] == ["PRIVATE", "PUBLIC", "PSC"]
    cfg = _config(URI, URI + "?public-ip=false", public_ip=True)
    assert [cfg.ip_type_for(i) for i in cfg.instances] == ["PUBLIC", "PRIVATE"]
    cfg = _config(URI, URI + "?auto-iam-authn=true")
    assert all(cfg.auto_iam_for(i) for i in cfg.instances)  # Go: effectively global
