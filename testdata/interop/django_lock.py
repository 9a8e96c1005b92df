"""Hold a django-pglocks advisory lock for the pglocks interop tests.

usage: django_lock.py NAME wait|nowait
Connects with PGHOST, PGPORT, PGUSER and PGDATABASE; prints "acquired" or
"not acquired", then holds the lock until standard input closes.
"""
import os
import sys

import django
from django.conf import settings

settings.configure(DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": os.environ["PGHOST"],
    "PORT": os.environ["PGPORT"],
    "USER": os.environ["PGUSER"],
    "NAME": os.environ["PGDATABASE"],
}})
django.setup()

from django_pglocks import advisory_lock  # noqa: E402

name, mode = sys.argv[1], sys.argv[2]
with advisory_lock(name, wait=(mode == "wait")) as acquired:
    print("acquired" if acquired else "not acquired", flush=True)
    sys.stdin.read()
