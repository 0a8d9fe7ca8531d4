"""Settings: production refuses placeholders; each service finds its database URL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.kit.settings import DEVELOPMENT_SECRET, SERVICES, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: nothing from the machine's ONECLUSTER_* variables."""
    for name in list(os.environ):
        if name.startswith("ONECLUSTER_"):
            monkeypatch.delenv(name)


def test_production_refuses_the_placeholder_secret() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(env="production", public_url="https://cluster.example")
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(
            env="production", public_url="https://cluster.example", secret_key=DEVELOPMENT_SECRET
        )


@pytest.mark.parametrize("url", ["http://cluster.example", "cluster.example", "ftp://x"])
def test_production_refuses_a_public_url_that_is_not_https(url: str) -> None:
    with pytest.raises(ValidationError, match="PUBLIC_URL"):
        Settings(env="production", public_url=url, secret_key="a-real-secret-of-some-length")


def test_production_with_real_values_is_accepted() -> None:
    settings = Settings(
        env="production", public_url="https://cluster.example/", secret_key="s3cret-from-vault"
    )
    assert settings.issuer == "https://cluster.example"
    assert not settings.insecure_transport_allowed


def test_production_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECLUSTER_ENV", "production")
    monkeypatch.setenv("ONECLUSTER_PUBLIC_URL", "https://cluster.example")
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings()
    monkeypatch.setenv("ONECLUSTER_SECRET_KEY", "from-the-environment")
    assert Settings().secret_key.get_secret_value() == "from-the-environment"


def test_development_allows_the_defaults() -> None:
    settings = Settings(env="development")
    assert settings.insecure_transport_allowed
    assert settings.secret_key.get_secret_value() == DEVELOPMENT_SECRET


def test_test_env_needs_its_own_secret_but_allows_http() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(env="test")
    settings = Settings(env="test", secret_key="per-run-secret", public_url="http://testserver")
    assert settings.insecure_transport_allowed


def test_database_url_precedence(tmp_path: Path) -> None:
    shared = "postgresql://app@db:5432/onecluster"
    own = "postgresql://membership@db-m:5432/membership"
    settings = Settings(
        data_dir=tmp_path / "data", database_url=shared, membership_database_url=own
    )
    assert settings.database_url_for("membership") == own  # the service's own URL first
    assert settings.database_url_for("marketplace") == shared  # then the shared one
    embedded = Settings(data_dir=tmp_path / "data")
    for service in SERVICES:
        url = embedded.database_url_for(service)
        assert url == f"sqlite:///{(tmp_path / 'data' / f'{service}.sqlite3').resolve()}"
    assert len({embedded.database_url_for(s) for s in SERVICES}) == len(SERVICES)


def test_embedded_sqlite_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = Settings(data_dir=Path("var")).database_url_for("metrics")
    path = Path(url.removeprefix("sqlite:///"))
    assert path.is_absolute() and path == tmp_path / "var" / "metrics.sqlite3"


def test_database_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECLUSTER_DATABASE_URL", "postgresql://shared@db/oc")
    monkeypatch.setenv("ONECLUSTER_MESSAGING_DATABASE_URL", "postgresql://msg@db2/msg")
    settings = Settings()
    assert settings.database_url_for("messaging") == "postgresql://msg@db2/msg"
    assert settings.database_url_for("metrics") == "postgresql://shared@db/oc"


def test_secrets_may_come_as_files_named_like_their_variables(tmp_path: Path) -> None:
    """A Kubernetes Secret mounted as files in ONECLUSTER_SECRETS_DIR; env still wins."""
    import subprocess
    import sys

    (tmp_path / "ONECLUSTER_SECRET_KEY").write_text("a-secret-from-a-mounted-file-0123456789")
    (tmp_path / "ONECLUSTER_DATABASE_URL").write_text("postgresql://file@db/onecluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONECLUSTER_")}
    env["ONECLUSTER_SECRETS_DIR"] = str(tmp_path)
    env["ONECLUSTER_DATABASE_URL"] = "postgresql://env@db/onecluster"
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "from services.kit.settings import Settings; s = Settings(); "
            "print(s.secret_key.get_secret_value()); print(s.database_url)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown == ["a-secret-from-a-mounted-file-0123456789", "postgresql://env@db/onecluster"]


def test_light_password_hashing_only_under_the_test_environment(tmp_path: Path) -> None:
    from argon2 import extract_parameters

    from services.membership import passwords

    secret = "s" * 40
    try:
        for env, memory in (("test", 1024), ("development", 65536), ("production", 65536)):
            extra = {"public_url": "https://x.example"} if env == "production" else {}
            passwords.configure(Settings(env=env, data_dir=tmp_path, secret_key=secret, **extra))
            hashed = passwords.hash_password("correct horse battery staple")
            assert extract_parameters(hashed).memory_cost == memory, env
            assert passwords.verify_password(hashed, "correct horse battery staple")
    finally:
        passwords.configure(Settings(env="test", data_dir=tmp_path, secret_key=secret))
