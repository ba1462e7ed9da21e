"""The W3C Trace Context fields, as `source_meta`, headers and message properties name
them: what carries a trace from one place to the next."""

FIELDS = ("traceparent", "tracestate")
