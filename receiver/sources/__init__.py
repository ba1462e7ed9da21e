"""Where callbacks come from: each source turns deliveries into receipts for ingest.

- `http`: CI's CallBack URL (and a TDMQ-CMQ topic's HTTP push);
- `tdmq`: TDMQ for Pulsar topics, and relay mode;
- `reconcile`: finished jobs CI's job API lists whose callback never came.
"""
