"""Work beside the flow, on a timer: retention (pruning what is handled and old), the
backlog gauges, and which processes run on an inbox."""
