"""Where callbacks come from: each source turns deliveries into receipts for ingest, and
runs as a `Source` (`source`) until the process stops.

- `http`: CI's CallBack URL (and a TDMQ-CMQ topic's HTTP push), served by `http_source`
  on the bounded server of `http_server`;
- `cmq`: TDMQ for CMQ queues CI delivers to;
- `tdmq`: TDMQ for Pulsar topics, and relay mode;
- `reconcile`: finished jobs CI's job API lists whose callback never came.
"""
