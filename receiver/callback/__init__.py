"""One callback's bytes become Events: decode (sniff XML or JSON, refuse what is hostile,
unwrap envelopes), then normalize (the document's shape -> `Event`s). Pure functions, no
I/O: every source and the public `receiver.parse_callback` go through them."""
