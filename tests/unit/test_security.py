"""Kafka SSL/SASL settings reach both client libraries; secrets never get printed."""

from __future__ import annotations

import ssl

import certifi
import faust
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from workers.cli import main
from workers.config import ConfigurationError, Settings
from workers.stream.security import aiokafka_options, faust_credentials


def test_plaintext_is_the_default_and_needs_no_credentials() -> None:
    settings = Settings()
    assert aiokafka_options(settings) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings) is None


def test_sasl_over_ssl_passes_mechanism_user_password_and_trusted_authorities() -> None:
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="router",
        kafka_sasl_password="s3cret",  # type: ignore[arg-type]
        kafka_ssl_cafile=certifi.where(),
    )
    options = aiokafka_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == (
        "SCRAM-SHA-512",
        "router",
    )
    assert options["sasl_plain_password"] == "s3cret"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0  # the CA file was loaded

    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("router", "s3cret")


def test_ssl_alone_gives_faust_ssl_credentials() -> None:
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=certifi.where())
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SSLCredentials)
    assert aiokafka_options(settings)["security_protocol"] == "SSL"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "needs KAFKA_SASL_USERNAME"),
        ({"kafka_ssl_certfile": "/tmp/cert.pem"}, "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"),
        ({"kafka_security_protocol": "SASL_TLS"}, "kafka_security_protocol"),
    ],
)
def test_incomplete_security_settings_fail_at_start(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


def test_the_config_command_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "OPENAI_API_KEY": "sk-live-abcdef",
        "JUDGE_API_KEY": "sk-judge-778899",
        "KAFKA_SASL_PASSWORD": "kafka-pass-123",
        "DATABASE_URL": "postgresql+psycopg://router:db-pass-456@db.internal/omnirouter"
        "?password=db-pass-789&sslmode=require",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "router")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0, result.output
    leaks = ("sk-live-abcdef", "sk-judge-778899", "kafka-pass-123", "db-pass-456", "db-pass-789")
    for leaked in leaks:
        assert leaked not in result.output
    assert "router:***@db.internal" in result.output  # the rest of the URL stays readable
    assert "sslmode=require" in result.output


def test_ssl_files_are_checked_at_start_and_named(tmp_path: pytest.TempPathFactory) -> None:
    """A missing file fails with its variable when the settings load; a file that is
    there but not PEM fails with its variable when the TLS context is made."""
    with pytest.raises(ValidationError, match="KAFKA_SSL_CAFILE=/nonexistent: no such readable"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_cafile="/nonexistent")
    Settings(kafka_ssl_cafile="/nonexistent")  # unused without SSL
    garbage = tmp_path / "ca.pem"  # type: ignore[operator]
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=f"KAFKA_SSL_CAFILE={garbage}: not a PEM"):
        aiokafka_options(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(garbage)))
    settings = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_certfile=str(garbage),
        kafka_ssl_keyfile=str(garbage),
    )
    with pytest.raises(ConfigurationError, match=r"KAFKA_SSL_CERTFILE=.* and KAFKA_SSL_KEYFILE="):
        faust_credentials(settings)
