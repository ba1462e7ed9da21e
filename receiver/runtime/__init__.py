"""The process: the service and its sources assembled from the config (`assemble`), run
until SIGTERM (`runner`), SIGHUP reloads (`reload`), `serve --workers N`'s supervisor and
workers, systemd's notify protocol."""
