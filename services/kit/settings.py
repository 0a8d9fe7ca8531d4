"""Platform settings, read from ``ONECLUSTER_*`` environment variables.

One class serves every service. Each service gets its own database: an explicit
``ONECLUSTER_<SERVICE>_DATABASE_URL`` wins, then the shared ``ONECLUSTER_DATABASE_URL``
(PostgreSQL, one schema per service), then a SQLite file per service under the data dir.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("membership", "marketplace", "messaging", "metrics")
DEVELOPMENT_SECRET = "development-only-secret-change-me"


class Settings(BaseSettings):
    # Secrets may also come as files (a Kubernetes Secret mounted as a volume): a file
    # named like the variable (ONECLUSTER_SECRET_KEY, …) in ONECLUSTER_SECRETS_DIR.
    # An environment variable of the same name wins over the file.
    model_config = SettingsConfigDict(
        env_prefix="ONECLUSTER_",
        extra="ignore",
        secrets_dir=os.environ.get("ONECLUSTER_SECRETS_DIR") or None,
    )

    env: Literal["development", "test", "production"] = Field(
        "development", description="development and test relax transport and secret checks"
    )
    data_dir: Path = Field(Path("var"), description="where embedded mode keeps its SQLite files")
    database_url: str | None = Field(
        None, description="shared PostgreSQL URL; each service uses its own schema in it"
    )
    membership_database_url: str | None = None
    marketplace_database_url: str | None = None
    messaging_database_url: str | None = None
    metrics_database_url: str | None = None
    db_pool_size: int = Field(10, ge=1, le=200)
    redis_url: str | None = Field(
        None, description="Redis for streams, rate limits and deny-lists; in-process when unset"
    )
    redis_prefix: str = Field("oc", description="namespace of every Redis key and stream")
    redis_pool_size: int = Field(
        100, ge=4, le=10_000, description="Redis connections per process; more requests wait"
    )
    auto_migrate: bool = Field(True, description="migrate each service's database at start-up")

    public_url: str = Field(
        "http://127.0.0.1:8000", description="external base URL; the token issuer"
    )
    token_audience: str = "onecluster"
    access_token_ttl: int = Field(600, ge=30, le=86400, description="seconds")
    refresh_token_ttl: int = Field(30 * 86400, ge=300, description="seconds")
    authorization_code_ttl: int = Field(300, ge=30, le=600, description="seconds")
    signing_key_retention: int = Field(
        86400, ge=60, description="seconds a rotated-out key stays in the JWKS"
    )
    jwks_url: str | None = Field(
        None, description="where a service alone fetches the JWKS; in-process when unset"
    )
    secret_key: SecretStr = Field(
        SecretStr(DEVELOPMENT_SECRET), description="signs login-form CSRF tokens"
    )
    web_client_id: str = Field("onecluster-web", description="the first-party public client")
    web_redirect_uris: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/oauth/callback"],
        description="redirect URIs of the first-party web client",
    )

    rate_limit_per_minute: int = Field(1200, ge=1, description="API requests per principal")
    firm_rate_limit_per_minute: int = Field(6000, ge=1, description="API requests per firm")
    token_rate_limit_per_minute: int = Field(120, ge=1, description="token requests per client")
    login_rate_limit_per_minute: int = Field(20, ge=1, description="login attempts per email+IP")
    idempotency_ttl: int = Field(86400, ge=60, description="seconds an Idempotency-Key lives")
    outbox_poll_interval: float = Field(1.0, gt=0, description="seconds between relay polls")
    review_sweep_interval: float = Field(
        30.0, gt=0, description="seconds between sweeps that auto-accept submissions past review"
    )

    webhook_allow_private_addresses: bool = Field(
        False,
        description="let webhooks reach private, loopback and link-local addresses (and "
        "plain http); for development and tests only",
    )
    webhook_timeout: float = Field(10.0, gt=0, le=60, description="seconds per delivery attempt")
    webhook_max_attempts: int = Field(15, ge=1, le=50, description="attempts before failing")
    webhook_retry_base: float = Field(
        10.0, gt=0, description="seconds before the first retry; each next one waits 3x longer"
    )
    webhook_retry_max: float = Field(10800.0, gt=0, description="longest wait between retries")
    webhook_concurrency: int = Field(16, ge=1, le=256, description="HTTP calls in flight")
    webhook_poll_interval: float = Field(1.0, gt=0, description="seconds between due polls")
    webhook_delivery_enabled: bool = Field(
        True, description="run the webhook delivery worker in this process"
    )

    messaging_max_message_bytes: int = Field(
        16_384, ge=256, le=1_048_576, description="largest message text, UTF-8 bytes"
    )
    messaging_max_frame_bytes: int = Field(
        131_072, ge=1024, le=4_194_304, description="largest WebSocket frame a client may send"
    )
    messaging_send_queue: int = Field(
        256, ge=1, le=100_000, description="frames queued per socket before it counts as slow"
    )
    messaging_replay_limit: int = Field(
        1000, ge=1, description="most events replayed on subscribe; beyond: resync_required"
    )
    messaging_send_rate_per_minute: int = Field(
        120, ge=1, description="messages one user may send per minute (REST and WebSocket)"
    )
    messaging_auth_timeout: float = Field(
        10.0, gt=0, description="seconds a new socket has to send its auth frame"
    )
    messaging_sweep_interval: float = Field(
        2.0, gt=0, description="seconds between checks that catch notifications lost in transit"
    )
    messaging_send_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds one frame may wait to be written to a socket before its client "
        "counts as slow (closed with 4008)",
    )
    messaging_presence_ttl: float = Field(
        60.0,
        gt=0,
        description="seconds a socket's presence mark lasts; refreshed every third of it "
        "while the socket is open and on each client ping",
    )
    messaging_typing_interval: float = Field(
        2.0, ge=0, description="least seconds between typing frames per socket and channel"
    )

    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        if self.env != "development" and self.secret_key.get_secret_value() == DEVELOPMENT_SECRET:
            raise ValueError("ONECLUSTER_SECRET_KEY must be set outside development")
        if self.env == "production" and not self.public_url.startswith("https://"):
            raise ValueError("ONECLUSTER_PUBLIC_URL must be https outside development")
        return self

    @property
    def insecure_transport_allowed(self) -> bool:
        return self.env != "production"

    @cached_property
    def issuer(self) -> str:
        return self.public_url.rstrip("/")

    def database_url_for(self, service: str) -> str:
        """The database URL a service uses (see the module docstring for the order)."""
        explicit = getattr(self, f"{service}_database_url", None)
        if explicit:
            return str(explicit)
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / f'{service}.sqlite3').resolve()}"
