"""Settings of the test project, from the environment the test gives each process:

- ``TEST_DB``: ``sqlite:<file>`` or ``postgres:<host>:<port>:<name>:<user>``;
- ``TEST_OTHER_DB``: a second SQLite file (database ``other``, for transactions on two databases);
- ``TEST_REDIS``, ``TEST_PREFIX``: the suite's own redis-server and a key prefix of the test's;
- ``TEST_PYFIQ``: JSON merged over the ``PYFIQ`` dict below (``{"EMBEDDED_WORKER": true}``...);
- ``TEST_LOG``: pyfiq's log records on stderr.
"""

import json
import os

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "djsite.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "pyfiq.contrib.django", "shop"]
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _database(spec: str) -> dict[str, object]:
    kind, _, rest = spec.partition(":")
    if kind == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": rest, "OPTIONS": {"timeout": 10}}
    host, port, name, user = rest.split(":")
    return {"ENGINE": "django.db.backends.postgresql", "HOST": host, "PORT": port, "NAME": name, "USER": user}


DATABASES = {"default": _database(os.environ["TEST_DB"])}
if os.environ.get("TEST_OTHER_DB"):
    DATABASES["other"] = _database(f"sqlite:{os.environ['TEST_OTHER_DB']}")

PYFIQ = {
    "URL": os.environ["TEST_REDIS"],
    "PREFIX": os.environ["TEST_PREFIX"],
    "SHARDS": 4,
    "LEASE_TTL": 1.5,
    "POLL_INTERVAL": 0.2,
    "ENQUEUE_TIMEOUT": 2.0,
    "QUEUES": ["orders"],
    "CONCURRENCY": 2,
    "STOP_TIMEOUT": 5,
    **json.loads(os.environ.get("TEST_PYFIQ", "{}")),
}

if os.environ.get("TEST_LOG"):
    # pyfiq's records on stderr, for a test that reads them (pyfiq itself configures no logging).
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"class": "logging.StreamHandler"}},
        "loggers": {"pyfiq": {"handlers": ["stderr"], "level": "INFO"}},
    }
