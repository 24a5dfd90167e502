"""The test project's manage.py: the Django side of tests/contrib/test_django.py runs here, in
processes of its own, so that Django's settings never reach the rest of the suite."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
