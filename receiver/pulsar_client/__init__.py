"""Connecting to TDMQ for Pulsar, shared by the consumer and relay (receiver/sources/tdmq)
and the `pulsar` handler: the client and subscription made from a connection's options,
which failures are worth a retry, and the C++ library's own log brought into ours."""
