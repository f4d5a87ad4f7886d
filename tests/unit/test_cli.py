"""The `stepcache` command as a user runs it: a subprocess, its stdout, stderr and exit status."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import yaml

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "keys"
POD = FIXTURES / "pod.yaml"


def stepcache(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPCACHE_")}
    return subprocess.run(
        [sys.executable, "-m", "stepcache", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def test_key_prints_the_same_64_hex_line_twice() -> None:
    first = stepcache("key", str(POD))
    second = stepcache("key", str(POD))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    line = first.stdout.strip()
    assert len(line) == 64
    assert int(line, 16) >= 0
    assert first.stdout.count("\n") == 1


def test_key_reads_an_admission_review_in_json_from_stdin() -> None:
    pod = yaml.safe_load(POD.read_text())
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "u1", "operation": "CREATE", "namespace": "ml", "object": pod},
    }
    from_stdin = stepcache("key", "-", stdin=json.dumps(review))
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == stepcache("key", str(POD)).stdout


def test_key_namespace_option_changes_the_key() -> None:
    assert stepcache("key", str(POD), "--namespace", "other").stdout != stepcache("key", str(POD)).stdout


def test_key_material_is_canonical_json() -> None:
    result = stepcache("key", str(POD), "--material")
    material = json.loads(result.stdout)
    assert material["scheme"] == "stepcache/v2"
    assert material["scope"] == "ml"
    assert material["configMapContent"] == "unresolved"
    assert material["containers"][0]["envFrom"] == [{"configMapRef": {"name": "train-env"}}]
    assert result.stdout.strip() == json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_explain_names_the_differing_field(tmp_path: pathlib.Path) -> None:
    pod = yaml.safe_load(POD.read_text())
    pod["spec"]["containers"][0]["image"] = "registry.example.com/ml/train:v2"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(pod))
    result = stepcache("explain", str(POD), str(other))
    assert result.returncode == 1
    assert "containers[0].image" in result.stdout


def test_explain_exits_0_for_pods_that_share_a_key(tmp_path: pathlib.Path) -> None:
    pod = yaml.safe_load(POD.read_text())
    pod["metadata"]["name"] = "train-other"
    pod["metadata"]["uid"] = "another-uid"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(pod))
    result = stepcache("explain", str(POD), str(other))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("same key ")


def test_a_file_that_is_not_a_pod_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("kind: Job\napiVersion: batch/v1\n")
    result = stepcache("key", str(job))
    assert result.returncode == 2
    assert result.stderr.endswith(": kind: holds a 'Job', not a Pod or an AdmissionReview\n")
    missing = stepcache("key", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_run_refuses_a_bad_setting_naming_it() -> None:
    result = stepcache(
        "run", env={"STEPCACHE_DATABASE_URL": "postgresql://x@127.0.0.1/x", "STEPCACHE_DB_TIMEOUT_MS": "fast"}
    )
    assert result.returncode == 2
    assert "STEPCACHE_DB_TIMEOUT_MS" in result.stderr
    assert "'fast' is not an integer" in result.stderr


def test_run_refuses_a_signing_key_shorter_than_32_bytes(tmp_path: pathlib.Path) -> None:
    short = tmp_path / "key"
    short.write_bytes(b"x" * 31)
    result = stepcache(
        "run", env={"STEPCACHE_DATABASE_URL": "postgresql://x@127.0.0.1/x", "STEPCACHE_SIGNING_KEY_FILE": str(short)}
    )
    assert result.returncode == 2
    assert "STEPCACHE_SIGNING_KEY_FILE" in result.stderr
    assert "31 bytes; at least 32 are needed" in result.stderr


def test_run_without_a_database_url_says_it_is_required() -> None:
    result = stepcache("run")
    assert result.returncode == 2
    assert "STEPCACHE_DATABASE_URL: is required" in result.stderr


def test_certs_writes_a_ca_and_a_serving_certificate_for_the_names(tmp_path: pathlib.Path) -> None:
    from cryptography import x509

    result = stepcache("certs", "--dir", str(tmp_path), "--dns", "stepcache.stepcache-system.svc", "--ip", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    serving = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert serving.issuer == ca.subject
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "stepcache.stepcache-system.svc" in sans.get_values_for_type(x509.DNSName)
    assert oct((tmp_path / "tls.key").stat().st_mode & 0o777) == "0o600"


def test_purge_without_a_selection_refuses_and_names_the_choices() -> None:
    result = stepcache("purge", env={"STEPCACHE_DATABASE_URL": "postgresql://127.0.0.1:1/none"})
    assert result.returncode == 2
    assert "say what to purge: --older-than DURATION, --unused-for DURATION, or --all" in result.stderr


def test_purge_refuses_all_together_with_an_age() -> None:
    result = stepcache("purge", "--all", "--older-than", "P7D", env={"STEPCACHE_DATABASE_URL": "postgresql://x"})
    assert result.returncode == 2
    assert "--all deletes every entry" in result.stderr


def test_purge_refuses_a_duration_that_is_not_iso_8601() -> None:
    result = stepcache("purge", "--unused-for", "a week", env={"STEPCACHE_DATABASE_URL": "postgresql://x"})
    assert result.returncode == 2
    assert "--unused-for 'a week'" in result.stderr


def test_stats_without_a_database_exits_1_and_says_so() -> None:
    result = stepcache("stats", env={"STEPCACHE_DATABASE_URL": "postgresql://stepcache@127.0.0.1:1/none"})
    assert result.returncode == 1
    assert result.stderr.startswith("stepcache: database unavailable: ")
