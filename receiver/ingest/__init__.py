"""The one way into the inbox that every source shares: decode and normalize a callback,
route each event to its handlers, commit (refusals kept within a budget)."""
