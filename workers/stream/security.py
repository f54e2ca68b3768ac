"""Kafka connection security (SSL, SASL) from the KAFKA_* settings.

One place turns the settings into what the two client libraries want: keyword
arguments for plain aiokafka clients (commands, admin, replay) and credentials
for Faust apps (the workers). PostgreSQL needs nothing here: TLS options are
part of DATABASE_URL (`?sslmode=verify-full&sslrootcert=...`) and reach libpq
as they are.
"""

from __future__ import annotations

import ssl
from typing import Any

import faust
from aiokafka.helpers import create_ssl_context
from faust.types.auth import CredentialsT

from workers.config import ConfigurationError, Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of every Kafka client; a file OpenSSL refuses (not PEM, a key
    that does not match its certificate) is named by its variable, not a traceback."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    cafile = settings.kafka_ssl_cafile or None
    try:
        context = create_ssl_context(cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"KAFKA_SSL_CAFILE={cafile}: not a PEM file of certificate authorities ({exc})"
        ) from None
    if settings.kafka_ssl_certfile:
        try:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"KAFKA_SSL_CERTFILE={settings.kafka_ssl_certfile} and KAFKA_SSL_KEYFILE="
                f"{settings.kafka_ssl_keyfile}: not a PEM certificate and its private key "
                f"({exc})"
            ) from None
    return context


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and the admin client."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        }
    return options


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """The same settings as Faust's `broker_credentials`."""
    context = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
