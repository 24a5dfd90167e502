"""``manage.py pyfiq_worker``."""
