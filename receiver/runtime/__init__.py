"""The process: the service assembled from the config, run until SIGTERM with its sources,
SIGHUP reloads, `serve --workers N`'s supervisor and workers, systemd's notify protocol."""
