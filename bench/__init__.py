"""`ferry bench` (`make bench`): ferry measured against this machine's own limits."""
