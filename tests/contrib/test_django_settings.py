"""``settings.PYFIQ`` read by pyfiq.contrib.django (no Django project needed: nothing here
configures Django): unknown keys and bad values refused by name, as Django's and pyfiq's
configuration error at once, and no password in any repr or error."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from pyfiq import ConfigurationError, JSONSerializer, RedisQueueBackend
from pyfiq.contrib.django.conf import PyfiqImproperlyConfigured, read_settings

SECRET = "s3cret-pw"


def test_no_settings_means_every_default() -> None:
    conf = read_settings(None)
    assert conf.on_commit and not conf.embedded_worker and conf.autodiscover == "tasks"
    assert conf.settings.prefix == "pyfiq" and conf.concurrency == 4 and conf.queues is None


def test_every_settings_field_and_the_integrations_own_keys_are_taken() -> None:
    conf = read_settings(
        {
            "URL": "redis://cache:6380/2",
            "PREFIX": "shop",
            "SHARDS": 8,
            "LEASE_TTL": 3.0,
            "SERIALIZER": "pyfiq.serializers.JSONSerializer",
            "REDIS_OPTIONS": {"socket_timeout": 2},
            "ON_COMMIT": False,
            "EMBEDDED_WORKER": True,
            "CONCURRENCY": 2,
            "QUEUES": ["billing", "mail"],
            "STOP_TIMEOUT": 10,
            "AUTODISCOVER": None,
        }
    )
    assert (conf.settings.prefix, conf.settings.shards, conf.settings.lease_ttl) == ("shop", 8, 3.0)
    assert isinstance(conf.settings.serializer, JSONSerializer)
    assert conf.settings.redis_options == {"socket_timeout": 2}
    assert (conf.on_commit, conf.embedded_worker, conf.concurrency) == (False, True, 2)
    assert conf.queues == ("billing", "mail") and conf.stop_timeout == 10.0 and conf.autodiscover is None
    backend = conf.backend()
    assert isinstance(backend, RedisQueueBackend) and backend.address == "redis://cache:6380/2"


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"LEASE_TIME": 3}, ["'LEASE_TIME'", "did you mean 'LEASE_TTL'"]),
        ({"url": "redis://x"}, ["'url'", "did you mean 'URL'"]),
        ({"WORKERS": 2}, ["'WORKERS'", "the keys are URL"]),
        ({"LEASE_TTL": -1}, ["lease_ttl"]),
        ({"ON_COMMIT": "yes"}, ["ON_COMMIT must be True or False"]),
        ({"QUEUES": "billing"}, ["QUEUES must be a non-empty list"]),
        ({"QUEUES": ["bad queue"]}, ["QUEUES", "invalid queue name"]),
        ({"CONCURRENCY": 0}, ["CONCURRENCY"]),
        ({"SERIALIZER": "no.such.Serializer"}, ["SERIALIZER", "cannot import"]),
        ({"SENTINEL_SERVICE": "main"}, ["need SENTINELS"]),
        ({"CLUSTER": True, "SENTINELS": ["h:26379"]}, ["exclude each other"]),
        ([("URL", "redis://x")], ["must be a dict"]),
    ],
)
def test_a_key_or_value_that_cannot_work_is_refused_by_name(config: Any, names: list[str]) -> None:
    with pytest.raises(PyfiqImproperlyConfigured) as caught:
        read_settings(config)
    assert isinstance(caught.value, ImproperlyConfigured) and isinstance(caught.value, ConfigurationError)
    assert str(caught.value).startswith("settings.PYFIQ: ")
    for name in names:
        assert name in str(caught.value)


def test_no_password_shows_in_a_repr_or_an_error() -> None:
    url = f"redis://app:{SECRET}@cache:6379/0"
    conf = read_settings({"URL": url, "REDIS_OPTIONS": {"password": SECRET}})
    assert conf.url == url, "the value is the URL itself"
    for shown in (repr(conf), str(conf), repr(conf.url), repr(conf.settings), repr(conf.backend())):
        assert SECRET not in shown, shown
    sentinel = read_settings({"URL": url, "SENTINELS": ["s1:26379"], "SENTINEL_OPTIONS": {"password": SECRET}})
    assert SECRET not in repr(sentinel) and SECRET not in repr(sentinel.backend())
    for bad in ({"URL": url, "LEASE_TYME": 1}, {"URL": url, "REDIS_OPTIONS": f"password={SECRET}"}):
        with pytest.raises(PyfiqImproperlyConfigured) as caught:
            read_settings(bad)
        assert SECRET not in str(caught.value)
