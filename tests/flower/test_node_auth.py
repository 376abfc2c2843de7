"""Customers bound to authenticated SuperNodes: a real SuperLink with TLS (a self-signed CA made here with
`cryptography`) and SuperNode authentication; three nodes registered with `flwr supernode register`, a third
that is not. The run's customers are the registered identities; the unregistered node gets nothing."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securemark.flower.processes import BIN, Processes, flower_env, free_port, wait_for_port

from .test_deployment import ROOT, flwr_run, traced

PEM, NONE = serialization.Encoding.PEM, serialization.NoEncryption()


def _cert(subject: str, key, issuer_key, issuer: str, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, as PEM files."""
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(_cert("securemark test CA", ca_key, ca_key, "securemark test CA", True).public_bytes(PEM))
    files["cert"].write_bytes(_cert("127.0.0.1", key, ca_key, "securemark test CA", False).public_bytes(PEM))
    files["key"].write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, NONE))
    return files


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what flower-supernode and `flwr supernode register` read)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, NONE))
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def test_customers_are_registered_nodes_and_an_unregistered_node_gets_nothing(tmp_path, capsys):
    keys_dir, home = tmp_path / "keys", tmp_path / "flwr-home"
    keys_dir.mkdir()
    home.mkdir()
    tls = make_tls(keys_dir)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "auth"\n\n[superlink.auth]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tls["ca"]}"\n'
    )
    procs = Processes(flower_env(home), tmp_path, tmp_path / "logs")
    nodes = {name: make_node_key(keys_dir, name) for name in ("alice", "bob", "carol", "mallory")}
    try:
        procs.start(
            "superlink", "flower-superlink", "--port", str(port), "--enable-supernode-auth",
            "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
        )  # fmt: skip
        wait_for_port(port, 60)
        for name in ("alice", "bob", "carol"):  # mallory is never registered
            extra = [] if name == "bob" else ["--name", name]  # bob: identified by its key's digest
            reg = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(nodes[name][1]), *extra],
                env=procs.env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for i, name in enumerate(("alice", "bob", "carol", "mallory")):
            procs.start(
                f"supernode-{name}", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(tls["ca"]), "--auth-supernode-private-key", str(nodes[name][0]),
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=4",
            )  # fmt: skip
        out = tmp_path / "run"
        overrides = (
            f'output="{out}" data.name="digits" train.rounds=1 train.clients=3 train.per_round=3 '
            'fingerprint.identity="node" fingerprint.length=256 fingerprint.max_colluders=2 fingerprint.eval_copies=1'
        )
        done = flwr_run(procs, ROOT, overrides)
    finally:
        procs.stop()
    assert (out / "metrics.json").is_file(), done.stdout + done.stderr
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rounds[0]["status"] == "completed" and rounds[0]["survived"] == 3, done.stdout
    customers = sorted(p.stem for p in (out / "customers").iterdir())
    # each customer is its key: a registered name, then the key's digest (a digest alone without a name)
    assert [c.split("-")[0] for c in customers] == ["alice", "carol", "node"] and len(customers) == 3
    for name in customers:
        assert traced(out / "registry", out / "customers" / f"{name}.safetensors", capsys) == [name]
    link_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log  # mallory is turned away at activation
    assert link_log.count("[Fleet.ActivateNode] Activated") == 3
    assert "Connection attempt failed" in (tmp_path / "logs" / "supernode-mallory.log").read_text()
